//! The PIO and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit for an I/O port or an MMIO address is dispatched to the device
//! whose range holds the address, with the offset into that range. Ranges never
//! overlap: [`Bus::insert`] refuses one that would. An access nobody claims is
//! ignored: a read returns all ones (like an empty ISA bus or unassigned MMIO),
//! a write is dropped, and the guest goes on.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A device on a bus. Calls come from vCPU threads, possibly several at once,
/// so the device synchronises internally (for example with a `Mutex`).
pub trait BusDevice: Send + Sync {
    /// Reads `data.len()` bytes at `offset` into the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (never 0).
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        // insert() guarantees base + len does not overflow.
        self.base + self.len
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// Errors from bus insertion.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error(
        "bus range {new_base:#x}+{new_len:#x} overlaps the device at {old_base:#x}+{old_len:#x}"
    )]
    Overlap {
        /// New range base.
        new_base: u64,
        /// New range length.
        new_len: u64,
        /// Existing range base.
        old_base: u64,
        /// Existing range length.
        old_len: u64,
    },
    /// Zero length or a range past the end of the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Range base.
        base: u64,
        /// Range length.
        len: u64,
    },
}

/// The devices of a bus, keyed by base address.
type DeviceMap = BTreeMap<u64, (BusRange, Arc<dyn BusDevice>)>;

/// A bus: PIO or MMIO. Cheap to clone (shared inside).
#[derive(Clone, Default)]
pub struct Bus {
    devices: Arc<RwLock<DeviceMap>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<BusRange> = match self.devices.read() {
            Ok(d) => d.values().map(|(r, _)| *r).collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on `[base, base + len)`; refuses an overlap.
    pub fn insert(&self, device: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let new = BusRange { base, len };
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        // Only the nearest range at or below the new end can overlap, plus any
        // range starting inside the new one: checking the neighbours is enough,
        // but the maps here are tiny, so check them all and keep it obvious.
        if let Some((old, _)) = devices.values().find(|(r, _)| r.overlaps(&new)) {
            return Err(BusError::Overlap {
                new_base: base,
                new_len: len,
                old_base: old.base,
                old_len: old.len,
            });
        }
        devices.insert(base, (new, device));
        Ok(())
    }

    /// The device holding `addr` and the offset of `addr` in its range.
    pub fn resolve(&self, addr: u64) -> Option<(Arc<dyn BusDevice>, u64)> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let (_, (range, dev)) = devices.range(..=addr).next_back()?;
        if addr < range.end() {
            Some((dev.clone(), addr - range.base))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff) when no
    /// device holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false (dropping it) when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The ranges on the bus, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        devices.values().map(|(r, _)| *r).collect()
    }
}

/// A device that accepts every access and reads as zero: absorbs harmless
/// probes (port 0x80 POST codes, the second UARTs, the PCI config ports...).
#[derive(Debug, Default)]
pub struct SinkDevice;

impl BusDevice for SinkDevice {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_offset() {
        let bus = Bus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.write(0x3f8, &[1]));
        assert!(bus.write(0x3ff, &[2]));
        assert!(bus.write(0x10ff, &[3, 4]));
        assert!(!bus.write(0x400, &[5]));
        assert!(!bus.write(0x3f7, &[5]));
        assert!(!bus.write(0x1100, &[5]));
        assert_eq!(*a.writes.lock().unwrap(), vec![(0, vec![1]), (7, vec![2])]);
        assert_eq!(*b.writes.lock().unwrap(), vec![(0xff, vec![3, 4])]);
        let mut d = [0u8; 2];
        assert!(bus.read(0x1010, &mut d));
        assert_eq!(d, [0x10, 0x11]);
    }

    #[test]
    fn unknown_reads_are_all_ones() {
        let bus = Bus::new();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xdead, &mut d));
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn overlap_refused() {
        let bus = Bus::new();
        bus.insert(Arc::new(SinkDevice), 0x100, 0x10).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0xf8, 0x10),
            (0x10f, 1),
            (0x0, 0x1000),
            (0x105, 2),
        ] {
            assert!(
                matches!(
                    bus.insert(Arc::new(SinkDevice), base, len),
                    Err(BusError::Overlap {
                        old_base: 0x100,
                        ..
                    })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges are fine.
        bus.insert(Arc::new(SinkDevice), 0x110, 0x10).unwrap();
        bus.insert(Arc::new(SinkDevice), 0xf0, 0x10).unwrap();
        assert_eq!(bus.ranges().len(), 3);
        assert_eq!(
            bus.insert(Arc::new(SinkDevice), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(bus.insert(Arc::new(SinkDevice), u64::MAX, 2).is_err());
    }
}
