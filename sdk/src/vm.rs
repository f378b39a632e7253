//! [`spawn`], [`restore`] and the [`Vm`] handle: one running microVM, its
//! console, its network and its metrics, and its snapshots
//! ([`Vm::snapshot`]). Dropping a `Vm` stops it and releases everything it
//! holds (vCPU and device threads, file descriptors, guest memory).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use osso_vmm::metrics::{
    guest_mapping_usage, memory_figures, process_rss_bytes, vmm_rss_since, Timeline,
};
use osso_vmm::net::UserNetHandle;
use osso_vmm::snapshot;
use osso_vmm::AttachedNet;
use osso_vmm::{Machine, MachineBuilder, StopHandle};
use vm_memory::GuestMemoryMmap;

use crate::config::{Config, ReadyWhen};
use crate::console::Console;
use crate::error::Error;
use crate::exit::{Exit, ExitReason};
use crate::image::{resolve_image, BootFiles};
use crate::metrics::{ImageSize, Metrics, SpawnClock};
use crate::signal::Signal;
use crate::HostKvm;

/// A running (or ended) microVM.
pub struct Vm {
    /// Told of console lines, boot milestones and the end (readiness waits).
    signal: Arc<Signal>,
    console: Console,
    stop: StopHandle,
    timeline: Arc<Timeline>,
    /// The VMM's machine: it tells of the end ([`Machine::on_exit`]) and is
    /// waited on directly, so a VM has no thread of its own that waits.
    /// `None` only while being dropped.
    machine: Option<Arc<Machine>>,
    /// Leave closing the VM to the reaper thread on drop.
    background_teardown: bool,
    /// Microseconds from the VMM's start (spawn() after image preparation,
    /// restore()) to ready.
    ready_us: OnceLock<u64>,
    /// spawn() to the VMM's start; None for a restored VM.
    image_prepare_us: Option<u64>,
    /// The process RSS just before the VMM started on this VM.
    rss_baseline_bytes: u64,
    /// For a VM made by [`restore`]: its snapshot and restore phases.
    restored: Option<RestoredFrom>,
    /// Serialises pause, resume and snapshot.
    control: Mutex<()>,
    mem: Option<GuestMemoryMmap>,
    forwards: Vec<std::net::SocketAddr>,
    image: ImageSize,
    host_kvm: HostKvm,
    // Files this VM owns (a job's initramfs), removed when it is dropped.
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("ended", &self.has_ended())
            .field(
                "net",
                &self.machine.as_ref().and_then(|m| m.net().map(|n| n.slot)),
            )
            .finish_non_exhaustive()
    }
}

/// Where a restored VM came from.
#[derive(Debug, Clone)]
struct RestoredFrom {
    snapshot: PathBuf,
    phases: crate::metrics::RestorePhases,
}

/// Boots a VM as `config` says and returns once it is ready (as
/// [`Config::ready`] defines), or fails: bad config, the image cannot be
/// found or checked (it is never built here: [`Error::NoImage`] names what
/// builds it), the VMM refused, the guest ended first, or the boot timeout
/// passed (the VM is then stopped). Preparing the image is measured apart
/// from the boot ([`crate::metrics::BootPhases::image_prepare_us`]).
pub fn spawn(config: Config) -> Result<Vm, Error> {
    let called = Instant::now();
    config.validate()?;
    let files = resolve_image(&config)?;
    spawn_files(config, files, None, called)
}

