//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! One [`MmioTransport`] per device occupies a 4 KiB slot: registers at
//! 0x000..0x100, the device's configuration space from 0x100. The VMM calls
//! [`MmioTransport::read`] / [`MmioTransport::write`] with the offset inside
//! the slot for each MMIO exit (see the wiring recipe in [`crate::virtio`]).
//!
//! The state machine enforced here:
//!
//! * Status bits may only be added, in the order ACKNOWLEDGE → DRIVER →
//!   FEATURES_OK → DRIVER_OK (each needs the previous one already set);
//!   FAILED may be set at any time; writing 0 resets the device. Any other
//!   write is ignored and counted.
//! * DriverFeatures may be written only between DRIVER and FEATURES_OK.
//!   FEATURES_OK is refused (the bit stays clear when the driver reads Status
//!   back) if the driver accepted a feature that was not offered, or did not
//!   accept `VIRTIO_F_VERSION_1`.
//! * Queue registers may be written only between FEATURES_OK and DRIVER_OK,
//!   and not while the selected queue is ready.
//! * DRIVER_OK activates the device; if a queue is not ready or lies outside
//!   guest memory, the device is not started and DEVICE_NEEDS_RESET is set
//!   (with a configuration-change interrupt).
//! * Register accesses must be 4 bytes wide and aligned; configuration space
//!   accesses may be of any width. Other accesses are ignored (reads return
//!   zeros) and counted in [`MmioTransport::bad_accesses`].

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::VIRTIO_F_VERSION_1;
use super::{status, Activation, Interrupt, VirtioDevice};

/// Size of one device slot (`virtio_mmio.device=4K@...`).
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: register the per-queue ioeventfds at `base + this`.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset where the device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt", little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// "OSSO".
const VENDOR_ID: u32 = 0x4f53_534f;

