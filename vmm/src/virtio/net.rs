//! virtio-net (device id 1): one receive queue (0) and one transmit queue (1).
//!
//! Offered features: `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC`, nothing
//! else (no checksum or segmentation offload, no mergeable buffers, no
//! control queue, no event index, no indirect descriptors). Every frame
//! crossing the queues carries the 12-byte virtio 1.x `virtio_net_hdr`
//! (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
//! num_buffers); the device ignores the transmit header (nothing it could
//! ask for is negotiated) and writes an all-zero header with
//! `num_buffers = 1` on receive.
//!
//! The device thread (started by [`NetDevice::activate`], i.e. when the driver
//! sets DRIVER_OK) runs an `event_manager::EventManager` with one
//! [`NetWorker`] subscriber watching:
//!
//! * the tx queue's EventFd: pop chains, gather each frame (without the
//!   header), hand it to the backend, return the chain, raise the irq;
//! * the rx queue's EventFd: the guest added receive buffers, deliver any
//!   frame that was waiting for one;
//! * the backend's ready fd (edge-triggered): drain the backend's frames
//!   into receive buffers, raise the irq;
//! * a stop EventFd written by [`VirtioDevice::reset`].
//!
//! First thing, the thread confines itself with the virtio device seccomp
//! allowlist ([`crate::seccomp`]; [`NetDevice::set_seccomp`] to opt out).
//!
//! A hostile guest: every chain is validated by [`super::chain::walk_chain`]
//! before any byte moves (loops, bad indices, indirect descriptors, zero or
//! huge lengths, buffers outside guest memory), a transmit chain must be
//! device-readable only and a receive chain device-writable only, more
//! available entries than the queue size stops the queue, transmit chains
//! are bounded by [`MAX_BUFFER_LEN`], and a receive buffer too small for a frame drops the
//! frame (the buffer is kept for the next one). Each case is counted in
//! [`NetMetrics`] and logged with `tracing::warn!` only the first time.
//! Refused chains whose head index is valid are returned to the guest with
//! length 0 so that it does not leak buffers. Nothing here panics on guest
//! data.

use std::io;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use tracing::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{walk_chain, ChainError, Segment};
use super::features::{VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC};
use super::{ActivateError, Activation, Interrupt, VirtioDevice, DEVICE_ID_NET};
use crate::net::{MacAddr, NetBackend, MAX_FRAME_LEN};

/// Size of `virtio_net_hdr` for a virtio 1.x device.
pub const VNET_HDR_LEN: usize = 12;
/// Largest chain accepted: header plus [`MAX_FRAME_LEN`] (65562 bytes).
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Smallest Ethernet frame accepted from the guest (a bare header).
pub const MIN_FRAME_LEN: usize = 14;
/// QueueNumMax of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Kinds of guest (or backend) misbehaviour the device counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum NetErrorKind {
    /// A chain looping or longer than the queue.
    DescriptorLoop,
    /// A head or `next` index at or beyond the queue size.
    DescriptorIndex,
    /// An indirect descriptor (not negotiated).
    IndirectDescriptor,
    /// A zero-length descriptor.
    ZeroLength,
    /// A chain longer than [`MAX_BUFFER_LEN`].
    TooLong,
    /// A buffer (or descriptor table entry) outside guest memory.
    BadAddress,
    /// A transmit chain with a writable buffer or a receive chain with a
    /// read-only one.
    WrongDirection,
    /// A transmit frame shorter than header + Ethernet header.
    FrameTooShort,
    /// A receive buffer too small for the waiting frame (frame dropped).
    RxBufferTooSmall,
    /// More available ring entries than the queue size, or an unreadable
    /// available ring.
    AvailRing,
    /// Writing the used ring failed.
    UsedRing,
    /// The backend refused a frame.
    BackendSend,
    /// The backend failed to receive.
    BackendRecv,
    /// Raising the interrupt failed.
    Interrupt,
}

impl NetErrorKind {
    /// Every kind, in index order.
    pub const ALL: [NetErrorKind; 14] = [
        Self::DescriptorLoop,
        Self::DescriptorIndex,
        Self::IndirectDescriptor,
        Self::ZeroLength,
        Self::TooLong,
        Self::BadAddress,
        Self::WrongDirection,
        Self::FrameTooShort,
        Self::RxBufferTooSmall,
        Self::AvailRing,
        Self::UsedRing,
        Self::BackendSend,
        Self::BackendRecv,
        Self::Interrupt,
    ];
    const COUNT: usize = Self::ALL.len();

    fn from_chain(e: ChainError) -> Self {
        match e {
            ChainError::IndexOutOfRange(_) => Self::DescriptorIndex,
            ChainError::Loop => Self::DescriptorLoop,
            ChainError::Indirect => Self::IndirectDescriptor,
            ChainError::ZeroLength => Self::ZeroLength,
            ChainError::TooLong(_) => Self::TooLong,
            ChainError::BadAddress => Self::BadAddress,
        }
    }
}

