//! The VM-wide KVM state a snapshot keeps ([`VmState`]: the in-kernel
//! irqchip, PIT and clock), with its [`save_vm`] and [`restore_vm`].

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::kvm::blob::KvmBlob;
use crate::kvm::{kvm_err, KvmError};

/// VM-wide KVM state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` chip ids 0, 1, 2).
    pub irqchips: Vec<KvmBlob<kvm_bindings::kvm_irqchip>>,
    /// PIT (`KVM_GET_PIT2`).
    pub pit: Option<KvmBlob<kvm_bindings::kvm_pit_state2>>,
    /// KVM clock (`KVM_GET_CLOCK`).
    pub clock: Option<KvmBlob<kvm_bindings::kvm_clock_data>>,
    /// What could not be saved on this host, and why.
    pub unsupported: Vec<String>,
}

/// Saves the in-kernel irqchip (PIC master, PIC slave, IOAPIC), PIT and clock.
pub fn save_vm(vm: &VmFd) -> VmState {
    let mut s = VmState::default();
    for chip_id in 0..3u32 {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        match vm.get_irqchip(&mut c) {
            Ok(()) => s.irqchips.push(KvmBlob(c)),
            Err(e) => s
                .unsupported
                .push(format!("KVM_GET_IRQCHIP (chip {chip_id}): {e}")),
        }
    }
    match vm.get_pit2() {
        Ok(p) => s.pit = Some(KvmBlob(p)),
        Err(e) => s.unsupported.push(format!("KVM_GET_PIT2: {e}")),
    }
    match vm.get_clock() {
        Ok(c) => s.clock = Some(KvmBlob(c)),
        Err(e) => s.unsupported.push(format!("KVM_GET_CLOCK: {e}")),
    }
    s
}

/// Loads VM-wide state into a VM that has its irqchip and PIT.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), KvmError> {
    for c in &s.irqchips {
        vm.set_irqchip(&c.0).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    if let Some(p) = &s.pit {
        vm.set_pit2(&p.0).map_err(kvm_err("KVM_SET_PIT2"))?;
    }
    if let Some(c) = &s.clock {
        // Only the clock value: flags such as KVM_CLOCK_TSC_STABLE are
        // reported by GET and refused by SET.
        let clock = kvm_bindings::kvm_clock_data {
            clock: c.0.clock,
            ..Default::default()
        };
        if let Err(e) = vm.set_clock(&clock) {
            tracing::debug!(%e, "KVM_SET_CLOCK failed: guest clock not restored");
        }
    }
    Ok(())
}
