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

/// The device thread's state: queues, backend, buffers.
pub struct NetWorker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    stop_evt: EventFd,
    interrupt: Arc<Interrupt>,
    backend: Box<dyn NetBackend>,
    metrics: Arc<NetMetrics>,
    /// Header + frame; `rx_pending` says how much of it is a waiting frame.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    /// The backend may have more frames (its edge has not been drained).
    backend_readable: bool,
    tx_buf: Vec<u8>,
    segs: Vec<Segment>,
    stopped: bool,
    /// See [`NetDevice::quiesce_gate`].
    gate: Arc<Mutex<()>>,
}

/// Which queue a helper works on.
#[derive(Clone, Copy)]
enum Which {
    Rx,
    Tx,
}

impl NetWorker {
    /// A worker over `rx` and `tx` (ready, valid queues in `mem`). The device
    /// builds one on activation and runs it on its thread; tests and fuzzers
    /// drive one synchronously with [`NetWorker::process_tx`] and
    /// [`NetWorker::process_rx`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        rx_evt: EventFd,
        tx_evt: EventFd,
        stop_evt: EventFd,
        interrupt: Arc<Interrupt>,
        backend: Box<dyn NetBackend>,
        metrics: Arc<NetMetrics>,
    ) -> Self {
        let mut rx_buf = vec![0u8; MAX_BUFFER_LEN];
        rx_buf[..VNET_HDR_LEN].copy_from_slice(&rx_header());
        Self {
            mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            stop_evt,
            interrupt,
            backend,
            metrics,
            rx_buf,
            rx_pending: None,
            // Frames may have arrived before the driver was ready.
            backend_readable: true,
            tx_buf: vec![0u8; MAX_BUFFER_LEN],
            segs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            stopped: false,
            gate: Arc::new(Mutex::new(())),
        }
    }

    /// The thread body: an event loop until the stop EventFd fires. Returns
    /// itself so the device gets its backend back.
    fn run(self) -> Option<NetWorker> {
        let mut em = match EventManager::<NetWorker>::new() {
            Ok(em) => em,
            Err(e) => {
                error!("virtio-net: creating the event manager: {e}");
                return Some(self);
            }
        };
        let id = em.add_subscriber(self);
        // Catch up on anything queued before the thread started.
        if let Ok(w) = em.subscriber_mut(id) {
            let gate = w.gate.clone();
            let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
            w.process_tx();
            w.process_rx();
        }
        loop {
            if let Err(e) = em.run() {
                error!("virtio-net: event loop: {e}");
                break;
            }
            match em.subscriber_mut(id) {
                Ok(w) if w.stopped => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        match em.remove_subscriber(id) {
            Ok(w) => Some(w),
            Err(e) => {
                error!("virtio-net: lost the device state: {e}");
                None
            }
        }
    }

    fn queue(&mut self, which: Which) -> &mut Queue {
        match which {
            Which::Rx => &mut self.rx,
            Which::Tx => &mut self.tx,
        }
    }

    /// Pops the next chain's head index, refusing an available ring that
    /// claims more entries than the queue holds.
    fn pop_head(&mut self, which: Which) -> Option<u16> {
        let mem = &self.mem;
        let q = match which {
            Which::Rx => &mut self.rx,
            Which::Tx => &mut self.tx,
        };
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => {
                let pending = (idx - Wrapping(q.next_avail())).0;
                if pending == 0 {
                    return None;
                }
                if pending > q.size() {
                    self.metrics.record(
                        NetErrorKind::AvailRing,
                        &format_args!(
                            "available ring index {} is {} entries ahead of a {}-entry queue",
                            idx.0,
                            pending,
                            q.size()
                        ),
                    );
                    return None;
                }
            }
            Err(e) => {
                self.metrics.record(NetErrorKind::AvailRing, &e);
                return None;
            }
        }
        q.pop_descriptor_chain(mem).map(|c| c.head_index())
    }

    /// Returns a chain to the guest.
    fn add_used(&mut self, which: Which, head: u16, len: u32) -> bool {
        let mem = self.mem.clone();
        match self.queue(which).add_used(&mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                self.metrics.record(NetErrorKind::UsedRing, &e);
                false
            }
        }
    }

    fn walk(&mut self, which: Which, head: u16) -> Result<u64, NetErrorKind> {
        let (table, size) = {
            let q = self.queue(which);
            (GuestAddress(q.desc_table()), q.size())
        };
        // A transmit chain is one frame: bounded by MAX_BUFFER_LEN. A receive
        // chain may be larger than any frame (only the start is used), but its
        // used length must fit the ring's u32; every buffer must still lie in
        // guest memory.
        let max_total = match which {
            Which::Tx => MAX_BUFFER_LEN as u64,
            Which::Rx => u64::from(u32::MAX),
        };
        walk_chain(&self.mem, table, size, head, max_total, &mut self.segs).map_err(|e| {
            let kind = NetErrorKind::from_chain(e);
            self.metrics.record(kind, &e);
            kind
        })
    }

    fn raise_irq(&mut self) {
        self.metrics.interrupts.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.interrupt.signal_used_queue() {
            self.metrics.record(NetErrorKind::Interrupt, &e);
        }
    }

    /// Transmits every frame the guest queued. Returns the frames sent.
    pub fn process_tx(&mut self) -> usize {
        let mut used = false;
        let mut sent = 0;
        while let Some(head) = self.pop_head(Which::Tx) {
            let len = match self.gather_tx(head) {
                Ok(len) => len,
                Err(kind) => {
                    // A bad head cannot go in the used ring.
                    if kind != NetErrorKind::DescriptorIndex || head < self.tx.size() {
                        used |= self.add_used(Which::Tx, head, 0);
                    }
                    continue;
                }
            };
            let frame = &self.tx_buf[VNET_HDR_LEN..len];
            match self.backend.send(frame) {
                Ok(()) => {
                    sent += 1;
                    self.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .tx_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Err(e) => self.metrics.record(NetErrorKind::BackendSend, &e),
            }
            used |= self.add_used(Which::Tx, head, 0);
        }
        if used {
            self.raise_irq();
        }
        sent
    }

    /// Validates the chain at `head` and copies it into `tx_buf`; returns
    /// its length (header included).
    fn gather_tx(&mut self, head: u16) -> Result<usize, NetErrorKind> {
        let total = self.walk(Which::Tx, head)? as usize;
        if self.segs.iter().any(|s| s.write_only) {
            self.metrics.record(
                NetErrorKind::WrongDirection,
                &"device-writable buffer in a transmit chain",
            );
            return Err(NetErrorKind::WrongDirection);
        }
        if total < VNET_HDR_LEN + MIN_FRAME_LEN {
            self.metrics.record(
                NetErrorKind::FrameTooShort,
                &format_args!("{total}-byte transmit chain"),
            );
            return Err(NetErrorKind::FrameTooShort);
        }
        let mut off = 0usize;
        for s in &self.segs {
            let end = off + s.len as usize;
            // `total` <= MAX_BUFFER_LEN == tx_buf.len(), so the slice is in bounds.
            if let Err(e) = self.mem.read_slice(&mut self.tx_buf[off..end], s.addr) {
                self.metrics.record(NetErrorKind::BadAddress, &e);
                return Err(NetErrorKind::BadAddress);
            }
            off = end;
        }
        Ok(total)
    }

    /// Moves frames from the backend into the guest's receive buffers while
    /// both last. Returns the frames delivered.
    pub fn process_rx(&mut self) -> usize {
        let mut used = false;
        let mut delivered = 0;
        loop {
            let frame_len = match self.rx_pending {
                Some(n) => n,
                None => {
                    if !self.backend_readable {
                        break;
                    }
                    match self.backend.recv(&mut self.rx_buf[VNET_HDR_LEN..]) {
                        Ok(0) => continue,
                        Ok(n) => {
                            let n = n.min(MAX_FRAME_LEN);
                            self.rx_pending = Some(n);
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.backend_readable = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            self.metrics.record(NetErrorKind::BackendRecv, &e);
                            self.backend_readable = false;
                            break;
                        }
                    }
                }
            };
            // Keep the frame until the guest posts a buffer.
            let Some(head) = self.pop_head(Which::Rx) else {
                break;
            };
            let total = match self.walk(Which::Rx, head) {
                Ok(t) => t as usize,
                Err(kind) => {
                    if kind != NetErrorKind::DescriptorIndex || head < self.rx.size() {
                        used |= self.add_used(Which::Rx, head, 0);
                    }
                    continue;
                }
            };
            if self.segs.iter().any(|s| !s.write_only) {
                self.metrics.record(
                    NetErrorKind::WrongDirection,
                    &"device-readable buffer in a receive chain",
                );
                used |= self.add_used(Which::Rx, head, 0);
                continue;
            }
            let need = VNET_HDR_LEN + frame_len;
            if total < need {
                self.metrics.record(
                    NetErrorKind::RxBufferTooSmall,
                    &format_args!("{total}-byte receive buffer for a {frame_len}-byte frame"),
                );
                // Drop the frame; give the buffer back to the ring for the
                // next (maybe smaller) frame.
                self.rx_pending = None;
                let prev = self.rx.next_avail().wrapping_sub(1);
                self.rx.set_next_avail(prev);
                continue;
            }
            match self.scatter_rx(need) {
                Ok(()) => {
                    delivered += 1;
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .rx_bytes
                        .fetch_add(frame_len as u64, Ordering::Relaxed);
                    // need <= MAX_BUFFER_LEN, fits in u32.
                    used |= self.add_used(Which::Rx, head, need as u32);
                }
                Err(e) => {
                    self.metrics.record(NetErrorKind::BadAddress, &e);
                    used |= self.add_used(Which::Rx, head, 0);
                }
            }
            self.rx_pending = None;
        }
        if used {
            self.raise_irq();
        }
        delivered
    }

    /// Writes `rx_buf[..need]` across the validated segments.
    fn scatter_rx(&mut self, need: usize) -> Result<(), vm_memory::GuestMemoryError> {
        let mut off = 0usize;
        for s in &self.segs {
            if off >= need {
                break;
            }
            let n = (s.len as usize).min(need - off);
            self.mem.write_slice(&self.rx_buf[off..off + n], s.addr)?;
            off += n;
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.backend.ready_fd()
    }
}

/// The receive header: no flags, no GSO, one buffer.
fn rx_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes());
    h
}

