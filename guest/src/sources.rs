//! Where the kernel and Toybox sources come from, and how they are unpacked.
//!
//! Three kinds of source for each, chosen by a setting:
//! - `debian` (the default): Debian's `linux-source-6.12` package (installed by
//!   the builder when missing, if it runs as root on Debian) and Debian's
//!   `toybox` source package (its 0.8.9 orig tarball, fetched with `apt-get
//!   source --download-only` through a private sources list, so the system's
//!   apt configuration is left alone). Both work without the internet.
//! - `download`: the versions the seed used (Linux 6.18.1, Toybox 0.8.13) from
//!   their home sites, checked against pinned sha256 sums. The download fails
//!   fast (5 s connect timeout) and the builder falls back to `debian`, saying so.
//! - a path: a tarball (`.tar.xz`, `.tar.gz`) or an unpacked directory.
//!
//! Downloads use `curl` rather than an HTTP crate: this path is taken only on
//! machines with the internet, and a TLS stack in every build is not worth it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use crate::cache;
use crate::error::{Error, Result};
use crate::steps::{self, ProgressMode};

/// Debian's kernel source tarball.
pub const DEBIAN_KERNEL_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// The Debian package that installs it.
pub const DEBIAN_KERNEL_PACKAGE: &str = "linux-source-6.12";
/// Debian bookworm's Toybox orig tarball and its sha256 (from the package's .dsc).
pub const DEBIAN_TOYBOX_FILE: &str = "toybox_0.8.9+dfsg.orig.tar.xz";
pub const DEBIAN_TOYBOX_SHA256: &str =
    "16fb5967531e88ca33b8c9142376987617ebe52e34e2b3f3a779603674b7d07c";
/// The Debian archive line used for the Toybox source package.
pub const DEBIAN_SRC_LINE: &str = "deb-src http://deb.debian.org/debian bookworm main";

/// A pinned upstream download. The sums are the published ones for these
/// releases; they could not be re-checked from this project's offline machines.
pub struct Pinned {
    pub version: &'static str,
    pub url: &'static str,
    pub sha256: &'static str,
}

pub const KERNEL_DOWNLOAD: Pinned = Pinned {
    version: "6.18.1",
    url: "https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.18.1.tar.xz",
    sha256: "d0a78bf3f0d12aaa10af3b5adcaed5bc767b5b78705e5ef885d5e930b72e25d5",
};
pub const TOYBOX_DOWNLOAD: Pinned = Pinned {
    version: "0.8.13",
    url: "https://landley.net/toybox/downloads/toybox-0.8.13.tar.gz",
    sha256: "9d4c124d7d731a2db399f6278baa2b42c2e3511f610c6ad30cc3f1a52581334b",
};

/// Which source to use for one component.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceSpec {
    /// Debian's packages (works offline).
    #[default]
    Debian,
    /// The pinned upstream release, falling back to Debian when it cannot be had.
    Download,
    /// A tarball or directory the user names.
    Path(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "" => Err("empty source; use debian, download or a path".into()),
            "debian" => Ok(SourceSpec::Debian),
            "download" => Ok(SourceSpec::Download),
            p => Ok(SourceSpec::Path(PathBuf::from(p))),
        }
    }
}

/// A source ready to unpack.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What it is, for the manifest (e.g. `debian:linux-source-6.12 6.12.117-1~deb12u1`).
    pub description: String,
    /// The tarball or directory.
    pub location: PathBuf,
    /// A stable identity for cache keys: the tarball's sha256, or path + version for a directory.
    pub identity: String,
}

impl Resolved {
    pub fn is_dir(&self) -> bool {
        self.location.is_dir()
    }
}

/// Resolves the kernel source.
pub fn kernel(
    spec: &SourceSpec,
    root: &Path,
    allow_install: bool,
    mode: ProgressMode,
) -> Result<Resolved> {
    match spec {
        SourceSpec::Path(p) => from_path(p, root, Error::KernelSource),
        SourceSpec::Download => match download(&KERNEL_DOWNLOAD, root, mode) {
            Ok(r) => Ok(r),
            Err(e) => {
                fallback_warning("kernel", &e);
                debian_kernel(root, allow_install, mode)
            }
        },
        SourceSpec::Debian => debian_kernel(root, allow_install, mode),
    }
}

