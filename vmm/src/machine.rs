//! The machine: configuration ([`VmConfig`]), assembly ([`MachineBuilder`]:
//! where other code adds MMIO devices, IRQs, eventfds and command-line
//! fragments before boot), and the running VM ([`Machine`]: vCPU threads,
//! stop from any thread, wait for the [`ExitReason`] and the [`Metrics`]).
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

use std::cell::Cell;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, cmdline, BootEntry, BootSource};
use crate::bus::{Bus, BusDevice, BusError, SinkDevice};
use crate::devices::boot_timer::BootTimer;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleWriter, Serial};
use crate::kvm::{self, kvm_err, vcpu, KvmError};
use crate::layout::{self, LayoutError};
use crate::metrics::{memory_figures, Metrics, Timeline};

/// The most vCPUs a machine can have.
pub const MAX_VCPUS: u8 = boot::mptable::MAX_CPUS;

/// What a VM boots and how.
pub struct VmConfig {
    /// Kernel + initrd, or raw code.
    pub boot: BootSource,
    /// Guest RAM in MiB (default 128).
    pub mem_mib: u64,
    /// vCPUs (default 1).
    pub vcpus: u8,
    /// Base command line (default [`cmdline::DEFAULT_CMDLINE`]).
    pub cmdline_base: String,
    /// Appended last to the command line.
    pub cmdline_extra: Option<String>,
    /// The VM is stopped with [`ExitReason::Timeout`] after this long.
    pub timeout: Option<Duration>,
    /// Where the guest console output goes (default: discarded).
    pub console: Box<dyn Write + Send>,
    /// Host input for the guest console, read on a thread of its own (which
    /// ends at end of file, on a read error, or at its first read after the
    /// VM ended). [`Machine::send_console_input`] is the other way in.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// The instant the metrics count from (default: [`MachineBuilder::new`]).
    pub start: Option<Instant>,
    /// Append the PVM workaround: `None` = when the host's KVM is PVM.
    pub pvm_workaround: Option<bool>,
    /// Confine the vCPU and virtio device threads with seccomp allowlists
    /// (default on; see [`crate::seccomp`]). Turn off only for debugging.
    pub seccomp: bool,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("boot", &self.boot)
            .field("mem_mib", &self.mem_mib)
            .field("vcpus", &self.vcpus)
            .field("cmdline_base", &self.cmdline_base)
            .field("cmdline_extra", &self.cmdline_extra)
            .field("timeout", &self.timeout)
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

impl VmConfig {
    /// Default guest RAM, MiB.
    pub const DEFAULT_MEM_MIB: u64 = 128;

    /// A config with defaults for `boot`.
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            boot,
            mem_mib: Self::DEFAULT_MEM_MIB,
            vcpus: 1,
            cmdline_base: cmdline::DEFAULT_CMDLINE.to_string(),
            cmdline_extra: None,
            timeout: None,
            console: Box::new(std::io::sink()),
            console_input: None,
            start: None,
            pvm_workaround: None,
            seccomp: true,
        }
    }

    /// A config booting a kernel and an optional initrd.
    pub fn kernel(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        Self::new(BootSource::Kernel {
            kernel: kernel.into(),
            initrd,
        })
    }

    /// A config running raw code (tiny test guests): loaded at `load_addr`,
    /// entered at `entry` in `mode`, 16 MiB of RAM.
    pub fn raw_code(code: Vec<u8>, load_addr: u64, entry: u64, mode: boot::CpuMode) -> Self {
        let mut c = Self::new(BootSource::RawCode {
            code,
            load_addr,
            entry,
            mode,
        });
        c.mem_mib = 16;
        c
    }
}

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

/// Errors while creating or starting a machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible?)")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Bad memory size or no memory.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Kernel, initrd, command line or boot parameters.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Bad vCPU count.
    #[error("{0} vCPUs requested: 1 to {max} are supported", max = MAX_VCPUS)]
    BadVcpuCount(u8),
    /// A device range conflict.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// No MMIO slot or IRQ left.
    #[error("no virtio-mmio slot or IRQ left for another device")]
    NoMmioSlot,
    /// An eventfd or thread could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

/// An MMIO slot handed to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub len: u64,
    /// The GSI (IOAPIC pin) of the device.
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command line fragment declaring a virtio-mmio device here.
    pub fn virtio_cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.addr,
            self.irq
        )
    }
}

