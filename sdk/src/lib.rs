//! osso-sdk: a fresh Linux microVM per request, from Rust.
//!
//! ```no_run
//! use std::time::Duration;
//! // Build the default Osso image once (minutes the first time; found in
//! // milliseconds after), then boot it and wait until it is ready.
//! osso_sdk::build_image(&osso_sdk::Config::default())?;
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
//! Which image: by default the Osso image `osso-guest` built from its
//! sources (the kernel and Toybox sources must be at hand, even for an image
//! already built: its cache key hashes them). Only [`build_image`] (or
//! `osso-guest build`) builds it; `spawn`, `run` and `prepare_image` never
//! do, and fail at once with [`Error::NoImage`] when it was never built. To boot a prebuilt image
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
mod exit;
pub mod host;
mod image;
mod image_dir;
pub mod job;
pub mod metrics;
pub mod pool;
pub mod reaper;
mod signal;
pub mod vm;

use std::time::{Duration, Instant};

pub use config::{Config, ConfigBuilder, Image, KernelFormat, Network, ReadyWhen};
pub use console::Console;
pub use error::Error;
pub use exit::{Exit, ExitReason};
pub use host::HostKvm;
pub use image::{build_image, prepare_image};
pub use job::JobOutput;
pub use metrics::{Metrics, RestoreFigures, RestorePhases};
pub use osso_vmm::net::user::PARKED_KERNEL_CMDLINE;
pub use pool::Pool;
pub use reaper::wait_for_background_teardown;
pub use vm::{restore, spawn, Vm};

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
    /// How long the job may take once the guest is ready, its output
    /// included (it travels over the serial console); when it passes, the
    /// VM is stopped and [`run`] fails with [`Error::JobTimeout`].
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
/// Fails at once under a KVM that cannot run guest user space; with
/// [`Error::JobTimeout`] when the job outlives [`Job::timeout`]; with
/// [`job::JobError::OutputTooLarge`] when its output does not fit in the
/// console kept for it (about 12 MiB of stdout and stderr together, see
/// [`job::JOB_CONSOLE_LIMIT`]; a larger [`Config::console_limit`] raises it).
pub fn run(job: Job) -> Result<JobResult, Error> {
    // Image preparation (finding the image, appending the job) runs from
    // here to the VMM's start, measured apart from the boot.
    let called = Instant::now();
    if HostKvm::detect() != HostKvm::Hardware {
        return Err(Error::NoGuestUserSpace);
    }
    let mut config = job.config;
    config.ready = ReadyWhen::BootTimer;
    // The result comes back base64-encoded over the console, after the boot
    // log: keep enough of it for a large output (see JOB_CONSOLE_LIMIT).
    config.console_limit = config.console_limit.max(job::JOB_CONSOLE_LIMIT);
    let console_limit = config.console_limit;
    config.validate()?;
    let mut files = image::resolve_image(&config)?;
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
    let finished = vm.wait_timeout(job.timeout).is_some();
    if !finished {
        vm.kill();
    }
    let output = job_output(
        &prepared,
        vm.console(),
        finished,
        job.timeout,
        console_limit,
    )?;
    Ok(JobResult {
        output,
        metrics: vm.metrics(),
    })
}

