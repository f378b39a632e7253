//! What a machine is asked to be ([`VmConfig`]: boot source, RAM, vCPUs,
//! console, timeout, seccomp), the errors of creating one ([`VmmError`]),
//! and the MMIO slots handed to devices ([`MmioSlot`]).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::boot::{self, cmdline, BootSource};
use crate::bus::BusError;
use crate::kvm::KvmError;
use crate::layout::LayoutError;

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
    /// The VM is stopped with [`ExitReason::Timeout`](crate::ExitReason::Timeout) after this long.
    pub timeout: Option<Duration>,
    /// Where the guest console output goes, byte for byte (default:
    /// discarded).
    pub console: Box<dyn Write + Send>,
    /// Told of each complete console line (default: none). The VMM cuts the
    /// console into lines once, for its milestones; a caller that wants
    /// lines takes them here rather than cutting the bytes again.
    pub console_lines: Option<crate::devices::serial::ConsoleLines>,
    /// Host input for the guest console, read on a thread of its own (which
    /// ends at end of file, on a read error, or at its first read after the
    /// VM ended). [`Machine::send_console_input`](crate::Machine::send_console_input) is the other way in.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// The instant the metrics count from (default: [`MachineBuilder::new`](crate::MachineBuilder::new)).
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

    /// The checks on a VM's size, which need neither a kernel nor KVM:
    /// 1 to [`MAX_VCPUS`] vCPUs, and RAM the layout can hold. Returns the RAM
    /// size in bytes. [`MachineBuilder::new`](crate::MachineBuilder::new)
    /// runs them; a caller that wants the answer before it spends time
    /// elsewhere (the SDK, before it looks for its image) runs the same
    /// function, so that there is one rule.
    pub fn validate_size(mem_mib: u64, vcpus: u8) -> Result<u64, VmmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpuCount(vcpus));
        }
        Ok(crate::layout::validate_mem_mib(mem_mib)?)
    }

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
            console_lines: None,
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
    /// `start` on a machine built for a restore ([`BootSource::Restored`]):
    /// it starts with `start_restored`, from a snapshot's vCPU state.
    #[error("a machine built for a restore has nothing to boot: start it with start_restored")]
    NothingToBoot,
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
