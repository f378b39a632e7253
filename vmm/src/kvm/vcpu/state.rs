//! One vCPU's saved state ([`VcpuState`]: registers, FPU, XSAVE, LAPIC,
//! MSRs, events...) with its [`save_vcpu`] and [`restore_vcpu`]: what a
//! snapshot keeps of a vCPU, next to the vCPU's set-up (`super`).

use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::kvm::blob::{Fpu, KvmBlob};
use crate::kvm::{kvm_err, KvmError};

/// One MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// One vCPU. Pieces the host's KVM could not read are `None`, with the
/// reason in `unsupported`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC ID).
    pub id: u8,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<KvmBlob<kvm_bindings::kvm_cpuid_entry2>>,
    /// General registers.
    pub regs: KvmBlob<kvm_bindings::kvm_regs>,
    /// Special registers.
    pub sregs: KvmBlob<kvm_bindings::kvm_sregs>,
    /// x87/SSE state (`KVM_GET_FPU`).
    pub fpu: Option<Fpu>,
    /// Extended state (`KVM_GET_XSAVE`, legacy 4 KiB area).
    pub xsave: Option<KvmBlob<kvm_bindings::kvm_xsave>>,
    /// XCRs.
    pub xcrs: Option<KvmBlob<kvm_bindings::kvm_xcrs>>,
    /// Debug registers.
    pub debugregs: Option<KvmBlob<kvm_bindings::kvm_debugregs>>,
    /// Local APIC registers.
    pub lapic: Option<KvmBlob<kvm_bindings::kvm_lapic_state>>,
    /// MSRs: those of `KVM_GET_MSR_INDEX_LIST` the vCPU lets us read.
    pub msrs: Vec<MsrValue>,
    /// Multiprocessing state (runnable, halted...).
    pub mp_state: Option<KvmBlob<kvm_bindings::kvm_mp_state>>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: Option<KvmBlob<kvm_bindings::kvm_vcpu_events>>,
    /// What could not be saved on this host, and why.
    pub unsupported: Vec<String>,
}

/// `KVM_GET_MSR_INDEX_LIST`, once per process.
pub(crate) fn msr_index_list(kvm: &Kvm) -> Vec<u32> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| match kvm.get_msr_index_list() {
        Ok(l) => l.as_slice().to_vec(),
        Err(e) => {
            tracing::warn!(%e, "KVM_GET_MSR_INDEX_LIST failed: no MSRs in snapshots");
            Vec::new()
        }
    })
    .clone()
}

/// The MSRs of `list` this host's vCPUs let us read (probed once per process:
/// `KVM_GET_MSRS` stops at the first MSR it refuses, which is dropped).
fn readable_msrs(vcpu: &VcpuFd, list: &[u32]) -> Vec<u32> {
    static READABLE: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(r) = READABLE.get() {
        return r.clone();
    }
    let mut ok = Vec::with_capacity(list.len());
    let mut refused = Vec::new();
    let mut rest: Vec<u32> = list.to_vec();
    while !rest.is_empty() {
        let chunk: Vec<u32> = rest.iter().take(MSR_CHUNK).copied().collect();
        let n = match read_msrs(vcpu, &chunk) {
            Ok(v) => v.len(),
            Err(_) => 0,
        };
        ok.extend_from_slice(&chunk[..n]);
        if n < chunk.len() {
            refused.push(chunk[n]);
            rest.drain(..=n);
        } else {
            rest.drain(..n);
        }
    }
    if !refused.is_empty() {
        tracing::debug!(
            readable = ok.len(),
            refused = refused.len(),
            "MSR index list filtered to the MSRs KVM_GET_MSRS accepts"
        );
    }
    READABLE.get_or_init(|| ok).clone()
}

/// `KVM_GET_MSRS` takes at most this many at once.
const MSR_CHUNK: usize = 200;

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, KvmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError {
        op: "build MSRs",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    Ok(msrs
        .as_slice()
        .iter()
        .take(n)
        .map(|e| MsrValue {
            index: e.index,
            data: e.data,
        })
        .collect())
}

