//! Assembling a machine ([`MachineBuilder`]): the VM, guest RAM and the
//! legacy devices are created first, then other code adds MMIO devices,
//! IRQs, eventfds and command-line fragments; [`MachineBuilder::start`]
//! loads the kernel and starts the vCPU threads (boot), and
//! [`MachineBuilder::start_restored`] starts vCPUs whose state a restore
//! loaded. Both end in the same launch step.

use super::config::{MmioSlot, VmConfig, VmmError};
use super::{Machine, StopHandle};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, cmdline, BootEntry, BootSource};
use crate::bus::{Bus, BusDevice, SinkDevice};
use crate::devices::boot_timer::BootTimer;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleWriter, Serial};
use crate::kvm::vcpu::run::ExitReason;
use crate::kvm::vcpu::run::{install_kick_handler, PthreadKick, RunControl, VcpuRunner};
use crate::kvm::{self, kvm_err, vcpu};
use crate::layout::{self, LayoutError};
use crate::metrics::Timeline;

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
    shared: Arc<RunControl>,
    timeline: Arc<Timeline>,
    pub(super) net: Option<super::AttachedNet>,
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
        let mem_size = VmConfig::validate_size(config.mem_mib, config.vcpus)?;
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
        let shared = Arc::new(RunControl {
            exit: Mutex::new(None),
            exited: Condvar::new(),
            stop: AtomicBool::new(false),
            end_us: OnceLock::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(os("exit eventfd"))?,
            timeline: timeline.clone(),
            requests: Mutex::new(Vec::new()),
            exit_observers: Mutex::new(Vec::new()),
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
            ConsoleWriter::new(console, config.console_lines.take(), timeline.clone()),
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
            net: None,
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
            BootSource::Restored => return Err(VmmError::NothingToBoot),
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
            let mut requests = self
                .shared
                .requests
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (id, fd) in vcpus.into_iter().enumerate() {
                let (tell, told) = std::sync::mpsc::channel();
                requests.push(tell);
                let ctx = VcpuRunner {
                    requests: told,
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
                        drop(requests);
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

        if let Some(t) = self.config.timeout {
            if let Err(source) = super::deadline::arm(self.timeline.start() + t, &self.shared) {
                self.shared.request_exit(ExitReason::Stopped);
                join_all(&self.shared, handles);
                return Err(VmmError::Os {
                    what: "start the VM deadline thread",
                    source,
                });
            }
        }
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
            paused: std::sync::atomic::AtomicBool::new(false),
            protocol,
            net: self.net,
            _kvm: self.kvm,
        })
    }
}

pub(super) fn join_all(shared: &RunControl, handles: Vec<JoinHandle<()>>) {
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

fn spawn_console_input(
    mut input: Box<dyn Read + Send>,
    serial: Arc<Serial>,
    shared: Arc<RunControl>,
) {
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
