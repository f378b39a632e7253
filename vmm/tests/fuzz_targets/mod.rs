//! Randomised tests of everything a guest controls, over real guest memory
//! (vm-memory `GuestMemoryMmap`), with `proptest` generators (stable Rust).
//!
//! Targets (each a function running `cases` generated inputs and returning how
//! many it ran):
//!
//! * [`mmio`]: virtio-mmio register reads and writes of any offset, width and
//!   value, in any order, including bring-ups that reach DRIVER_OK with random
//!   queue sizes and addresses (the real virtio-net device thread then runs
//!   over whatever garbage the rings point at); afterwards a reset and a clean
//!   bring-up must move one frame each way.
//! * [`net`]: virtio-net queue processing ([`NetWorker::process_tx`] /
//!   [`NetWorker::process_rx`]) with random descriptor tables, available rings,
//!   lengths, flags, `next` indices and frame contents placed in guest memory,
//!   and random frames from the backend. Checks: used elements name a head
//!   inside the queue, never claim more bytes than the chain's buffers hold
//!   (when the rings are not themselves overwritten), never more than
//!   `MAX_BUFFER_LEN`; transmitted frames are within Ethernet bounds; a fresh
//!   worker (what a device reset makes) over the same memory and backend
//!   still moves a frame each way.
//! * [`serial`]: UART port traffic (any offset, width, value, host input);
//!   afterwards the console still reaches the host sink.
//! * [`i8042`]: port traffic; a reset happens exactly for each 0xFE written to
//!   the command port.
//! * [`boot_timer`]: writes of any offset and width; "ready" is recorded
//!   exactly when one of them was the magic write.
//!
//! Every target fails on a panic on any thread (a process-wide panic hook
//! counts them, so a panic on the device thread counts too). Accesses outside
//! guest memory are errors in vm-memory, never undefined behaviour; the
//! targets put buffers across region ends, in the hole between the two RAM
//! regions and far above RAM to make sure they are refused.
#![allow(dead_code)]

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use osso_vmm::devices::boot_timer::BootTimer;
use osso_vmm::devices::i8042::I8042;
use osso_vmm::devices::serial::{ConsoleWriter, Serial};
use osso_vmm::metrics::Timeline;
use osso_vmm::net::{MacAddr, MAX_FRAME_LEN};
use osso_vmm::testing::virtio::{
    mmio_read as rd, mmio_write as wr, negotiate, setup_queue, SplitRing,
};
pub use osso_vmm::testing::TestBackend;
use osso_vmm::virtio::mmio::reg;
use osso_vmm::virtio::net::{NetMetrics, NetWorker, MAX_BUFFER_LEN, VNET_HDR_LEN};
use osso_vmm::virtio::{Interrupt, MmioTransport, NetDevice};
use osso_vmm::BusDevice;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------- plumbing

static PANICS: AtomicU64 = AtomicU64::new(0);

/// What the storms did (summed over all cases), to show they reach the code.
pub static STORM_ACTIVATIONS: AtomicU64 = AtomicU64::new(0);
pub static STORM_TX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static STORM_RX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static STORM_REFUSED: AtomicU64 = AtomicU64::new(0);

/// One line summing [`STORM_ACTIVATIONS`] and the others.
pub fn storm_summary() -> String {
    format!(
        "storms: {} DRIVER_OK activations with random queues, {} frames sent and {} received from random rings, {} chains or rings refused",
        STORM_ACTIVATIONS.load(Ordering::Relaxed),
        STORM_TX_FRAMES.load(Ordering::Relaxed),
        STORM_RX_FRAMES.load(Ordering::Relaxed),
        STORM_REFUSED.load(Ordering::Relaxed),
    )
}

/// Installs (once) a panic hook that counts every panic on any thread.
pub fn count_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// Panics seen so far, on any thread.
pub fn panics() -> u64 {
    PANICS.load(Ordering::SeqCst)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PtConfig {
        cases,
        // No proptest-regressions files left in the source tree.
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..PtConfig::default()
    })
}