/// Saves one vCPU's state. Call on a vCPU that is out of `KVM_RUN` (parked),
/// after pending I/O was completed.
pub fn save_vcpu(id: u8, vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, KvmError> {
    fn opt<T>(
        unsupported: &mut Vec<String>,
        what: &str,
        r: Result<T, kvm_ioctls::Error>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                unsupported.push(format!("{what}: {e}"));
                None
            }
        }
    }
    let mut unsupported = Vec::new();
    let u = &mut unsupported;
    let mp_state = opt(u, "KVM_GET_MP_STATE", vcpu.get_mp_state()).map(KvmBlob);
    let fpu = opt(u, "KVM_GET_FPU", vcpu.get_fpu()).map(Fpu);
    let xsave = opt(u, "KVM_GET_XSAVE", vcpu.get_xsave()).map(KvmBlob);
    let xcrs = opt(u, "KVM_GET_XCRS", vcpu.get_xcrs()).map(KvmBlob);
    let debugregs = opt(u, "KVM_GET_DEBUGREGS", vcpu.get_debug_regs()).map(KvmBlob);
    let lapic = opt(u, "KVM_GET_LAPIC", vcpu.get_lapic()).map(KvmBlob);
    let events = opt(u, "KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events()).map(KvmBlob);
    let cpuid = match vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES) {
        Ok(c) => c.as_slice().iter().map(|e| KvmBlob(*e)).collect(),
        Err(e) => {
            unsupported.push(format!("KVM_GET_CPUID2: {e}"));
            Vec::new()
        }
    };
    let regs = KvmBlob(vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?);
    let sregs = KvmBlob(vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?);
    let readable = readable_msrs(vcpu, msr_list);
    let mut msrs = Vec::with_capacity(readable.len());
    for chunk in readable.chunks(MSR_CHUNK) {
        let got = read_msrs(vcpu, chunk)?;
        if got.len() < chunk.len() {
            unsupported.push(format!("MSR {:#x} could not be read", chunk[got.len()]));
        }
        msrs.extend(got);
    }
    Ok(VcpuState {
        id,
        cpuid,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        mp_state,
        events,
        unsupported,
    })
}

/// Loads a saved state into a fresh vCPU (Firecracker's order: CPUID, MP
/// state, registers, extended state, LAPIC, MSRs, and pending events last).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState, fallback_cpuid: &CpuId) -> Result<(), KvmError> {
    if s.cpuid.is_empty() {
        vcpu.set_cpuid2(fallback_cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
    } else {
        let entries: Vec<_> = s.cpuid.iter().map(|b| b.0).collect();
        let c = CpuId::from_entries(&entries).map_err(|_| KvmError {
            op: "build CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
    }
    if let Some(m) = &s.mp_state {
        vcpu.set_mp_state(m.0)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    vcpu.set_regs(&s.regs.0).map_err(kvm_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs.0)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    if let Some(f) = &s.fpu {
        vcpu.set_fpu(&f.0).map_err(kvm_err("KVM_SET_FPU"))?;
    }
    if let Some(x) = &s.xsave {
        // SAFETY: a legacy 4 KiB `kvm_xsave` read by KVM_GET_XSAVE on a host
        // of the same kind (checked by the header); no XSAVE2 extension area
        // is passed, so KVM reads only the struct itself.
        unsafe { vcpu.set_xsave(&x.0) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(&x.0).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(&d.0)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(l) = &s.lapic {
        vcpu.set_lapic(&l.0).map_err(kvm_err("KVM_SET_LAPIC"))?;
    }
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError {
            op: "build MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < entries.len() {
            // Set the rest one by one past the refused one.
            tracing::debug!(
                msr = format_args!("{:#x}", entries[n].index),
                "KVM_SET_MSRS refused an MSR; setting the others one by one"
            );
            for e in &entries[n..] {
                if let Ok(one) = Msrs::from_entries(std::slice::from_ref(e)) {
                    if vcpu.set_msrs(&one).unwrap_or(0) != 1 {
                        tracing::debug!(msr = format_args!("{:#x}", e.index), "MSR not restored");
                    }
                }
            }
        }
    }
    if let Some(ev) = &s.events {
        vcpu.set_vcpu_events(&ev.0)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}
