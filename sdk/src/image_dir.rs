//! Which Osso image a [`Config`](crate::Config) boots, and prebuilt image
//! directories checked once per process.
//!
//! Precedence for the Osso image (not a [`Image::Custom`] one):
//! [`Image::Dir`] (`ConfigBuilder::image_dir`), then the directory in
//! `OSSO_IMAGE_DIR` ([`crate::IMAGE_DIR_ENV`]), then the image `osso-guest`
//! built from its sources. Nothing here builds: an image that was never built
//! is [`Error::NoImage`], naming the command and the call that build it
//! ([`crate::build_image`]).
//!
//! A directory is checked ([`osso_guest::open_image_dir`]: manifest, sizes,
//! sha256 of every file) the first time a process boots it. Later spawns only
//! compare the size, modification time and inode of `manifest.json` and of
//! each file with what they were when checked (a few `stat` calls) and check
//! again if any changed. Failures are not remembered: a directory fixed
//! meanwhile is checked afresh.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::Image;
use crate::error::Error;

/// Where the Osso image comes from, after precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageChoice {
    /// A prebuilt directory, and what named it.
    Dir { dir: PathBuf, via: &'static str },
    /// `osso-guest`'s image from its sources (built beforehand).
    FromSources,
}

/// Named by [`Error::ImageDir`] for a directory from the config.
pub(crate) const VIA_CONFIG: &str = "Config::image_dir";

/// The choice for a non-custom `image`, given the value of `OSSO_IMAGE_DIR`
/// (an empty value counts as unset). `None` for [`Image::Custom`].
pub(crate) fn choose(image: &Image, env: Option<OsString>) -> Option<ImageChoice> {
    match image {
        Image::Custom { .. } => None,
        Image::Dir(dir) => Some(ImageChoice::Dir {
            dir: dir.clone(),
            via: VIA_CONFIG,
        }),
        Image::Default => Some(match env.filter(|v| !v.is_empty()) {
            Some(dir) => ImageChoice::Dir {
                dir: dir.into(),
                via: crate::IMAGE_DIR_ENV,
            },
            None => ImageChoice::FromSources,
        }),
    }
}

/// The Osso image for a non-custom `image` setting, by precedence; `build`:
/// build it from its sources when it is not built (only [`crate::build_image`]
/// asks for that).
pub(crate) fn osso_image(image: &Image, build: bool) -> Result<osso_guest::Image, Error> {
    match choose(image, std::env::var_os(crate::IMAGE_DIR_ENV)) {
        Some(ImageChoice::Dir { dir, via }) => Ok(open_checked(&dir, via)?.0),
        Some(ImageChoice::FromSources) | None => {
            let opts = osso_guest::BuildOptions::from_env()?;
            if build {
                return Ok(osso_guest::build(&opts)?);
            }
            osso_guest::find(&opts).map_err(|e| match e {
                osso_guest::Error::NoImage(cache) => Error::NoImage { cache },
                other => Error::Image(other),
            })
        }
    }
}

