//! A vCPU running: its thread's loop (`KVM_RUN`, port and MMIO exits to the
//! buses, the exits that end the VM), its run state shared with the machine
//! ([`RunControl`]: running, paused with its state saved, or finished with an
//! [`ExitReason`]), and the kick that takes it out of `KVM_RUN` (a signal
//! whose handler sets `immediate_exit`). Asked to pause, a vCPU parks itself
//! and saves its own state ([`super::state::save_vcpu`]): the state does not
//! travel out of the thread and back.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::metrics::Timeline;

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest reset itself (i8042 reset, triple fault, KVM reset event).
    Reset,
    /// The guest shut down (KVM shutdown event, or HLT without an in-kernel LAPIC).
    Shutdown,
    /// The guest kernel panicked: a KVM crash event, or a reset or shutdown
    /// after a console line `Kernel panic - not syncing` (a kernel with
    /// `panic=-1` reboots at once after panicking; without this rule that
    /// would look like a clean reset).
    Panic,
    /// The configured timeout expired.
    Timeout,
    /// The host stopped it.
    Stopped,
    /// `KVM_EXIT_INTERNAL_ERROR` (or a failed VM entry).
    InternalError {
        /// KVM's suberror (1 = emulation failure); for a failed entry, the
        /// hardware entry failure reason.
        suberror: u64,
        /// The vCPU.
        vcpu: u8,
        /// The registers and extra data at the failure, as text.
        registers: String,
    },
    /// A vCPU ioctl failed or KVM exited in a way the VMM does not handle.
    VcpuError(String),
}

impl ExitReason {
    /// Whether the guest ended by itself (reset or shutdown).
    pub fn guest_ended_by_itself(&self) -> bool {
        matches!(self, ExitReason::Reset | ExitReason::Shutdown)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "reset"),
            ExitReason::Shutdown => write!(f, "shutdown"),
            ExitReason::Panic => write!(f, "guest kernel panic"),
            ExitReason::Timeout => write!(f, "timeout"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
            ExitReason::InternalError {
                suberror,
                vcpu,
                registers,
            } => write!(
                f,
                "KVM internal error (suberror {suberror}) on vCPU {vcpu}: {registers}"
            ),
            ExitReason::VcpuError(e) => write!(f, "vCPU error: {e}"),
        }
    }
}

/// The run state shared between the vCPU threads, the devices and the
/// machine's handle: why it ended (if it did), the stop flag, the pause and
/// what parked vCPUs saved.
pub(crate) struct RunControl {
    pub(crate) exit: Mutex<Option<ExitReason>>,
    pub(crate) exited: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) end_us: OnceLock<u64>,
    /// The vCPU threads to kick; emptied before they are joined.
    pub(crate) vcpu_threads: Mutex<Vec<PthreadKick>>,
    pub(crate) exit_evt: EventFd,
    pub(crate) timeline: Arc<Timeline>,
    /// Snapshot support: vCPUs park while this is set (see [`Machine::resume`]).
    pub(crate) pause: AtomicBool,
    /// Parked vCPUs and the state each saved on parking.
    pub(crate) parked: Mutex<ParkState>,
    /// Signalled when a vCPU parks, and when the pause ends.
    pub(crate) park_cv: Condvar,
    /// Told once of the exit, on the thread that caused it (see
    /// [`RunControl::on_exit`]); emptied when they are called.
    pub(crate) exit_observers: Mutex<Vec<ExitObserver>>,
}

/// Called once when the VM ends, with why. It runs on the thread that ended
/// the VM (a vCPU's, a device's, the deadline thread, or a caller's that
/// stopped it), so it must be short and must not wait for the VM.
pub type ExitObserver = Box<dyn FnOnce(&ExitReason) + Send>;

/// vCPUs parked by a pause, and what they saved.
#[derive(Default)]
pub(crate) struct ParkState {
    /// How many vCPUs are parked.
    pub(crate) count: usize,
    /// MSR indices to save (set by the pauser).
    pub(crate) msr_list: Vec<u32>,
    /// Each parked vCPU's saved state, by index.
    pub(crate) saved: Vec<Option<Result<super::state::VcpuState, String>>>,
}

/// A vCPU thread to kick, by the id std gives (`RawPthread`: an integer on
/// every Linux libc, so this is `Send` and `Sync` as it is). libc's
/// `pthread_t` is an integer on glibc but a pointer on musl: the id becomes
/// one only at the `pthread_kill`.
#[derive(Clone, Copy)]
pub(crate) struct PthreadKick(std::os::unix::thread::RawPthread);

impl PthreadKick {
    pub(crate) fn of<T>(h: &JoinHandle<T>) -> Self {
        PthreadKick(std::os::unix::thread::JoinHandleExt::as_pthread_t(h))
    }
}

// SAFETY: the id comes from a vCPU thread's JoinHandle and is only used
// while `RunControl::vcpu_threads` holds it, which is cleared (under its mutex)
// before those threads are joined, so the handle is always valid. The cast
// gives back the value the C library handed to std (on musl, the pointer it
// was made from).
unsafe impl Killable for PthreadKick {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0 as libc::pthread_t
    }
}

