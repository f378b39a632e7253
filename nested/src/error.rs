//! The harness's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` is needed and was not found; install it with: {fix}")]
    MissingTool { tool: String, fix: String },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("Debian package {package}: {detail}")]
    Package { package: String, detail: String },
    #[error("{path}: {detail}")]
    BadArtifact { path: PathBuf, detail: String },
    #[error("no built program matches {0:?} (see `osso-nested list`)")]
    NoSuchProgram(String),
    #[error("the Osso guest image: {0}")]
    Image(#[from] osso_guest::Error),
    #[error("level-1 image: {0}")]
    Cpio(#[from] osso_guest::cpio::CpioError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
