//! virtio-net queue processing against real guest memory, with split rings
//! built by hand, including a hostile guest's chains.

use super::*;
use crate::testing::virtio::{negotiate, setup_queue, SplitRing, STATUS_UP};
use crate::testing::TestBackend;
use crate::virtio::chain::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::virtio::MmioTransport;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MEM_SIZE: usize = 0x40_0000; // 4 MiB
const QSIZE: u16 = 16;

/// A split ring at `base` (table, then the available and used rings a page
/// apart), driven as a well-behaved driver does: chains take the next free
/// descriptors and are published in order. Built on [`SplitRing`]
/// (virtio-queue's mock).
struct Ring<'a> {
    ring: SplitRing<'a>,
    base: u64,
    avail_idx: u16,
    next_desc: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            ring: SplitRing::new(mem, (base, base + 0x1000, base + 0x2000), size),
            base,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    /// Descriptor table, available ring, used ring.
    fn addrs(&self) -> [u64; 3] {
        [self.base, self.base + 0x1000, self.base + 0x2000]
    }

    fn queue(&self) -> Queue {
        self.ring.queue()
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        self.ring.set_desc(i, addr, len, flags as u16, next);
    }

    /// Publishes `head` in the available ring.
    fn publish(&mut self, head: u16) {
        self.ring.publish(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.ring.set_avail_idx(idx);
    }

    /// Builds a chain of buffers `(addr, len)` with `flags` on each and
    /// publishes it. Returns the head.
    fn add_chain(&mut self, bufs: &[(u64, u32)], write: bool) -> u16 {
        let size = self.ring.size();
        let head = self.next_desc;
        for (k, &(addr, len)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % size;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(i, addr, len, flags, self.next_desc);
        }
        self.publish(head);
        head
    }

    fn used_idx(&self) -> u16 {
        self.ring.used_idx()
    }

    /// (id, len) of used element `i`.
    fn used_elem(&self, i: u16) -> (u32, u32) {
        self.ring.used_elem(i)
    }
}

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

struct Fixture<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Ring<'a>,
    tx: Ring<'a>,
    backend: TestBackend,
    interrupt: Arc<Interrupt>,
    worker: NetWorker,
}

fn fixture(mem: &GuestMemoryMmap) -> Fixture<'_> {
    let rx = Ring::new(mem, 0x10000, QSIZE);
    let tx = Ring::new(mem, 0x20000, QSIZE);
    let backend = TestBackend::new();
    let interrupt = Arc::new(Interrupt::new().unwrap());
    let worker = NetWorker::new(
        mem.clone(),
        rx.queue(),
        tx.queue(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        interrupt.clone(),
        Box::new(backend.clone()),
        Arc::new(NetMetrics::default()),
    );
    Fixture {
        mem,
        rx,
        tx,
        backend,
        interrupt,
        worker,
    }
}

/// An Ethernet frame of `len` bytes with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Writes header + frame at `addr` in guest memory.
fn put_tx(mem: &GuestMemoryMmap, addr: u64, f: &[u8]) -> u32 {
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(addr))
        .unwrap();
    mem.write_slice(f, GuestAddress(addr + VNET_HDR_LEN as u64))
        .unwrap();
    (VNET_HDR_LEN + f.len()) as u32
}

fn irq_fired(i: &Interrupt) -> bool {
    i.evt().read().is_ok() && i.status() & 1 == 1
}

