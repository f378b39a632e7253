//! KVM: VM creation (in-kernel irqchip and PIT, guest RAM slots) and vCPU
//! configuration (CPUID, MSRs, FPU, local APIC, boot registers).

pub mod blob;
pub mod vcpu;
pub mod vm_state;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::KVM_TSS_ADDR;

/// KVM errors, with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM {op} failed: {source}")]
pub struct KvmError {
    /// The operation.
    pub op: &'static str,
    /// The errno.
    pub source: kvm_ioctls::Error,
}

/// Maps a kvm-ioctls error to a [`KvmError`] naming the operation.
pub fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { op, source }
}

/// Creates the VM with its guest RAM, TSS address, in-kernel
/// IOAPIC/PIC/LAPIC and PIT.
///
/// Guest RAM is registered *before* the irqchip is created: measured on the
/// project's PVM host, the first `KVM_SET_USER_MEMORY_REGION` takes about
/// 0.1 ms on a VM without an irqchip and 7 to 12 ms on one with it.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, KvmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    register_memory(&vm, mem)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Registers every guest RAM region with KVM, one slot each.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| KvmError {
                op: "guest memory host address",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live mapping owned by `mem`; the
        // caller keeps `mem` alive at least as long as the VM (the machine
        // owns both and drops the VM's vCPUs first), so KVM never sees a
        // dangling mapping.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
