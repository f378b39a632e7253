//! Validating walk of a split-virtqueue descriptor chain written by the guest.
//!
//! `virtio_queue::DescriptorChain` silently stops at a loop or a bad `next`
//! index; a device must tell "end of chain" from "hostile chain" to count the
//! latter, so this walker reads the descriptors itself (through vm-memory,
//! never raw pointers) and refuses:
//!
//! * a `next` index at or beyond the queue size,
//! * a chain longer than the queue size (that is how a loop shows),
//! * an indirect descriptor (`VIRTIO_F_INDIRECT_DESC` is never offered),
//! * a zero-length descriptor,
//! * a total length above the caller's bound (checked before any copy),
//! * a buffer not wholly inside guest memory, or a descriptor table entry
//!   outside it.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u32 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u32 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u32 = 4;

/// Size of one split-queue descriptor.
const DESC_SIZE: u64 = 16;

/// One buffer of a validated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} out of range for the queue")]
    IndexOutOfRange(u16),
    #[error("descriptor chain longer than the queue (a loop)")]
    Loop,
    #[error("indirect descriptor, not negotiated")]
    Indirect,
    #[error("zero-length descriptor")]
    ZeroLength,
    #[error("chain longer than {0} bytes")]
    TooLong(u64),
    #[error("buffer outside guest memory")]
    BadAddress,
}

/// Walks the chain starting at `head` in the descriptor table at `desc_table`
/// of a queue of `queue_size` entries, appending its buffers to `out`
/// (cleared first). Returns the total length, at most `max_total`.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_total: u64,
    out: &mut Vec<Segment>,
) -> Result<u64, ChainError> {
    out.clear();
    let mut idx = head;
    let mut total: u64 = 0;
    let mut count: u32 = 0;
    loop {
        if idx >= queue_size {
            return Err(ChainError::IndexOutOfRange(idx));
        }
        count += 1;
        if count > u32::from(queue_size) {
            return Err(ChainError::Loop);
        }
        let entry = desc_table
            .checked_add(u64::from(idx) * DESC_SIZE)
            .ok_or(ChainError::BadAddress)?;
        let desc: Descriptor = mem.read_obj(entry).map_err(|_| ChainError::BadAddress)?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect);
        }
        let len = desc.len();
        if len == 0 {
            return Err(ChainError::ZeroLength);
        }
        total += u64::from(len);
        if total > max_total {
            return Err(ChainError::TooLong(max_total));
        }
        // `len` is at most max_total here, so the usize conversion is exact.
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(desc.addr(), len as usize, access) {
            return Err(ChainError::BadAddress);
        }
        out.push(Segment {
            addr: desc.addr(),
            len,
            write_only: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(total);
        }
        idx = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        m.write_obj(
            Descriptor::new(addr, len, flags as u16, next),
            GuestAddress(u64::from(i) * 16),
        )
        .unwrap();
    }

    #[test]
    fn valid_chain() {
        let m = mem();
        put(&m, 0, 0x1000, 100, VRING_DESC_F_NEXT, 3);
        put(&m, 3, 0x2000, 50, VRING_DESC_F_WRITE, 0);
        let mut segs = Vec::new();
        let total = walk_chain(&m, GuestAddress(0), 8, 0, 1000, &mut segs).unwrap();
        assert_eq!(total, 150);
        assert_eq!(segs.len(), 2);
        assert!(!segs[0].write_only && segs[1].write_only);
        assert_eq!(segs[1].addr, GuestAddress(0x2000));
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        let mut segs = Vec::new();
        // Loop 0 -> 1 -> 0.
        put(&m, 0, 0x1000, 10, VRING_DESC_F_NEXT, 1);
        put(&m, 1, 0x1000, 10, VRING_DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::Loop)
        );
        // Self loop.
        put(&m, 2, 0x1000, 10, VRING_DESC_F_NEXT, 2);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 2, 1 << 20, &mut segs),
            Err(ChainError::Loop)
        );
        // next beyond the queue.
        put(&m, 0, 0x1000, 10, VRING_DESC_F_NEXT, 9);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::IndexOutOfRange(9))
        );
        // head beyond the queue.
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 8, 1 << 20, &mut segs),
            Err(ChainError::IndexOutOfRange(8))
        );
        // Outside guest memory, and straddling its end.
        put(&m, 0, 0x1_0000_0000, 10, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::BadAddress)
        );
        put(&m, 0, 0xfff0, 0x20, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::BadAddress)
        );
        // Zero and huge lengths.
        put(&m, 0, 0x1000, 0, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::ZeroLength)
        );
        put(&m, 0, 0x1000, u32::MAX, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 65562, &mut segs),
            Err(ChainError::TooLong(65562))
        );
        // Indirect.
        put(&m, 0, 0x1000, 32, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(0), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::Indirect)
        );
        // Descriptor table itself outside guest memory.
        assert_eq!(
            walk_chain(&m, GuestAddress(0xffff_0000), 8, 0, 1 << 20, &mut segs),
            Err(ChainError::BadAddress)
        );
    }
}