/// State shared between the vCPU threads, the devices and the handle.
struct Shared {
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    stop: AtomicBool,
    end_us: OnceLock<u64>,
    /// The vCPU threads to kick; emptied before they are joined.
    vcpu_threads: Mutex<Vec<PthreadKick>>,
    exit_evt: EventFd,
    timeline: Arc<Timeline>,
    /// Snapshot support: vCPUs park while this is set (see [`Machine::resume`]).
    pause: AtomicBool,
    /// Parked vCPUs and the state each saved on parking.
    parked: Mutex<ParkState>,
    /// Signalled when a vCPU parks, and when the pause ends.
    park_cv: Condvar,
}

/// vCPUs parked by a pause, and what they saved.
#[derive(Default)]
struct ParkState {
    /// How many vCPUs are parked.
    count: usize,
    /// MSR indices to save (set by the pauser).
    msr_list: Vec<u32>,
    /// Each parked vCPU's saved state, by index.
    saved: Vec<Option<Result<crate::kvm::vcpu::state::VcpuState, String>>>,
}

/// A vCPU thread to kick, by the id std gives (`RawPthread`: an integer on
/// every Linux libc, so this is `Send` and `Sync` as it is). libc's
/// `pthread_t` is an integer on glibc but a pointer on musl: the id becomes
/// one only at the `pthread_kill`.
#[derive(Clone, Copy)]
struct PthreadKick(std::os::unix::thread::RawPthread);

impl PthreadKick {
    fn of<T>(h: &JoinHandle<T>) -> Self {
        PthreadKick(std::os::unix::thread::JoinHandleExt::as_pthread_t(h))
    }
}

// SAFETY: the id comes from a vCPU thread's JoinHandle and is only used
// while `Shared::vcpu_threads` holds it, which is cleared (under its mutex)
// before those threads are joined, so the handle is always valid. The cast
// gives back the value the C library handed to std (on musl, the pointer it
// was made from).
unsafe impl Killable for PthreadKick {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0 as libc::pthread_t
    }
}

impl Shared {
    /// Records `reason` if none was yet, and stops every vCPU.
    fn request_exit(&self, reason: ExitReason) {
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
    }