/// Runs `cases` inputs of `strategy` through `test`; panics with proptest's
/// minimised counterexample on failure. Returns the cases run.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    count_panics();
    let before = panics();
    let counter = AtomicU64::new(0);
    let result = runner(cases).run(&strategy, |v| {
        counter.fetch_add(1, Ordering::Relaxed);
        test(v)?;
        prop_assert_eq!(panics(), before, "a thread panicked");
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    assert_eq!(panics(), before, "{name}: a thread panicked");
    counter.load(Ordering::Relaxed)
}

/// Fills guest memory with deterministic garbage from `seed`.
fn fill_garbage(mem: &GuestMemoryMmap, ranges: &[(u64, usize)], seed: u64) {
    for (i, &(base, len)) in ranges.iter().enumerate() {
        let buf = osso_testkit::noise(len, seed.wrapping_add(i as u64));
        mem.write_slice(&buf, GuestAddress(base)).unwrap();
    }
}

/// An Ethernet-sized frame with a recognisable pattern.
fn pattern_frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

// ---------------------------------------------------------------- mmio

/// Guest RAM of the mmio and net targets: two regions with a hole between.
const R0: (u64, usize) = (0, 0x10000);
const R1: (u64, usize) = (0x20000, 0x10000);

fn two_region_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(R0.0), R0.1), (GuestAddress(R1.0), R1.1)]).unwrap()
}

/// A guest-physical address: mostly inside RAM, sometimes at region edges,
/// in the hole, far above RAM or anywhere.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..0x30000,
        2 => (0u64..0x3000).prop_map(|a| a * 16),
        1 => prop::sample::select(vec![0xfff0u64, 0xfffc, 0x10000, 0x1fff0, 0x2fff8, 0x30000, u64::MAX - 15, 1 << 48]),
        1 => any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum MmioOp {
    Read {
        off: u64,
        width: usize,
    },
    Write {
        off: u64,
        width: usize,
        value: u64,
    },
    Status(u32),
    Features {
        sel: u32,
        value: u32,
    },
    Queue {
        sel: u32,
        size: u32,
        desc: u64,
        avail: u64,
        used: u64,
        ready: u32,
    },
    Notify(u32),
    /// The whole Linux probe sequence with these queue parameters.
    BringUp {
        sizes: [u32; 2],
        addrs: [[u64; 3]; 2],
    },
    Reset,
}

fn width() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(4usize), 1 => Just(1), 1 => Just(2), 1 => Just(8), 1 => 0usize..16]
}

fn qsize() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => prop::sample::select(vec![1u32, 2, 4, 8, 16, 32, 64, 128, 256]),
        1 => prop::sample::select(vec![0u32, 3, 255, 257, 512, 65536, u32::MAX]),
        1 => any::<u32>(),
    ]
}

fn mmio_op() -> impl Strategy<Value = MmioOp> {
    let off = prop_oneof![
        8 => (0u64..0x40).prop_map(|w| w * 4),
        2 => 0u64..0x200,
        1 => any::<u64>(),
    ];
    let status = prop_oneof![
        4 => prop::sample::select(vec![0u32, 1, 3, 11, 15, 128, 131, 139, 143, 64, 7]),
        1 => any::<u32>(),
    ];
    prop_oneof![
        3 => (off.clone(), width()).prop_map(|(off, width)| MmioOp::Read { off, width }),
        3 => (off, width(), any::<u64>()).prop_map(|(off, width, value)| MmioOp::Write { off, width, value }),
        2 => status.prop_map(MmioOp::Status),
        1 => (0u32..3, any::<u32>()).prop_map(|(sel, value)| MmioOp::Features { sel, value }),
        2 => (0u32..3, qsize(), addr(), addr(), addr(), 0u32..3)
            .prop_map(|(sel, size, desc, avail, used, ready)| MmioOp::Queue { sel, size, desc, avail, used, ready }),
        1 => (0u32..4).prop_map(MmioOp::Notify),
        2 => ([qsize(), qsize()], [[addr(), addr(), addr()], [addr(), addr(), addr()]])
            .prop_map(|(sizes, addrs)| MmioOp::BringUp { sizes, addrs }),
        1 => Just(MmioOp::Reset),
    ]
}