/// Starts the VMM on prepared files; `called` is when spawn() or run() was
/// called (image preparation is from then to now).
pub(crate) fn spawn_files(
    config: Config,
    files: BootFiles,
    scratch: Option<tempfile::TempDir>,
    called: Instant,
) -> Result<Vm, Error> {
    // The VMM starts here: the memory baseline first, then the boot clock.
    let rss_baseline_bytes = process_rss_bytes();
    let clock = SpawnClock {
        called,
        vmm_start: Instant::now(),
    };
    let signal = Arc::new(Signal::default());
    let console = Console::new(config.console_limit, config.echo_console, signal.clone());
    let vmc = config.vm_config(
        files.kernel,
        files.initrd,
        console.line_sink(),
        clock.vmm_start,
    );
    let mut builder = MachineBuilder::new(vmc).map_err(Error::vmm)?;
    observe_milestones(&builder.timeline(), &signal);
    builder
        .attach_net(&config.net_config())
        .map_err(Error::net)?;
    let forwards = set_up_forwards(builder.net(), &config)?;
    let machine = builder.start().map_err(Error::vmm)?;
    Vm::assemble(VmParts {
        console,
        signal,
        machine,
        forwards,
        image: files.image,
        scratch,
        restored: None,
        image_prepare_us: Some(clock.image_prepare_us()),
        rss_baseline_bytes,
        ready: config.ready.clone(),
        boot_timeout: config.boot_timeout,
        background_teardown: config.background_teardown,
    })
}

/// What [`Vm::assemble`] puts together.
struct VmParts {
    console: Console,
    signal: Arc<Signal>,
    machine: Machine,
    forwards: Vec<std::net::SocketAddr>,
    image: ImageSize,
    scratch: Option<tempfile::TempDir>,
    restored: Option<RestoredFrom>,
    image_prepare_us: Option<u64>,
    rss_baseline_bytes: u64,
    ready: ReadyWhen,
    boot_timeout: Duration,
    background_teardown: bool,
}

/// Restores the snapshot in `dir` (written by [`Vm::snapshot`]) into a new
/// VM and returns once it is ready. Guest RAM is the snapshot's memory file
/// mapped copy-on-write, so clones of one snapshot share every page none of
/// them wrote; each clone gets its own network backend (its own private user
/// network: clones need no renaming).
///
/// From `config` only the host side is used: network backend, forwards and
/// allowed ports, console, readiness, timeouts and seccomp. RAM size, vCPUs,
/// kernel and command line come from the snapshot. Readiness: `GuestPing`
/// pings the clone; `ConsoleLine` waits for a line printed after the
/// restore; `BootTimer` and `Started` mean "the vCPUs run" (a restored
/// guest has long passed its boot-timer write).
///
/// Errors: a missing, corrupt, truncated or incompatible snapshot
/// ([`Error::Snapshot`], saying which), a snapshot with a network device
/// restored with `Network::None`, or readiness not reached in time.
pub fn restore(dir: impl AsRef<Path>, config: Config) -> Result<Vm, Error> {
    let rss_baseline_bytes = process_rss_bytes();
    let started = Instant::now();
    let dir = dir.as_ref();
    config.validate_host_side()?;
    let signal = Arc::new(Signal::default());
    let console = Console::new(config.console_limit, config.echo_console, signal.clone());
    let opts = config.restore_options(console.line_sink(), started);
    let machine = snapshot::restore(dir, opts).map_err(Error::snapshot)?;
    // The vCPUs already run: a milestone recorded before this is read from
    // the timeline by wait_ready, which checks before it waits.
    observe_milestones(&machine.timeline(), &signal);
    if config.ready == ReadyWhen::GuestPing && machine.user_net().is_none() {
        machine.stop();
        return Err(Error::Config(format!(
            "ready when the guest answers ping, but the snapshot in {} has no network device",
            dir.display()
        )));
    }
    let forwards = match set_up_forwards(machine.net(), &config) {
        Ok(f) => f,
        Err(e) => {
            machine.stop();
            return Err(e);
        }
    };
    let phases = machine.restore_metrics().unwrap_or_default().into();
    let ready = match &config.ready {
        ReadyWhen::BootTimer => ReadyWhen::Started,
        r => r.clone(),
    };
    Vm::assemble(VmParts {
        console,
        signal,
        machine,
        forwards,
        image: ImageSize::default(),
        scratch: None,
        restored: Some(RestoredFrom {
            snapshot: dir.to_path_buf(),
            phases,
        }),
        image_prepare_us: None,
        rss_baseline_bytes,
        ready,
        boot_timeout: config.boot_timeout,
        background_teardown: config.background_teardown,
    })
}

/// Tells `signal` of every boot milestone `timeline` records.
fn observe_milestones(timeline: &osso_vmm::metrics::Timeline, signal: &Arc<Signal>) {
    let signal = signal.clone();
    timeline.observe(Box::new(move || signal.notify()));
}

