//! [`KvmBlob`]: a KVM uapi struct (`kvm_regs`, `kvm_sregs`, `kvm_lapic_state`...)
//! serialised as the hex text of its bytes, exactly as the kernel laid them
//! out. Reading it back checks the length: a blob of another size (another
//! kernel ABI, or a damaged file) is refused instead of being padded.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A KVM uapi struct that is plain bytes: `repr(C)`, only integer fields
/// (and arrays or unions of them), every padding byte named as a field, so
/// any byte pattern is a valid value.
///
/// # Safety
///
/// Implement only for such types.
pub unsafe trait KvmPod: Default {}

macro_rules! kvm_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a KVM uapi struct from kvm-bindings: repr(C), integer
            // fields, explicit padding fields (the kernel ABI has no implicit
            // padding), so every byte is initialised and any pattern is valid.
            unsafe impl KvmPod for $t {}
        )*
    };
}

kvm_pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_fpu,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_xsave,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_cpuid_entry2,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_pit_state2,
    kvm_bindings::kvm_clock_data,
);

/// A KVM struct, serialised as hex bytes.
#[derive(Default)]
pub struct KvmBlob<T: KvmPod>(pub T);

impl<T: KvmPod> Clone for KvmBlob<T> {
    fn clone(&self) -> Self {
        // SAFETY: `T: KvmPod` is plain bytes; a bitwise copy is a valid,
        // independent value (no pointers, no Drop).
        KvmBlob(unsafe { std::ptr::read(&self.0) })
    }
}

impl<T: KvmPod> KvmBlob<T> {
    /// The struct's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `T: KvmPod` has no uninitialised (implicit padding) bytes,
        // and the slice covers exactly the value, borrowed for its lifetime.
        unsafe {
            std::slice::from_raw_parts((&self.0 as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
    }

    /// The struct from exactly `size_of::<T>()` bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != std::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: the length matches and any byte pattern is a valid `T`
        // (`KvmPod`); read_unaligned copes with the slice's alignment.
        Some(KvmBlob(unsafe {
            std::ptr::read_unaligned(b.as_ptr().cast::<T>())
        }))
    }
}

impl<T: KvmPod> PartialEq for KvmBlob<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<T: KvmPod> std::fmt::Debug for KvmBlob<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvmBlob<{}>({} bytes)",
            std::any::type_name::<T>(),
            std::mem::size_of::<T>()
        )
    }
}

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

/// Bytes from hex text, or `None` if it is not even-length hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks_exact(2)
        .map(|p| Some((nib(p[0])? << 4) | nib(p[1])?))
        .collect()
}

impl<T: KvmPod> Serialize for KvmBlob<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(self.bytes()))
    }
}

impl<'de, T: KvmPod> Deserialize<'de> for KvmBlob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let b = from_hex(&s).ok_or_else(|| serde::de::Error::custom("not hex"))?;
        let n = b.len();
        KvmBlob::from_bytes(&b).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{} is {} bytes, the snapshot holds {n}",
                std::any::type_name::<T>(),
                std::mem::size_of::<T>()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn blob_round_trip_and_wrong_size_refused() {
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
        let short = format!("\"{}\"", &j[1..j.len() - 3]);
        let e = serde_json::from_str::<KvmBlob<kvm_bindings::kvm_regs>>(&short).unwrap_err();
        assert!(
            e.to_string().contains("not hex") || e.to_string().contains("bytes"),
            "{e}"
        );
    }
}
