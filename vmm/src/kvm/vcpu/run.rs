//! A vCPU running: its thread's loop (`KVM_RUN`, port and MMIO exits to the
//! buses, the exits that end the VM), the requests it answers
//! ([`VcpuRequest`]: pause, save your state, resume, stop), the run state it
//! shares with the machine ([`RunControl`]: running or finished with an
//! [`ExitReason`]), and the kick that takes it out of `KVM_RUN` (a signal
//! whose handler sets `immediate_exit`). A request travels on the vCPU's own
//! channel and is followed by a kick; the vCPU answers on the channel the
//! request carries. Its state is saved by the vCPU thread itself
//! ([`super::state::save_vcpu`]), which owns the `VcpuFd`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;

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
/// machine's handle: why it ended (if it did), the stop flag, and the way to
/// each vCPU's requests.
pub(crate) struct RunControl {
    pub(crate) exit: Mutex<Option<ExitReason>>,
    pub(crate) exited: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) end_us: OnceLock<u64>,
    /// The vCPU threads to kick; emptied before they are joined.
    pub(crate) vcpu_threads: Mutex<Vec<PthreadKick>>,
    pub(crate) exit_evt: EventFd,
    pub(crate) timeline: Arc<Timeline>,
    /// Each vCPU's request channel, by index (see [`RunControl::tell`]).
    pub(crate) requests: Mutex<Vec<Sender<VcpuRequest>>>,
    /// Told once of the exit, on the thread that caused it (see
    /// [`RunControl::on_exit`]); emptied when they are called.
    pub(crate) exit_observers: Mutex<Vec<ExitObserver>>,
}

/// Called once when the VM ends, with why. It runs on the thread that ended
/// the VM (a vCPU's, a device's, the deadline thread, or a caller's that
/// stopped it), so it must be short and must not wait for the VM.
pub type ExitObserver = Box<dyn FnOnce(&ExitReason) + Send>;

/// What the machine asks of a vCPU thread; it answers on the channel a
/// request carries.
pub(crate) enum VcpuRequest {
    /// Leave `KVM_RUN` (completing a pending port or MMIO read first) and
    /// wait for the next request; answered once parked. A parked vCPU
    /// answers at once.
    Pause(Sender<()>),
    /// Save your state (answered only while parked: a running vCPU's state
    /// would not match its siblings').
    SaveState {
        /// The MSRs to save.
        msr_list: Arc<[u32]>,
        /// Where the state goes.
        reply: Sender<Result<super::state::VcpuState, String>>,
    },
    /// Run on after a pause (ignored by a running vCPU).
    Resume,
    /// The VM ends: wakes a parked vCPU (a running one sees the stop flag).
    Stop,
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
        self.tell_all(|| VcpuRequest::Stop);
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

    /// Sends vCPU `index` a request (kick it after, so that a vCPU inside
    /// `KVM_RUN` sees it). False if there is no such vCPU or it has ended.
    pub(crate) fn tell(&self, index: usize, request: VcpuRequest) -> bool {
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests
            .get(index)
            .is_some_and(|tx| tx.send(request).is_ok())
    }

    /// Sends every vCPU the request `make` makes.
    pub(crate) fn tell_all(&self, make: impl Fn() -> VcpuRequest) {
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for tx in requests.iter() {
            // A vCPU that has ended has dropped its receiver: nothing to do.
            let _ = tx.send(make());
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
    /// This vCPU's requests ([`RunControl::tell`] sends them).
    pub(crate) requests: Receiver<VcpuRequest>,
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
    /// Answers the requests waiting for this running vCPU. False when the
    /// VM ends.
    fn answer_requests(&self, vcpu: &mut VcpuFd) -> bool {
        loop {
            match self.requests.try_recv() {
                Ok(VcpuRequest::Pause(reply)) => {
                    if !self.park(vcpu, reply) {
                        return false;
                    }
                }
                Ok(VcpuRequest::SaveState { reply, .. }) => {
                    let _ = reply.send(Err("the vCPU is running: pause it first".into()));
                }
                Ok(VcpuRequest::Resume) => {}
                Ok(VcpuRequest::Stop) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Parks this vCPU for a pause: completes a pending PIO/MMIO read (one
    /// `KVM_RUN` with `immediate_exit` set, as KVM documents), says it is
    /// parked, then answers requests (saving its state when asked) until it
    /// is resumed (true) or the VM ends (false).
    fn park(&self, vcpu: &mut VcpuFd, parked: Sender<()>) -> bool {
        vcpu.set_kvm_immediate_exit(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => tracing::debug!(vcpu = self.id, %e, "completing I/O before parking"),
            Ok(exit) => tracing::debug!(vcpu = self.id, ?exit, "exit while parking"),
        }
        vcpu.set_kvm_immediate_exit(0);
        let _ = parked.send(());
        while !self.shared.stop.load(Ordering::SeqCst) {
            match self.requests.recv() {
                Ok(VcpuRequest::Resume) => return true,
                Ok(VcpuRequest::Pause(reply)) => {
                    let _ = reply.send(());
                }
                Ok(VcpuRequest::SaveState { msr_list, reply }) => {
                    let saved = super::state::save_vcpu(self.id, vcpu, &msr_list)
                        .map_err(|e| e.to_string());
                    let _ = reply.send(saved);
                }
                Ok(VcpuRequest::Stop) | Err(_) => return false,
            }
        }
        false
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
            if !self.answer_requests(&mut vcpu) {
                tracing::debug!(vcpu = self.id, "vCPU stopped while parked");
                break;
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
            requests: Mutex::new(Vec::new()),
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
