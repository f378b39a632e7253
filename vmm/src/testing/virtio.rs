//! The driver's side of virtio for tests: split rings in guest memory built
//! on virtio-queue's own mock (`virtio_queue::mock`), placed where the test
//! says (a hostile driver puts them anywhere), and the virtio-mmio register
//! sequence a Linux driver goes through. One copy for the unit tests, the
//! fuzz targets and the seccomp tests.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::virtio::mmio::reg;
use crate::virtio::{status, MmioTransport, VirtioDevice};

pub use virtio_queue::mock::MockSplitQueue;

/// A split ring: descriptor table, available ring and used ring at three
/// addresses of the test's choosing, in RAM.
pub struct SplitRing<'a> {
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    size: u16,
    desc: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
}

impl<'a> SplitRing<'a> {
    /// A ring of `size` entries; the rings' flags, indices and event fields
    /// start at zero (as a driver leaves them). Panics if a part is not in
    /// RAM (a test's mistake).
    pub fn new(mem: &'a GuestMemoryMmap, (desc, avail, used): (u64, u64, u64), size: u16) -> Self {
        SplitRing {
            desc_addr: desc,
            avail_addr: avail,
            used_addr: used,
            size,
            desc: DescriptorTable::new(mem, GuestAddress(desc), size),
            avail: AvailRing::new(mem, GuestAddress(avail), size),
            used: UsedRing::new(mem, GuestAddress(used), size),
        }
    }

    /// Descriptor table, available ring, used ring.
    pub fn addrs(&self) -> [u64; 3] {
        [self.desc_addr, self.avail_addr, self.used_addr]
    }

    /// The ring's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Zeroes every descriptor.
    pub fn clear_descriptors(&self) {
        for i in 0..self.size {
            self.set_desc(i, 0, 0, 0, 0);
        }
    }

    /// Writes descriptor `i` as given: any flags, any `next`, any address.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc
            .store(
                i,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .expect("descriptor index within the ring");
    }

    /// Writes `head` into available entry `n` (modulo the size).
    pub fn set_avail(&self, n: u16, head: u16) {
        self.avail
            .ring()
            .ref_at(usize::from(n % self.size))
            .expect("entry within the ring")
            .store(head);
    }

    /// Sets the available ring's index (what the driver has published).
    pub fn set_avail_idx(&self, idx: u16) {
        self.avail.idx().store(idx);
    }

    /// Publishes `head` as available entry `n` (the index becomes `n + 1`).
    pub fn publish(&self, n: u16, head: u16) {
        self.set_avail(n, head);
        self.set_avail_idx(n.wrapping_add(1));
    }

    /// The used ring's index (what the device has returned).
    pub fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// `(id, len)` of used entry `i` (modulo the size).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let e = self
            .used
            .ring()
            .ref_at(usize::from(i % self.size))
            .expect("entry within the ring")
            .load();
        (e.id(), e.len())
    }

    /// The device's view of this ring: a ready `virtio_queue::Queue` (whose
    /// largest size is 256, as the VMM's devices offer).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(256).expect("a valid largest size");
        q.try_set_size(self.size).expect("a power of two up to 256");
        q.try_set_desc_table_address(GuestAddress(self.desc_addr))
            .expect("an aligned table");
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr))
            .expect("an aligned ring");
        q.try_set_used_ring_address(GuestAddress(self.used_addr))
            .expect("an aligned ring");
        q.set_ready(true);
        q
    }
}

/// Reads a 32-bit register of a virtio-mmio transport.
pub fn mmio_read<D: VirtioDevice>(t: &mut MmioTransport<D>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register of a virtio-mmio transport.
pub fn mmio_write<D: VirtioDevice>(t: &mut MmioTransport<D>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Configures queue `i`: its size, its three addresses (descriptor table,
/// available ring, used ring), then `QUEUE_READY` = `ready`.
pub fn setup_queue<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    i: u32,
    size: u32,
    addrs: [u64; 3],
    ready: u32,
) {
    mmio_write(t, reg::QUEUE_SEL, i);
    mmio_write(t, reg::QUEUE_NUM, size);
    for (k, a) in addrs.iter().enumerate() {
        let low = reg::QUEUE_DESC_LOW + 0x10 * k as u64;
        mmio_write(t, low, *a as u32);
        mmio_write(t, low + 4, (*a >> 32) as u32);
    }
    mmio_write(t, reg::QUEUE_READY, ready);
}

/// The probe sequence of a Linux driver up to `FEATURES_OK`: reset,
/// acknowledge, driver, the features `features`, features OK.
pub fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, features: u64) {
    mmio_write(t, reg::STATUS, 0);
    mmio_write(t, reg::STATUS, status::ACKNOWLEDGE);
    mmio_write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    mmio_write(t, reg::DRIVER_FEATURES_SEL, 0);
    mmio_write(t, reg::DRIVER_FEATURES, features as u32);
    mmio_write(t, reg::DRIVER_FEATURES_SEL, 1);
    mmio_write(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    mmio_write(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

/// The status of a driven-up device: acknowledged, driver, features OK,
/// driver OK.
pub const STATUS_UP: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