/// Register offsets (virtio 1.2, 4.2.2).
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The kernel command-line fragment declaring a device at `base` with `irq`:
/// `virtio_mmio.device=4K@0xd0000000:5`.
pub fn mmio_cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// A virtio-mmio v2 transport around one device.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    bad_accesses: u64,
    warned_bad_access: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("activated", &self.activated)
            .finish()
    }
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("creating an EventFd: {0}")]
    EventFd(#[from] std::io::Error),
    #[error("device declares an invalid queue size {0}")]
    QueueSize(u16),
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, whose queues will live in `mem`.
    pub fn new(device: D, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| MmioError::QueueSize(max))?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new()?),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            bad_accesses: 0,
            warned_bad_access: false,
        })
    }

    /// The irqfd: register with KVM for the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.evt()
    }

    /// The interrupt line (InterruptStatus and the irqfd).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// One `EventFd` per queue (index = queue index = ioeventfd datamatch),
    /// to register as ioeventfds at `base + NOTIFY_REG_OFFSET`.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Malformed or out-of-order register accesses seen so far.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// Stops the device thread (as a reset does). Also done on drop.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn bad_access(&mut self, what: &str, offset: u64) {
        self.bad_accesses += 1;
        if !self.warned_bad_access {
            self.warned_bad_access = true;
            warn!(
                "virtio-mmio: ignored {what} at offset {offset:#x} (further ones are only counted)"
            );
        } else {
            debug!("virtio-mmio: ignored {what} at offset {offset:#x}");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// An MMIO read at `offset` inside the slot.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset & 3 != 0 {
            self.bad_access("register read of bad width or alignment", offset);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length -1 means "none".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            // The configuration space never changes.
            reg::CONFIG_GENERATION => 0,
            _ => {
                self.bad_access("read of a write-only or unknown register", offset);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// An MMIO write at `offset` inside the slot.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & status::FAILED != 0 {
                return;
            }
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access("register write of bad width", offset);
            return;
        };
        if offset & 3 != 0 {
            self.bad_access("unaligned register write", offset);
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if !self.status_is(status::DRIVER, status::FEATURES_OK) {
                    self.bad_access("DriverFeatures write outside DRIVER..FEATURES_OK", offset);
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    // Pages beyond 1 hold no feature we offer: a set bit
                    // there is an unoffered feature.
                    _ if v != 0 => self.driver_features |= 1 << 63,
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        warn!("virtio-mmio: signalling queue {v}: {e}");
                    }
                }
                None => self.bad_access("QueueNotify for a queue that does not exist", offset),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => self.bad_access("write to a read-only or unknown register", offset),
        }
    }

    /// `set` bits all set and no `clear` bit set in Status.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.status_is(status::FEATURES_OK, status::DRIVER_OK | status::FAILED) {
            self.bad_access(
                "queue register write outside FEATURES_OK..DRIVER_OK",
                offset,
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            self.bad_access(
                "queue register write for a queue that does not exist",
                offset,
            );
            return;
        };
        if offset == reg::QUEUE_READY {
            q.set_ready(v == 1);
            return;
        }
        if q.ready() {
            self.bad_access("queue register write while the queue is ready", offset);
            return;
        }
        let ok = match offset {
            reg::QUEUE_NUM => u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok()),
            reg::QUEUE_DESC_LOW => {
                q.set_desc_table_address(Some(v), None);
                true
            }
            reg::QUEUE_DESC_HIGH => {
                q.set_desc_table_address(None, Some(v));
                true
            }
            reg::QUEUE_DRIVER_LOW => {
                q.set_avail_ring_address(Some(v), None);
                true
            }
            reg::QUEUE_DRIVER_HIGH => {
                q.set_avail_ring_address(None, Some(v));
                true
            }
            reg::QUEUE_DEVICE_LOW => {
                q.set_used_ring_address(Some(v), None);
                true
            }
            reg::QUEUE_DEVICE_HIGH => {
                q.set_used_ring_address(None, Some(v));
                true
            }
            _ => true,
        };
        if !ok {
            self.bad_access(
                "invalid QueueNum (0, above QueueNumMax or not a power of 2)",
                offset,
            );
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            self.bad_access("Status write clearing bits (only 0 resets)", reg::STATUS);
            return;
        }
        let added = v & !old;
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::FAILED;
        if added & !known != 0 {
            self.bad_access(
                "Status write with unknown or device-owned bits",
                reg::STATUS,
            );
            return;
        }
        // Each step needs the previous one already acknowledged.
        let needs = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, prereq) in needs {
            if added & bit != 0 && old & prereq == 0 {
                self.bad_access("Status bits out of order", reg::STATUS);
                return;
            }
        }
        let mut new = v;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            warn!(
                "virtio-mmio: refusing FEATURES_OK: driver features {:#x}, offered {:#x}",
                self.driver_features,
                self.device.avail_features()
            );
            new &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 && new & status::FAILED == 0 {
            match self.activate() {
                Ok(()) => self.activated = true,
                Err(e) => {
                    warn!("virtio-mmio: device activation failed: {e}");
                    new &= !status::DRIVER_OK;
                    new |= status::DEVICE_NEEDS_RESET;
                    if let Err(e) = self.interrupt.signal_config_change() {
                        warn!("virtio-mmio: signalling the config interrupt: {e}");
                    }
                }
            }
        }
        self.status = new;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), super::ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(super::ActivateError::InvalidQueue(i));
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            queues.push(
                Queue::try_from(q.state()).map_err(|_| super::ActivateError::InvalidQueue(i))?,
            );
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            queue_evts.push(e.try_clone()?);
        }
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        })
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_evts {
            // Drop notifications still pending; EAGAIN when none.
            let _ = e.read();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's registers and queues, for a snapshot (the vCPUs must
    /// be paused). Queue positions of a running device come from the used
    /// rings in guest memory (see [`crate::virtio::state::VirtioMmioState`]).
    pub fn save_state(&self) -> crate::virtio::state::VirtioMmioState {
        use crate::virtio::state::VirtqueueState;
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let (next_avail, next_used) = if self.activated && q.ready() {
                    match q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire) {
                        Ok(i) => (i.0, i.0),
                        Err(_) => (q.next_avail(), q.next_used()),
                    }
                } else {
                    (q.next_avail(), q.next_used())
                };
                VirtqueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail,
                    next_used,
                }
            })
            .collect();
        crate::virtio::state::VirtioMmioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Loads a saved state into a fresh transport (same device type and
    /// queue count) and, if the driver had set DRIVER_OK, activates the
    /// device on the restored queues.
    pub fn restore_state(
        &mut self,
        s: &crate::virtio::state::VirtioMmioState,
    ) -> Result<(), String> {
        if self.activated {
            return Err("the transport is already running".into());
        }
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {} with {} queues, the snapshot has type {} with {}",
                self.device.device_type(),
                self.queues.len(),
                s.device_type,
                s.queues.len()
            ));
        }
        for (i, (q, qs)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            q.try_set_size(qs.size)
                .map_err(|e| format!("queue {i} size {}: {e:?}", qs.size))?;
            q.set_desc_table_address(
                Some(qs.desc_table as u32),
                Some((qs.desc_table >> 32) as u32),
            );
            q.set_avail_ring_address(
                Some(qs.avail_ring as u32),
                Some((qs.avail_ring >> 32) as u32),
            );
            q.set_used_ring_address(Some(qs.used_ring as u32), Some((qs.used_ring >> 32) as u32));
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            q.set_ready(qs.ready);
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        let running = status::DRIVER_OK;
        let broken = status::FAILED | status::DEVICE_NEEDS_RESET;
        if s.status & running != 0 && s.status & broken == 0 {
            self.activate()
                .map_err(|e| format!("activating the device: {e}"))?;
            self.activated = true;
        }
        self.interrupt
            .restore_status(s.interrupt_status)
            .map_err(|e| format!("interrupt: {e}"))?;
        Ok(())
    }
}

