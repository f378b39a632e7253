//! Snapshot and restore under KVM with a tiny long-mode guest that counts:
//! `rbx` is incremented, stored at 0x3000 and its low byte written to the
//! UART, in a loop. A snapshot taken mid-run is restored twice; each clone
//! must go on counting from where the original was (registers and memory
//! preserved), and clones must share the snapshot's memory pages.
//!
//! Without `/dev/kvm` each test prints `SKIPPED <test>: <reason>` and returns,
//! or fails under `OSSO_REQUIRE_E2E=1` (see `osso_testkit`).

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::Console;
use osso_vmm::snapshot::{self, RestoreOptions, SnapshotError};
use osso_vmm::{CpuMode, MachineBuilder, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const LOAD: u64 = 0x1000;
const COUNTER_ADDR: u64 = 0x3000;

/// The counting loop, 64-bit code at `LOAD`:
/// ```text
/// L: inc rbx                    48 ff c3
///    mov [0x3000], ebx          89 1c 25 00 30 00 00
///    mov eax, ebx               89 d8
///    mov dx, 0x3f8              66 ba f8 03
///    out dx, al                 ee
///    jmp L                      eb ed
/// ```
fn counter_code() -> Vec<u8> {
    let code = vec![
        0x48, 0xff, 0xc3, 0x89, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0x89, 0xd8, 0x66, 0xba, 0xf8,
        0x03, 0xee, 0xeb, 0xed,
    ];
    assert_eq!(code.len(), 19);
    code
}

fn counter_config(console: &Console, mem_mib: u64) -> VmConfig {
    let mut c = VmConfig::raw_code(counter_code(), LOAD, LOAD, CpuMode::Long64);
    c.console = Box::new(console.clone());
    c.mem_mib = mem_mib;
    c.timeout = Some(Duration::from_secs(60));
    c
}

fn wait_for_output(console: &Console, from: usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while console.bytes().len() < from + n {
        assert!(Instant::now() < deadline, "no guest output");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn restore_with_console(dir: &Path) -> (osso_vmm::Machine, Console) {
    let console = Console::default();
    let m = snapshot::restore(
        dir,
        RestoreOptions {
            console: Box::new(console.clone()),
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .expect("restore");
    (m, console)
}

/// The snapshot's counter register.
fn snapshot_rbx(dir: &Path) -> u64 {
    let (_, body) = snapshot::read_snapshot(dir).expect("read snapshot");
    body.vcpus[0].regs.0.rbx
}

fn assert_consecutive(bytes: &[u8]) {
    for w in bytes.windows(2) {
        assert_eq!(w[1], w[0].wrapping_add(1), "the count skipped or restarted");
    }
}

#[test]
fn counting_guest_snapshot_restores_twice_and_counts_on() {
    if !osso_testkit::require_kvm("counting_guest_snapshot_restores_twice_and_counts_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = Console::default();
    let m = MachineBuilder::new(counter_config(&console, 16))
        .unwrap()
        .start()
        .unwrap();
    wait_for_output(&console, 0, 300);

    let t = Instant::now();
    m.snapshot(dir.path()).expect("snapshot");
    let snap_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(m.is_paused());
    let (header, body) = snapshot::read_snapshot(dir.path()).unwrap();
    let r = body.vcpus[0].regs.0.rbx;
    println!(
        "snapshot in {snap_ms:.1} ms at count {r}; host {:?}; vCPU state not available: {:?}; VM state not available: {:?}; {} MSRs saved",
        header.host, body.vcpus[0].unsupported, body.vm.unsupported, body.vcpus[0].msrs.len()
    );
    assert!(r > 256, "the guest counted before the snapshot ({r})");
    let mem_counter = m
        .guest_memory()
        .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
        .unwrap();
    assert!(
        u64::from(mem_counter) == r || u64::from(mem_counter) + 1 == r,
        "memory {mem_counter} vs rbx {r}"
    );
    // Paused: no output while paused.
    let len_paused = console.bytes().len();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(console.bytes().len(), len_paused, "a paused guest ran");
    // The original resumes.
    m.resume();
    wait_for_output(&console, len_paused, 50);
    assert_consecutive(&console.bytes());

    let (a, ca) = restore_with_console(dir.path());
    let (b, cb) = restore_with_console(dir.path());
    for (name, mach) in [("A", &a), ("B", &b)] {
        let rm = mach.restore_metrics().expect("restore metrics");
        println!("clone {name} restore phases (us): {rm:?}");
    }
    wait_for_output(&ca, 0, 300);
    wait_for_output(&cb, 0, 300);
    for (name, mach, cons) in [("A", &a, &ca), ("B", &b, &cb)] {
        let out = cons.bytes();
        let first = out[0];
        assert!(
            first == r as u8 || first == (r as u8).wrapping_add(1),
            "clone {name} first output {first} does not continue from count {r}"
        );
        assert_consecutive(&out);
        // Snapshot the clone: its counter went on from r, in register and memory.
        let d = tempfile::tempdir().unwrap();
        mach.snapshot(d.path()).expect("snapshot of a clone");
        let rc = snapshot_rbx(d.path());
        let mc = mach
            .guest_memory()
            .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
            .unwrap();
        println!("clone {name}: count {rc} (snapshot at {r}), memory counter {mc}");
        assert!(rc > r + 200, "clone {name} did not count on: {rc} vs {r}");
        assert!(u64::from(mc) == rc || u64::from(mc) + 1 == rc);
        mach.resume();
    }
    for mach in [m, a, b] {
        mach.stop();
        let out = mach.wait();
        assert_eq!(out.exit, osso_vmm::ExitReason::Stopped);
        if out.metrics.boot_protocol == "restored" {
            assert!(out.metrics.restore.is_some());
        }
    }
}

/// (Rss, Pss, Private_Dirty) in KiB of the clone's guest RAM mapping.
fn smaps_of(m: &osso_vmm::Machine) -> (u64, u64, u64) {
    let u = osso_vmm::metrics::guest_mapping_usage(&m.guest_memory());
    (
        u.rss_bytes >> 10,
        u.pss_bytes >> 10,
        u.private_dirty_bytes >> 10,
    )
}

/// Reads every page of the clone's RAM (as a guest that uses its memory
/// would): makes the snapshot's pages resident in this clone's mapping.
fn touch_all(m: &osso_vmm::Machine, mib: u64) {
    let mem = m.guest_memory();
    let mut buf = vec![0u8; 4096];
    let mut a = 0;
    while a < mib << 20 {
        mem.read_slice(&mut buf, GuestAddress(a)).unwrap();
        a += 4096;
    }
}

#[test]
fn clones_share_the_snapshot_pages() {
    if !osso_testkit::require_kvm("clones_share_the_snapshot_pages") {
        return;
    }
    const MIB: u64 = 32;
    const FILLED: u64 = 24 << 20;
    let dir = tempfile::tempdir().unwrap();
    let console = Console::default();
    let builder = MachineBuilder::new(counter_config(&console, MIB)).unwrap();
    // 24 MiB of non-zero data above 1 MiB: what a booted kernel leaves.
    let pattern: Vec<u8> = (0..FILLED).map(|i| (i % 251) as u8 | 1).collect();
    builder
        .guest_memory()
        .write_slice(&pattern, GuestAddress(0x10_0000))
        .unwrap();
    let m = builder.start().unwrap();
    wait_for_output(&console, 0, 100);
    m.snapshot(dir.path()).unwrap();
    m.stop();
    let _ = m.wait();

    let (a, _ca) = restore_with_console(dir.path());
    touch_all(&a, MIB);
    let (rss_a1, pss_a1, pd_a1) = smaps_of(&a);
    let (b, _cb) = restore_with_console(dir.path());
    touch_all(&b, MIB);
    std::thread::sleep(Duration::from_millis(50));
    let (rss_a2, pss_a2, pd_a2) = smaps_of(&a);
    let (rss_b2, pss_b2, pd_b2) = smaps_of(&b);
    println!(
        "one clone: Rss {rss_a1} KiB, Pss {pss_a1} KiB, Private_Dirty {pd_a1} KiB; \
         two clones: A Rss {rss_a2} Pss {pss_a2} Private_Dirty {pd_a2}, B Rss {rss_b2} Pss {pss_b2} Private_Dirty {pd_b2} (KiB); \
         two clones together (Pss) {} KiB vs one {} KiB",
        pss_a2 + pss_b2,
        pss_a1
    );
    assert!(rss_a1 >= FILLED >> 10, "the clone's pages are resident");
    // Each clone owns only the pages it wrote.
    assert!(
        pd_a2 < 1024 && pd_b2 < 1024,
        "private pages: {pd_a2} {pd_b2} KiB"
    );
    // Two clones cost about one: the file pages are shared.
    assert!(
        pss_a2 + pss_b2 < pss_a1 + pss_a1 / 4,
        "two clones {} KiB vs one {pss_a1} KiB",
        pss_a2 + pss_b2
    );
    for mach in [a, b] {
        mach.stop();
        let _ = mach.wait();
    }
}

#[test]
fn a_machine_with_virtio_devices_is_refused_and_bad_snapshots_fail() {
    if !osso_testkit::require_kvm("a_machine_with_virtio_devices_is_refused_and_bad_snapshots_fail")
    {
        return;
    }
    // A snapshot of nothing: clear error.
    let empty = tempfile::tempdir().unwrap();
    let e = snapshot::restore(empty.path(), RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, SnapshotError::Io { .. }), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let console = Console::default();
    let m = MachineBuilder::new(counter_config(&console, 16))
        .unwrap()
        .start()
        .unwrap();
    wait_for_output(&console, 0, 10);
    m.snapshot(dir.path()).unwrap();
    m.stop();
    let _ = m.wait();
    // Truncated memory file.
    let mem = dir.path().join(snapshot::format::MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4 << 20).unwrap();
    let e = snapshot::restore(dir.path(), RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
    println!("{e}");
    // Corrupt state.
    let st = dir.path().join(snapshot::format::STATE_FILE);
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();
    f.set_len(16 << 20).unwrap();
    let e = snapshot::restore(dir.path(), RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e}");
    println!("{e}");
}

/// Pause, save and stop are requests each vCPU answers, the AP too (which
/// never leaves `KVM_RUN` by itself: it waits for a SIPI inside KVM).
#[test]
fn two_vcpus_pause_snapshot_resume_and_stop_while_parked() {
    if !osso_testkit::require_kvm("two_vcpus_pause_snapshot_resume_and_stop_while_parked") {
        return;
    }
    let console = Console::default();
    let mut cfg = counter_config(&console, 16);
    cfg.vcpus = 2;
    let m = MachineBuilder::new(cfg).unwrap().start().unwrap();
    wait_for_output(&console, 0, 10);

    m.pause(Duration::from_secs(30)).expect("both vCPUs park");
    assert!(m.is_paused());
    let paused_at = console.bytes().len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        console.bytes().len(),
        paused_at,
        "a paused guest writes nothing"
    );

    let dir = tempfile::tempdir().unwrap();
    m.snapshot(dir.path()).expect("snapshot of a paused VM");
    assert!(m.is_paused(), "a snapshot keeps the caller's pause");
    let (_, body) = snapshot::read_snapshot(dir.path()).unwrap();
    assert_eq!(body.vcpus.len(), 2, "each vCPU saved its own state");
    assert_eq!(console.bytes().len(), paused_at);

    m.resume();
    assert!(!m.is_paused());
    wait_for_output(&console, paused_at, 10);

    // Parked vCPUs wake for a stop: the VM ends without a resume.
    m.pause(Duration::from_secs(30)).unwrap();
    m.stop();
    let out = m.wait();
    assert_eq!(out.exit, osso_vmm::ExitReason::Stopped);
}