    fn kick_all(&self) {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter() {
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                tracing::debug!(%e, "kick vCPU");
            }
        }
    }

    fn reason(&self) -> Option<ExitReason> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A cloneable handle that stops the VM from any thread.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
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

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(vcpu_kick_signal(), handle_kick) {
            tracing::error!(%e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// A machine being assembled: add devices, command-line fragments, irqfds and
/// ioeventfds here, then [`MachineBuilder::start`].
pub struct MachineBuilder {
    config: VmConfig,
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mem_size: u64,
    pio: Bus,
    mmio: Bus,
    cmdline_fragments: Vec<String>,
    next_slot: u32,
    serial: Arc<Serial>,
    shared: Arc<Shared>,
    timeline: Arc<Timeline>,
}

impl MachineBuilder {
    /// Creates the VM, its guest RAM and the legacy devices (UART, i8042,
    /// boot timer). Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        Self::with_memory(config, None)
    }

    /// As [`MachineBuilder::new`], with guest RAM given by the caller (a
    /// snapshot's memory mapped copy-on-write) instead of fresh anonymous
    /// memory; it must be `config.mem_mib` long.
    pub fn with_memory(
        mut config: VmConfig,
        given_mem: Option<GuestMemoryMmap>,
    ) -> Result<Self, VmmError> {
        let start = config.start.unwrap_or_else(Instant::now);
        let timeline = Arc::new(Timeline::new(start));
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpuCount(config.vcpus));
        }
        let mem_size = layout::validate_mem_mib(config.mem_mib)?;
        // Bad input is reported before any VM exists (and without KVM).
        if let BootSource::Kernel { kernel, initrd } = &config.boot {
            boot::validate_kernel(kernel, initrd.as_deref(), mem_size)?;
        }
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let mem = match given_mem {
            Some(m) => {
                let len: u64 = vm_memory::GuestMemoryBackend::iter(&m)
                    .map(vm_memory::GuestMemoryRegion::len)
                    .sum();
                if len != mem_size {
                    return Err(VmmError::Layout(LayoutError::BadMemorySize {
                        mib: len >> 20,
                        min: config.mem_mib,
                        max: config.mem_mib,
                    }));
                }
                m
            }
            None => layout::create_guest_memory(config.mem_mib)?,
        };
        let vm = Arc::new(kvm::create_vm(&kvm, &mem)?);
        tracing::debug!(us = timeline.now_us(), "setup: VM, guest RAM, irqchip, PIT");

        let os = |what| move |source| VmmError::Os { what, source };
        let shared = Arc::new(Shared {
            exit: Mutex::new(None),
            exited: Condvar::new(),
            stop: AtomicBool::new(false),
            end_us: OnceLock::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(os("exit eventfd"))?,
            timeline: timeline.clone(),
            pause: AtomicBool::new(false),
            parked: Mutex::new(ParkState::default()),
            park_cv: Condvar::new(),
        });

        let pio = Bus::new();
        let mmio = Bus::new();

        // UART: interrupts through an irqfd on GSI 4.
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("serial eventfd"))?;
        vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let console = std::mem::replace(&mut config.console, Box::new(std::io::sink()));
        let serial = Arc::new(Serial::new(
            serial_evt,
            ConsoleWriter::new(console, timeline.clone()),
        ));
        pio.insert(serial.clone(), u64::from(layout::SERIAL_PORT), Serial::LEN)?;

        // i8042: 0xFE on port 0x64 resets the guest.
        let s = shared.clone();
        let i8042 = Arc::new(I8042::new(move || s.request_exit(ExitReason::Reset)));
        pio.insert(i8042, u64::from(layout::I8042_DATA_PORT), I8042::LEN)?;

        // Harmless probes: POST code port 0x80, I/O delay port 0xed, and the
        // CMOS/RTC index/data ports (no RTC: reads 0, so "update in progress"
        // is never seen set).
        pio.insert(Arc::new(SinkDevice), 0x80, 1)?;
        pio.insert(Arc::new(SinkDevice), 0xed, 1)?;
        pio.insert(Arc::new(SinkDevice), 0x70, 2)?;

        mmio.insert(
            Arc::new(BootTimer::new(timeline.clone())),
            layout::BOOT_TIMER_ADDR,
            layout::BOOT_TIMER_SIZE,
        )?;

        tracing::debug!(us = timeline.now_us(), "setup: legacy devices");
        Ok(MachineBuilder {
            config,
            kvm,
            vm,
            mem,
            mem_size,
            pio,
            mmio,
            cmdline_fragments: Vec::new(),
            next_slot: 0,
            serial,
            shared,
            timeline,
        })
    }

    /// The KVM VM, for device code (irqfds, ioeventfds...).
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm.clone()
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM (a cheap clone sharing the mapping).
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    /// The PIO bus.
    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    /// The run's timeline (milestones).
    pub fn timeline(&self) -> Arc<Timeline> {
        self.timeline.clone()
    }

    /// An eventfd that becomes readable when the VM ends: device threads
    /// (event loops) can wait on it to stop.
    pub fn exit_event(&self) -> Result<EventFd, VmmError> {
        self.shared
            .exit_evt
            .try_clone()
            .map_err(|source| VmmError::Os {
                what: "clone exit eventfd",
                source,
            })
    }

    /// A handle that stops the VM (usable before and after start).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Appends a kernel command line fragment (after the defaults, before the
    /// PVM workaround and the user's extra text).
    pub fn add_cmdline(&mut self, fragment: impl Into<String>) {
        self.cmdline_fragments.push(fragment.into());
    }

    /// Takes the next virtio-mmio slot (4 KiB at 0xd000_0000 + n * 4 KiB) and
    /// its IRQ (5 + n) without putting anything there.
    pub fn allocate_mmio_slot(&mut self) -> Result<MmioSlot, VmmError> {
        let irq = layout::FIRST_DEVICE_IRQ + self.next_slot;
        let addr = layout::virtio_mmio_slot_addr(self.next_slot).ok_or(VmmError::NoMmioSlot)?;
        if irq > layout::LAST_DEVICE_IRQ {
            return Err(VmmError::NoMmioSlot);
        }
        self.next_slot += 1;
        Ok(MmioSlot {
            addr,
            len: layout::VIRTIO_MMIO_SLOT_SIZE,
            irq,
        })
    }

    /// Puts a device on the MMIO bus at an explicit range.
    pub fn add_mmio_device_at(
        &mut self,
        device: Arc<dyn BusDevice>,
        addr: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        self.mmio.insert(device, addr, len)?;
        Ok(())
    }

    /// Puts a virtio-mmio device in the next slot and declares it on the
    /// command line (`virtio_mmio.device=4K@<addr>:<irq>`). The device raises
    /// its interrupt by writing an `EventFd` registered with
    /// [`MachineBuilder::register_irqfd`] on `slot.irq`.
    pub fn add_virtio_mmio_device(
        &mut self,
        device: Arc<dyn BusDevice>,
    ) -> Result<MmioSlot, VmmError> {
        let slot = self.allocate_mmio_slot()?;
        self.mmio.insert(device, slot.addr, slot.len)?;
        self.cmdline_fragments.push(slot.virtio_cmdline());
        tracing::debug!(?slot, "virtio-mmio device added");
        Ok(slot)
    }

    /// Routes writes of `evt` to guest interrupt `gsi` (KVM irqfd).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmmError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(())
    }

    /// Makes guest writes to MMIO `addr` signal `evt` in the kernel, without a
    /// vCPU exit (KVM ioeventfd); with `datamatch`, only writes of that 32-bit
    /// value (the virtio queue index for `QueueNotify`).
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmmError> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.vm.register_ioevent(evt, &a, v),
            None => self.vm.register_ioevent(evt, &a, NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
        Ok(())
    }

    /// Whether the VM's threads are confined by seccomp ([`VmConfig::seccomp`]):
    /// device code starting threads of its own applies it to them too.
    pub fn seccomp(&self) -> bool {
        self.config.seccomp
    }

    /// The UART, e.g. to queue console input.
    pub fn serial(&self) -> Arc<Serial> {
        self.serial.clone()
    }

    /// The command line the kernel will get (as [`MachineBuilder::start`] builds it).
    pub fn kernel_cmdline(&self) -> Result<String, VmmError> {
        let pvm = self
            .config
            .pvm_workaround
            .unwrap_or_else(cmdline::host_kvm_is_pvm);
        let c = cmdline::assemble(
            &self.config.cmdline_base,
            Some(layout::BOOT_TIMER_ADDR),
            &self.cmdline_fragments,
            pvm,
            self.config.cmdline_extra.as_deref(),
        );
        Ok(c.render().map_err(boot::BootError::from)?)
    }

    /// Loads what is to be booted, configures the vCPUs and starts them.
    pub fn start(self) -> Result<Machine, VmmError> {
        let (entry, protocol): (BootEntry, &'static str) = match &self.config.boot {
            BootSource::Kernel { kernel, initrd } => {
                let pvm = self
                    .config
                    .pvm_workaround
                    .unwrap_or_else(cmdline::host_kvm_is_pvm);
                if pvm {
                    tracing::info!(
                        workaround = cmdline::PVM_WORKAROUND,
                        "host KVM is PVM (/sys/module/kvm_pvm): appending the workaround to the kernel command line"
                    );
                }
                let line = self.kernel_cmdline()?;
                tracing::info!(cmdline = %line, "kernel command line");
                let k =
                    boot::load_kernel(&self.mem, self.mem_size, kernel, initrd.as_deref(), &line)?;
                (k.entry, k.entry.protocol.name())
            }
            BootSource::RawCode {
                code,
                load_addr,
                entry,
                mode,
            } => {
                let e =
                    boot::load_raw_code(&self.mem, self.mem_size, code, *load_addr, *entry, *mode)?;
                (e, e.protocol.name())
            }
        };
        boot::mptable::write(&self.mem, self.config.vcpus).map_err(boot::BootError::from)?;
        tracing::debug!(us = self.timeline.now_us(), "setup: guest loaded");

        let cpuid = vcpu::supported_cpuid(&self.kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(self.config.vcpus));
        for id in 0..self.config.vcpus {
            let fd = self
                .vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let c = vcpu::patch_cpuid(&cpuid, id, self.config.vcpus)?;
            vcpu::configure(&fd, &c)?;
            if id == 0 {
                vcpu::set_boot_registers(&fd, &entry)?;
            }
            vcpus.push(fd);
        }

        tracing::debug!(us = self.timeline.now_us(), "setup: vCPUs configured");
        self.launch(vcpus, protocol, None)
    }

    /// Starts vCPUs whose state the caller has set (a restore): nothing is
    /// loaded into guest memory and no boot registers are set.
    pub fn start_restored(
        self,
        vcpus: Vec<VcpuFd>,
        restore: crate::metrics::RestoreMetrics,
    ) -> Result<Machine, VmmError> {
        if vcpus.len() != usize::from(self.config.vcpus) {
            return Err(VmmError::BadVcpuCount(
                u8::try_from(vcpus.len()).unwrap_or(u8::MAX),
            ));
        }
        self.launch(vcpus, "restored", Some(restore))
    }

    fn launch(
        mut self,
        vcpus: Vec<VcpuFd>,
        protocol: &'static str,
        restore: Option<crate::metrics::RestoreMetrics>,
    ) -> Result<Machine, VmmError> {
        install_kick_handler();
        let mut handles = Vec::with_capacity(vcpus.len());
        {
            // Hold the list while spawning so a stop cannot miss a thread.
            let mut threads = self
                .shared
                .vcpu_threads
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (id, fd) in vcpus.into_iter().enumerate() {
                let ctx = VcpuContext {
                    id: id as u8,
                    seccomp: self.config.seccomp,
                    pio: self.pio.clone(),
                    mmio: self.mmio.clone(),
                    shared: self.shared.clone(),
                };
                let h = std::thread::Builder::new()
                    .name(format!("osso-vcpu{id}"))
                    .spawn(move || ctx.run(fd))
                    .map_err(|source| VmmError::Os {
                        what: "spawn vCPU thread",
                        source,
                    });
                let h = match h {
                    Ok(h) => h,
                    Err(e) => {
                        drop(threads);
                        self.shared.request_exit(ExitReason::Stopped);
                        join_all(&self.shared, handles);
                        return Err(e);
                    }
                };
                threads.push(PthreadKick::of(&h));
                handles.push(h);
            }
        }

        if let Some(input) = self.config.console_input.take() {
            spawn_console_input(input, self.serial.clone(), self.shared.clone());
        }

        let deadline = self.config.timeout.map(|t| self.timeline.start() + t);
        Ok(Machine {
            vm: self.vm,
            mem: self.mem,
            mmio: self.mmio,
            restore,
            serial: self.serial,
            shared: self.shared,
            timeline: self.timeline,
            handles: Mutex::new(handles),
            vcpu_count: usize::from(self.config.vcpus),
            deadline,
            protocol,
            _kvm: self.kvm,
        })
    }
}