#[test]
fn tx_frame_reaches_backend() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    let fr = frame(100, 1);
    let len = put_tx(f.mem, 0x100000, &fr);
    let head = f.tx.add_chain(&[(0x100000, len)], false);
    // A second frame split across three descriptors, header alone first.
    let fr2 = frame(300, 2);
    f.mem
        .write_slice(&[0u8; 12], GuestAddress(0x110000))
        .unwrap();
    f.mem
        .write_slice(&fr2[..100], GuestAddress(0x111000))
        .unwrap();
    f.mem
        .write_slice(&fr2[100..], GuestAddress(0x112000))
        .unwrap();
    let head2 =
        f.tx.add_chain(&[(0x110000, 12), (0x111000, 100), (0x112000, 200)], false);

    assert_eq!(f.worker.process_tx(), 2);
    let sent = f.backend.sent.lock().unwrap().clone();
    assert_eq!(sent, vec![fr, fr2], "frames without the header, in order");
    assert_eq!(f.tx.used_idx(), 2);
    assert_eq!(f.tx.used_elem(0), (u32::from(head), 0));
    assert_eq!(f.tx.used_elem(1), (u32::from(head2), 0));
    assert!(irq_fired(&f.interrupt));
    let m = &f.worker.metrics;
    assert_eq!(m.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(m.tx_bytes.load(Ordering::Relaxed), 400);
    assert_eq!(m.total_errors(), 0);
    // Nothing more: no interrupt.
    assert_eq!(f.worker.process_tx(), 0);
    assert!(!irq_fired(&f.interrupt));
}

#[test]
fn rx_frame_lands_in_guest_buffers() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    // A frame arrives before any buffer: kept.
    let fr = frame(1000, 3);
    f.backend.push(fr.clone());
    assert_eq!(f.worker.process_rx(), 0);
    assert!(f.worker.rx_pending.is_some());
    assert!(!irq_fired(&f.interrupt));
    // The guest posts a buffer split in two.
    let head = f.rx.add_chain(&[(0x200000, 512), (0x201000, 1514)], true);
    assert_eq!(f.worker.process_rx(), 1);
    assert_eq!(f.rx.used_idx(), 1);
    assert_eq!(f.rx.used_elem(0), (u32::from(head), (12 + 1000) as u32));
    let mut got = vec![0u8; 12 + 1000];
    f.mem
        .read_slice(&mut got[..512], GuestAddress(0x200000))
        .unwrap();
    f.mem
        .read_slice(&mut got[512..], GuestAddress(0x201000))
        .unwrap();
    assert_eq!(
        &got[..12],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "hdr, num_buffers=1"
    );
    assert_eq!(&got[12..], &fr[..]);
    assert!(irq_fired(&f.interrupt));
    assert_eq!(f.worker.metrics.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(f.worker.metrics.rx_bytes.load(Ordering::Relaxed), 1000);

    // Several frames, several buffers, drained in one pass.
    for k in 0..3 {
        f.rx.add_chain(&[(0x300000 + k * 0x1000, 1526)], true);
        f.backend.push(frame(60 + k as usize, k as u8));
    }
    f.worker.backend_readable = true;
    assert_eq!(f.worker.process_rx(), 3);
    assert_eq!(f.rx.used_idx(), 4);
    let mut b = vec![0u8; 62];
    f.mem
        .read_slice(&mut b, GuestAddress(0x302000 + 12))
        .unwrap();
    assert_eq!(b, frame(62, 2));
    assert_eq!(f.worker.metrics.total_errors(), 0);
}

#[test]
fn rx_buffer_too_small_drops_frame_keeps_buffer() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    f.rx.add_chain(&[(0x200000, 100)], true);
    f.backend.push(frame(500, 1)); // too big for 100 bytes
    f.backend.push(frame(50, 2)); // fits
    assert_eq!(f.worker.process_rx(), 1);
    assert_eq!(f.worker.metrics.errors(NetErrorKind::RxBufferTooSmall), 1);
    assert_eq!(f.rx.used_idx(), 1);
    assert_eq!(
        f.rx.used_elem(0).1,
        62,
        "the buffer carried the small frame"
    );
    let mut b = vec![0u8; 50];
    f.mem
        .read_slice(&mut b, GuestAddress(0x200000 + 12))
        .unwrap();
    assert_eq!(b, frame(50, 2));
}