impl RunControl {
    /// Records `reason` if none was yet, and stops every vCPU.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        // The console line is scanned on the vCPU thread that wrote it, so a
        // panic line printed before the reset is always seen here.
        let reason = match reason {
            ExitReason::Reset | ExitReason::Shutdown
                if self.timeline.kernel_panic_us().is_some() =>
            {
                ExitReason::Panic
            }
            other => other,
        };
        let first = {
            let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
            if exit.is_none() {
                tracing::info!(%reason, "VM exit");
                let _ = self.end_us.get_or_init(|| self.timeline.now_us());
                *exit = Some(reason);
                true
            } else {
                false
            }
        };
        self.stop.store(true, Ordering::SeqCst);
        self.kick_all();
        if first {
            let _ = self.exit_evt.write(1);
        }
        self.exited.notify_all();
        if first {
            let observers = std::mem::take(
                &mut *self
                    .exit_observers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if let Some(reason) = self.reason() {
                for o in observers {
                    o(&reason);
                }
            }
        }
    }

    /// Calls `observer` once when the VM ends; at once (on this thread) if
    /// it already has.
    pub(crate) fn on_exit(&self, observer: ExitObserver) {
        // Registered under the exit lock, so an exit cannot slip between
        // the check and the registration: request_exit records the reason
        // under that lock before it takes the observers.
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        match exit.clone() {
            Some(reason) => {
                drop(exit);
                observer(&reason);
            }
            None => self
                .exit_observers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(observer),
        }
    }

    pub(crate) fn kick_all(&self) {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter() {
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                tracing::debug!(%e, "kick vCPU");
            }
        }
    }

    pub(crate) fn reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Const-initialised thread local without a destructor: no allocation, no
    // lock, async-signal-safe in practice.
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set by
        // the vCPU loop while it owns the VcpuFd and cleared before the VcpuFd
        // is dropped; writing `immediate_exit` is what KVM documents for this.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(vcpu_kick_signal(), handle_kick) {
            tracing::error!(%e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// What one vCPU thread runs with.
pub(crate) struct VcpuRunner {
    pub(crate) id: u8,
    pub(crate) seccomp: bool,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) shared: Arc<RunControl>,
}

/// What the loop does after an exit (decided once the exit's borrow of the
/// vCPU ends).
enum Next {
    Continue,
    Exit(ExitReason),
    InternalError,
    FailEntry(u64),
}

