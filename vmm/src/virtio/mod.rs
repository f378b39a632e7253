//! virtio-mmio transport (version 2, "modern") and the virtio-net device.
//!
//! # How the VMM wires a virtio-net device
//!
//! ```text
//! // 1. A backend (see crate::net): user (default), tap:NAME or none.
//! let opened = net_config.open()?;          // OpenedBackend { backend, user: Option<UserNetHandle> }
//! // 2. The device and its transport, sharing the VM's guest memory.
//! let dev = NetDevice::new(net_config.mac, opened.backend);
//! let metrics = dev.metrics();              // Arc<NetMetrics>: frames, bytes, error counters
//! let transport = Arc::new(Mutex::new(MmioTransport::new(dev, builder.guest_memory())?));
//! // 3. On the MMIO bus: Mutex<MmioTransport<_>> implements crate::bus::BusDevice,
//! //    and add_virtio_mmio_device also appends virtio_mmio.device=4K@<addr>:<irq>.
//! let slot = builder.add_virtio_mmio_device(transport.clone())?;
//! // 4. Interrupt: the transport's irq EventFd is the irqfd of the slot's GSI.
//! builder.register_irqfd(transport.lock().unwrap().irq_evt(), slot.irq)?;
//! // 5. Notifications: one ioeventfd per queue on QueueNotify, datamatch = queue index.
//! for (i, evt) in transport.lock().unwrap().queue_evts().iter().enumerate() {
//!     builder.register_ioevent(evt, slot.addr + NOTIFY_REG_OFFSET, Some(i as u32))?; // rx 0, tx 1
//! }
//! // Keep `transport` (and opened.user) alive as long as the VM; dropping the
//! // transport stops the device thread.
//! ```
//!
//! Without that machine API: forward each MMIO access in
//! `[base, base + MMIO_SLOT_SIZE)` to `transport.lock().unwrap().read(addr - base, data)`
//! / `.write(addr - base, data)`, register the irqfd and ioeventfds with
//! `VmFd::register_irqfd(evt, irq)` / `VmFd::register_ioevent(evt,
//! &IoEventAddress::Mmio(base + 0x50), i as u32)`, and put
//! [`mmio_cmdline_fragment`]`(base, irq)` (`virtio_mmio.device=4K@0x<base>:<irq>`)
//! on the kernel command line.
//!
//! * `slot.addr` (the base) is the device's 4 KiB slot in the MMIO window,
//!   `slot.irq` its GSI (an IOAPIC pin, e.g. 5..=23; it must be in the MP
//!   table's IOAPIC routing as edge-triggered, active-high (ISA conforming),
//!   like Firecracker's: the irqfd injects an edge). The device only ever *signals* the irq `EventFd`; the driver
//!   reads InterruptStatus and writes InterruptACK through the MMIO exits.
//! * A QueueNotify write that reaches the transport (no ioeventfd registered,
//!   or a write whose value matches no datamatch) signals the same per-queue
//!   `EventFd`, so registering ioeventfds is an optimisation, not a must.
//! * The device thread: `MmioTransport` starts it itself when the driver sets
//!   `DRIVER_OK` (the device's `activate`), and stops and joins it when the
//!   driver resets the device (Status = 0) or when the transport is dropped
//!   (also: [`MmioTransport::shutdown`]). The thread runs an
//!   `event_manager::EventManager` with one subscriber (the queue EventFds,
//!   the backend's ready fd, a stop EventFd). The VMM does nothing else.
//! * The transport is `Send`; keep it in `Arc<Mutex<_>>`. The vCPU thread
//!   takes the lock for each MMIO access; the device thread never takes it
//!   (it owns clones of the queues, the EventFds and an `Arc<Interrupt>`).

pub mod chain;
pub mod mmio;
pub mod net;
pub mod state;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use mmio::{mmio_cmdline_fragment, MmioTransport, MMIO_SLOT_SIZE, NOTIFY_REG_OFFSET};
pub use net::{NetDevice, NetErrorKind, NetMetrics};

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Feature bits this crate knows about.
pub mod features {
    /// virtio 1.x (modern) device: mandatory for this transport.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
    /// virtio-net: the device has a MAC address in its config space.
    pub const VIRTIO_NET_F_MAC: u32 = 5;
}

/// virtio device ids.
pub const DEVICE_ID_NET: u32 = 1;

/// InterruptStatus bit: the device used a buffer in a queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt line: the InterruptStatus register and the irqfd.
///
/// Shared (through `Arc`) between the transport (register reads, ACK) and the
/// device thread (raising).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// Sets InterruptStatus to `bits` (a restore from a snapshot) and, if
    /// any is set, raises the interrupt again.
    pub fn restore_status(&self, bits: u32) -> io::Result<()> {
        self.status.store(bits, std::sync::atomic::Ordering::SeqCst);
        if bits != 0 {
            self.evt.write(1)?;
        }
        Ok(())
    }

    /// A new interrupt line with a non-blocking `EventFd`.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The `EventFd` to register with KVM as the irqfd of the device's GSI.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Sets InterruptStatus bit 0 and signals the irqfd.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_USED_RING)
    }

    /// Sets InterruptStatus bit 1 and signals the irqfd.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(INT_CONFIG)
    }

    fn signal(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
#[derive(Debug)]
pub struct Activation {
    /// The guest's memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them (all ready and valid).
    pub queues: Vec<virtio_queue::Queue>,
    /// One notification `EventFd` per queue (clones of the transport's).
    pub queue_evts: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features the driver accepted (a subset of the offered ones).
    pub acked_features: u64,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or lies outside guest memory")]
    InvalidQueue(usize),
    #[error("the device has no backend (already active?)")]
    NoBackend,
    #[error("I/O error setting up the device thread: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind an [`MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = net).
    fn device_type(&self) -> u32;
    /// QueueNumMax for each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space (offset from 0x100).
    /// Bytes beyond the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (offset from 0x100).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device (its thread) with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device (joins its thread) so that it can be activated again.
    fn reset(&mut self);
}