const FEATURES: u64 = (1 << 32) | (1 << 5);

fn apply(t: &mut MmioTransport<NetDevice>, op: &MmioOp) {
    match op {
        MmioOp::Read { off, width } => {
            let mut b = vec![0xa5u8; *width];
            t.read(*off, &mut b);
        }
        MmioOp::Write { off, width, value } => {
            let b = value.to_le_bytes();
            let mut v = b.to_vec();
            v.resize(*width, 0xcc);
            t.write(*off, &v);
        }
        MmioOp::Status(v) => wr(t, reg::STATUS, *v),
        MmioOp::Features { sel, value } => {
            wr(t, reg::DRIVER_FEATURES_SEL, *sel);
            wr(t, reg::DRIVER_FEATURES, *value);
        }
        MmioOp::Queue {
            sel,
            size,
            desc,
            avail,
            used,
            ready,
        } => setup_queue(t, *sel, *size, [*desc, *avail, *used], *ready),
        MmioOp::Notify(q) => wr(t, reg::QUEUE_NOTIFY, *q),
        MmioOp::BringUp { sizes, addrs } => {
            negotiate(t, FEATURES);
            setup_queue(t, 0, sizes[0], addrs[0], 1);
            setup_queue(t, 1, sizes[1], addrs[1], 1);
            wr(t, reg::STATUS, 15);
            wr(t, reg::QUEUE_NOTIFY, 0);
            wr(t, reg::QUEUE_NOTIFY, 1);
        }
        MmioOp::Reset => wr(t, reg::STATUS, 0),
    }
}

/// After any storm: reset, bring the device up properly and move one frame
/// each way through the real device thread.
fn mmio_recovers(
    t: &mut MmioTransport<NetDevice>,
    mem: &GuestMemoryMmap,
    backend: &TestBackend,
) -> Result<(), TestCaseError> {
    wr(t, reg::STATUS, 0);
    prop_assert!(!t.is_activated());
    prop_assert_eq!(rd(t, reg::STATUS), 0);
    backend.inbox.lock().unwrap().clear();
    backend.sent.lock().unwrap().clear();
    let rx = SplitRing::new(mem, (0xa000, 0xb000, 0xc000), 16);
    let tx = SplitRing::new(mem, (0xd000, 0xe000, 0xf000), 16);
    rx.clear_descriptors();
    tx.clear_descriptors();
    negotiate(t, FEATURES);
    prop_assert_eq!(rd(t, reg::STATUS), 11, "FEATURES_OK accepted");
    setup_queue(t, 0, 16, rx.addrs(), 1);
    setup_queue(t, 1, 16, tx.addrs(), 1);
    wr(t, reg::STATUS, 15);
    prop_assert!(t.is_activated(), "a clean bring-up after garbage activates");
    // Transmit.
    let f = pattern_frame(60, 7);
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x9000))
        .unwrap();
    mem.write_slice(&f, GuestAddress(0x9000 + VNET_HDR_LEN as u64))
        .unwrap();
    tx.set_desc(0, 0x9000, (VNET_HDR_LEN + f.len()) as u32, 0, 0);
    tx.publish(0, 0);
    wr(t, reg::QUEUE_NOTIFY, 1);
    prop_assert!(
        wait_until(Duration::from_secs(5), || backend
            .sent
            .lock()
            .unwrap()
            .first()
            == Some(&f)),
        "a valid frame after the storm is transmitted"
    );
    // Receive.
    let g = pattern_frame(90, 9);
    rx.set_desc(0, 0x9800, 2048, 2, 0);
    rx.publish(0, 0);
    wr(t, reg::QUEUE_NOTIFY, 0);
    backend.push(g.clone());
    prop_assert!(
        wait_until(Duration::from_secs(5), || rx.used_idx() == 1),
        "a frame after the storm is received"
    );
    prop_assert_eq!(rx.used_elem(0), (0, (VNET_HDR_LEN + g.len()) as u32));
    let mut got = vec![0u8; g.len()];
    mem.read_slice(&mut got, GuestAddress(0x9800 + VNET_HDR_LEN as u64))
        .unwrap();
    prop_assert_eq!(got, g);
    wr(t, reg::STATUS, 0);
    Ok(())
}

