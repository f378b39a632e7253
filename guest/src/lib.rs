//! osso-guest: builds and locates Osso Linux, the guest image: a minimal
//! kernel (from source, with a committed config fragment and two small patches)
//! plus a static Toybox initramfs written by our own cpio code.
//!
//! Knows nothing of KVM. The SDK calls [`default_image`] (which builds on first
//! use), or [`open_image_dir`] for a prebuilt image directory (no sources
//! needed: the manifest's sizes and sha256 checksums are checked); the
//! `osso-guest` binary offers `build` and `info` (`info --dir DIR` checks
//! and shows a prebuilt directory).
//!
//! Every artifact is cached under [`cache::cache_root`] by a hash of all its
//! inputs (source identities, the config fragments, the patches, the init
//! script, the builder's format version), so a build with nothing changed only
//! computes keys and reads a manifest.

pub mod cache;
pub mod cpio;
pub mod error;
pub mod image_dir;
pub mod initramfs;
pub mod kernel;
pub mod klog;
pub mod manifest;
pub mod qemu;
pub mod sources;
pub mod steps;
pub mod tools;
pub mod toybox;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use error::{Error, ImageDirError, Result};
pub use image_dir::{open_image_dir, IMAGE_DIR_ENV};
pub use manifest::Manifest;
pub use sources::SourceSpec;
pub use steps::ProgressMode;

/// Settings for building or finding an image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Cache root (default: `$OSSO_CACHE_DIR`, else `~/.cache/osso`).
    pub cache_root: PathBuf,
    /// Kernel source (default `debian`; `$OSSO_KERNEL_SOURCE`).
    pub kernel_source: SourceSpec,
    /// Toybox source (default `debian`; `$OSSO_TOYBOX_SOURCE`).
    pub toybox_source: SourceSpec,
    /// Install missing Debian packages when running as root on Debian.
    pub install_missing: bool,
    pub progress: ProgressMode,
    /// Parallel make jobs (default: the number of CPUs).
    pub jobs: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            cache_root: cache::cache_root(),
            kernel_source: SourceSpec::Debian,
            toybox_source: SourceSpec::Debian,
            install_missing: true,
            progress: ProgressMode::Bars,
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

impl BuildOptions {
    /// The defaults, with `OSSO_KERNEL_SOURCE` and `OSSO_TOYBOX_SOURCE` applied.
    pub fn from_env() -> Result<Self> {
        let mut o = BuildOptions::default();
        for (name, slot) in [
            ("OSSO_KERNEL_SOURCE", &mut o.kernel_source),
            ("OSSO_TOYBOX_SOURCE", &mut o.toybox_source),
        ] {
            if let Ok(value) = std::env::var(name) {
                *slot = value.parse().map_err(|reason| Error::Setting {
                    name: name.into(),
                    value,
                    reason,
                })?;
            }
        }
        Ok(o)
    }
}

/// A built image: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// True when the image came from the cache without building anything.
    pub reused: bool,
}

impl Image {
    /// The stripped ELF kernel, for PVH boot.
    pub fn vmlinux(&self) -> &Path {
        &self.manifest.vmlinux_path
    }
    /// The compressed kernel, for the Linux boot protocol.
    pub fn bzimage(&self) -> &Path {
        &self.manifest.bzimage_path
    }
    /// The gzip-compressed cpio initramfs.
    pub fn initramfs(&self) -> &Path {
        &self.manifest.initramfs_path
    }
}

/// The default image, built on first use (with progress on stderr), reused after.
pub fn default_image() -> Result<Image> {
    build(&BuildOptions::from_env()?)
}

/// The built image to use, without building anything: the directory that
/// `OSSO_IMAGE_DIR` names ([`IMAGE_DIR_ENV`], checked against its manifest by
/// [`open_image_dir`]) when it is set, otherwise the one [`find`] locates from
/// the sources' cache keys. What tests, benches and examples call, so that
/// they also run where only a built image was copied (layer 5's level 1).
pub fn find_built() -> Result<Image> {
    match std::env::var_os(IMAGE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => open_image_dir(dir),
        _ => find(&BuildOptions::from_env()?),
    }
}

/// The image `build` would produce or reuse, without building anything:
/// [`Error::NoImage`] when it has not been built. A `download` source that
/// has not been fetched counts as Debian's (what a build without the internet
/// falls back to).
pub fn find(opts: &BuildOptions) -> Result<Image> {
    find_with(opts, true)
}

fn find_with(opts: &BuildOptions, fallback: bool) -> Result<Image> {
    let root = &opts.cache_root;
    let no_image = || Error::NoImage(root.clone());
    let kernel_src = sources::offline(
        &opts.kernel_source,
        root,
        sources::Component::Kernel,
        fallback,
    )
    .ok_or_else(no_image)?;
    let toybox_src = sources::offline(
        &opts.toybox_source,
        root,
        sources::Component::Toybox,
        fallback,
    )
    .ok_or_else(no_image)?;
    let dir = image_dir(root, &inputs(&kernel_src, &toybox_src).keys().image);
    if !dir.join("manifest.json").exists() {
        return Err(no_image());
    }
    Ok(Image {
        manifest: Manifest::read(&dir)?,
        dir,
        reused: true,
    })
}

