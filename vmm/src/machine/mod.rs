//! The machine: what it is asked to be ([`VmConfig`], in `config.rs`), its
//! assembly ([`MachineBuilder`], in `builder.rs`: where other code adds MMIO
//! devices, IRQs, eventfds and command-line fragments before boot, with one
//! entry point for boot and one for restore), and the running VM here
//! ([`Machine`]: stop from any thread, pause and resume, wait for the
//! [`ExitReason`] and the [`RunMetrics`]). The vCPU threads' loop and their
//! shared run state are `crate::kvm::vcpu::run`.
//!
//! ```no_run
//! use osso_vmm::{MachineBuilder, VmConfig};
//! let config = VmConfig::kernel("vmlinux", Some("initramfs.cpio.gz".into()));
//! let builder = MachineBuilder::new(config)?;
//! // builder.add_mmio_device(...), builder.register_irqfd(...), ...
//! let machine = builder.start()?;
//! let outcome = machine.wait();
//! println!("{} after {} us", outcome.exit, outcome.metrics.end_us);
//! # Ok::<(), osso_vmm::VmmError>(())
//! ```
//!
//! Stopping: [`StopHandle::stop`] records the reason, sets every vCPU's
//! `immediate_exit` from a signal handler (SIGRTMIN, sent with vmm-sys-util's
//! `Killable`) so a vCPU inside `KVM_RUN` returns at once with `EINTR`, and a
//! vCPU about to enter it does not enter.

mod builder;
mod config;
mod deadline;
mod net;

use builder::join_all;
pub use builder::MachineBuilder;
pub use config::{MmioSlot, VmConfig, VmmError, MAX_VCPUS};
pub use net::{AttachError, AttachedNet};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::devices::serial::Serial;
pub use crate::kvm::vcpu::run::{ExitObserver, ExitReason};
use crate::kvm::vcpu::run::{RunControl, VcpuRequest};
use crate::metrics::{memory_figures, RunMetrics, Timeline};

/// A cloneable handle that stops the VM from any thread.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<RunControl>,
}

impl StopHandle {
    /// Stops the VM with [`ExitReason::Stopped`] (unless it already ended).
    pub fn stop(&self) {
        self.shared.request_exit(ExitReason::Stopped);
    }

    /// Whether the VM has ended.
    pub fn has_exited(&self) -> bool {
        self.shared.reason().is_some()
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Why.
    pub exit: ExitReason,
    /// What was measured.
    pub metrics: RunMetrics,
}

/// A running VM.
pub struct Machine {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mmio: Bus,
    restore: Option<crate::metrics::RestoreMetrics>,
    serial: Arc<Serial>,
    shared: Arc<RunControl>,
    timeline: Arc<Timeline>,
    /// The vCPU threads, until [`Machine::wait`] joins them.
    handles: Mutex<Vec<JoinHandle<()>>>,
    vcpu_count: usize,
    /// A pause was asked and not ended ([`Machine::pause`]).
    paused: AtomicBool,
    protocol: &'static str,
    /// The network device, if one was attached: the machine owns it.
    net: Option<AttachedNet>,
    _kvm: Kvm,
}

impl Machine {
    /// The network device, if the machine has one.
    pub fn net(&self) -> Option<&AttachedNet> {
        self.net.as_ref()
    }

    /// The host side of the user-mode network, if the machine has one.
    pub fn user_net(&self) -> Option<&crate::net::UserNetHandle> {
        self.net.as_ref().and_then(|n| n.user.as_ref())
    }

    /// Stops the devices' threads and closes their backends now (a TAP fd,
    /// the user network), without waiting for the machine to be dropped;
    /// dropping it does the same. For an owner that hands the rest of the
    /// teardown (closing the VM, unmapping RAM) to another thread.
    pub fn release_devices(&self) {
        if let Some(n) = &self.net {
            n.release();
        }
    }

    /// A handle that stops the VM from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops the VM with [`ExitReason::Stopped`].
    pub fn stop(&self) {
        self.stop_handle().stop();
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm.clone()
    }

    /// Guest RAM.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    /// The run's timeline (milestones so far).
    pub fn timeline(&self) -> Arc<Timeline> {
        self.timeline.clone()
    }

    /// The exit reason if the VM has ended, without waiting.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.reason()
    }

    /// Calls `observer` once when the VM ends, with why; at once if it has
    /// already ended. It runs on the thread that ended the VM, so it must be
    /// short and must not wait for the VM: a way to be told of the end
    /// without a thread that waits for it.
    pub fn on_exit(&self, observer: ExitObserver) {
        self.shared.on_exit(observer);
    }

    /// Waits up to `timeout` for the VM to end, without joining its vCPU
    /// threads ([`Machine::wait`] does).
    pub fn wait_for_exit(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner());
        while exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            exit = self
                .shared
                .exited
                .wait_timeout(exit, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        exit.clone()
    }

