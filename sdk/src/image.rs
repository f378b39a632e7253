//! What a [`Config`] boots: the kernel and initramfs files and their sizes,
//! from a custom image, a prebuilt image directory or the default image
//! ([`prepare_image`] finds and checks, [`build_image`] also builds).

use std::path::PathBuf;

use crate::config::{Config, Image, KernelFormat};
use crate::error::Error;
use crate::metrics::ImageSize;

/// What to boot, resolved from a [`Config`].
pub(crate) struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub image: ImageSize,
}

pub(crate) fn resolve_image(config: &Config) -> Result<BootFiles, Error> {
    resolve(config, false)
}

/// `build`: build the default image from its sources if it is not built.
fn resolve(config: &Config, build: bool) -> Result<BootFiles, Error> {
    match &config.image {
        Image::Custom { kernel, initrd } => {
            let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let kernel_bytes = size(kernel);
            let initramfs_bytes = initrd.as_ref().map(size).unwrap_or(0);
            Ok(BootFiles {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                image: ImageSize {
                    kernel_bytes,
                    initramfs_bytes,
                    total_bytes: kernel_bytes + initramfs_bytes,
                    bzimage_bytes: None,
                    initramfs_uncompressed_bytes: None,
                },
            })
        }
        image @ (Image::Default | Image::Dir(_)) => {
            let img = crate::image_dir::osso_image(image, build)?;
            let m = &img.manifest;
            let (kernel, kernel_bytes) = match config.kernel_format {
                KernelFormat::Pvh => (m.vmlinux_path.clone(), m.vmlinux_bytes),
                KernelFormat::BzImage => (m.bzimage_path.clone(), m.bzimage_bytes),
            };
            Ok(BootFiles {
                kernel,
                initrd: Some(m.initramfs_path.clone()),
                image: ImageSize {
                    kernel_bytes,
                    initramfs_bytes: m.initramfs_bytes,
                    total_bytes: kernel_bytes + m.initramfs_bytes,
                    bzimage_bytes: Some(m.bzimage_bytes),
                    initramfs_uncompressed_bytes: Some(m.initramfs_uncompressed_bytes),
                },
            })
        }
    }
}

/// Finds and checks the image `config` boots, as [`crate::spawn`] would, without
/// starting a VM, and returns its sizes: to pay for a prebuilt directory's
/// first check up front, outside the first spawn's latency and memory
/// figures. Builds nothing ([`Error::NoImage`] if the default image was
/// never built; see [`build_image`]).
pub fn prepare_image(config: &Config) -> Result<ImageSize, Error> {
    config.validate()?;
    Ok(resolve_image(config)?.image)
}

/// Builds the Osso image `config` boots if it is not built yet, and returns
/// its sizes. This is the one SDK call that builds: the first time, it
/// compiles a Linux kernel and Toybox from Debian's source packages (minutes:
/// about 6 on a 2-core machine), with progress bars on stderr, and when run
/// as root on Debian it installs missing build tools with `apt-get`. Later
/// calls find the cached image in milliseconds. A prebuilt directory
/// ([`crate::ConfigBuilder::image_dir`], `OSSO_IMAGE_DIR`) is only checked;
/// a custom kernel is left as it is. `osso-guest build` does the same from
/// the command line.
pub fn build_image(config: &Config) -> Result<ImageSize, Error> {
    config.validate()?;
    Ok(resolve(config, true)?.image)
}