#[test]
fn hostile_tx_chains_refused_and_counted() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    let good = put_tx(f.mem, 0x100000, &frame(64, 9));
    // 0: loop 0 -> 1 -> 0.
    f.tx.set_desc(0, 0x100000, good, VRING_DESC_F_NEXT, 1);
    f.tx.set_desc(1, 0x100000, 16, VRING_DESC_F_NEXT, 0);
    f.tx.publish(0);
    // 2: buffer outside guest memory.
    f.tx.set_desc(2, 0x8000_0000, 100, 0, 0);
    f.tx.publish(2);
    // 3: zero length.
    f.tx.set_desc(3, 0x100000, 0, 0, 0);
    f.tx.publish(3);
    // 4: huge length.
    f.tx.set_desc(4, 0x100000, 0x7fff_ffff, 0, 0);
    f.tx.publish(4);
    // 5: next index beyond the queue.
    f.tx.set_desc(5, 0x100000, good, VRING_DESC_F_NEXT, 200);
    f.tx.publish(5);
    // 6: a device-writable buffer in a tx chain.
    f.tx.set_desc(6, 0x100000, good, VRING_DESC_F_WRITE, 0);
    f.tx.publish(6);
    // 7: too short for header + Ethernet header.
    f.tx.set_desc(7, 0x100000, 20, 0, 0);
    f.tx.publish(7);
    // 8: indirect.
    f.tx.set_desc(8, 0x100000, 32, VRING_DESC_F_INDIRECT, 0);
    f.tx.publish(8);
    // head index beyond the queue in the avail ring.
    f.tx.publish(999);
    // 9: one good frame after all that.
    f.tx.set_desc(9, 0x100000, good, 0, 0);
    f.tx.publish(9);

    assert_eq!(f.worker.process_tx(), 1, "only the good frame is sent");
    assert_eq!(f.backend.sent.lock().unwrap().as_slice(), &[frame(64, 9)]);
    let m = f.worker.metrics.clone();
    for kind in [
        NetErrorKind::DescriptorLoop,
        NetErrorKind::BadAddress,
        NetErrorKind::ZeroLength,
        NetErrorKind::TooLong,
        NetErrorKind::WrongDirection,
        NetErrorKind::FrameTooShort,
        NetErrorKind::IndirectDescriptor,
    ] {
        assert_eq!(m.errors(kind), 1, "{kind:?}");
    }
    assert_eq!(
        m.errors(NetErrorKind::DescriptorIndex),
        2,
        "next 200 and head 999"
    );
    // Every valid head came back (9 refused-or-sent + good), the bad head not.
    assert_eq!(f.tx.used_idx(), 9);
    let ids: Vec<u32> = (0..9).map(|i| f.tx.used_elem(i).0).collect();
    assert_eq!(ids, vec![0, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert!(irq_fired(&f.interrupt));
}

#[test]
fn hostile_avail_ring_overrun() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    let good = put_tx(f.mem, 0x100000, &frame(64, 9));
    f.tx.set_desc(0, 0x100000, good, 0, 0);
    // The driver claims 1000 new entries in a 16-entry queue.
    f.tx.set_avail_idx(1000);
    assert_eq!(f.worker.process_tx(), 0);
    assert_eq!(f.worker.metrics.errors(NetErrorKind::AvailRing), 1);
    assert!(f.backend.sent.lock().unwrap().is_empty());
    // The same on rx, with a frame waiting.
    f.rx.set_avail_idx(17);
    f.backend.push(frame(60, 0));
    assert_eq!(f.worker.process_rx(), 0);
    assert_eq!(f.worker.metrics.errors(NetErrorKind::AvailRing), 2);
    // A sane index afterwards works again.
    f.tx.set_avail_idx(0);
    f.tx.publish(0);
    assert_eq!(f.worker.process_tx(), 1);
}

#[test]
fn hostile_rx_chains_refused_and_counted() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    f.backend.push(frame(60, 5));
    // Read-only buffer in an rx chain.
    f.rx.set_desc(0, 0x200000, 1526, 0, 0);
    f.rx.publish(0);
    // Loop.
    f.rx.set_desc(1, 0x200000, 1526, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
    f.rx.publish(1);
    // Outside memory.
    f.rx.set_desc(2, (MEM_SIZE as u64) - 100, 1526, VRING_DESC_F_WRITE, 0);
    f.rx.publish(2);
    // Good.
    f.rx.set_desc(3, 0x200000, 1526, VRING_DESC_F_WRITE, 0);
    f.rx.publish(3);
    assert_eq!(f.worker.process_rx(), 1);
    let m = f.worker.metrics.clone();
    assert_eq!(m.errors(NetErrorKind::WrongDirection), 1);
    assert_eq!(m.errors(NetErrorKind::DescriptorLoop), 1);
    assert_eq!(m.errors(NetErrorKind::BadAddress), 1);
    assert_eq!(f.rx.used_idx(), 4);
    assert_eq!(f.rx.used_elem(0), (0, 0));
    assert_eq!(f.rx.used_elem(3), (3, 72));
}

