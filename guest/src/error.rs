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

/// The builder's result type.
pub type Result<T> = std::result::Result<T, Error>;
