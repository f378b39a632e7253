//! Snapshot and restore: the orchestration (pause, save each piece, write
//! the files; read them, build a machine, load each piece) and the file
//! format ([`format`](mod@format)). Each piece's state type and its save and restore
//! live with their owner: a vCPU's in `crate::kvm::vcpu::state`, the VM's
//! irqchip, PIT and clock in `crate::kvm::vm_state`, the virtio transport's
//! in `crate::virtio::state` (saved and loaded by the transport). No other
//! module of the VMM imports this one.
//!
//! [`crate::Machine::snapshot`] pauses the vCPUs (each parks itself out of
//! `KVM_RUN`, after one `KVM_RUN` with `immediate_exit` set so that a pending
//! PIO/MMIO read completes), then saves, into a directory:
//! per vCPU the registers, special registers, FPU, XSAVE and XCRs, debug
//! registers, LAPIC, MSRs (those of `KVM_GET_MSR_INDEX_LIST` the vCPU lets us
//! read), MP state and pending events; VM-wide the PIC and IOAPIC, the PIT
//! and the KVM clock; the UART; and guest RAM, one raw file (zero pages left
//! as holes). The format is in [`format`](mod@format).
//!
//! [`restore`] builds a new machine from such a directory: guest RAM is the
//! snapshot's memory file mapped `MAP_PRIVATE` (copy-on-write: nothing is
//! copied, clones share every page they have not written), the VM, irqchip
//! and PIT are created and loaded, vCPUs are created with the saved state,
//! the UART is re-created with its state, and the vCPUs run. The phases are
//! timed in [`RestoreMetrics`] (also in the run's [`crate::RunMetrics`]).
//!
//! Pieces a host's KVM cannot read (PVM lacks some) are left out and named in
//! the state's `unsupported` lists; restore skips them.
//!
//! virtio-net: [`Machine::snapshot`] saves the machine's device's
//! virtio-mmio transport (registers, features, queue addresses and
//! positions) and the MAC; [`restore`] attaches a new device on a fresh
//! backend ([`RestoreOptions::net`]) and loads that state. A machine with other MMIO devices is refused at snapshot time
//! with [`SnapshotError::Unsupported`], rather than restored half-working.

pub mod format;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::kvm::vcpu::state::{msr_index_list, restore_vcpu};
use crate::kvm::vm_state::{restore_vm, save_vm};
use crate::kvm::{kvm_err, KvmError};
use crate::machine::{Machine, MachineBuilder, VmConfig, VmmError};
pub use crate::metrics::RestoreMetrics;
use crate::net::NetConfig;
use crate::persist::Persist;
pub use format::{
    DeviceStates, Header, HostFacts, MsrValue, SerialState, SnapshotBody, VcpuState,
    VirtioMmioState, VirtioNetState, VirtqueueState, VmState,
};

/// Snapshot and restore errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file is not an Osso snapshot.
    #[error("{path} is not an Osso snapshot: {reason}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Written in another format version.
    #[error("snapshot format version {found} (written by osso-vmm {written_by}) is not supported: this build reads version {supported}")]
    Version {
        /// The snapshot's version.
        found: u32,
        /// This build's.
        supported: u32,
        /// The VMM version that wrote it.
        written_by: String,
    },
    /// Taken on a host that differs in a way the vCPU state depends on.
    #[error(
        "snapshot was taken on another kind of host: {what} is {snapshot:?} there, {host:?} here"
    )]
    HostMismatch {
        /// The fact that differs.
        what: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// This host's.
        host: String,
    },
    /// A file is shorter than its header says.
    #[error("snapshot file {path} is truncated: {found} bytes, {expected} expected")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes announced.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// A file's content does not match its header.
    #[error("snapshot file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state could not be encoded.
    #[error("encoding the snapshot state: {0}")]
    Encode(String),
    /// A KVM state ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating the machine failed.
    #[error(transparent)]
    Machine(#[from] VmmError),
    /// The vCPUs did not park in time, or the VM has ended.
    #[error("cannot pause the VM: {0}")]
    Pause(String),
    /// Something this version cannot snapshot or restore.
    #[error("not supported by snapshots yet: {0}")]
    Unsupported(String),
    /// Guest memory could not be mapped or read.
    #[error("guest memory: {0}")]
    Memory(String),
}

