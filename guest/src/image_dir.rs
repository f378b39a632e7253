//! A prebuilt image directory, opened without its sources.
//!
//! [`crate::find`] and [`crate::build`] name an image by the hash of every
//! input, so they need the kernel and Toybox sources at hand to find even an
//! image that is already built. [`open_image_dir`] takes the directory itself
//! (`images/<key>/` of a cache, or a copy of it anywhere): it reads
//! `manifest.json` and checks that every file the manifest names is there,
//! with the manifest's size and sha256.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::cache::sha256_file;
use crate::error::{Error, ImageDirError, Result};
use crate::manifest::Manifest;
use crate::Image;

/// The environment variable that points the SDK (and `osso-guest info`) at
/// a prebuilt image directory.
pub const IMAGE_DIR_ENV: &str = "OSSO_IMAGE_DIR";

/// The image in `dir`, checked against its manifest: `manifest.json` must
/// parse (and be of this builder's format), and the kernel (`vmlinux`,
/// `bzImage`) and initramfs files it names must be in `dir` with the sizes
/// and sha256 checksums it records. Files are looked up in `dir` by the file
/// names the manifest gives (its paths are where the image was built), so a
/// copied or moved image directory opens too; the returned manifest's paths
/// point into `dir`.
///
/// Sizes are checked before anything is hashed, so a truncated file fails
/// fast; the hashes read every byte (tens of milliseconds for the ~17 MB of
/// an Osso image). Errors: [`Error::ImageDir`] with the [`ImageDirError`].
pub fn open_image_dir(dir: impl AsRef<Path>) -> Result<Image> {
    let dir = dir.as_ref();
    check(dir).map_err(|problem| Error::ImageDir {
        dir: dir.to_path_buf(),
        problem,
    })
}