/// Resolves the Toybox source.
pub fn toybox(spec: &SourceSpec, root: &Path, mode: ProgressMode) -> Result<Resolved> {
    match spec {
        SourceSpec::Path(p) => from_path(p, root, Error::ToyboxSource),
        SourceSpec::Download => match download(&TOYBOX_DOWNLOAD, root, mode) {
            Ok(r) => Ok(r),
            Err(e) => {
                fallback_warning("Toybox", &e);
                debian_toybox(root, mode)
            }
        },
        SourceSpec::Debian => debian_toybox(root, mode),
    }
}

fn fallback_warning(what: &str, e: &Error) {
    tracing::warn!(error = %e, "{what} download failed; falling back to Debian's source package");
    eprintln!("osso-guest: {what} download failed ({e}); using Debian's source package instead");
}

fn from_path(p: &Path, root: &Path, err: fn(String) -> Error) -> Result<Resolved> {
    if p.is_dir() {
        let canonical = fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
        return Ok(Resolved {
            description: format!("dir:{}", canonical.display()),
            identity: format!("dir:{}", canonical.display()),
            location: canonical,
        });
    }
    if !p.is_file() {
        return Err(err(format!(
            "{} is neither a tarball nor a directory",
            p.display()
        )));
    }
    let name = p.to_string_lossy();
    if !(name.ends_with(".tar.xz") || name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
        return Err(err(format!(
            "{}: expected a .tar.xz or .tar.gz tarball",
            p.display()
        )));
    }
    Ok(Resolved {
        description: format!("tarball:{}", p.display()),
        identity: cache::file_identity(root, p).map_err(|e| Error::io(p, e))?,
        location: p.to_path_buf(),
    })
}

fn debian_kernel(root: &Path, allow_install: bool, mode: ProgressMode) -> Result<Resolved> {
    let tarball = Path::new(DEBIAN_KERNEL_TARBALL);
    if !tarball.exists() {
        if allow_install && crate::tools::can_apt_install() {
            eprintln!(
                "osso-guest: installing {DEBIAN_KERNEL_PACKAGE} with apt-get (kernel source)"
            );
            crate::tools::apt_install(&[DEBIAN_KERNEL_PACKAGE], &root.join("logs/apt.log"), mode)?;
        } else {
            return Err(Error::KernelSource(format!(
                "{DEBIAN_KERNEL_TARBALL} is missing; install it with: sudo apt-get install {DEBIAN_KERNEL_PACKAGE} \
                 (or name a kernel tarball or directory with --kernel-source)"
            )));
        }
    }
    debian_kernel_local(root)
        .ok_or_else(|| Error::KernelSource(format!("cannot read {DEBIAN_KERNEL_TARBALL}")))
}

/// Debian's kernel source if its tarball is installed. The description names
/// the tarball by its checksum (the manifest records the kernel version from
/// the tree itself): asking dpkg here would cost tens of milliseconds on every
/// lookup of a cached image.
fn debian_kernel_local(root: &Path) -> Option<Resolved> {
    let tarball = Path::new(DEBIAN_KERNEL_TARBALL);
    let identity = cache::file_identity(root, tarball).ok()?;
    Some(Resolved {
        description: format!(
            "debian:{DEBIAN_KERNEL_PACKAGE} (sha256 {})",
            &identity[..16]
        ),
        identity,
        location: tarball.to_path_buf(),
    })
}

/// Debian's Toybox orig tarball if it is already in `downloads/` with the right sum.
fn debian_toybox_local(root: &Path) -> Option<Resolved> {
    let file = root.join("downloads").join(DEBIAN_TOYBOX_FILE);
    let identity = cache::file_identity(root, &file).ok()?;
    (identity == DEBIAN_TOYBOX_SHA256).then(|| Resolved {
        description: format!("debian:toybox source {DEBIAN_TOYBOX_FILE}"),
        identity,
        location: file,
    })
}