/// Binds the forwards of `config` on the VM's user network.
fn set_up_forwards(
    net: Option<&AttachedNet>,
    config: &Config,
) -> Result<Vec<std::net::SocketAddr>, Error> {
    let mut out = Vec::new();
    if let crate::config::Network::User { forwards, .. } = &config.network {
        if forwards.is_empty() {
            return Ok(out);
        }
        let user = net
            .and_then(|n| n.user.as_ref())
            .ok_or_else(|| Error::Config("forwards need the user network".into()))?;
        for &(host, guest) in forwards {
            let addr = user.forward(host, guest).map_err(|source| Error::Io {
                what: format!("forward 127.0.0.1:{host} to guest port {guest}"),
                source,
            })?;
            out.push(addr);
        }
    }
    Ok(out)
}

impl Vm {
    /// Hooks the end of the VM to the console and the readiness signal, and
    /// waits until the VM is ready.
    fn assemble(p: VmParts) -> Result<Vm, Error> {
        let machine = p.machine;
        {
            let console = p.console.clone();
            let signal = p.signal.clone();
            machine.on_exit(Box::new(move |_| {
                console.close();
                signal.notify();
            }));
        }
        let machine = Arc::new(machine);
        let vm = Vm {
            console: p.console,
            signal: p.signal,
            stop: machine.stop_handle(),
            timeline: machine.timeline(),
            mem: Some(machine.guest_memory()),
            machine: Some(machine),
            background_teardown: p.background_teardown,
            ready_us: OnceLock::new(),
            image_prepare_us: p.image_prepare_us,
            rss_baseline_bytes: p.rss_baseline_bytes,
            restored: p.restored,
            control: Mutex::new(()),
            forwards: p.forwards,
            image: p.image,
            host_kvm: HostKvm::detect(),
            _scratch: p.scratch,
        };
        vm.wait_ready(&p.ready, p.boot_timeout)?;
        let _ = vm.ready_us.set(vm.timeline.now_us());
        Ok(vm)
    }

    /// Pauses the VM, writes a snapshot of it into `dir` (created if
    /// missing; files already there are replaced by rename, so clones
    /// restored from them keep their pages), and lets it run on (a VM the
    /// caller paused with [`Vm::pause`] stays paused).
    /// Saved: guest RAM (one sparse file), every vCPU's state, the
    /// in-kernel irqchip, PIT and clock, the UART, and the virtio-net
    /// transport and queues (the network backend itself is not saved: each
    /// restore gets a fresh one). The format is versioned and checked on
    /// restore. Fails if the VM has ended or its vCPUs do not pause within
    /// 5 s (the VM then runs on).
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<(), Error> {
        let dir = dir.as_ref();
        let _one = self.lock_control();
        // A VM the caller paused stays paused; one paused here resumes.
        let machine = self.machine();
        let was_paused = machine.is_paused();
        let r = machine.snapshot(dir);
        if !was_paused {
            machine.resume();
        }
        r.map_err(Error::snapshot)
    }

    /// Pauses every vCPU (devices keep running; a paused guest posts no new
    /// work). [`Vm::resume`] goes on.
    pub fn pause(&self) -> Result<(), Error> {
        let _one = self.lock_control();
        self.machine()
            .pause(Duration::from_secs(5))
            .map_err(|e| Error::snapshot(snapshot::SnapshotError::Pause(e)))
    }

    /// Ends a [`Vm::pause`].
    pub fn resume(&self) {
        let _one = self.lock_control();
        self.machine().resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.machine().is_paused()
    }

    fn machine(&self) -> &Machine {
        // Set from construction until drop.
        self.machine
            .as_deref()
            .unwrap_or_else(|| unreachable!("the machine is gone only in drop"))
    }

    /// Pause, resume and snapshot one at a time: a snapshot's resume must
    /// not land in the middle of another snapshot's writing.
    fn lock_control(&self) -> std::sync::MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this VM was made by [`restore`].
    pub fn is_restored(&self) -> bool {
        self.restored.is_some()
    }