/// Lets `Arc<Mutex<MmioTransport<_>>>` sit on the VMM's MMIO bus directly
/// (`MachineBuilder::add_virtio_mmio_device(transport.clone())`). A poisoned
/// lock is recovered: the transport's state stays consistent between calls.
impl<D: VirtioDevice> crate::bus::BusDevice for std::sync::Mutex<MmioTransport<D>> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write(offset, data);
    }
}

impl<D: VirtioDevice> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
    }
}

/// The transport as a machine holds it (behind its lock, shared with the
/// bus and the device thread's owner) saves and restores through
/// [`crate::persist::Persist`].
impl<D: VirtioDevice> crate::persist::Persist for std::sync::Mutex<MmioTransport<D>> {
    type State = crate::virtio::state::VirtioMmioState;
    type Error = String;

    fn save_state(&self) -> Self::State {
        self.lock().unwrap_or_else(|p| p.into_inner()).save_state()
    }

    fn restore_state(&self, state: &Self::State) -> Result<(), String> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(state)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    /// A device that records activations and resets.
    pub struct DummyDevice {
        pub activations: Arc<AtomicUsize>,
        pub resets: Arc<AtomicUsize>,
        pub config: [u8; 6],
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            (1 << 32) | (1 << 5)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            assert_eq!(a.queues.len(), 2);
            assert_eq!(a.acked_features, (1 << 32) | (1 << 5));
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn transport() -> (
        MmioTransport<DummyDevice>,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let a = Arc::new(AtomicUsize::new(0));
        let r = Arc::new(AtomicUsize::new(0));
        let dev = DummyDevice {
            activations: a.clone(),
            resets: r.clone(),
            config: [0x52, 0x54, 0, 1, 2, 3],
        };
        (MmioTransport::new(dev, mem).unwrap(), a, r)
    }

    use crate::testing::virtio::{mmio_read as rd, mmio_write as wr, negotiate, STATUS_UP};

