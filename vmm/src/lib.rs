//! osso-vmm: Osso's virtual machine monitor, built on the rust-vmm crates.
//!
//! Owns KVM VM and vCPU setup, the guest memory layout, kernel loading and boot
//! state, the PIO/MMIO bus and the devices. Knows nothing of how guest images
//! are built (that is `osso-guest`).
//!
//! Modules, one concern each:
//! - [`layout`]: the guest physical memory map (RAM, boot structures, MMIO
//!   window, IRQs) and guest RAM creation;
//! - `kvm` (internal): VM creation, vCPU set-up, the vCPU run loop and its
//!   requests, and the saved state of both;
//! - [`boot`]: kernel/initrd loading (PVH, Linux 64-bit), command line, MP
//!   table, boot page tables and GDT;
//! - [`bus`]: the PIO and MMIO buses;
//! - [`devices`]: UART, i8042, boot timer;
//! - [`machine`]: configuration, assembly (where devices are added), vCPU
//!   threads, stop/wait, exit reasons;
//! - [`metrics`]: boot milestones and memory figures;
//! - `virtio`, `net`: the virtio-mmio transport, virtio-net and its backends;
//! - [`snapshot`]: pause, snapshot to a directory, restore into a new machine;
//! - [`seccomp`]: the vCPU and device threads' allowlists.
//!
//! What an embedder uses is re-exported here (the machine, its config, exit
//! and metrics types); the modules stay public where a device, a backend or
//! a test needs their parts. `kvm` and `persist` are internal.

pub mod boot;
pub mod bus;
pub mod devices;
pub(crate) mod kvm;
pub mod layout;
pub mod machine;
pub mod metrics;
pub mod net;
pub(crate) mod persist;
pub mod seccomp;
pub mod snapshot;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod virtio;

pub use boot::{BootSource, CpuMode};
pub use bus::{Bus, BusDevice};
pub use devices::serial::ConsoleLines;
pub use machine::{
    run, AttachError, AttachedNet, ExitObserver, ExitReason, Machine, MachineBuilder, MmioSlot,
    RunOutcome, StopHandle, VmConfig, VmmError,
};
pub use metrics::RunMetrics;
