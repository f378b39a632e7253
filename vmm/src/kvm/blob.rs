//! [`KvmBlob`]: a KVM uapi struct (`kvm_regs`, `kvm_sregs`, `kvm_lapic_state`...)
//! in a snapshot, serialised by kvm-bindings' own `serde` feature (the
//! struct's bytes, exactly as the kernel laid them out), and [`Fpu`], the one
//! struct we save that the feature does not cover (`kvm_fpu`), serialised
//! field by field.
//!
//! The wrapper adds what the bindings leave out for some structs (`Clone`,
//! `PartialEq`, `Default`, `Debug` for `kvm_xsave` and `kvm_irqchip`), all
//! through zerocopy's safe byte views: no `unsafe` here. kvm-bindings pads a
//! short byte array with zeros when reading; a long one is refused. A
//! snapshot's bytes are covered by its checksum and its format version, so
//! neither happens to a snapshot this build wrote.

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A KVM struct with kvm-bindings' byte serialisation.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct KvmBlob<T>(pub T);

impl<T> KvmBlob<T>
where
    T: IntoBytes + Immutable,
{
    /// The struct's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl<T> Clone for KvmBlob<T>
where
    T: IntoBytes + FromBytes + Immutable,
{
    fn clone(&self) -> Self {
        // Every byte pattern is a valid `T` (FromBytes), so a copy of the
        // bytes is an independent value of the same size.
        match T::read_from_bytes(self.0.as_bytes()) {
            Ok(v) => KvmBlob(v),
            Err(_) => unreachable!("a value's own bytes have its size"),
        }
    }
}

impl<T> Default for KvmBlob<T>
where
    T: FromBytes,
{
    fn default() -> Self {
        KvmBlob(T::new_zeroed())
    }
}

impl<T> PartialEq for KvmBlob<T>
where
    T: IntoBytes + Immutable,
{
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl<T> std::fmt::Debug for KvmBlob<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvmBlob<{}>({} bytes)",
            std::any::type_name::<T>(),
            std::mem::size_of::<T>()
        )
    }
}

/// `kvm_fpu` (`KVM_GET_FPU`), field by field: kvm-bindings gives it no serde.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fpu(#[serde(with = "FpuFields")] pub kvm_bindings::kvm_fpu);

/// serde's mirror of `kvm_bindings::kvm_fpu` (checked against it by the
/// compiler: a field that differs does not build).
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_bindings::kvm_fpu")]
struct FpuFields {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_struct_round_trips_through_json() {
        let r = kvm_bindings::kvm_regs {
            rax: 0x1234,
            rip: 0xdead_beef,
            rflags: 2,
            ..Default::default()
        };
        let j = serde_json::to_string(&KvmBlob(r)).unwrap();
        let back: KvmBlob<kvm_bindings::kvm_regs> = serde_json::from_str(&j).unwrap();
        assert_eq!(back.0.rip, 0xdead_beef);
        assert_eq!(back, KvmBlob(r));
        assert_eq!(
            back.bytes().len(),
            std::mem::size_of::<kvm_bindings::kvm_regs>()
        );
    }

    #[test]
    fn structs_without_clone_or_eq_get_them_from_their_bytes() {
        let mut x = KvmBlob::<kvm_bindings::kvm_xsave>::default();
        x.0.region[7] = 0xabcd;
        let y = x.clone();
        assert_eq!(x, y);
        assert_eq!(y.0.region[7], 0xabcd);
        let j = serde_json::to_vec(&y).unwrap();
        let z: KvmBlob<kvm_bindings::kvm_xsave> = serde_json::from_slice(&j).unwrap();
        assert_eq!(z, x);
        x.0.region[7] = 0;
        assert_ne!(x, z);
    }

    #[test]
    fn a_longer_byte_array_is_refused() {
        let j =
            serde_json::to_string(&KvmBlob(kvm_bindings::kvm_mp_state { mp_state: 3 })).unwrap();
        let longer = format!("{},9]", j.trim_end_matches(']'));
        assert!(serde_json::from_str::<KvmBlob<kvm_bindings::kvm_mp_state>>(&longer).is_err());
    }

    #[test]
    fn the_fpu_round_trips_field_by_field() {
        let mut f = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xffff_ffff_8100_0000,
            ..Default::default()
        };
        f.xmm[15][3] = 0x42;
        let j = serde_json::to_string(&Fpu(f)).unwrap();
        let back: Fpu = serde_json::from_str(&j).unwrap();
        assert_eq!(back, Fpu(f));
    }
}