/// virtio-mmio register storms, then recovery. Returns the cases run.
pub fn mmio(cases: u32) -> u64 {
    let strategy = (
        any::<u64>(),
        prop::collection::vec(mmio_op(), 1..40),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..4),
    );
    run("mmio", cases, strategy, |(seed, ops, frames)| {
        let mem = two_region_mem();
        fill_garbage(&mem, &[R0, R1], seed);
        let backend = TestBackend::new();
        for f in frames {
            backend.push(f);
        }
        let dev = NetDevice::new(MacAddr::DEFAULT_GUEST, Box::new(backend.clone()));
        let metrics = dev.metrics();
        let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
        let mut bad = 0;
        for op in &ops {
            let was = t.is_activated();
            apply(&mut t, op);
            if t.is_activated() && !was {
                STORM_ACTIVATIONS.fetch_add(1, Ordering::Relaxed);
            }
            let s = t.status();
            // DRIVER_OK is set exactly when the device runs.
            prop_assert_eq!(s & 4 != 0, t.is_activated(), "status {:#x}", s);
            prop_assert_eq!(t.is_activated(), t.device().is_running());
            prop_assert!(t.bad_accesses() >= bad);
            bad = t.bad_accesses();
            prop_assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        }
        mmio_recovers(&mut t, &mem, &backend)?;
        drop(t);
        prop_assert!(metrics.rx_frames.load(Ordering::Relaxed) >= 1);
        Ok(())
    })
}

// ---------------------------------------------------------------- net

/// Ring layout of the net target: rings in low memory, buffers from DATA.
const RX_RING: (u64, u64, u64) = (0x0000, 0x1000, 0x2000);
const TX_RING: (u64, u64, u64) = (0x3000, 0x4000, 0x5000);
const DATA: u64 = 0x6000;

#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Debug, Clone)]
struct QueueInput {
    size_log2: u8,
    descs: Vec<Desc>,
    avail: Vec<u16>,
    /// avail idx = entries published, or this raw value.
    raw_idx: Option<u16>,
    /// Bytes written at each buffer (frame contents).
    payload_seed: u8,
}

#[derive(Debug, Clone)]
struct NetInput {
    seed: u64,
    /// Buffers may point anywhere, rings included (checks relaxed).
    hostile: bool,
    rx: QueueInput,
    tx: QueueInput,
    frames: Vec<Vec<u8>>,
    /// Rounds of process_tx / process_rx, with more entries published between.
    rounds: u8,
}