    /// Asks every vCPU to park out of `KVM_RUN` and waits for each to say
    /// it has. The VM stays paused until [`Machine::resume`]. Fails if the
    /// VM ended or a vCPU did not park within `timeout` (the pause is then
    /// undone).
    fn pause_vcpus(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        self.paused.store(true, Ordering::SeqCst);
        let parked = self.tell_each(VcpuRequest::Pause);
        self.shared.kick_all();
        for (i, rx) in parked.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                self.resume();
                return Err(match self.shared.reason() {
                    Some(r) => format!("the VM has ended ({r})"),
                    None => format!("vCPU {i} did not park within {timeout:?}"),
                });
            }
        }
        Ok(())
    }

    /// Sends each vCPU, in index order, the request `make` builds around a
    /// reply channel of its own; returns the receiving ends.
    fn tell_each<T>(
        &self,
        make: impl Fn(std::sync::mpsc::Sender<T>) -> VcpuRequest,
    ) -> Vec<std::sync::mpsc::Receiver<T>> {
        (0..self.vcpu_count)
            .map(|i| {
                let (reply, rx) = std::sync::mpsc::channel();
                self.shared.tell(i, make(reply));
                rx
            })
            .collect()
    }

    /// Asks every parked vCPU for its state, in index order.
    fn save_vcpus(
        &self,
        timeout: Duration,
        msr_list: &[u32],
    ) -> Result<Vec<crate::kvm::vcpu::state::VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let msr_list: Arc<[u32]> = msr_list.into();
        // Parked vCPUs wait on their channel: no kick needed.
        let replies = self.tell_each(|reply| VcpuRequest::SaveState {
            msr_list: msr_list.clone(),
            reply,
        });
        let mut out = Vec::with_capacity(self.vcpu_count);
        for (i, rx) in replies.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(state)) => out.push(state),
                Ok(Err(e)) => return Err(format!("saving vCPU {i}: {e}")),
                Err(_) => return Err(format!("vCPU {i} saved nothing within {timeout:?}")),
            }
        }
        Ok(out)
    }

    /// Pauses every vCPU and has each save its state; returns the states in
    /// index order. The VM stays paused until [`Machine::resume`]. Fails if
    /// the VM ended, a vCPU did not park within `timeout`, or a vCPU's state
    /// could not be read (the pause is then undone).
    pub(crate) fn pause_and_save(
        &self,
        timeout: Duration,
        msr_list: &[u32],
    ) -> Result<Vec<crate::kvm::vcpu::state::VcpuState>, String> {
        self.pause_vcpus(timeout)?;
        self.save_vcpus(timeout, msr_list).inspect_err(|_| {
            // Not left paused behind an error.
            self.resume();
        })
    }

    /// Pauses the VM: every vCPU parks out of `KVM_RUN`. Devices keep their
    /// threads (a paused guest posts no new work).
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        self.pause_vcpus(timeout)
    }

    /// Ends a pause: parked vCPUs run on.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.shared.tell_all(|| VcpuRequest::Resume);
    }

    /// Whether the VM is paused (a pause was asked and not ended).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The restore phases, for a machine made by [`crate::snapshot::restore`].
    pub fn restore_metrics(&self) -> Option<crate::metrics::RestoreMetrics> {
        self.restore
    }

    pub(crate) fn kvm(&self) -> &Kvm {
        &self._kvm
    }

    pub(crate) fn mmio_ranges(&self) -> Vec<(u64, u64)> {
        self.mmio.ranges().iter().map(|r| (r.base, r.len)).collect()
    }

    /// How the guest was started: the boot protocol (`pvh`, `linux-64bit`,
    /// `raw-code`)
    /// or `restored`.
    pub fn boot_protocol(&self) -> &'static str {
        self.protocol
    }

    pub(crate) fn serial_state(&self) -> crate::devices::serial::SerialState {
        use crate::persist::Persist;
        self.serial.save_state()
    }

    /// Queues console input for the guest; returns the bytes accepted.
    pub fn send_console_input(&self, bytes: &[u8]) -> usize {
        self.serial.enqueue_input(bytes)
    }

    /// Waits for the VM to end (by itself, a stop, or the timeout) and joins
    /// its vCPU threads, measuring nothing: what an owner that only tears
    /// the VM down needs. [`Machine::wait`] does this, then takes the
    /// metrics. A second call returns at once.
    pub fn join(&self) {
        {
            let mut exit = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner());
            while exit.is_none() {
                exit = self
                    .shared
                    .exited
                    .wait(exit)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        // Make sure every vCPU is on its way out, then join them.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.kick_all();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        join_all(&self.shared, handles);
    }

    /// Waits for the VM to end (by itself, a stop, or the timeout), joins the
    /// vCPU threads and returns the reason and the metrics. Takes `&self` so
    /// that the machine can be shared (`Arc<Machine>`) with a caller taking
    /// snapshots; a second call returns at once.
    pub fn wait(&self) -> RunOutcome {
        self.join();
        let exit = self.shared.reason().unwrap_or(ExitReason::Stopped);
        let mem = memory_figures(&self.mem);
        let t = &self.timeline;
        let metrics = RunMetrics {
            start_us: 0,
            first_kvm_run_us: t.first_kvm_run_us(),
            init_started_us: t.init_started_us(),
            kernel_panic_us: t.kernel_panic_us(),
            boot_timer_us: t.boot_timer_us(),
            end_us: self
                .shared
                .end_us
                .get()
                .copied()
                .unwrap_or_else(|| t.now_us()),
            exit_reason: exit.to_string(),
            boot_protocol: self.protocol.to_string(),
            guest_mem_bytes: mem.guest_mem_bytes,
            guest_resident_bytes: mem.guest_resident_bytes,
            process_rss_bytes: mem.process_rss_bytes,
            vmm_rss_bytes: mem.vmm_rss_bytes,
            vmm_anon_rss_bytes: mem.vmm_anon_rss_bytes,
            restore: self.restore,
        };
        RunOutcome { exit, metrics }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let handles = std::mem::take(self.handles.get_mut().unwrap_or_else(|p| p.into_inner()));
        if !handles.is_empty() {
            self.shared.request_exit(ExitReason::Stopped);
            join_all(&self.shared, handles);
        }
        self.release_devices();
    }
}

/// Creates, starts and waits for a VM: the whole run in one call.
pub fn run(config: VmConfig) -> Result<RunOutcome, VmmError> {
    Ok(MachineBuilder::new(config)?.start()?.wait())
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpu_count)
            .field("protocol", &self.protocol)
            .field("exit", &self.shared.reason())
            .finish_non_exhaustive()
    }
}