impl VcpuRunner {
    /// Parks this vCPU for a pause: completes a pending PIO/MMIO read (one
    /// `KVM_RUN` with `immediate_exit` set, as KVM documents), saves the
    /// vCPU's state for a snapshot, then waits until the pause ends or the VM
    /// stops.
    fn park(&self, vcpu: &mut VcpuFd) {
        vcpu.set_kvm_immediate_exit(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::debug!(vcpu = self.id, %e, "completing I/O before parking"),
            Ok(exit) => tracing::debug!(vcpu = self.id, ?exit, "exit while parking"),
        }
        vcpu.set_kvm_immediate_exit(0);
        let msr_list = {
            let p = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
            p.msr_list.clone()
        };
        let saved = super::state::save_vcpu(self.id, vcpu, &msr_list).map_err(|e| e.to_string());
        let mut p = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
        let i = usize::from(self.id);
        if p.saved.len() <= i {
            p.saved.resize_with(i + 1, || None);
        }
        p.saved[i] = Some(saved);
        p.count += 1;
        self.shared.park_cv.notify_all();
        while self.shared.pause.load(Ordering::SeqCst) && !self.shared.stop.load(Ordering::SeqCst) {
            p = self
                .shared
                .park_cv
                .wait_timeout(p, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        p.count -= 1;
        if let Some(s) = p.saved.get_mut(i) {
            *s = None;
        }
    }

    /// The vCPU thread: runs `vcpu` until the VM ends.
    pub(crate) fn run(self, mut vcpu: VcpuFd) {
        if self.seccomp {
            // Fail closed: a vCPU that cannot be confined does not run.
            if let Err(e) =
                crate::seccomp::apply_to_current_thread(crate::seccomp::ThreadKind::Vcpu)
            {
                self.shared.request_exit(ExitReason::VcpuError(format!(
                    "{e} (VmConfig::seccomp = false turns the filters off)"
                )));
                return;
            }
        }
        KVM_RUN_PTR.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
        let mut unknown_logged = 0u32;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                // Where the guest was when the host stopped it (timeouts,
                // stops): cheap, and what one needs to debug a hung boot.
                tracing::debug!(vcpu = self.id, regs = %dump_registers(&vcpu), "vCPU stopped");
                break;
            }
            if self.shared.pause.load(Ordering::SeqCst) {
                self.park(&mut vcpu);
                continue;
            }
            if self.id == 0 {
                self.shared.timeline.mark_first_kvm_run();
            }
            let next = match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) && unknown_logged < 32 {
                        unknown_logged += 1;
                        tracing::trace!(
                            port = format_args!("{port:#x}"),
                            ?data,
                            "PIO write to nothing"
                        );
                    }
                    Next::Continue
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) && unknown_logged < 32 {
                        unknown_logged += 1;
                        tracing::trace!(port = format_args!("{port:#x}"), "PIO read from nothing");
                    }
                    Next::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) && unknown_logged < 32 {
                        unknown_logged += 1;
                        tracing::debug!(
                            addr = format_args!("{addr:#x}"),
                            ?data,
                            "MMIO write to nothing: ignored"
                        );
                    }
                    Next::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) && unknown_logged < 32 {
                        unknown_logged += 1;
                        tracing::debug!(
                            addr = format_args!("{addr:#x}"),
                            "MMIO read from nothing: all ones"
                        );
                    }
                    Next::Continue
                }
                Ok(VcpuExit::Hlt) => Next::Exit(ExitReason::Shutdown),
                // A triple fault: the guest's way to reset (reboot=t).
                Ok(VcpuExit::Shutdown) => Next::Exit(ExitReason::Reset),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Exit(ExitReason::Shutdown),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Exit(ExitReason::Reset),
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Next::Exit(ExitReason::Panic),
                    other => {
                        tracing::debug!(other, "system event ignored");
                        Next::Continue
                    }
                },
                Ok(VcpuExit::InternalError) => Next::InternalError,
                Ok(VcpuExit::FailEntry(reason, _cpu)) => Next::FailEntry(reason),
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::IoapicEoi(_)) => {
                    Next::Continue
                }
                Ok(other) => Next::Exit(ExitReason::VcpuError(format!(
                    "unhandled KVM exit {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    Next::Continue
                }
                Err(e) => Next::Exit(ExitReason::VcpuError(format!("KVM_RUN failed: {e}"))),
            };
            match next {
                Next::Continue => {}
                Next::Exit(reason) => {
                    self.shared.request_exit(reason);
                    break;
                }
                Next::InternalError => {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so
                    // `internal` is the union member KVM filled in.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    let data: Vec<String> = internal.data[..n]
                        .iter()
                        .map(|d| format!("{d:#x}"))
                        .collect();
                    let registers =
                        format!("{}; data [{}]", dump_registers(&vcpu), data.join(", "));
                    self.shared.request_exit(ExitReason::InternalError {
                        suberror: u64::from(internal.suberror),
                        vcpu: self.id,
                        registers,
                    });
                    break;
                }
                Next::FailEntry(reason) => {
                    self.shared.request_exit(ExitReason::InternalError {
                        suberror: reason,
                        vcpu: self.id,
                        registers: format!("VM entry failed; {}", dump_registers(&vcpu)),
                    });
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }
}

fn dump_registers(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    match vcpu.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )),
        Err(e) => s.push_str(&format!("regs unavailable: {e}")),
    }
    match vcpu.get_sregs() {
        Ok(sr) => s.push_str(&format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x}",
            sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.base
        )),
        Err(e) => s.push_str(&format!(" sregs unavailable: {e}")),
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    pub(crate) fn control() -> Arc<RunControl> {
        Arc::new(RunControl {
            exit: Mutex::new(None),
            exited: Condvar::new(),
            stop: AtomicBool::new(false),
            end_us: OnceLock::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            timeline: Arc::new(Timeline::new(Instant::now())),
            pause: AtomicBool::new(false),
            parked: Mutex::new(ParkState::default()),
            park_cv: Condvar::new(),
            exit_observers: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn exit_observers_are_told_once_with_the_first_reason() {
        let c = control();
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        c.on_exit(Box::new(move |r| t.lock().unwrap().push(r.clone())));
        assert!(told.lock().unwrap().is_empty(), "told before the end");
        c.request_exit(ExitReason::Shutdown);
        c.request_exit(ExitReason::Stopped);
        assert_eq!(*told.lock().unwrap(), vec![ExitReason::Shutdown]);
        assert!(c.stop.load(Ordering::SeqCst));
        // Registered after the end: called at once, with the same reason.
        let t = told.clone();
        c.on_exit(Box::new(move |r| t.lock().unwrap().push(r.clone())));
        assert_eq!(
            *told.lock().unwrap(),
            vec![ExitReason::Shutdown, ExitReason::Shutdown]
        );
    }

    #[test]
    fn a_reset_after_a_panic_line_is_a_panic() {
        let c = control();
        let n = Arc::new(AtomicUsize::new(0));
        let seen = n.clone();
        c.on_exit(Box::new(move |r| {
            assert_eq!(*r, ExitReason::Panic);
            seen.fetch_add(1, Ordering::SeqCst);
        }));
        c.timeline.mark_kernel_panic();
        c.request_exit(ExitReason::Reset);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(c.reason(), Some(ExitReason::Panic));
    }
}