    /// Waits until `ready` holds; stops the VM and fails on timeout or early
    /// end. Between checks it sleeps until something changes (a console
    /// line, a boot milestone, the VM's end; see [`Signal`]); only
    /// `GuestPing` acts, sending a ping each round.
    fn wait_ready(&self, ready: &ReadyWhen, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut seq: u16 = 0;
        loop {
            let seen = self.signal.generation();
            let ok = match ready {
                ReadyWhen::BootTimer => self.timeline.boot_timer_us().is_some(),
                ReadyWhen::Started => self.timeline.first_kvm_run_us().is_some(),
                ReadyWhen::ConsoleLine(s) => self.console.contains(s),
                ReadyWhen::GuestPing => {
                    seq = seq.wrapping_add(1);
                    self.user_net()
                        .map(|u| u.ping_guest(seq, Duration::from_millis(300)).is_ok())
                        .unwrap_or(false)
                }
            };
            if ok {
                return Ok(());
            }
            if let Some(exit) = self.exit_now() {
                return Err(Error::EndedBeforeReady {
                    reason: exit.to_string(),
                    console_tail: self.console.tail(20),
                });
            }
            if Instant::now() >= deadline {
                self.stop.stop();
                return Err(Error::BootTimeout {
                    timeout,
                    ready: ready.to_string(),
                    console_tail: self.console.tail(20),
                });
            }
            if *ready != ReadyWhen::GuestPing {
                self.signal.wait_past(seen, deadline);
            }
        }
    }

    /// The exit, if the VM has ended.
    fn exit_now(&self) -> Option<Exit> {
        self.machine().exit_reason().map(|r| Exit {
            reason: ExitReason::from(&r),
        })
    }

    /// Whether the VM has ended.
    pub fn has_ended(&self) -> bool {
        self.exit_now().is_some()
    }

    /// The console: captured text, lines, live stream.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The host side of the user-mode network, if the VM has one.
    fn user_net(&self) -> Option<&UserNetHandle> {
        self.machine.as_ref().and_then(|m| m.user_net())
    }

    /// Opens a TCP connection to `guest_port` in the guest through the user
    /// network; returns a connected stream.
    pub fn connect(
        &self,
        guest_port: u16,
        timeout: Duration,
    ) -> Result<std::os::unix::net::UnixStream, Error> {
        let user = self.user_net().ok_or_else(|| self.no_user_net())?;
        user.connect(guest_port, timeout)
            .map_err(|source| Error::Io {
                what: format!("connect to guest port {guest_port}"),
                source,
            })
    }

    /// Pings the guest (10.0.2.15) from its gateway; returns the round trip.
    pub fn ping(&self, seq: u16, timeout: Duration) -> Result<Duration, Error> {
        let user = self.user_net().ok_or_else(|| self.no_user_net())?;
        user.ping_guest(seq, timeout).map_err(|source| Error::Io {
            what: "ping the guest".into(),
            source,
        })
    }

    /// Forwards host loopback `host_port` (0: any free port) to `guest_port`;
    /// returns the bound host address.
    pub fn forward(&self, host_port: u16, guest_port: u16) -> Result<std::net::SocketAddr, Error> {
        let user = self.user_net().ok_or_else(|| self.no_user_net())?;
        user.forward(host_port, guest_port)
            .map_err(|source| Error::Io {
                what: format!("forward host port {host_port} to guest port {guest_port}"),
                source,
            })
    }

    /// The host addresses of the forwards set in the config, in order.
    pub fn forwards(&self) -> &[std::net::SocketAddr] {
        &self.forwards
    }

    fn no_user_net(&self) -> Error {
        let has_net = self.machine.as_ref().is_some_and(|m| m.net().is_some());
        Error::NoUserNet(if has_net { "tap" } else { "none" }.into())
    }

