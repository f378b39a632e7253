//! The virtio-net device thread ([`NetWorker`]): it owns the two queues and
//! the backend once the driver is up, moves frames between them (transmit:
//! gather a chain, strip the header, send; receive: a frame from the
//! backend into the guest's buffers with a header), counts the guest's
//! mistakes instead of trusting it, and sleeps in the event manager between
//! notifications.

use super::*;

/// The device thread's state: queues, backend, buffers.
pub struct NetWorker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) rx_evt: EventFd,
    pub(super) tx_evt: EventFd,
    pub(super) stop_evt: EventFd,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) backend: Box<dyn NetBackend>,
    pub(super) metrics: Arc<NetMetrics>,
    /// Header + frame; `rx_pending` says how much of it is a waiting frame.
    pub(super) rx_buf: Vec<u8>,
    pub(super) rx_pending: Option<usize>,
    /// The backend may have more frames (its edge has not been drained).
    pub(super) backend_readable: bool,
    pub(super) tx_buf: Vec<u8>,
    pub(super) segs: Vec<Segment>,
    pub(super) stopped: bool,
    /// See [`NetDevice::quiesce_gate`].
    pub(super) gate: Arc<Mutex<()>>,
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
    pub(super) fn run(self) -> Option<NetWorker> {
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