/// What a file looked like when its directory was checked.
type Stamp = Option<(u64, i64, i64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

fn stamps(image: &osso_guest::Image) -> Vec<Stamp> {
    [
        image.dir.join("manifest.json").as_path(),
        image.vmlinux(),
        image.bzimage(),
        image.initramfs(),
    ]
    .into_iter()
    .map(stamp)
    .collect()
}

struct Checked {
    key: PathBuf,
    image: osso_guest::Image,
    stamps: Vec<Stamp>,
}

/// Directories checked by this process.
static CHECKED: Mutex<Vec<Checked>> = Mutex::new(Vec::new());

/// The image in `dir`, checked now or (unchanged since) earlier in this
/// process; the flag says whether it was checked now.
pub(crate) fn open_checked(
    dir: &Path,
    via: &'static str,
) -> Result<(osso_guest::Image, bool), Error> {
    let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // Held while checking: concurrent first spawns check a directory once.
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = checked.iter().position(|c| c.key == key) {
        if stamps(&checked[i].image) == checked[i].stamps {
            return Ok((checked[i].image.clone(), false));
        }
        checked.swap_remove(i);
    }
    let image = osso_guest::open_image_dir(dir).map_err(|e| match e {
        osso_guest::Error::ImageDir { dir, problem } => Error::ImageDir { dir, via, problem },
        other => Error::Image(other),
    })?;
    checked.push(Checked {
        key,
        stamps: stamps(&image),
        image: image.clone(),
    });
    Ok((image, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use osso_guest::ImageDirError;

    #[test]
    fn the_option_beats_the_variable_which_beats_the_sources() {
        let env = || Some(OsString::from("/from/env"));
        assert_eq!(
            choose(&Image::Dir("/from/config".into()), env()),
            Some(ImageChoice::Dir {
                dir: "/from/config".into(),
                via: VIA_CONFIG
            })
        );
        assert_eq!(
            choose(&Image::Default, env()),
            Some(ImageChoice::Dir {
                dir: "/from/env".into(),
                via: "OSSO_IMAGE_DIR"
            })
        );
        assert_eq!(
            choose(&Image::Default, None),
            Some(ImageChoice::FromSources)
        );
        assert_eq!(
            choose(&Image::Default, Some(OsString::new())),
            Some(ImageChoice::FromSources),
            "an empty OSSO_IMAGE_DIR counts as unset"
        );
        let custom = Image::Custom {
            kernel: "/k".into(),
            initrd: None,
        };
        assert_eq!(choose(&custom, env()), None, "a custom image ignores it");
    }

    #[test]
    fn a_directory_is_checked_once_until_it_changes() {
        let t = tempfile::tempdir().unwrap();
        osso_guest::image_dir::write_fake_image_dir(t.path()).unwrap();
        let (image, fresh) = open_checked(t.path(), VIA_CONFIG).unwrap();
        assert!(fresh, "checked the first time");
        assert_eq!(image.vmlinux(), t.path().join("vmlinux"));
        let (again, fresh) = open_checked(t.path(), VIA_CONFIG).unwrap();
        assert!(!fresh, "remembered the second time");
        assert_eq!(again.manifest, image.manifest);
        // A changed file is noticed (other size: a new stamp) and refused.
        std::fs::write(t.path().join("initramfs.cpio.gz"), b"other").unwrap();
        match open_checked(t.path(), crate::IMAGE_DIR_ENV) {
            Err(Error::ImageDir { dir, via, problem }) => {
                assert_eq!(dir, t.path());
                assert_eq!(via, "OSSO_IMAGE_DIR");
                assert!(
                    matches!(problem, ImageDirError::SizeMismatch { ref file, .. } if file == "initramfs.cpio.gz"),
                    "{problem}"
                );
            }
            other => panic!("expected an image-directory error, got {other:?}"),
        }
        // Fixed again: checked afresh, accepted.
        osso_guest::image_dir::write_fake_image_dir(t.path()).unwrap();
        assert!(open_checked(t.path(), VIA_CONFIG).unwrap().1);
    }

    #[test]
    fn bad_directories_are_refused_naming_the_directory() {
        let t = tempfile::tempdir().unwrap();
        let expect =
            |problem_is: fn(&ImageDirError) -> bool| match open_checked(t.path(), VIA_CONFIG) {
                Err(e @ Error::ImageDir { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&t.path().display().to_string()), "{text}");
                    assert!(text.contains("Config::image_dir"), "{text}");
                    let Error::ImageDir { problem, .. } = e else {
                        unreachable!()
                    };
                    assert!(problem_is(&problem), "{problem}");
                }
                other => panic!("expected an image-directory error, got {other:?}"),
            };
        expect(|p| matches!(p, ImageDirError::MissingManifest));
        osso_guest::image_dir::write_fake_image_dir(t.path()).unwrap();
        std::fs::remove_file(t.path().join("vmlinux")).unwrap();
        expect(|p| matches!(p, ImageDirError::MissingFile { file } if file == "vmlinux"));
        osso_guest::image_dir::write_fake_image_dir(t.path()).unwrap();
        std::fs::write(t.path().join("bzImage"), b"x").unwrap();
        expect(|p| matches!(p, ImageDirError::SizeMismatch { file, .. } if file == "bzImage"));
        osso_guest::image_dir::write_fake_image_dir(t.path()).unwrap();
        let len = std::fs::metadata(t.path().join("bzImage")).unwrap().len();
        std::fs::write(t.path().join("bzImage"), vec![b'x'; len as usize]).unwrap();
        expect(|p| matches!(p, ImageDirError::ChecksumMismatch { file, .. } if file == "bzImage"));
        std::fs::write(t.path().join("manifest.json"), b"[]").unwrap();
        expect(|p| matches!(p, ImageDirError::BadManifest(_)));
    }
}