fn join_all(shared: &Shared, handles: Vec<JoinHandle<()>>) {
    // No more kicks once joining starts: the pthread handles go stale.
    shared
        .vcpu_threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    for h in handles {
        if h.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

fn spawn_console_input(mut input: Box<dyn Read + Send>, serial: Arc<Serial>, shared: Arc<Shared>) {
    let r = std::thread::Builder::new()
        .name("osso-console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            while !shared.stop.load(Ordering::SeqCst) {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() && !shared.stop.load(Ordering::SeqCst) {
                    let done = serial.enqueue_input(rest);
                    rest = &rest[done..];
                    if done == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
    if let Err(e) = r {
        tracing::warn!(%e, "no console input thread");
    }
}

struct VcpuContext {
    id: u8,
    seccomp: bool,
    pio: Bus,
    mmio: Bus,
    shared: Arc<Shared>,
}

/// What the loop does after an exit (decided once the exit's borrow of the
/// vCPU ends).
enum Next {
    Continue,
    Exit(ExitReason),
    InternalError,
    FailEntry(u64),
}

impl VcpuContext {
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
        let saved =
            crate::kvm::vcpu::state::save_vcpu(self.id, vcpu, &msr_list).map_err(|e| e.to_string());
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

    fn run(self, mut vcpu: VcpuFd) {
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

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Why.
    pub exit: ExitReason,
    /// What was measured.
    pub metrics: Metrics,
}

/// A running VM.
pub struct Machine {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    mmio: Bus,
    restore: Option<crate::metrics::RestoreMetrics>,
    serial: Arc<Serial>,
    shared: Arc<Shared>,
    timeline: Arc<Timeline>,
    /// The vCPU threads, until [`Machine::wait`] joins them.
    handles: Mutex<Vec<JoinHandle<()>>>,
    vcpu_count: usize,
    deadline: Option<Instant>,
    protocol: &'static str,
    _kvm: Kvm,
}

impl Machine {
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

    /// Waits up to `timeout` for the VM to end, without consuming the handle
    /// (the configured VM timeout is enforced by [`Machine::wait`] only).
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

    /// Pauses every vCPU (each parks out of `KVM_RUN` and saves its state)
    /// and returns their states, in index order. The VM stays paused until
    /// [`Machine::resume`]. Fails if the VM ended or a vCPU did not park
    /// within `timeout`, or a vCPU's state could not be read (the pause is
    /// then undone).
    pub(crate) fn pause_and_save(
        &self,
        timeout: Duration,
        msr_list: &[u32],
    ) -> Result<Vec<crate::kvm::vcpu::state::VcpuState>, String> {
        let n = self.vcpu_count;
        {
            let mut p = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
            p.msr_list = msr_list.to_vec();
        }
        self.shared.pause.store(true, Ordering::SeqCst);
        self.shared.kick_all();
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
        while p.count < n {
            let now = Instant::now();
            if self.shared.reason().is_some() || now >= deadline {
                drop(p);
                self.resume();
                return Err(match self.shared.reason() {
                    Some(r) => format!("the VM has ended ({r})"),
                    None => format!("vCPUs did not park within {timeout:?}"),
                });
            }
            p = self
                .shared
                .park_cv
                .wait_timeout(p, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut out = Vec::with_capacity(n);
        let mut failed = None;
        for i in 0..n {
            match p.saved.get(i).cloned().flatten() {
                Some(Ok(s)) => out.push(s),
                Some(Err(e)) => failed = Some(format!("saving vCPU {i}: {e}")),
                None => failed = Some(format!("vCPU {i} saved nothing")),
            }
            if failed.is_some() {
                break;
            }
        }
        if let Some(e) = failed {
            // Not left paused behind an error.
            drop(p);
            self.resume();
            return Err(e);
        }
        Ok(out)
    }

    /// Pauses the VM: every vCPU parks out of `KVM_RUN`. Devices keep their
    /// threads (a paused guest posts no new work).
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        // The vCPUs save their state on parking (a later snapshot of the
        // paused VM uses it), so they need the MSR list now.
        let msrs = crate::kvm::vcpu::state::msr_index_list(&self._kvm);
        self.pause_and_save(timeout, &msrs).map(|_| ())
    }

    /// Ends a pause: parked vCPUs run on.
    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
        let _p = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.park_cv.notify_all();
    }

    /// Whether the VM is paused (a pause was asked and not ended).
    pub fn is_paused(&self) -> bool {
        self.shared.pause.load(Ordering::SeqCst)
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

    pub(crate) fn boot_protocol(&self) -> &'static str {
        self.protocol
    }

    pub(crate) fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial.save_state()
    }

    /// Queues console input for the guest; returns the bytes accepted.
    pub fn send_console_input(&self, bytes: &[u8]) -> usize {
        self.serial.enqueue_input(bytes)
    }

    /// Waits for the VM to end (by itself, a stop, or the timeout), joins the
    /// vCPU threads and returns the reason and the metrics. Takes `&self` so
    /// that a waiter thread and a caller taking snapshots can share the
    /// machine (`Arc<Machine>`); a second call returns at once.
    pub fn wait(&self) -> RunOutcome {
        {
            let mut exit = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner());
            while exit.is_none() {
                match self.deadline {
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            drop(exit);
                            self.shared.request_exit(ExitReason::Timeout);
                            exit = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner());
                            continue;
                        }
                        exit = self
                            .shared
                            .exited
                            .wait_timeout(exit, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    None => {
                        exit = self
                            .shared
                            .exited
                            .wait(exit)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
        // Make sure every vCPU is on its way out, then join them.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.kick_all();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        join_all(&self.shared, handles);
        let exit = self.shared.reason().unwrap_or(ExitReason::Stopped);
        let mem = memory_figures(&self.mem);
        let t = &self.timeline;
        let metrics = Metrics {
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
    }
}

/// Creates, starts and waits for a VM: the whole run in one call.
pub fn run(config: VmConfig) -> Result<RunOutcome, VmmError> {
    Ok(MachineBuilder::new(config)?.start()?.wait())
}

impl std::fmt::Debug for MachineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineBuilder")
            .field("config", &self.config)
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("cmdline_fragments", &self.cmdline_fragments)
            .finish_non_exhaustive()
    }
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
