//! One vCPU: its configuration here (CPUID: KVM's supported set with the KVM
//! signature leaves, APIC IDs, the hypervisor bit; boot MSRs, FPU, local APIC
//! LINT0 = ExtINT / LINT1 = NMI, and the registers of the boot entry), and
//! its saved state with save and restore in [`state`], and its thread's run
//! loop and run state in [`run`].

pub mod run;
pub mod state;

use std::sync::OnceLock;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::{kvm_err, KvmError};
use crate::boot::gdt::{
    segment_from_gdt, CODE_INDEX, DATA_INDEX, GDT_32, GDT_64, GDT_ENTRIES, TSS_INDEX,
};
use crate::boot::{BootEntry, CpuMode};
use crate::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, PML4_ADDR};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MISC_ENABLE.FAST_STRING.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The KVM paravirtual signature, "KVMKVMKVM\0\0\0", as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// KVM's supported CPUID. Read once per process (it is the same for every
/// VM of a host, and the ioctl takes about 0.3 ms here), then cloned.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    static CACHE: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c.clone());
    }
    let mut c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        advertise_tsc_deadline(&mut c);
    }
    Ok(CACHE.get_or_init(|| c).clone())
}

/// CPUID.1:ECX[24], the TSC-deadline timer. KVM emulates it in its local
/// APIC when it has `KVM_CAP_TSC_DEADLINE_TIMER`, but leaves the bit out of
/// its supported CPUID for the VMM to set. A guest that sees it skips the
/// local APIC timer's calibration (`calibrate_APIC_clock` returns at once):
/// about 100 ms of busy-waiting on `rdtsc` and `pause` at every boot. Under
/// a nested KVM emulated by QEMU TCG that loop, with a VM exit per `pause`,
/// is also where level 1 was found stopped for good.
fn advertise_tsc_deadline(c: &mut CpuId) {
    for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 24;
    }
}

/// Adjusts the supported CPUID for vCPU `id` of `count`.
pub fn patch_cpuid(base: &CpuId, id: u8, count: u8) -> Result<CpuId, KvmError> {
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = base.as_slice().to_vec();
    let mut has_sig = false;
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // ECX[31]: running under a hypervisor.
                e.ecx |= 1 << 31;
                // EDX[28]: HTT, meaningful with more than one logical CPU.
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // x2APIC ID.
                e.edx = u32::from(id);
            }
            0x8000_001e => {
                // AMD extended APIC ID, core ID (one thread per core), node 0.
                e.eax = u32::from(id);
                e.ebx = u32::from(id);
                e.ecx = 0;
            }
            KVM_CPUID_SIGNATURE => {
                has_sig = true;
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            _ => {}
        }
    }
    if !has_sig {
        entries.push(kvm_bindings::kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
        if !entries.iter().any(|e| e.function == KVM_CPUID_FEATURES) {
            entries.push(kvm_bindings::kvm_cpuid_entry2 {
                function: KVM_CPUID_FEATURES,
                ..Default::default()
            });
        }
    }
    CpuId::from_entries(&entries).map_err(|_| KvmError {
        op: "build CPUID",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// The boot MSRs (as Firecracker and vmm-reference set them).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes([
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Configures everything but the registers: CPUID, MSRs, FPU, LAPIC.
pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), KvmError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError {
        op: "build MSRs",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        // Some hosts (PVM) refuse some MSRs; the boot does not depend on them.
        tracing::debug!(
            set = n,
            wanted = entries.len(),
            "not every boot MSR was accepted"
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        set_apic_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        set_apic_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Sets the special and general registers for the boot entry (BSP only).
pub fn set_boot_registers(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    match entry.mode {
        CpuMode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        CpuMode::Protected32 | CpuMode::Long64 => {
            let gdt: &[u64; GDT_ENTRIES] = if entry.mode == CpuMode::Long64 {
                &GDT_64
            } else {
                &GDT_32
            };
            let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
            let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
            let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
            sregs.gdt.base = BOOT_GDT_ADDR;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.idt.base = BOOT_IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = tss;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            if entry.mode == CpuMode::Long64 {
                sregs.cr3 = PML4_ADDR;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: entry.rsp,
        rbp: entry.rsp,
        rsi: entry.rsi,
        rbx: entry.rbx,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_bit_is_set_in_leaf_1_only() {
        let mut c = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0001,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        advertise_tsc_deadline(&mut c);
        assert_eq!(c.as_slice()[0].ecx, 0x8100_0001);
        assert_eq!(c.as_slice()[1].ecx, 0);
    }

    #[test]
    fn cpuid_patch_sets_ids_and_signature() {
        let base = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0x8000_001e,
                eax: 9,
                ebx: 0x100,
                ecx: 0x101,
                ..Default::default()
            },
        ])
        .unwrap();
        let p = patch_cpuid(&base, 3, 4).unwrap();
        let s = p.as_slice();
        let leaf1 = s.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx, 0x0304_0800);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_eq!(s.iter().find(|e| e.function == 0xb).unwrap().edx, 3);
        let amd = s.iter().find(|e| e.function == 0x8000_001e).unwrap();
        assert_eq!((amd.eax, amd.ebx, amd.ecx), (3, 3, 0));
        let sig = s
            .iter()
            .find(|e| e.function == KVM_CPUID_SIGNATURE)
            .unwrap();
        let mut text = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            text.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&text, b"KVMKVMKVM\0\0\0");
        assert!(s.iter().any(|e| e.function == KVM_CPUID_FEATURES));
    }

    #[test]
    fn apic_delivery_mode() {
        assert_eq!(
            set_apic_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(
            set_apic_delivery_mode(0x0000_0700, APIC_MODE_NMI),
            0x0000_0400
        );
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0xdead_beef);
    }

    #[test]
    fn boot_msrs_include_mtrr_and_misc_enable() {
        let m = boot_msr_entries();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_ENABLE_WB));
        assert!(m
            .iter()
            .any(|e| e.index == MSR_IA32_MISC_ENABLE && e.data == 1));
    }
}