/// A pinned download if it is already in `downloads/` with the right sum.
fn download_local(p: &Pinned, root: &Path) -> Option<Resolved> {
    let file = root.join("downloads").join(p.url.rsplit('/').next()?);
    let identity = cache::file_identity(root, &file).ok()?;
    (identity == p.sha256).then(|| Resolved {
        description: format!("download:{} {}", p.url, p.version),
        identity,
        location: file,
    })
}

/// Which component a source is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Kernel,
    Toybox,
}

/// Resolves a source from what is already on this machine only: no install,
/// no download. With `fallback`, a `download` source not yet fetched resolves
/// to Debian's, as a build without the internet falls back to; without it, it
/// does not resolve (so that a build tries the download first).
pub fn offline(
    spec: &SourceSpec,
    root: &Path,
    component: Component,
    fallback: bool,
) -> Option<Resolved> {
    let debian = || match component {
        Component::Kernel => debian_kernel_local(root),
        Component::Toybox => debian_toybox_local(root),
    };
    match spec {
        SourceSpec::Debian => debian(),
        SourceSpec::Path(p) => {
            let err = match component {
                Component::Kernel => Error::KernelSource,
                Component::Toybox => Error::ToyboxSource,
            };
            from_path(p, root, err).ok()
        }
        SourceSpec::Download => {
            let pinned = match component {
                Component::Kernel => &KERNEL_DOWNLOAD,
                Component::Toybox => &TOYBOX_DOWNLOAD,
            };
            download_local(pinned, root).or_else(|| if fallback { debian() } else { None })
        }
    }
}

fn debian_toybox(root: &Path, mode: ProgressMode) -> Result<Resolved> {
    if let Some(r) = debian_toybox_local(root) {
        return Ok(r);
    }
    let dl = root.join("downloads");
    fetch_debian_toybox(&dl, mode)?;
    let file = dl.join(DEBIAN_TOYBOX_FILE);
    let actual = cache::sha256_file(&file).map_err(|e| Error::io(&file, e))?;
    debian_toybox_local(root).ok_or(Error::Checksum {
        what: file.display().to_string(),
        expected: DEBIAN_TOYBOX_SHA256.into(),
        actual,
    })
}

