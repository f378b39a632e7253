//! The SDK's error type: one enum, each variant saying what the caller can
//! do. `#[non_exhaustive]`: variants may be added. A variant that wraps
//! another error keeps it as its `source()`, so the chain of causes is
//! there for a caller to walk.

use std::time::Duration;

/// Errors from spawning, running or driving a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (bad memory size, vCPU count, ports...).
    #[error("bad configuration: {0}")]
    Config(String),
    /// The guest image could not be built, found or read.
    #[error("guest image: {0}")]
    Image(#[from] osso_guest::Error),
    /// The default Osso image has not been built: `spawn` never builds it
    /// (a kernel build takes minutes and may install packages). Build it with
    /// `osso-guest build` or [`crate::build_image`] first, or name a prebuilt
    /// directory ([`crate::ConfigBuilder::image_dir`], `OSSO_IMAGE_DIR`).
    #[error(
        "no Osso image has been built (cache {}): build it first with \
         `cargo run -p osso-guest --release -- build` or `osso_sdk::build_image()`, \
         or name a prebuilt image directory with OSSO_IMAGE_DIR",
        cache.display()
    )]
    NoImage {
        /// The cache the image was looked for in.
        cache: std::path::PathBuf,
    },
    /// A prebuilt image directory ([`crate::ConfigBuilder::image_dir`] or
    /// `OSSO_IMAGE_DIR`) is not a usable Osso image: no or a bad
    /// `manifest.json`, or a file it names missing, of another size, or with
    /// another sha256.
    #[error("image directory {} (from {via}): {problem}", dir.display())]
    ImageDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Where it was named: `Config::image_dir` or `OSSO_IMAGE_DIR`.
        via: &'static str,
        /// What is wrong with it.
        #[source]
        problem: osso_guest::ImageDirError,
    },
    /// The VMM refused the machine (KVM missing, bad kernel, layout...).
    #[error("VMM: {0}")]
    Vmm(#[source] VmmFailure),
    /// A snapshot could not be taken or restored (missing, corrupt,
    /// truncated, from another format version or host, or the VM could not
    /// be paused).
    #[error("snapshot: {0}")]
    Snapshot(#[source] VmmFailure),
    /// A warm pool cannot restore clones (the last restore's error).
    #[error("warm pool: {0}")]
    Pool(String),
    /// The network device could not be set up.
    #[error("network: {0}")]
    Net(#[source] VmmFailure),
    /// The guest did not become ready in time; it has been stopped.
    #[error(
        "the guest was not ready within {timeout:?} ({ready}); last console lines:\n{console_tail}"
    )]
    BootTimeout {
        timeout: Duration,
        ready: String,
        console_tail: String,
    },
    /// The guest ended before it was ready.
    #[error("the guest ended before it was ready ({reason}); last console lines:\n{console_tail}")]
    EndedBeforeReady {
        reason: String,
        console_tail: String,
    },
    /// The host's KVM cannot run guest user space (the PVM software KVM).
    #[error(
        "this host's KVM is PVM (/sys/module/kvm_pvm), which boots a Linux kernel but never runs \
         guest user space, so a job cannot run here; run jobs on a host with hardware KVM"
    )]
    NoGuestUserSpace,
    /// A job ([`crate::run`]) did not finish within its timeout (counted
    /// from the guest being ready); its VM has been stopped.
    #[error(
        "the job did not finish within {timeout:?} of the guest being ready; its VM was \
         stopped; last console lines:\n{console_tail}"
    )]
    JobTimeout {
        timeout: Duration,
        console_tail: String,
    },
    /// A job ran but its result could not be read.
    #[error("job: {0}")]
    Job(#[from] crate::job::JobError),
    /// The VM has no user-mode network (backend `none` or `tap`).
    #[error("this VM has no user-mode network (backend {0})")]
    NoUserNet(String),
    /// A host-side network operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// What went wrong inside the VMM, as the VMM said it: its text, and its
/// own causes through `source()`. Opaque, so that the SDK's API does not
/// depend on the VMM crate's types.
#[derive(Debug)]
pub struct VmmFailure(Box<dyn std::error::Error + Send + Sync + 'static>);

impl std::fmt::Display for VmmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for VmmFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl Error {
    /// The VMM refused or failed (conversions stay inside the crate).
    pub(crate) fn vmm(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Vmm(VmmFailure(Box::new(e)))
    }

    /// A snapshot could not be taken or restored.
    pub(crate) fn snapshot(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Snapshot(VmmFailure(Box::new(e)))
    }

    /// The network device could not be set up.
    pub(crate) fn net(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Net(VmmFailure(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn causes_are_kept_as_sources() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no /dev/urandom");
        let e = Error::Job(crate::job::JobError::Random(io()));
        let job = e.source().expect("the job error");
        let cause = job.source().expect("the I/O error under it");
        assert_eq!(cause.to_string(), "no /dev/urandom");
        let e = Error::Io {
            what: "forward 127.0.0.1:8080".into(),
            source: io(),
        };
        assert!(e.source().is_some());
        assert!(Error::NoImage { cache: "/x".into() }.source().is_none());
        // A VMM failure keeps the VMM's text and its own causes.
        let e = Error::vmm(osso_vmm::snapshot::SnapshotError::Io {
            path: "/snap/state.osso".into(),
            source: io(),
        });
        assert!(e.to_string().starts_with("VMM: "), "{e}");
        let failure = e.source().expect("the VMM's error");
        assert!(
            failure.to_string().contains("/snap/state.osso"),
            "{failure}"
        );
        assert_eq!(
            failure.source().map(|c| c.to_string()).as_deref(),
            Some("no /dev/urandom")
        );
    }
}
