//! osso-sdk: a fresh Linux microVM per request, from Rust.
//!
//! ```no_run
//! use std::time::Duration;
//! // Boot the default Osso image (built on first use) and wait until it is ready.
//! let vm = osso_sdk::spawn(osso_sdk::Config::builder().mem_mib(128).build())?;
//! println!("{}", vm.metrics());              // boot time, RSS, image size
//! let rtt = vm.ping(1, Duration::from_secs(1))?; // through the user-mode network
//! drop(vm);                                   // stops it and frees everything
//!
//! // One VM per request: run a shell command in a fresh VM, get its output.
//! let out = osso_sdk::run(osso_sdk::Job::new("uname -a"))?;
//! println!("{} (exit {})", out.output.stdout_text(), out.output.status);
//!
//! // Boot once, snapshot, and hand out clones in milliseconds: each clone
//! // maps the snapshot's RAM copy-on-write and has its own private network.
//! let template = osso_sdk::spawn(osso_sdk::Config::builder().cmdline("osso.stay").build())?;
//! template.snapshot("/tmp/osso-snap")?;
//! let clone = osso_sdk::restore("/tmp/osso-snap", osso_sdk::Config::builder()
//!     .ready_when(osso_sdk::ReadyWhen::GuestPing).build())?;
//! println!("{}", clone.metrics());            // "restored in ... (ready ...)"
//! // Or keep a few clones ready and take one per request:
//! let pool = osso_sdk::Pool::from_snapshot("/tmp/osso-snap", osso_sdk::Config::default(), 4)?;
//! let vm = pool.take()?;
//! # Ok::<(), osso_sdk::Error>(())
//! ```
//!
//! Which image: by default the Osso image `osso-guest` finds or builds from
//! its sources (the kernel and Toybox sources must be at hand, even for an
//! image already built: its cache key hashes them). To boot a prebuilt image
//! without the sources, point the SDK at its directory (the one `osso-guest
//! build` prints, or a copy of it) with [`ConfigBuilder::image_dir`] or the
//! environment variable [`IMAGE_DIR_ENV`] (`OSSO_IMAGE_DIR`); the option
//! wins over the variable, the variable over the sources. The directory's
//! `manifest.json` is read and every file it names checked (size and sha256)
//! the first time a process boots it; a bad directory fails spawn with
//! [`Error::ImageDir`], naming the directory and the problem.
//!
//! What runs where: on hardware KVM everything does. On a host whose KVM is
//! the PVM software hypervisor ([`HostKvm::Pvm`]) a guest kernel boots (about a
//! thousand times slower) but guest user space never runs: spawn with
//! [`ReadyWhen::GuestPing`] and the kernel's own `ip=` configuration, and
//! [`run`] fails at once with [`Error::NoGuestUserSpace`].

pub mod config;
pub mod console;
pub mod error;
pub mod host;
mod image_dir;
pub mod job;
pub mod metrics;
pub mod pool;
pub mod reaper;
pub mod vm;

use std::time::{Duration, Instant};

pub use config::{Config, ConfigBuilder, Image, KernelFormat, Network, ReadyWhen};
pub use console::Console;
pub use error::Error;
pub use host::HostKvm;
pub use job::JobOutput;
pub use metrics::{Metrics, RestoreFigures};
pub use osso_vmm::net::user::PARKED_KERNEL_CMDLINE;
pub use pool::Pool;
pub use reaper::wait_for_background_teardown;
pub use vm::{prepare_image, restore, spawn, Exit, Vm};

/// The environment variable naming a prebuilt Osso image directory to boot
/// when the config does not name one ([`ConfigBuilder::image_dir`] wins over
/// it; it wins over finding or building the image from sources). An empty
/// value counts as unset.
pub const IMAGE_DIR_ENV: &str = osso_guest::IMAGE_DIR_ENV;

/// A shell command to run in a fresh VM.
#[derive(Debug, Clone)]
pub struct Job {
    /// The script, run by the guest's `sh`.
    pub script: String,
    /// The VM (default: [`Config::default`]; its `ready` is ignored).
    pub config: Config,
    /// How long the job may take once the guest is ready.
    pub timeout: Duration,
}

impl Job {
    /// A job running `script` with the default VM and a 30 s timeout.
    pub fn new(script: impl Into<String>) -> Self {
        Job {
            script: script.into(),
            config: Config::default(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub output: JobOutput,
    /// The VM's figures (boot phases, memory, image size with the job appended).
    pub metrics: Metrics,
}

/// Runs `job` in a fresh VM and tears the VM down: the job travels as a small
/// archive appended to the image's initramfs (no rebuild), runs after the guest
/// is ready, and its stdout, stderr and exit status come back over the console.
/// Fails at once under a KVM that cannot run guest user space.
pub fn run(job: Job) -> Result<JobResult, Error> {
    // Image preparation (finding the image, appending the job) runs from
    // here to the VMM's start, measured apart from the boot.
    let called = Instant::now();
    if HostKvm::detect() != HostKvm::Hardware {
        return Err(Error::NoGuestUserSpace);
    }
    let mut config = job.config;
    config.ready = ReadyWhen::BootTimer;
    config.validate()?;
    let mut files = vm::resolve_image(&config)?;
    let base = files
        .initrd
        .clone()
        .ok_or_else(|| Error::Config("a job needs an initramfs".into()))?;
    let prepared = job::prepare_from_file(&base, &job.script)?;
    let scratch = tempfile::tempdir().map_err(|source| Error::Io {
        what: "create a scratch directory for the job".into(),
        source,
    })?;
    let initrd = scratch.path().join("initramfs-with-job");
    std::fs::write(&initrd, &prepared.initrd).map_err(|source| Error::Io {
        what: format!("write {}", initrd.display()),
        source,
    })?;
    files.image.initramfs_bytes = prepared.initrd.len() as u64;
    files.image.total_bytes = files.image.kernel_bytes + files.image.initramfs_bytes;
    files.initrd = Some(initrd);
    let vm = vm::spawn_files(config, files, Some(scratch), called)?;
    let exit = vm.wait_timeout(Some(job.timeout));
    if exit.is_none() {
        vm.kill();
    }
    let output = prepared.parse(&vm.console().text())?;
    Ok(JobResult {
        output,
        metrics: vm.metrics(),
    })
}