#[test]
fn more_descriptors_than_queue_size() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    // A chain visiting every descriptor and then looping back: longer than
    // the queue, refused without reading past QSIZE descriptors.
    for i in 0..QSIZE {
        f.tx.set_desc(i, 0x100000, 64, VRING_DESC_F_NEXT, (i + 1) % QSIZE);
    }
    f.tx.publish(0);
    assert_eq!(f.worker.process_tx(), 0);
    assert_eq!(f.worker.metrics.errors(NetErrorKind::DescriptorLoop), 1);
    assert_eq!(f.tx.used_idx(), 1);
}

#[test]
fn device_thread_end_to_end_through_transport() {
    let mem = guest_mem();
    let backend = TestBackend::new();
    let mac = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    let dev = NetDevice::new(mac, Box::new(backend.clone()));
    let metrics = dev.metrics();
    let t = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone()).unwrap()));
    let mut rx = Ring::new(&mem, 0x10000, QSIZE);
    let mut tx = Ring::new(&mem, 0x20000, QSIZE);
    {
        let mut g = t.lock().unwrap();
        let mut m = [0u8; 6];
        g.read(0x100, &mut m);
        assert_eq!(m, mac.0);
        negotiate(&mut *g, (1 << 32) | (1 << 5));
        setup_queue(&mut *g, 0, u32::from(QSIZE), rx.addrs(), 1);
        setup_queue(&mut *g, 1, u32::from(QSIZE), tx.addrs(), 1);
        let mut b = [0u8; 4];
        g.write(0x70, &STATUS_UP.to_le_bytes());
        g.read(0x70, &mut b);
        assert_eq!(u32::from_le_bytes(b), STATUS_UP);
        assert!(g.device().is_running());
    }
    let irq = t.lock().unwrap().interrupt();

    // Guest transmits; notifies with a QueueNotify MMIO write (no ioeventfd).
    let len = put_tx(&mem, 0x100000, &frame(80, 4));
    tx.add_chain(&[(0x100000, len)], false);
    t.lock().unwrap().write(0x50, &1u32.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.sent.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(backend.sent.lock().unwrap().as_slice(), &[frame(80, 4)]);

    // Guest posts an rx buffer, then the backend gets a frame.
    rx.add_chain(&[(0x200000, 1526)], true);
    t.lock().unwrap().queue_evts()[0].write(1).unwrap(); // as an ioeventfd would
    backend.push(frame(70, 8));
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.used_idx() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(rx.used_idx(), 1);
    let mut b = vec![0u8; 70];
    mem.read_slice(&mut b, GuestAddress(0x200000 + 12)).unwrap();
    assert_eq!(b, frame(70, 8));
    assert_ne!(irq.status() & 1, 0);
    assert!(irq.evt().read().is_ok());
    assert_eq!(metrics.rx_frames.load(Ordering::Relaxed), 1);

    // Quiesced (as for a snapshot): while the gate is held, a frame from the
    // backend waits and guest memory is not touched; released, it lands.
    let gate = t.lock().unwrap().device().quiesce_gate();
    {
        let _held = gate.lock().unwrap();
        rx.add_chain(&[(0x210000, 1526)], true);
        t.lock().unwrap().queue_evts()[0].write(1).unwrap();
        backend.push(frame(60, 9));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.used_idx(), 1, "the device moved a frame while quiesced");
        assert_eq!(metrics.rx_frames.load(Ordering::Relaxed), 1);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.used_idx() == 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(rx.used_idx(), 2, "the waiting frame lands once released");
    let _ = irq.evt().read();

    // Reset stops the thread and gives the backend back; it restarts.
    t.lock().unwrap().write(0x70, &0u32.to_le_bytes());
    assert!(!t.lock().unwrap().device().is_running());
    {
        let mut g = t.lock().unwrap();
        negotiate(&mut *g, (1 << 32) | (1 << 5));
        rx = Ring::new(&mem, 0x10000, QSIZE);
        tx = Ring::new(&mem, 0x20000, QSIZE);
        for r in [&rx, &tx] {
            r.ring.clear_descriptors();
        }
        setup_queue(&mut *g, 0, u32::from(QSIZE), rx.addrs(), 1);
        setup_queue(&mut *g, 1, u32::from(QSIZE), tx.addrs(), 1);
        g.write(0x70, &STATUS_UP.to_le_bytes());
        assert!(g.device().is_running());
    }
    let _ = (&mut rx, &mut tx);
    drop(t); // joins the thread
    assert_eq!(metrics.total_errors(), 0);
}