    /// Configures queue `i` at the given addresses, ready.
    fn setup_queue<D: VirtioDevice>(
        t: &mut MmioTransport<D>,
        i: u32,
        size: u32,
        desc: u64,
        avail: u64,
        used: u64,
    ) {
        crate::testing::virtio::setup_queue(t, i, size, [desc, avail, used], 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 1);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 5);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        // Bad width: ignored, zeros, counted.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(t.bad_accesses(), 1);
    }

    #[test]
    fn config_space_reads() {
        let (mut t, _, _) = transport();
        let mut mac = [0u8; 6];
        t.read(0x100, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
        let mut b = [0u8; 1];
        t.read(0x103, &mut b);
        assert_eq!(b[0], 1);
        let mut tail = [0xffu8; 4];
        t.read(0x104, &mut tail);
        assert_eq!(tail, [2, 3, 0, 0]);
    }

    #[test]
    fn status_order_enforced() {
        let (mut t, _, _) = transport();
        // DRIVER before ACKNOWLEDGE: refused.
        wr(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        // FEATURES_OK before DRIVER: refused.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK before FEATURES_OK: refused.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            rd(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Clearing a bit without reset: refused.
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            rd(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Driver may not set DEVICE_NEEDS_RESET.
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            rd(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert!(t.bad_accesses() >= 5);
    }

    #[test]
    fn feature_negotiation() {
        // Unoffered feature (bit 0, CSUM): FEATURES_OK refused.
        let (mut t, _, _) = transport();
        negotiate(&mut t, (1 << 32) | (1 << 5) | 1);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Without VERSION_1: refused.
        let (mut t, _, _) = transport();
        negotiate(&mut t, 1 << 5);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // A feature bit in page 2: refused.
        let (mut t, _, _) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 2);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Exactly what is offered: accepted; features then frozen.
        let (mut t, _, _) = transport();
        negotiate(&mut t, (1 << 32) | (1 << 5));
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features(), (1 << 32) | (1 << 5));
        // A subset (no MAC) is fine too.
        let (mut t, _, _) = transport();
        negotiate(&mut t, 1 << 32);
        assert_ne!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn state_save_and_restore_into_a_fresh_transport() {
        let (mut t, _, _) = transport();
        negotiate(&mut t, (1 << 32) | (1 << 5));
        setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
        setup_queue(&mut t, 1, 8, 0x4000, 0x5000, 0x6000);
        wr(&mut t, reg::STATUS, STATUS_UP);
        assert!(t.is_activated());
        // The device has used 5 entries of queue 1 (used->idx at used + 2).
        use vm_memory::Bytes;
        t.mem.write_obj::<u16>(5, GuestAddress(0x6002)).unwrap();
        t.interrupt.signal_used_queue().unwrap();
        let saved = t.save_state();
        assert_eq!(saved.status, STATUS_UP);
        assert_eq!(saved.queues[1].next_used, 5);
        assert_eq!(saved.queues[1].next_avail, 5);
        assert_eq!(saved.queues[0].size, 16);
        assert_eq!(saved.queues[1].used_ring, 0x6000);
        assert_eq!(saved.interrupt_status, 1);
        let json = serde_json::to_string(&saved).unwrap();
        let back: crate::virtio::state::VirtioMmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let (mut fresh, act, _) = transport();
        fresh.restore_state(&back).unwrap();
        assert!(fresh.is_activated());
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut fresh, reg::STATUS), STATUS_UP);
        assert_eq!(rd(&mut fresh, reg::INTERRUPT_STATUS), 1);
        assert_eq!(fresh.queues[1].next_avail(), 5);
        assert_eq!(fresh.queues[1].desc_table(), 0x4000);
        // Saved again (its guest memory holds the same used ring): the same.
        fresh.mem.write_obj::<u16>(5, GuestAddress(0x6002)).unwrap();
        assert_eq!(fresh.save_state(), saved);
        // A running transport, or one of another shape, is not overwritten.
        assert!(fresh.restore_state(&back).is_err());
        let (mut other, _, _) = transport();
        let mut wrong = back.clone();
        wrong.queues.pop();
        assert!(other.restore_state(&wrong).is_err());
    }

    #[test]
    fn queue_setup_activation_and_reset() {
        let (mut t, act, resets) = transport();
        // Queue registers before FEATURES_OK are ignored.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t, (1 << 32) | (1 << 5));
        // Bogus sizes refused.
        wr(&mut t, reg::QUEUE_SEL, 0);
        let before = t.bad_accesses();
        wr(&mut t, reg::QUEUE_NUM, 32);
        wr(&mut t, reg::QUEUE_NUM, 3);
        wr(&mut t, reg::QUEUE_NUM, 0);
        assert_eq!(t.bad_accesses(), before + 3);
        setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Address writes while ready are ignored.
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        // Only one queue ready: DRIVER_OK fails, NEEDS_RESET, config irq.
        let mut t2 = {
            let (mut t2, _, _) = transport();
            negotiate(&mut t2, (1 << 32) | (1 << 5));
            setup_queue(&mut t2, 0, 16, 0x1000, 0x2000, 0x3000);
            t2
        };
        wr(&mut t2, reg::STATUS, STATUS_UP);
        let s = rd(&mut t2, reg::STATUS);
        assert_eq!(s & status::DRIVER_OK, 0);
        assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t2, reg::INTERRUPT_STATUS), 2);
        // A queue outside guest memory: DRIVER_OK fails too.
        let (mut t3, a3, _) = transport();
        negotiate(&mut t3, (1 << 32) | (1 << 5));
        setup_queue(&mut t3, 0, 16, 0x1000, 0x2000, 0x3000);
        setup_queue(&mut t3, 1, 16, 0xffff_0000, 0x2100, 0x3100);
        wr(&mut t3, reg::STATUS, STATUS_UP);
        assert_eq!(rd(&mut t3, reg::STATUS) & status::DRIVER_OK, 0);
        assert_eq!(a3.load(Ordering::SeqCst), 0);