/// Builds the image, or reuses the cached one when no input changed.
pub fn build(opts: &BuildOptions) -> Result<Image> {
    let root = &opts.cache_root;
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    // Fast path: every input is already local and the image exists.
    if let Ok(image) = find_with(opts, false) {
        return Ok(image);
    }
    let started = Instant::now();
    let mode = opts.progress;
    tools::ensure(opts.install_missing, &root.join("logs/tools.log"), mode)?;
    let kernel_src = sources::kernel(&opts.kernel_source, root, opts.install_missing, mode)?;
    let toybox_src = sources::toybox(&opts.toybox_source, root, mode)?;
    let keys = inputs(&kernel_src, &toybox_src).keys();
    let key = keys.image.clone();
    let dir = image_dir(root, &key);
    if dir.join("manifest.json").exists() {
        return Ok(Image {
            manifest: Manifest::read(&dir)?,
            dir,
            reused: true,
        });
    }
    eprintln!("osso-guest: building image {key} in {}", dir.display());
    let k = kernel::build(&kernel_src, &keys, root, opts.jobs, mode)?;
    let t = toybox::build(&toybox_src, &keys.toybox, &k, root, mode)?;

    let staging = root
        .join("images")
        .join(format!(".{key}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = (|| -> Result<Manifest> {
        kernel::strip_vmlinux(
            &k.vmlinux,
            &staging.join("vmlinux"),
            &staging.join("strip.log"),
            mode,
        )?;
        let _ = fs::remove_file(staging.join("strip.log"));
        fs::copy(&k.bzimage, staging.join("bzImage")).map_err(|e| Error::io(&k.bzimage, e))?;
        let toybox_bin = fs::read(&t.binary).map_err(|e| Error::io(&t.binary, e))?;
        let cpio = initramfs::assemble(toybox_bin, &t.commands, initramfs::INIT)?.to_bytes()?;
        let gz = initramfs::gzip(&cpio)?;
        fs::write(staging.join("initramfs.cpio.gz"), &gz).map_err(|e| Error::io(&staging, e))?;
        let config = fs::read(&k.config).map_err(|e| Error::io(&k.config, e))?;
        fs::write(staging.join("kernel.config"), &config).map_err(|e| Error::io(&staging, e))?;
        let file_facts = |name: &str| -> Result<(PathBuf, u64, String)> {
            let p = staging.join(name);
            let len = fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
            let sum = cache::sha256_file(&p).map_err(|e| Error::io(&p, e))?;
            Ok((dir.join(name), len, sum))
        };
        let (vmlinux_path, vmlinux_bytes, vmlinux_sha256) = file_facts("vmlinux")?;
        let (bzimage_path, bzimage_bytes, bzimage_sha256) = file_facts("bzImage")?;
        let (initramfs_path, initramfs_bytes, initramfs_sha256) = file_facts("initramfs.cpio.gz")?;
        let manifest = Manifest {
            format: manifest::MANIFEST_FORMAT,
            key: key.clone(),
            kernel_version: k.version.clone(),
            kernel_source: kernel_src.description.clone(),
            toybox_version: t.version.clone(),
            toybox_source: toybox_src.description.clone(),
            toybox_commands: t.commands.clone(),
            vmlinux_path,
            vmlinux_bytes,
            vmlinux_sha256,
            vmlinux_unstripped_bytes: fs::metadata(&k.vmlinux)
                .map_err(|e| Error::io(&k.vmlinux, e))?
                .len(),
            bzimage_path,
            bzimage_bytes,
            bzimage_sha256,
            initramfs_path,
            initramfs_bytes,
            initramfs_sha256,
            initramfs_uncompressed_bytes: cpio.len() as u64,
            kernel_config_sha256: cache::sha256_bytes(&config),
            build_seconds: started.elapsed().as_secs_f64(),
        };
        // The manifest is written last: its presence marks a complete image.
        steps::write_atomic(
            &staging.join("manifest.json"),
            manifest.to_json().as_bytes(),
        )?;
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        fs::rename(&staging, &dir).map_err(|e| Error::io(&dir, e))?;
        Ok(manifest)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    Ok(Image {
        manifest: result?,
        dir,
        reused: false,
    })
}

/// Every input of the image built from these sources.
fn inputs<'a>(
    kernel_src: &'a sources::Resolved,
    toybox_src: &'a sources::Resolved,
) -> cache::Inputs<'a> {
    cache::Inputs {
        kernel_source: &kernel_src.identity,
        patches: kernel::PATCHES,
        kernel_fragment: kernel::FRAGMENT,
        toybox_source: &toybox_src.identity,
        toybox_fragment: toybox::FRAGMENT,
        init: initramfs::INIT,
        layout: initramfs::LAYOUT_VERSION,
    }
}

fn image_dir(root: &Path, key: &str) -> PathBuf {
    root.join("images").join(key)
}