/// "Who has 10.0.2.2? Tell 10.0.2.15", from `guest_mac`.
fn arp_request_for_gateway(guest_mac: MacAddr) -> Vec<u8> {
    use crate::net::user::{GATEWAY_IP, GUEST_IP};
    osso_testkit::frames::arp_request(guest_mac.0, GUEST_IP, GATEWAY_IP)
}

/// The whole in-process path: guest rings -> device thread -> user-mode
/// stack -> device thread -> guest rings, for an ARP request to the gateway.
#[test]
fn device_with_user_network_answers_arp() {
    use crate::net::user::{UserNet, UserNetConfig, GATEWAY_IP, GATEWAY_MAC};
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame};

    let mem = guest_mem();
    let (backend, handle) = UserNet::start(UserNetConfig::default()).unwrap();
    let guest_mac = MacAddr::DEFAULT_GUEST;
    let dev = NetDevice::new(guest_mac, Box::new(backend));
    let metrics = dev.metrics();
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    let mut rx = Ring::new(&mem, 0x10000, QSIZE);
    let mut tx = Ring::new(&mem, 0x20000, QSIZE);
    negotiate(&mut t, (1 << 32) | (1 << 5));
    setup_queue(&mut t, 0, u32::from(QSIZE), rx.addrs(), 1);
    setup_queue(&mut t, 1, u32::from(QSIZE), tx.addrs(), 1);
    t.write(0x70, &STATUS_UP.to_le_bytes());
    for k in 0..4 {
        rx.add_chain(&[(0x200000 + k * 0x1000, 1526)], true);
    }
    t.queue_evts()[0].write(1).unwrap();

    let fr = arp_request_for_gateway(guest_mac);
    let len = put_tx(&mem, 0x100000, &fr);
    tx.add_chain(&[(0x100000, len)], false);
    t.queue_evts()[1].write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    while rx.used_idx() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(rx.used_idx(), 1, "the ARP reply reached the rx ring");
    let (id, used_len) = rx.used_elem(0);
    assert_eq!(id, 0);
    let mut got = vec![0u8; used_len as usize];
    mem.read_slice(&mut got, GuestAddress(0x200000)).unwrap();
    let f = EthernetFrame::new_checked(&got[VNET_HDR_LEN..]).unwrap();
    assert_eq!(f.dst_addr(), EthernetAddress(guest_mac.0));
    let reply = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        ..
    } = reply
    else {
        panic!("not an ARP reply");
    };
    assert_eq!(operation, ArpOperation::Reply);
    assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
    assert_eq!(source_protocol_addr, GATEWAY_IP);
    assert_ne!(t.interrupt().status() & 1, 0);
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(handle.stats().frames_from_guest, 1);
    drop(t);
}

