//! osso-vmm: Osso's virtual machine monitor, built on the rust-vmm crates.
//!
//! Owns KVM VM and vCPU setup, the guest memory layout, kernel loading and boot
//! state, the PIO/MMIO bus and the devices. Knows nothing of how guest images
//! are built (that is `osso-guest`).

pub mod net;
pub mod virtio;