impl MutEventSubscriber for NetWorker {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |ev: Events, what: &str| {
            if let Err(e) = ops.add(ev) {
                error!("virtio-net: registering {what}: {e}");
            }
        };
        add(Events::new(&self.rx_evt, EventSet::IN), "rx queue EventFd");
        add(Events::new(&self.tx_evt, EventSet::IN), "tx queue EventFd");
        add(Events::new(&self.stop_evt, EventSet::IN), "stop EventFd");
        if let Some(fd) = self.backend_fd() {
            add(
                Events::new_raw(fd, EventSet::IN | EventSet::EDGE_TRIGGERED),
                "backend fd",
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let gate = self.gate.clone();
        let _held = gate.lock().unwrap_or_else(|p| p.into_inner());
        if fd == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            self.stopped = true;
        } else if fd == self.tx_evt.as_raw_fd() {
            let _ = self.tx_evt.read();
            self.process_tx();
            // Replies from an in-process backend are often ready at once.
            self.process_rx();
        } else if fd == self.rx_evt.as_raw_fd() {
            let _ = self.rx_evt.read();
            self.process_rx();
        } else if Some(fd) == self.backend_fd() {
            self.backend_readable = true;
            self.process_rx();
        }
    }
}

#[cfg(test)]
mod tests;