/// `apt-get source --download-only toybox` with a private sources list and
/// private state, leaving the system's apt configuration untouched.
fn fetch_debian_toybox(dl: &Path, mode: ProgressMode) -> Result<()> {
    if !crate::tools::on_path("apt-get") {
        return Err(Error::ToyboxSource(format!(
            "apt-get is not available to fetch Debian's toybox source package; \
             put {DEBIAN_TOYBOX_FILE} in {} or pass --toybox-source <tarball>",
            dl.display()
        )));
    }
    let apt = dl.join("apt");
    for d in [
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let sources = apt.join("sources.list");
    fs::write(&sources, format!("{DEBIAN_SRC_LINE}\n")).map_err(|e| Error::io(&sources, e))?;
    let opts = |cmd: &mut Command| {
        cmd.arg(format!("-o=Dir::Etc::sourcelist={}", sources.display()))
            .arg("-o=Dir::Etc::sourceparts=-")
            .arg(format!(
                "-o=Dir::State::Lists={}",
                apt.join("lists").display()
            ))
            .arg(format!("-o=Dir::Cache={}", apt.join("cache").display()))
            .arg("-o=APT::Get::List-Cleanup=0")
            .arg("-o=Debug::NoLocking=1");
    };
    let log = dl.join("apt-source.log");
    let mut update = Command::new("apt-get");
    opts(&mut update);
    update.arg("update");
    steps::run(
        mode,
        "apt-get update (private list for deb-src toybox)",
        &mut update,
        &log,
    )?;
    // The .debian.tar.xz answers 404 on the mirror; it is not needed, so the
    // command's failure is judged by whether the orig tarball arrived.
    let mut source = Command::new("apt-get");
    opts(&mut source);
    source
        .args(["source", "--download-only", "toybox"])
        .current_dir(dl);
    let res = steps::run(
        mode,
        "apt-get source --download-only toybox",
        &mut source,
        &log,
    );
    if dl.join(DEBIAN_TOYBOX_FILE).exists() {
        Ok(())
    } else {
        res.and(Err(Error::ToyboxSource(format!(
            "apt-get source did not deliver {DEBIAN_TOYBOX_FILE} (see {})",
            log.display()
        ))))
    }
}

/// Downloads a pinned tarball into `downloads/`, verifying its sha256.
fn download(p: &Pinned, root: &Path, mode: ProgressMode) -> Result<Resolved> {
    if let Some(r) = download_local(p, root) {
        return Ok(r);
    }
    let dl = root.join("downloads");
    fs::create_dir_all(&dl).map_err(|e| Error::io(&dl, e))?;
    let name = p.url.rsplit('/').next().unwrap_or("download.tar");
    let file = dl.join(name);
    {
        if !crate::tools::on_path("curl") {
            return Err(Error::Download {
                url: p.url.into(),
                reason: "curl is not installed".into(),
            });
        }
        let part = dl.join(format!("{name}.part"));
        steps::run(
            mode,
            &format!("download {name}"),
            Command::new("curl")
                .args(["-fsSL", "--connect-timeout", "5", "--max-time", "900", "-o"])
                .arg(&part)
                .arg(p.url),
            &dl.join("download.log"),
        )
        .map_err(|e| Error::Download {
            url: p.url.into(),
            reason: e.to_string(),
        })?;
        let actual = cache::sha256_file(&part).map_err(|e| Error::io(&part, e))?;
        if actual != p.sha256 {
            let _ = fs::remove_file(&part);
            return Err(Error::Checksum {
                what: p.url.into(),
                expected: p.sha256.into(),
                actual,
            });
        }
        fs::rename(&part, &file).map_err(|e| Error::io(&file, e))?;
    }
    download_local(p, root).ok_or_else(|| Error::Download {
        url: p.url.into(),
        reason: format!("{} vanished after download", file.display()),
    })
}

/// Unpacks `src` (a tarball, or a directory that is copied) into `dest`, which
/// must not exist yet. The tarball's single top-level directory becomes `dest`.
/// Unpacks into a temporary sibling first, so `dest` appears whole or not at all.
pub fn unpack(src: &Resolved, dest: &Path, mode: ProgressMode, what: &str) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".unpack-{}-{}",
        dest.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        let top = if src.is_dir() {
            let target = tmp.join("src");
            steps::run(
                mode,
                &format!("copy {what} source"),
                Command::new("cp").arg("-a").arg(&src.location).arg(&target),
                &tmp.join("copy.log"),
            )?;
            target
        } else {
            let f = fs::File::open(&src.location).map_err(|e| Error::io(&src.location, e))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let pb = steps::byte_bar(mode, &format!("unpack {what}"), len);
            let reader = pb.wrap_read(f);
            let name = src.location.to_string_lossy();
            let decoded: Box<dyn std::io::Read> = if name.ends_with(".tar.xz") {
                Box::new(xz2::read::XzDecoder::new(reader))
            } else {
                Box::new(flate2::read::GzDecoder::new(reader))
            };
            let mut archive = tar::Archive::new(decoded);
            archive
                .unpack(&tmp)
                .map_err(|e| Error::Check(format!("unpacking {}: {e}", src.location.display())))?;
            pb.finish_and_clear();
            let mut tops: Vec<PathBuf> = fs::read_dir(&tmp)
                .map_err(|e| Error::io(&tmp, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            if tops.len() != 1 {
                return Err(Error::Check(format!(
                    "{} should hold exactly one top-level directory, found {}",
                    src.location.display(),
                    tops.len()
                )));
            }
            tops.remove(0)
        };
        fs::rename(&top, dest).map_err(|e| Error::io(dest, e))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}