        setup_queue(&mut t, 1, 16, 0x4000, 0x5000, 0x6000);
        wr(&mut t, reg::STATUS, STATUS_UP);
        assert_eq!(rd(&mut t, reg::STATUS), STATUS_UP);
        assert_eq!(act.load(Ordering::SeqCst), 1);
        assert!(t.is_activated());
        // Queue registers after DRIVER_OK are ignored.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);

        // Interrupt status and ACK.
        t.interrupt().signal_used_queue().unwrap();
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);

        // QueueNotify written through MMIO signals the queue's EventFd.
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err(), "queue 0 not signalled");
        wr(&mut t, reg::QUEUE_NOTIFY, 7);

        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert!(!t.is_activated());
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.driver_features(), 0);
        // And it can come up again.
        negotiate(&mut t, (1 << 32) | (1 << 5));
        setup_queue(&mut t, 0, 16, 0x1000, 0x2000, 0x3000);
        setup_queue(&mut t, 1, 16, 0x4000, 0x5000, 0x6000);
        wr(&mut t, reg::STATUS, STATUS_UP);
        assert_eq!(act.load(Ordering::SeqCst), 2);
        drop(t);
        assert_eq!(resets.load(Ordering::SeqCst), 2, "drop stops the device");
    }

    #[test]
    fn usable_as_a_bus_device() {
        let (t, _, _) = transport();
        let dev: Arc<dyn crate::bus::BusDevice> = Arc::new(std::sync::Mutex::new(t));
        let mut b = [0u8; 4];
        dev.read(reg::MAGIC, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAGIC_VALUE);
        dev.write(reg::STATUS, &status::ACKNOWLEDGE.to_le_bytes());
        dev.read(reg::STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b), status::ACKNOWLEDGE);
    }

    #[test]
    fn cmdline_fragment() {
        assert_eq!(
            mmio_cmdline_fragment(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
