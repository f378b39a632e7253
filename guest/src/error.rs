//! The guest builder's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while building or locating an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("missing host tools: {missing}. Install them with: {install}")]
    MissingTools { missing: String, install: String },
    #[error("{what} failed: {detail}\n(full log: {})", log.display())]
    Command {
        what: String,
        detail: String,
        log: PathBuf,
    },
    #[error("kernel source: {0}")]
    KernelSource(String),
    #[error("Toybox source: {0}")]
    ToyboxSource(String),
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("kconfig dropped options the fragment asks for (their dependencies are off): {}", .0.join(", "))]
    ConfigDropped(Vec<String>),
    #[error("Toybox lacks commands the image needs: {}", .0.join(", "))]
    MissingCommands(Vec<String>),
    #[error("build check failed: {0}")]
    Check(String),
    #[error("initramfs: {0}")]
    Cpio(#[from] crate::cpio::CpioError),
    #[error("no Osso image has been built in {}; build one with: cargo run -p osso-guest --release -- build", .0.display())]
    NoImage(PathBuf),
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// A prebuilt image directory ([`crate::open_image_dir`]) failed its check.
    #[error("image directory {}: {problem}", dir.display())]
    ImageDir {
        dir: PathBuf,
        #[source]
        problem: ImageDirError,
    },
    #[error("bad setting {name}={value:?}: {reason}")]
    Setting {
        name: String,
        value: String,
        reason: String,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Why a prebuilt image directory was refused by [`crate::open_image_dir`].
/// `file` is a name inside the directory (`vmlinux`, `bzImage`,
/// `initramfs.cpio.gz`, `manifest.json`).
#[derive(Debug, thiserror::Error)]
pub enum ImageDirError {
    /// The directory has no `manifest.json` (or is not a directory at all).
    #[error("no manifest.json (not an Osso image directory; build one with: cargo run -p osso-guest --release -- build)")]
    MissingManifest,
    /// `manifest.json` cannot be read as an Osso manifest of this format.
    #[error("bad manifest.json: {0}")]
    BadManifest(String),
    /// A file the manifest names is not in the directory.
    #[error("{file}: missing (manifest.json names it)")]
    MissingFile { file: String },
    /// A file's size differs from the manifest's.
    #[error("{file}: {actual} bytes, manifest.json says {expected}")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    /// A file's sha256 differs from the manifest's.
    #[error("{file}: sha256 {actual}, manifest.json says {expected}")]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    /// A file could not be read.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// The builder's result type.
pub type Result<T> = std::result::Result<T, Error>;