fn desc(hostile: bool) -> impl Strategy<Value = Desc> {
    let a = if hostile {
        addr().boxed()
    } else {
        prop_oneof![
            8 => DATA..0x30000u64,
            1 => prop::sample::select(vec![0xfff0u64, 0x1fff0, 0x2fff8, 1 << 40, u64::MAX - 3]),
        ]
        .boxed()
    };
    let len = prop_oneof![
        6 => 1u32..2000,
        2 => prop::sample::select(vec![0u32, 1, 11, 12, 13, 25, 26, 1514, 1526, 4096, 65550, 65562, 65563, 0x10000]),
        1 => any::<u32>(),
    ];
    let flags = prop_oneof![
        6 => 0u16..4,
        2 => 0u16..8,
        1 => any::<u16>(),
    ];
    let next = prop_oneof![6 => 0u16..16, 2 => 0u16..256, 1 => any::<u16>()];
    (a, len, flags, next).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

fn queue_input(hostile: bool) -> impl Strategy<Value = QueueInput> {
    (
        0u8..=8,
        prop::collection::vec(desc(hostile), 0..48),
        prop::collection::vec(prop_oneof![8 => 0u16..16, 1 => any::<u16>()], 0..24),
        prop::option::weighted(0.1, any::<u16>()),
        any::<u8>(),
    )
        .prop_map(
            |(size_log2, descs, avail, raw_idx, payload_seed)| QueueInput {
                size_log2,
                descs,
                avail,
                raw_idx,
                payload_seed,
            },
        )
}

fn net_input() -> impl Strategy<Value = NetInput> {
    any::<bool>().prop_flat_map(|hostile| {
        let frame_len = prop_oneof![
            6 => 0usize..200,
            1 => prop::sample::select(vec![14usize, 1514, 4000, MAX_FRAME_LEN]),
        ];
        (
            any::<u64>(),
            queue_input(hostile),
            queue_input(hostile),
            prop::collection::vec(
                (frame_len, any::<u8>()).prop_map(|(n, s)| pattern_frame(n, s)),
                0..6,
            ),
            1u8..4,
        )
            .prop_map(move |(seed, rx, tx, frames, rounds)| NetInput {
                seed,
                hostile,
                rx,
                tx,
                frames,
                rounds,
            })
    })
}

fn make_queue(mem: &GuestMemoryMmap, ring: &SplitRing) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let q = ring.queue();
    assert!(q.is_valid(mem));
    q
}

/// Writes the guest's side of one queue (the rings' flags and indices start
/// at 0, as a driver leaves them); returns the ring.
fn lay_out<'a>(mem: &'a GuestMemoryMmap, at: (u64, u64, u64), q: &QueueInput) -> SplitRing<'a> {
    let ring = SplitRing::new(mem, at, 1u16 << q.size_log2);
    for (i, d) in q.descs.iter().enumerate().take(usize::from(ring.size())) {
        ring.set_desc(i as u16, d.addr, d.len, d.flags, d.next);
        // Frame-ish contents where the buffer is in RAM (ignored if not).
        let n = (d.len as usize).min(64);
        let _ = mem.write_slice(&pattern_frame(n, q.payload_seed), GuestAddress(d.addr));
    }
    ring
}

/// Publishes entries `from..to` of `q.avail`.
fn publish_range(ring: &SplitRing, q: &QueueInput, from: usize, to: usize) {
    for n in from..to {
        ring.set_avail(n as u16, q.avail[n]);
    }
    ring.set_avail_idx(q.raw_idx.unwrap_or(to as u16));
}

/// Sum of buffer lengths of the chain at `head`, walking descriptors as the
/// guest wrote them (stopping at a loop or a bad index), for the bound check.
fn chain_capacity(q: &QueueInput, size: u16, head: u16) -> u64 {
    let mut total = 0u64;
    let mut idx = head;
    for _ in 0..size {
        if idx >= size {
            break;
        }
        let Some(d) = q.descs.get(usize::from(idx)) else {
            break; // zeroed entry: length 0
        };
        total += u64::from(d.len);
        if d.flags & 1 == 0 {
            break;
        }
        idx = d.next;
    }
    total
}

fn check_used(
    ring: &SplitRing,
    q: &QueueInput,
    published: usize,
    is_tx: bool,
    hostile: bool,
) -> Result<(), TestCaseError> {
    let used = ring.used_idx();
    if hostile {
        // The guest may have had the device write over the used ring itself.
        return Ok(());
    }
    prop_assert!(
        usize::from(used) <= published.max(usize::from(q.raw_idx.unwrap_or(0)))
            || q.raw_idx.is_some(),
        "used idx {} beyond {} published",
        used,
        published
    );
    for i in 0..used.min(ring.size()) {
        let (id, len) = ring.used_elem(i);
        prop_assert!(
            id < u32::from(ring.size()),
            "used id {} in a {}-entry queue",
            id,
            ring.size()
        );
        prop_assert!(len as usize <= MAX_BUFFER_LEN, "used len {}", len);
        if is_tx {
            prop_assert_eq!(len, 0, "tx used length");
        } else {
            let cap = chain_capacity(q, ring.size(), id as u16);
            prop_assert!(
                u64::from(len) <= cap,
                "used len {} > chain capacity {}",
                len,
                cap
            );
        }
    }
    Ok(())
}