fn check(dir: &Path) -> std::result::Result<Image, ImageDirError> {
    if !dir.join("manifest.json").is_file() {
        return Err(ImageDirError::MissingManifest);
    }
    let mut manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(Error::Io { source, .. }) => {
            return Err(ImageDirError::Io {
                file: "manifest.json".into(),
                source,
            })
        }
        Err(Error::Manifest { reason, .. }) => return Err(ImageDirError::BadManifest(reason)),
        Err(e) => return Err(ImageDirError::BadManifest(e.to_string())),
    };
    let m = &mut manifest;
    let mut files = [
        (
            "vmlinux_path",
            &mut m.vmlinux_path,
            m.vmlinux_bytes,
            m.vmlinux_sha256.as_str(),
        ),
        (
            "bzimage_path",
            &mut m.bzimage_path,
            m.bzimage_bytes,
            m.bzimage_sha256.as_str(),
        ),
        (
            "initramfs_path",
            &mut m.initramfs_path,
            m.initramfs_bytes,
            m.initramfs_sha256.as_str(),
        ),
    ];
    // Names and sizes first (cheap), then the checksums.
    let mut named = Vec::with_capacity(files.len());
    for (field, path, expected, _) in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ImageDirError::BadManifest(format!(
                    "{field} {:?} names no file",
                    path.display().to_string()
                ))
            })?
            .to_string();
        let here = dir.join(&name);
        let meta = match fs::metadata(&here) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Err(ImageDirError::MissingFile { file: name }),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ImageDirError::MissingFile { file: name })
            }
            Err(source) => return Err(ImageDirError::Io { file: name, source }),
        };
        if meta.len() != *expected {
            return Err(ImageDirError::SizeMismatch {
                file: name,
                expected: *expected,
                actual: meta.len(),
            });
        }
        named.push((name, here));
    }
    for ((name, here), (_, _, _, expected)) in named.iter().zip(&files) {
        let actual = sha256_file(here).map_err(|source| ImageDirError::Io {
            file: name.clone(),
            source,
        })?;
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ImageDirError::ChecksumMismatch {
                file: name.clone(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    for ((_, here), (_, path, _, _)) in named.into_iter().zip(files.iter_mut()) {
        **path = here;
    }
    Ok(Image {
        dir: dir.to_path_buf(),
        manifest,
        reused: true,
    })
}

/// Writes a small, valid image directory (fake kernel and initramfs bytes
/// with a matching manifest) into `dir`: for tests here and in the SDK.
#[doc(hidden)]
pub fn write_fake_image_dir(dir: &Path) -> Result<Manifest> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file = |name: &str, body: &[u8]| -> Result<(PathBuf, u64, String)> {
        // The manifest records where the image was built: somewhere else.
        let p = dir.join(name);
        fs::write(&p, body).map_err(|e| Error::io(&p, e))?;
        Ok((
            Path::new("/nonexistent/built-here").join(name),
            body.len() as u64,
            crate::cache::sha256_bytes(body),
        ))
    };
    let (vmlinux_path, vmlinux_bytes, vmlinux_sha256) = file("vmlinux", b"\x7fELF fake vmlinux")?;
    let (bzimage_path, bzimage_bytes, bzimage_sha256) = file("bzImage", b"fake bzImage")?;
    let (initramfs_path, initramfs_bytes, initramfs_sha256) =
        file("initramfs.cpio.gz", b"\x1f\x8b fake initramfs")?;
    let manifest = Manifest {
        format: crate::manifest::MANIFEST_FORMAT,
        key: "0123456789abcdef".into(),
        kernel_version: "6.12.0".into(),
        kernel_source: "test".into(),
        toybox_version: "0.8.9".into(),
        toybox_source: "test".into(),
        toybox_commands: vec!["sh".into()],
        vmlinux_path,
        vmlinux_bytes,
        vmlinux_sha256,
        vmlinux_unstripped_bytes: 2 * vmlinux_bytes,
        bzimage_path,
        bzimage_bytes,
        bzimage_sha256,
        initramfs_path,
        initramfs_bytes,
        initramfs_sha256,
        initramfs_uncompressed_bytes: 3 * initramfs_bytes,
        kernel_config_sha256: crate::cache::sha256_bytes(b""),
        build_seconds: 0.0,
    };
    let p = dir.join("manifest.json");
    fs::write(&p, manifest.to_json()).map_err(|e| Error::io(&p, e))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(dir: &Path) -> ImageDirError {
        match open_image_dir(dir) {
            Err(Error::ImageDir { dir: d, problem }) => {
                assert_eq!(d, dir, "the error names the directory");
                problem
            }
            other => panic!("expected an image-directory error, got {other:?}"),
        }
    }

    #[test]
    fn a_good_directory_opens_with_paths_inside_it() {
        let t = tempfile::tempdir().unwrap();
        let written = write_fake_image_dir(t.path()).unwrap();
        let image = open_image_dir(t.path()).unwrap();
        assert_eq!(image.dir, t.path());
        assert!(image.reused);
        assert_eq!(image.vmlinux(), t.path().join("vmlinux"));
        assert_eq!(image.bzimage(), t.path().join("bzImage"));
        assert_eq!(image.initramfs(), t.path().join("initramfs.cpio.gz"));
        assert_eq!(image.manifest.vmlinux_sha256, written.vmlinux_sha256);
        assert_eq!(image.manifest.initramfs_bytes, written.initramfs_bytes);
    }

    #[test]
    fn a_missing_manifest_is_refused() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(problem(t.path()), ImageDirError::MissingManifest));
        write_fake_image_dir(t.path()).unwrap();
        fs::remove_file(t.path().join("manifest.json")).unwrap();
        assert!(matches!(problem(t.path()), ImageDirError::MissingManifest));
        let nowhere = t.path().join("no-such-dir");
        assert!(matches!(problem(&nowhere), ImageDirError::MissingManifest));
    }

    #[test]
    fn a_bad_manifest_is_refused() {
        let t = tempfile::tempdir().unwrap();
        write_fake_image_dir(t.path()).unwrap();
        fs::write(t.path().join("manifest.json"), b"{ not json").unwrap();
        assert!(matches!(problem(t.path()), ImageDirError::BadManifest(_)));
        // Another manifest format.
        let mut m = write_fake_image_dir(t.path()).unwrap();
        m.format += 1;
        fs::write(t.path().join("manifest.json"), m.to_json()).unwrap();
        let p = problem(t.path());
        assert!(
            matches!(&p, ImageDirError::BadManifest(r) if r.contains("format")),
            "{p}"
        );
        // A path that names no file.
        let mut m = write_fake_image_dir(t.path()).unwrap();
        m.bzimage_path = PathBuf::from("/");
        fs::write(t.path().join("manifest.json"), m.to_json()).unwrap();
        assert!(matches!(problem(t.path()), ImageDirError::BadManifest(_)));
    }

    #[test]
    fn a_missing_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        write_fake_image_dir(t.path()).unwrap();
        fs::remove_file(t.path().join("initramfs.cpio.gz")).unwrap();
        let p = problem(t.path());
        assert!(
            matches!(&p, ImageDirError::MissingFile { file } if file == "initramfs.cpio.gz"),
            "{p}"
        );
        assert!(p.to_string().contains("initramfs.cpio.gz: missing"), "{p}");
    }

    #[test]
    fn a_wrong_size_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let m = write_fake_image_dir(t.path()).unwrap();
        fs::write(t.path().join("vmlinux"), b"short").unwrap();
        let p = problem(t.path());
        assert!(
            matches!(&p, ImageDirError::SizeMismatch { file, expected, actual: 5 }
                if file == "vmlinux" && *expected == m.vmlinux_bytes),
            "{p}"
        );
    }

    #[test]
    fn a_wrong_checksum_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let m = write_fake_image_dir(t.path()).unwrap();
        // Same size, other bytes.
        let mut body = fs::read(t.path().join("bzImage")).unwrap();
        body[0] ^= 0xff;
        fs::write(t.path().join("bzImage"), &body).unwrap();
        let p = problem(t.path());
        assert!(
            matches!(&p, ImageDirError::ChecksumMismatch { file, expected, actual }
                if file == "bzImage" && *expected == m.bzimage_sha256 && *actual != m.bzimage_sha256),
            "{p}"
        );
        let whole = Error::ImageDir {
            dir: t.path().to_path_buf(),
            problem: p,
        }
        .to_string();
        assert!(whole.contains(&t.path().display().to_string()), "{whole}");
        assert!(whole.contains("bzImage: sha256"), "{whole}");
    }
}