/// The KVM kind and CPU of this host, with `kvm`'s API version.
pub fn host_facts(kvm: &Kvm) -> HostFacts {
    HostFacts::current(kvm.get_api_version())
}

/// Reads and checks the snapshot in `dir` against this host (for tools and
/// tests: [`restore`] does this itself).
pub fn read_snapshot(dir: &Path) -> Result<(Header, SnapshotBody), SnapshotError> {
    let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
    format::read_state(dir, &host_facts(&kvm))
}

/// Writes guest RAM to `path`: non-zero pages written, zero pages left as
/// holes (the file is sparse). Returns the bytes of RAM. The file is written
/// under a temporary name and renamed over `path`: clones restored from an
/// earlier snapshot in the same place map the old file copy-on-write, and
/// truncating it in place would pull pages from under them (SIGBUS), or from
/// under this very VM if it is such a clone.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, SnapshotError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let total = write_memory_to(mem, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(total)
}

fn write_memory_to(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, SnapshotError> {
    const PAGE: usize = 4096;
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    let mut total: u64 = 0;
    let mut buf = vec![0u8; PAGE];
    for region in mem.iter() {
        if region.start_addr().0 != total {
            return Err(SnapshotError::Unsupported(
                "guest RAM that is not one contiguous range from 0".into(),
            ));
        }
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = usize::try_from((len - off).min(PAGE as u64)).unwrap_or(PAGE);
            let page = &mut buf[..n];
            mem.read_slice(page, GuestAddress(total + off))
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
            if page.iter().any(|b| *b != 0) {
                f.seek(SeekFrom::Start(total + off)).map_err(io)?;
                f.write_all(page).map_err(io)?;
            }
            off += n as u64;
        }
        total += len;
    }
    f.set_len(total).map_err(io)?;
    Ok(total)
}

/// Maps `path` (`bytes` long) as guest RAM from GPA 0, private and
/// copy-on-write: the guest's writes go to anonymous pages of this process,
/// the file is never modified, and unchanged pages are shared (page cache)
/// between every VM mapping the same file.
pub fn map_memory(path: &Path, bytes: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let size = usize::try_from(bytes)
        .map_err(|_| SnapshotError::Memory(format!("{bytes} bytes do not fit usize")))?;
    let region = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| SnapshotError::Memory(format!("mmap of {}: {e}", path.display())))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| SnapshotError::Memory("guest region overflows".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| SnapshotError::Memory(e.to_string()))
}