/// After a storm: a fresh worker (what a device reset builds) over the same
/// memory and backend moves one frame each way.
fn net_recovers(
    mem: &GuestMemoryMmap,
    backend: &TestBackend,
    metrics: &Arc<NetMetrics>,
) -> Result<(), TestCaseError> {
    backend.inbox.lock().unwrap().clear();
    backend.sent.lock().unwrap().clear();
    let rx = SplitRing::new(mem, (RX_RING.0, RX_RING.1, RX_RING.2), 16);
    let tx = SplitRing::new(mem, (TX_RING.0, TX_RING.1, TX_RING.2), 16);
    rx.clear_descriptors();
    tx.clear_descriptors();
    let mut w = NetWorker::new(
        mem.clone(),
        make_queue(mem, &rx),
        make_queue(mem, &tx),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Arc::new(Interrupt::new().unwrap()),
        Box::new(backend.clone()),
        metrics.clone(),
    );
    let f = pattern_frame(60, 1);
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x8000))
        .unwrap();
    mem.write_slice(&f, GuestAddress(0x8000 + VNET_HDR_LEN as u64))
        .unwrap();
    tx.set_desc(0, 0x8000, (VNET_HDR_LEN + f.len()) as u32, 0, 0);
    tx.publish(0, 0);
    prop_assert_eq!(w.process_tx(), 1);
    let last = backend.sent.lock().unwrap().last().cloned();
    prop_assert_eq!(last, Some(f));
    let g = pattern_frame(70, 2);
    backend.push(g.clone());
    rx.set_desc(0, 0x9000, 1600, 2, 0);
    rx.publish(0, 0);
    prop_assert_eq!(w.process_rx(), 1);
    prop_assert_eq!(rx.used_elem(0), (0, (VNET_HDR_LEN + g.len()) as u32));
    let mut got = vec![0u8; g.len()];
    mem.read_slice(&mut got, GuestAddress(0x9000 + VNET_HDR_LEN as u64))
        .unwrap();
    prop_assert_eq!(got, g);
    Ok(())
}

/// virtio-net descriptor chains and frames. Returns the cases run.
pub fn net(cases: u32) -> u64 {
    run("net", cases, net_input(), |input| {
        let mem = two_region_mem();
        fill_garbage(&mem, &[R0, R1], input.seed);
        let backend = TestBackend::new();
        for f in &input.frames {
            backend.push(f.clone());
        }
        let rx = lay_out(&mem, RX_RING, &input.rx);
        let tx = lay_out(&mem, TX_RING, &input.tx);
        let metrics = Arc::new(NetMetrics::default());
        let mut w = NetWorker::new(
            mem.clone(),
            make_queue(&mem, &rx),
            make_queue(&mem, &tx),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(Interrupt::new().unwrap()),
            Box::new(backend.clone()),
            metrics.clone(),
        );
        let rounds = usize::from(input.rounds);
        let (mut prx, mut ptx) = (0usize, 0usize);
        for r in 1..=rounds {
            let nrx = input.rx.avail.len() * r / rounds;
            let ntx = input.tx.avail.len() * r / rounds;
            publish_range(&rx, &input.rx, prx, nrx);
            publish_range(&tx, &input.tx, ptx, ntx);
            prx = nrx;
            ptx = ntx;
            w.process_tx();
            w.process_rx();
        }
        check_used(&rx, &input.rx, prx, false, input.hostile)?;
        check_used(&tx, &input.tx, ptx, true, input.hostile)?;
        for f in backend.sent.lock().unwrap().iter() {
            prop_assert!(
                f.len() >= 14 && f.len() <= MAX_FRAME_LEN,
                "sent {} bytes",
                f.len()
            );
        }
        let delivered = metrics.rx_frames.load(Ordering::Relaxed) as usize;
        STORM_RX_FRAMES.fetch_add(delivered as u64, Ordering::Relaxed);
        STORM_TX_FRAMES.fetch_add(metrics.tx_frames.load(Ordering::Relaxed), Ordering::Relaxed);
        STORM_REFUSED.fetch_add(metrics.total_errors(), Ordering::Relaxed);
        prop_assert!(delivered <= input.frames.len());
        drop(w);
        net_recovers(&mem, &backend, &metrics)
    })
}