/// The job's result from the console of its VM, which has ended by itself
/// (`finished`) or was stopped when `timeout` passed. A complete result is
/// returned even if the VM was stopped (the job finished, the guest was
/// slow to end); otherwise the error says why there is none: the timeout,
/// console lines dropped over `limit` (the output was too large), or what
/// the guest printed.
fn job_output(
    prepared: &job::PreparedJob,
    console: &Console,
    finished: bool,
    timeout: Duration,
    limit: usize,
) -> Result<JobOutput, Error> {
    match prepared.parse(&console.text()) {
        Ok(output) => Ok(output),
        Err(_) if !finished => Err(Error::JobTimeout {
            timeout,
            console_tail: console.tail(20),
        }),
        Err(_) if console.dropped_lines() > 0 => Err(job::JobError::OutputTooLarge {
            limit,
            dropped_lines: console.dropped_lines(),
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {

    use base64::Engine;

    use super::*;

    /// A console holding `text`, kept within `limit` bytes.
    fn console_with(text: &str, limit: usize) -> Console {
        let c = Console::new(limit, false, Default::default());
        console::tests::write_console(&c, text.as_bytes());
        c
    }

    /// What the guest's /init prints for a job: the framing around
    /// `base64 -w 76` of stdout and stderr, after a boot log.
    fn framed(nonce: &str, stdout: &[u8], stderr: &[u8], status: i32) -> String {
        let b64 = |b: &[u8]| {
            let s = base64::engine::general_purpose::STANDARD.encode(b);
            s.as_bytes()
                .chunks(76)
                .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
                .collect::<String>()
        };
        let mut t = "[    0.000000] Linux version 6.12\n".repeat(200);
        t += &format!("OSSO-JOB {nonce} STDOUT\n{}", b64(stdout));
        t += &format!("OSSO-JOB {nonce} STDERR\n{}", b64(stderr));
        t += &format!("OSSO-JOB {nonce} EXIT {status}\nosso: init done, rebooting\n");
        t
    }

    fn prepared(nonce: &str) -> job::PreparedJob {
        job::PreparedJob {
            initrd: Vec::new(),
            nonce: nonce.into(),
        }
    }

    #[test]
    fn a_one_mib_job_output_fits_the_job_console_but_not_the_default_one() {
        let stdout: Vec<u8> = b"0123456789abcde\n".repeat(1 << 16);
        assert_eq!(stdout.len(), 1 << 20);
        let text = framed("n1", &stdout, b"err\n", 0);
        let t = Duration::from_secs(1);
        let c = console_with(&text, job::JOB_CONSOLE_LIMIT);
        let out = job_output(&prepared("n1"), &c, true, t, job::JOB_CONSOLE_LIMIT).unwrap();
        assert_eq!(out.stdout, stdout);
        assert_eq!((out.stderr.as_slice(), out.status), (&b"err\n"[..], 0));
        // The default console (1 MiB) drops the start of the output: a
        // clear error, not a missing result.
        let limit = Config::default().console_limit;
        let c = console_with(&text, limit);
        let e = job_output(&prepared("n1"), &c, true, t, limit).unwrap_err();
        assert!(
            matches!(e, Error::Job(job::JobError::OutputTooLarge { limit: l, dropped_lines }) if l == limit && dropped_lines > 0),
            "{e}"
        );
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn a_job_stopped_at_its_timeout_says_so_unless_its_result_is_complete() {
        let t = Duration::from_secs(7);
        let limit = job::JOB_CONSOLE_LIMIT;
        // Stopped before any result: the timeout error, with the console's end.
        let c = console_with("[    1.0] booting\nSUCCESS: ONLINE\n", limit);
        let e = job_output(&prepared("n2"), &c, false, t, limit).unwrap_err();
        match &e {
            Error::JobTimeout {
                timeout,
                console_tail,
            } => {
                assert_eq!(*timeout, t);
                assert!(console_tail.contains("SUCCESS: ONLINE"), "{console_tail}");
            }
            other => panic!("wanted JobTimeout, got {other}"),
        }
        // Stopped after the whole result was printed: the result.
        let c = console_with(&framed("n2", b"out\n", b"", 3), limit);
        let out = job_output(&prepared("n2"), &c, false, t, limit).unwrap();
        assert_eq!((out.stdout.as_slice(), out.status), (&b"out\n"[..], 3));
        // Ended by itself with no result: what the framing lacked.
        let c = console_with("Kernel panic - not syncing\n", limit);
        let e = job_output(&prepared("n2"), &c, true, t, limit).unwrap_err();
        assert!(matches!(e, Error::Job(job::JobError::NoResult)), "{e}");
    }
}