/// Per-device counters, shared between the device thread and whoever wants
/// to read them ([`NetDevice::metrics`]).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames (and bytes, without header) the guest sent to the backend.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames (and bytes, without header) delivered to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    errors: [AtomicU64; NetErrorKind::COUNT],
    warned: [AtomicBool; NetErrorKind::COUNT],
}

impl NetMetrics {
    /// How many times `kind` happened.
    pub fn errors(&self, kind: NetErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// All errors, summed.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    /// Counts `kind`; warns the first time only.
    pub fn record(&self, kind: NetErrorKind, detail: &dyn std::fmt::Display) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        if !self.warned[kind as usize].swap(true, Ordering::Relaxed) {
            warn!("virtio-net: {kind:?}: {detail} (further ones are only counted)");
        }
    }
}

/// The virtio-net device model. Wrap it in an [`super::MmioTransport`].
pub struct NetDevice {
    mac: MacAddr,
    backend: Option<Box<dyn NetBackend>>,
    metrics: Arc<NetMetrics>,
    worker: Option<RunningWorker>,
    warned_config_write: bool,
    seccomp: bool,
    /// Held by the device thread while it handles an event; a snapshot
    /// holds it to keep the thread off guest memory and the queues.
    gate: Arc<Mutex<()>>,
}

struct RunningWorker {
    stop: EventFd,
    thread: JoinHandle<Option<NetWorker>>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("mac", &self.mac)
            .field("running", &self.worker.is_some())
            .finish()
    }
}

impl NetDevice {
    /// A device with this MAC in its config space, exchanging frames with
    /// `backend`.
    pub fn new(mac: MacAddr, backend: Box<dyn NetBackend>) -> Self {
        Self {
            mac,
            backend: Some(backend),
            metrics: Arc::new(NetMetrics::default()),
            worker: None,
            warned_config_write: false,
            seccomp: true,
            gate: Arc::new(Mutex::new(())),
        }
    }

    /// The device thread's gate: while a caller holds it, the thread handles
    /// no event (it touches neither guest memory nor the queues nor the
    /// backend) and events wait. Used to quiesce the device for a snapshot.
    pub fn quiesce_gate(&self) -> Arc<Mutex<()>> {
        self.gate.clone()
    }

    /// Whether the device thread confines itself with the virtio device
    /// seccomp filter ([`crate::seccomp`]) when it starts (default: yes).
    pub fn set_seccomp(&mut self, on: bool) {
        self.seccomp = on;
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The MAC offered to the guest.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Stops the device thread and closes the backend (a TAP fd, the user
    /// network's threads) now, rather than when the device is dropped. The
    /// device then stays idle: a later activation fails with no backend.
    pub fn release_backend(&mut self) {
        self.stop_worker();
        self.backend = None;
    }

    /// Whether the device thread is running.
    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.stop.write(1) {
                error!("virtio-net: signalling the device thread to stop: {e}");
            }
            match w.thread.join() {
                Ok(Some(worker)) => self.backend = Some(worker.backend),
                Ok(None) => error!("virtio-net: backend lost; the device cannot restart"),
                Err(_) => error!("virtio-net: the device thread panicked; backend lost"),
            }
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; ... }: only `mac` exists
        // without STATUS/MQ/MTU.
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.mac.0.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a virtio 1.x driver.
        if !self.warned_config_write {
            self.warned_config_write = true;
            warn!(
                "virtio-net: ignored {}-byte config write at {offset:#x} (further ones silently)",
                data.len()
            );
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let backend = self.backend.take().ok_or(ActivateError::NoBackend)?;
        let mut queues = a.queues.into_iter();
        let mut evts = a.queue_evts.into_iter();
        let (Some(rx), Some(tx), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), evts.next(), evts.next())
        else {
            self.backend = Some(backend);
            return Err(ActivateError::InvalidQueue(TX_QUEUE));
        };
        let stop = match EventFd::new(EFD_NONBLOCK).and_then(|s| Ok((s.try_clone()?, s))) {
            Ok(s) => s,
            Err(e) => {
                self.backend = Some(backend);
                return Err(e.into());
            }
        };
        let worker = NetWorker::new(
            a.mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            stop.0,
            a.interrupt,
            backend,
            self.metrics.clone(),
        );
        let mut worker = worker;
        worker.gate = self.gate.clone();
        let seccomp = self.seccomp;
        let thread = std::thread::Builder::new()
            .name("osso-virtio-net".into())
            .spawn(move || {
                if seccomp {
                    // Fail closed: an unconfined device thread moves no frame.
                    if let Err(e) = crate::seccomp::apply_to_current_thread(
                        crate::seccomp::ThreadKind::VirtioDevice,
                    ) {
                        error!("virtio-net: {e}; the device stays idle");
                        return Some(worker);
                    }
                }
                worker.run()
            })?;
        self.worker = Some(RunningWorker {
            stop: stop.1,
            thread,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

mod worker;
pub use worker::NetWorker;

#[cfg(test)]
mod tests;