/// How to run a restored VM: what a [`VmConfig`] says about the host side
/// (the guest side comes from the snapshot).
pub struct RestoreOptions {
    /// Where the guest console output goes, byte for byte.
    pub console: Box<dyn Write + Send>,
    /// Told of each complete console line (as [`VmConfig::console_lines`]).
    pub console_lines: Option<crate::devices::serial::ConsoleLines>,
    /// Host input for the guest console.
    pub console_input: Option<Box<dyn std::io::Read + Send>>,
    /// Stop the VM with a timeout after this long.
    pub timeout: Option<Duration>,
    /// The instant the metrics count from (default: the call to [`restore`]).
    pub start: Option<Instant>,
    /// Confine the VM's threads with seccomp (default on, as
    /// [`VmConfig::seccomp`]).
    pub seccomp: bool,
    /// The network backend for a snapshot with a virtio-net device (the MAC
    /// comes from the snapshot): each restore opens a fresh one. Such a
    /// snapshot restored without one is refused.
    pub net: Option<NetConfig>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            console: Box::new(std::io::sink()),
            console_lines: None,
            console_input: None,
            timeout: None,
            start: None,
            seccomp: true,
            net: None,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn us_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Restores the snapshot in `dir` into a new, running machine, re-creating
/// its virtio-net device (if it had one) on a fresh backend opened from
/// `opts.net`; the machine owns it ([`Machine::net`]).
pub fn restore(dir: &Path, opts: RestoreOptions) -> Result<Machine, SnapshotError> {
    let start = opts.start.unwrap_or_else(Instant::now);
    let t0 = Instant::now();
    let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
    let host = host_facts(&kvm);
    let (header, body) = format::read_state(dir, &host)?;
    let mem_path = format::check_memory_file(dir, &header)?;
    if body.mem_mib << 20 != header.memory_bytes {
        return Err(SnapshotError::Corrupt {
            path: dir.join(format::STATE_FILE),
            reason: format!(
                "{} MiB of RAM but a {}-byte memory file",
                body.mem_mib, header.memory_bytes
            ),
        });
    }
    let vcpus = u8::try_from(body.vcpus.len())
        .map_err(|_| SnapshotError::Unsupported(format!("{} vCPUs", body.vcpus.len())))?;
    let read_state_us = us_since(t0);

    let t = Instant::now();
    let mem = map_memory(&mem_path, header.memory_bytes)?;
    let map_memory_us = us_since(t);

    let t = Instant::now();
    let mut config = VmConfig::new(crate::BootSource::Restored);
    config.mem_mib = body.mem_mib;
    config.vcpus = vcpus;
    config.console = opts.console;
    config.console_lines = opts.console_lines;
    config.console_input = opts.console_input;
    config.timeout = opts.timeout;
    config.start = Some(start);
    config.seccomp = opts.seccomp;
    let net = opts.net;
    let mut builder = MachineBuilder::with_memory(config, Some(mem))?;
    let create_vm_us = us_since(t);

    let t = Instant::now();
    restore_vm(&builder.vm_fd(), &body.vm)?;
    let irqchip_us = us_since(t);

    let t = Instant::now();
    builder
        .serial()
        .restore_state(&body.devices.serial)
        .map_err(|e| SnapshotError::Corrupt {
            path: dir.join(format::STATE_FILE),
            reason: format!("serial state: {e}"),
        })?;
    match (&body.devices.net, &net) {
        (None, _) => {}
        (Some(_), None) => {
            return Err(SnapshotError::Unsupported(
                "the snapshot has a virtio-net device: restore it with a network configuration (RestoreOptions::net)".into(),
            ))
        }
        (Some(ns), Some(cfg)) => restore_net(&mut builder, ns, cfg)?,
    }
    let devices_us = us_since(t);

    let t = Instant::now();
    let cpuid = crate::kvm::vcpu::supported_cpuid(builder.kvm())?;
    let mut fds = Vec::with_capacity(body.vcpus.len());
    for (i, s) in body.vcpus.iter().enumerate() {
        let fd = builder
            .vm_fd()
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let fallback = crate::kvm::vcpu::patch_cpuid(&cpuid, i as u8, vcpus)?;
        restore_vcpu(&fd, s, &fallback)?;
        fds.push(fd);
    }
    let vcpus_us = us_since(t);

    let mut metrics = RestoreMetrics {
        read_state_us,
        map_memory_us,
        create_vm_us,
        irqchip_us,
        devices_us,
        vcpus_us,
        total_us: 0,
    };
    metrics.total_us = us_since(t0);
    tracing::info!(?metrics, dir = %dir.display(), "VM restored");
    Ok(builder.start_restored(fds, metrics)?)
}

fn restore_net(
    builder: &mut MachineBuilder,
    ns: &VirtioNetState,
    cfg: &NetConfig,
) -> Result<(), SnapshotError> {
    let mut cfg = cfg.clone();
    cfg.mac = crate::net::MacAddr(ns.mac);
    builder
        .attach_net(&cfg)
        .map_err(|e| SnapshotError::Unsupported(format!("re-creating virtio-net: {e}")))?;
    let attached = builder.net().ok_or_else(|| {
        SnapshotError::Unsupported(
            "the snapshot has a virtio-net device but the network configuration is `none`".into(),
        )
    })?;
    if attached.slot.addr != ns.mmio_base || attached.slot.irq != ns.irq {
        return Err(SnapshotError::Unsupported(format!(
            "virtio-net landed at {:#x} (IRQ {}), the snapshot had it at {:#x} (IRQ {})",
            attached.slot.addr, attached.slot.irq, ns.mmio_base, ns.irq
        )));
    }
    attached
        .transport
        .restore_state(&ns.transport)
        .map_err(|e| SnapshotError::Corrupt {
            path: PathBuf::from(format::STATE_FILE),
            reason: format!("virtio-net state: {e}"),
        })?;
    // The restored guest will not announce its MAC again: tell the fresh
    // user network, so the first packet to it needs no ARP round trip.
    if let Some(user) = &attached.user {
        user.learn_guest_mac(ns.mac);
    }
    Ok(())
}

impl Machine {
    /// Pauses the VM, writes a snapshot of it into `dir` (created if
    /// missing), and leaves it paused: call [`Machine::resume`] to go on.
    /// Its virtio-net device (if any) is saved too; a VM with other MMIO
    /// devices is refused.
    pub fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        snapshot(self, dir)
    }
}