// ---------------------------------------------------------------- serial

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum PortOp {
    Read { off: u64, width: usize },
    Write { off: u64, data: Vec<u8> },
    Input(Vec<u8>),
}

fn port_op(span: u64) -> impl Strategy<Value = PortOp> {
    let off = prop_oneof![8 => 0..span, 1 => any::<u64>()];
    let w = prop_oneof![8 => Just(1usize), 1 => 0usize..5];
    prop_oneof![
        3 => (off.clone(), w.clone()).prop_map(|(off, width)| PortOp::Read { off, width }),
        4 => (off, prop::collection::vec(any::<u8>(), 0..5)).prop_map(|(off, data)| PortOp::Write { off, data }),
        1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(PortOp::Input),
    ]
}

/// UART register and input storms. Returns the cases run.
pub fn serial(cases: u32) -> u64 {
    let strategy = prop::collection::vec(port_op(10), 1..80);
    run("serial", cases, strategy, |ops| {
        let sink = Sink::default();
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = lines.clone();
        let s = Serial::new(
            evt,
            ConsoleWriter::new(
                Box::new(sink.clone()),
                Some(Box::new(move |l| seen.lock().unwrap().push(l.to_string()))),
                timeline,
            ),
        );
        for op in &ops {
            match op {
                PortOp::Read { off, width } => {
                    let mut b = vec![0u8; *width];
                    s.read(*off, &mut b);
                }
                PortOp::Write { off, data } => s.write(*off, data),
                PortOp::Input(b) => {
                    let n = s.enqueue_input(b);
                    prop_assert!(n <= b.len());
                }
            }
        }
        // Recovery: loopback off, 8N1 with DLAB clear, then output arrives.
        s.write(4, &[0]);
        s.write(3, &[3]);
        for b in b"\nOK\n" {
            s.write(0, &[*b]);
        }
        let out = sink.0.lock().unwrap();
        prop_assert!(out.ends_with(b"\nOK\n"), "console output after the storm");
        let lines = lines.lock().unwrap();
        prop_assert_eq!(
            lines.last().map(String::as_str),
            Some("OK"),
            "the line after the storm"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------- i8042

/// i8042 port storms. Returns the cases run.
pub fn i8042(cases: u32) -> u64 {
    let strategy = prop::collection::vec(
        prop_oneof![
            4 => port_op(6),
            1 => prop_oneof![Just(0xfeu8), any::<u8>()].prop_map(|v| PortOp::Write { off: 4, data: vec![v] }),
        ],
        1..60,
    );
    run("i8042", cases, strategy, |ops| {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        let dev = I8042::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        let mut expected = 0;
        for op in &ops {
            match op {
                PortOp::Read { off, width } => {
                    let mut b = vec![0xffu8; *width];
                    dev.read(*off, &mut b);
                    prop_assert!(b.iter().all(|x| *x == 0));
                }
                PortOp::Write { off, data } => {
                    if *off == 4 && data.first() == Some(&0xfe) {
                        expected += 1;
                    }
                    dev.write(*off, data);
                }
                PortOp::Input(_) => {}
            }
        }
        prop_assert_eq!(resets.load(Ordering::SeqCst), expected);
        dev.write(4, &[0xfe]);
        prop_assert_eq!(
            resets.load(Ordering::SeqCst),
            expected + 1,
            "reset still works"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------- boot timer

/// Boot timer write storms. Returns the cases run.
pub fn boot_timer(cases: u32) -> u64 {
    let data = prop::collection::vec(
        prop_oneof![3 => Just(0u8), 3 => Just(123u8), 2 => Just(1u8), 2 => any::<u8>()],
        0..9,
    );
    let strategy = prop::collection::vec(
        (
            prop_oneof![6 => Just(0u64), 2 => 0u64..16, 1 => any::<u64>()],
            data,
            any::<bool>(),
        ),
        1..20,
    );
    run("boot_timer", cases, strategy, |ops| {
        let timeline = Arc::new(Timeline::new(Instant::now()));
        let bt = BootTimer::new(timeline.clone());
        let (mut ready, mut init) = (false, false);
        for (off, data, is_read) in &ops {
            if *is_read {
                let mut b = data.clone();
                bt.read(*off, &mut b);
                prop_assert!(b.iter().all(|x| *x == 0));
            } else {
                let well_formed = *off == 0 && data.iter().skip(1).all(|b| *b == 0);
                ready |= well_formed && data.first() == Some(&123);
                init |= well_formed && data.first() == Some(&1);
                bt.write(*off, data);
            }
            prop_assert_eq!(timeline.boot_timer_us().is_some(), ready);
            prop_assert_eq!(timeline.init_started_us().is_some(), init);
        }
        Ok(())
    })
}

/// Case counts for each target out of a `total`, in proportion to their cost.
pub fn split(total: u64) -> [(&'static str, u32); 5] {
    let part = |pct: u64| u32::try_from(total * pct / 100).unwrap_or(u32::MAX).max(1);
    [
        ("mmio", part(10)),
        ("net", part(40)),
        ("serial", part(20)),
        ("i8042", part(15)),
        ("boot_timer", part(15)),
    ]
}

/// Runs the named target.
pub fn run_target(name: &str, cases: u32) -> u64 {
    match name {
        "mmio" => mmio(cases),
        "net" => net(cases),
        "serial" => serial(cases),
        "i8042" => i8042(cases),
        "boot_timer" => boot_timer(cases),
        other => panic!("no fuzz target {other}"),
    }
}

/// Brings a transport up from a clean reset, as the guest driver does, then
/// transmits `frame` and waits (up to 10 s) for one received frame, which it
/// returns. Every register access runs on the calling thread, as it would on
/// a vCPU thread, so the device thread starts from it.
pub fn bring_up_and_exchange(
    t: &mut MmioTransport<NetDevice>,
    mem: &GuestMemoryMmap,
    frame: &[u8],
) -> Option<Vec<u8>> {
    let rx = SplitRing::new(mem, (0xa000, 0xb000, 0xc000), 16);
    let tx = SplitRing::new(mem, (0xd000, 0xe000, 0xf000), 16);
    rx.clear_descriptors();
    tx.clear_descriptors();
    negotiate(t, FEATURES);
    setup_queue(t, 0, 16, rx.addrs(), 1);
    setup_queue(t, 1, 16, tx.addrs(), 1);
    wr(t, reg::STATUS, 15);
    if !t.is_activated() {
        return None;
    }
    rx.set_desc(0, 0x9800, 2048, 2, 0);
    rx.publish(0, 0);
    wr(t, reg::QUEUE_NOTIFY, 0);
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x9000))
        .ok()?;
    mem.write_slice(frame, GuestAddress(0x9000 + VNET_HDR_LEN as u64))
        .ok()?;
    tx.set_desc(0, 0x9000, (VNET_HDR_LEN + frame.len()) as u32, 0, 0);
    tx.publish(0, 0);
    wr(t, reg::QUEUE_NOTIFY, 1);
    if !wait_until(Duration::from_secs(10), || rx.used_idx() == 1) {
        return None;
    }
    let (_, len) = rx.used_elem(0);
    let n = (len as usize).checked_sub(VNET_HDR_LEN)?;
    let mut got = vec![0u8; n];
    mem.read_slice(&mut got, GuestAddress(0x9800 + VNET_HDR_LEN as u64))
        .ok()?;
    wr(t, reg::STATUS, 0);
    Some(got)
}

/// Two-region guest RAM as the targets use.
pub fn guest_ram() -> GuestMemoryMmap {
    two_region_mem()
}