/// The device with a real TAP backend, inside a network namespace private
/// to the test thread (never the host's network): an ARP request from the
/// guest rings reaches the kernel through the TAP, and the kernel's reply
/// comes back into the rx ring. Needs root, /dev/net/tun and `ip`;
/// otherwise skipped, or failed under `OSSO_REQUIRE_E2E=1` (`osso_testkit`).
#[test]
fn device_with_tap_in_private_netns_answers_arp() {
    use crate::net::tap::{Tap, TapError};
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    };

    let r = std::thread::spawn(|| -> Result<(), String> {
        // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network
        // namespace; the thread (and the `ip` children it starts) end with
        // the test.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {} (needs root)",
                io::Error::last_os_error()
            ));
        }
        let tap = match Tap::open("osso-t1") {
            Ok(t) => t,
            Err(TapError::NoTunDevice) => return Err("no /dev/net/tun".into()),
            Err(e) => panic!("TAP in a private netns: {e}"),
        };
        for args in [
            &["link", "set", "osso-t1", "up"][..],
            &["addr", "add", "10.0.2.2/24", "dev", "osso-t1"][..],
        ] {
            match std::process::Command::new("ip").args(args).status() {
                Ok(s) if s.success() => {}
                Ok(s) => panic!("ip {args:?}: {s}"),
                Err(e) => return Err(format!("cannot run ip (iproute2): {e}")),
            }
        }

        let mem = guest_mem();
        let guest_mac = MacAddr::DEFAULT_GUEST;
        let dev = NetDevice::new(guest_mac, Box::new(tap));
        let metrics = dev.metrics();
        let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
        let mut rx = Ring::new(&mem, 0x10000, QSIZE);
        let mut tx = Ring::new(&mem, 0x20000, QSIZE);
        negotiate(&mut t, (1 << 32) | (1 << 5));
        setup_queue(&mut t, 0, u32::from(QSIZE), rx.addrs(), 1);
        setup_queue(&mut t, 1, u32::from(QSIZE), tx.addrs(), 1);
        t.write(0x70, &STATUS_UP.to_le_bytes());
        for k in 0..QSIZE {
            rx.add_chain(&[(0x200000 + u64::from(k) * 0x1000, 1526)], true);
        }
        t.queue_evts()[0].write(1).unwrap();

        let fr = arp_request_for_gateway(guest_mac);
        let len = put_tx(&mem, 0x100000, &fr);
        tx.add_chain(&[(0x100000, len)], false);
        t.queue_evts()[1].write(1).unwrap();

        // The kernel may also send its own frames (IPv6 router
        // solicitations...): look through everything used for the reply.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = 0;
        loop {
            while seen < rx.used_idx() {
                let (id, used_len) = rx.used_elem(seen);
                seen += 1;
                let mut got = vec![0u8; used_len as usize];
                mem.read_slice(&mut got, GuestAddress(0x200000 + u64::from(id) * 0x1000))
                    .unwrap();
                let Ok(f) = EthernetFrame::new_checked(&got[VNET_HDR_LEN..]) else {
                    continue;
                };
                if f.ethertype() != EthernetProtocol::Arp {
                    continue;
                }
                let Ok(ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_protocol_addr,
                    target_hardware_addr,
                    ..
                }) = ArpPacket::new_checked(f.payload()).and_then(|p| ArpRepr::parse(&p))
                else {
                    continue;
                };
                assert_eq!(source_protocol_addr, crate::net::user::GATEWAY_IP);
                assert_eq!(target_hardware_addr, EthernetAddress(guest_mac.0));
                assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 1);
                assert_eq!(metrics.total_errors(), 0);
                return Ok(());
            }
            assert!(Instant::now() < deadline, "no ARP reply through the TAP");
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .join()
    .unwrap();
    if let Err(reason) = r {
        osso_testkit::skip_or_fail("device_with_tap_in_private_netns_answers_arp", reason);
    }
}

#[test]
fn rx_chain_larger_than_any_frame_is_fine() {
    let mem = guest_mem();
    let mut f = fixture(&mem);
    // 128 KiB of receive buffer (more than MAX_BUFFER_LEN), all in memory.
    f.rx.add_chain(&[(0x200000, 0x10000), (0x210000, 0x10000)], true);
    f.backend.push(frame(1514, 6));
    assert_eq!(f.worker.process_rx(), 1);
    assert_eq!(f.rx.used_elem(0).1, 12 + 1514);
    assert_eq!(f.worker.metrics.total_errors(), 0);
}