    /// This VM's figures, now.
    pub fn metrics(&self) -> Metrics {
        let m = self.mem.as_ref().map(memory_figures).unwrap_or_default();
        // A clone's RAM is a private file mapping shared with its siblings:
        // /proc/self/smaps says what this process maps of it (mincore would
        // count every page of the file in the page cache) and what it holds
        // alone. A cold VM's RAM is anonymous and all its own (and smaps may
        // merge it with a neighbour's mapping), so mincore's resident pages
        // are what the process RSS holds of it, and private = proportional.
        let (guest_rss_bytes, guest_pss_bytes, guest_private_bytes) =
            match (&self.mem, &self.restored) {
                (Some(mem), Some(_)) => {
                    let u = guest_mapping_usage(mem);
                    (u.rss_bytes, u.pss_bytes, u.private_bytes)
                }
                _ => (
                    m.guest_resident_bytes,
                    m.guest_resident_bytes,
                    m.guest_resident_bytes,
                ),
            };
        let process_rss_bytes = m.process_rss_bytes;
        let vmm_rss_bytes =
            vmm_rss_since(self.rss_baseline_bytes, process_rss_bytes, guest_rss_bytes);
        let machine = self.machine();
        Metrics {
            boot: Metrics::phases(
                self.image_prepare_us,
                self.timeline.first_kvm_run_us(),
                self.timeline.init_started_us(),
                self.timeline.boot_timer_us(),
            ),
            ready_us: self.ready_us.get().copied(),
            restore: self
                .restored
                .as_ref()
                .map(|r| crate::metrics::RestoreFigures {
                    snapshot: r.snapshot.clone(),
                    phases: r.phases,
                    first_run_us: self.timeline.first_kvm_run_us(),
                    ready_us: self.ready_us.get().copied(),
                }),
            guest_pss_bytes,
            guest_private_bytes,
            vmm_rss_bytes,
            process_rss_bytes,
            rss_baseline_bytes: self.rss_baseline_bytes,
            guest_resident_bytes: m.guest_resident_bytes,
            guest_mem_bytes: m.guest_mem_bytes,
            image: self.image.clone(),
            exit: machine.exit_reason().map(|r| r.to_string()),
            host_kvm: self.host_kvm,
            boot_protocol: machine.boot_protocol().to_string(),
        }
    }

    /// The exit if the VM has ended, without waiting (like
    /// `std::process::Child::try_wait`).
    pub fn try_wait(&self) -> Option<Exit> {
        self.exit_now()
    }

    /// Waits up to `timeout` for the guest to end by itself (or its lifetime
    /// to pass); None if `timeout` passed first. The VM keeps running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        self.wait_until(Some(timeout))
    }

    /// `None` waits for ever.
    fn wait_until(&self, timeout: Option<Duration>) -> Option<Exit> {
        // Long rounds rather than a wait without end: the same call serves.
        const ROUND: Duration = Duration::from_secs(3600);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => ROUND,
            };
            if let Some(r) = self.machine().wait_for_exit(left) {
                return Some(Exit {
                    reason: ExitReason::from(&r),
                });
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
        }
    }

    /// Waits for the guest to end.
    pub fn wait(&self) -> Exit {
        loop {
            if let Some(e) = self.wait_until(None) {
                return e;
            }
        }
    }

    /// Gives the guest `grace` to end by itself, then stops it. Osso's guest
    /// has no agent to ask it to power off, so this waits rather than signals.
    pub fn shutdown(&self, grace: Duration) -> Exit {
        if let Some(e) = self.wait_timeout(grace) {
            return e;
        }
        self.kill()
    }

    /// Stops the VM now (its vCPUs are kicked out of KVM_RUN) and waits for it.
    pub fn kill(&self) -> Exit {
        self.stop.stop();
        self.wait()
    }
}

// A `Vm` is shared between threads (a pool hands them out, a server keeps
// them in its state): that it stays Send and Sync is checked here, at
// compile time.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Vm>();
};

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(m) = &self.machine {
            // The vCPU threads are kicked out of KVM_RUN: join them (no
            // metrics: nobody reads them on a drop).
            m.join();
            // The device thread stops, and the backend (a TAP fd, the user
            // network) closes now, even if the machine goes to the reaper
            // below.
            m.release_devices();
        }
        // What is left is closing the KVM VM (the host kernel destroys it)
        // and unmapping guest RAM, in that order.
        let rest = (self.machine.take(), self.mem.take());
        if self.background_teardown {
            crate::reaper::defer(Box::new(rest));
        } else {
            drop(rest);
        }
    }
}