fn snapshot(machine: &Machine, dir: &Path) -> Result<(), SnapshotError> {
    let net = machine.net();
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ranges = machine.mmio_ranges();
    let extra: Vec<_> = ranges
        .iter()
        .filter(|r| r.0 != crate::layout::BOOT_TIMER_ADDR && Some(r.0) != net.map(|n| n.slot.addr))
        .collect();
    if !extra.is_empty() {
        return Err(SnapshotError::Unsupported(format!(
            "MMIO devices the snapshot does not know at {:#x?}",
            extra.iter().map(|r| r.0).collect::<Vec<_>>()
        )));
    }
    let msr_list = msr_index_list(machine.kvm());
    let vcpus = machine
        .pause_and_save(Duration::from_secs(5), &msr_list)
        .map_err(SnapshotError::Pause)?;
    for v in &vcpus {
        if !v.unsupported.is_empty() {
            tracing::info!(vcpu = v.id, missing = ?v.unsupported, "vCPU state this KVM does not give");
        }
    }
    let vm = save_vm(&machine.vm_fd());
    if !vm.unsupported.is_empty() {
        tracing::info!(missing = ?vm.unsupported, "VM state this KVM does not give");
    }
    // Quiesce the device thread: it must not move frames (write guest
    // memory, advance the queues) while the transport and RAM are saved.
    // Lock order: vCPUs parked first, then the gate, then the transport. Not
    // the gate first: a vCPU in an MMIO exit (say, a device reset) holds the
    // transport lock and waits for the device thread, which would wait for
    // the gate.
    let gate = net.map(|n| {
        n.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device()
            .quiesce_gate()
    });
    let _quiet = gate
        .as_ref()
        .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()));
    let net_state = net.map(|n| {
        let t = n.transport.lock().unwrap_or_else(|p| p.into_inner());
        VirtioNetState {
            mmio_base: n.slot.addr,
            irq: n.slot.irq,
            mac: t.device().mac().0,
            transport: t.save_state(),
        }
    });
    let mem = machine.guest_memory();
    let memory_bytes = write_memory(&mem, &dir.join(format::MEMORY_FILE))?;
    let body = SnapshotBody {
        mem_mib: memory_bytes >> 20,
        boot_protocol: machine.boot_protocol().to_string(),
        vcpus,
        vm,
        devices: DeviceStates {
            serial: machine.serial_state(),
            mmio_ranges: ranges,
            net: net_state,
        },
    };
    format::write_state(dir, &host_facts(machine.kvm()), &body, memory_bytes)?;
    Ok(())
}
