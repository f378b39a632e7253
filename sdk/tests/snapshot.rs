//! Snapshots through the SDK with tiny guests (see `common`): `Vm::snapshot`,
//! `osso_sdk::restore`, the warm `Pool`, restore metrics, bad snapshots.
//! The real kernel restored and pinged is `examples/restore.rs` (run by
//! `scripts/test.sh`) and osso-vmm's `snapshot_real_kernel` test.
//! Under any KVM; SKIPPED without /dev/kvm.

mod common;

use std::time::Duration;

use common::{fd_count, thread_count, tiny_kernel, Then};
use osso_sdk::ExitReason;
use osso_sdk::{Config, Error, Pool, ReadyWhen};
use osso_vmm::snapshot::format::{MEMORY_FILE, STATE_FILE};

/// The tests here run one at a time: the pool test counts this process's
/// threads and fds, which VMs of a test running beside it would change.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn idle_guest(dir: &std::path::Path) -> osso_sdk::ConfigBuilder {
    Config::builder()
        .custom_image(
            tiny_kernel(dir, "k", "tiny guest up", Then::ReadyThenHalt),
            None,
        )
        .mem_mib(16)
        .boot_timeout(Duration::from_secs(10))
}

#[test]
fn a_snapshot_restores_into_clones_that_run_and_report_restore_metrics() {
    if !osso_testkit::require_kvm("a_snapshot_restores_into_clones") {
        return;
    }
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let config = idle_guest(dir.path()).no_network().build();
    let vm = osso_sdk::spawn(config.clone()).expect("spawn");
    vm.snapshot(&snap).expect("snapshot");
    assert!(!vm.is_restored());
    assert!(vm.metrics().restore.is_none());
    // The original runs on after the snapshot.
    assert!(
        vm.wait_timeout(Duration::from_millis(100)).is_none(),
        "the snapshotted VM goes on"
    );
    assert!(snap.join(STATE_FILE).is_file() && snap.join(MEMORY_FILE).is_file());

    let a = osso_sdk::restore(&snap, config.clone()).expect("restore a");
    let b = osso_sdk::restore(&snap, config).expect("restore b");
    for clone in [&a, &b] {
        assert!(clone.is_restored());
        let m = clone.metrics();
        let r = m.restore.as_ref().expect("restore figures");
        assert_eq!(r.snapshot, snap);
        assert!(r.phases.total_us > 0, "{r:?}");
        assert!(
            r.phases.total_us
                >= r.phases.read_state_us + r.phases.map_memory_us + r.phases.vcpus_us,
            "the phases add up to at most the whole: {r:?}"
        );
        let first = r.first_run_us.expect("the clone's vCPU ran");
        let ready = r.ready_us.expect("ready was recorded");
        assert!(first <= ready, "{r:?}");
        assert_eq!(m.ready_us, Some(ready));
        assert_eq!(m.boot_protocol, "restored", "known while it runs");
        assert_eq!(m.guest_mem_bytes, 16 << 20, "RAM size from the snapshot");
        assert!(m.to_string().contains("restored in "), "{}", m.to_string());
        assert!(
            clone.wait_timeout(Duration::from_millis(50)).is_none(),
            "the clone idles on (halted guest), it does not end"
        );
    }
    // A clone snapshotted into the very directory it came from (the files
    // are replaced by rename): it and its sibling keep running on their
    // pages, and the new snapshot restores.
    a.snapshot(&snap)
        .expect("snapshot a clone over its own snapshot");
    let c = osso_sdk::restore(&snap, idle_guest(dir.path()).no_network().build())
        .expect("restore the new snapshot");
    for v in [&a, &b, &c] {
        assert!(
            !v.has_ended(),
            "a clone died when its snapshot was replaced"
        );
    }
    // A VM the caller paused stays paused through a snapshot.
    c.pause().expect("pause");
    c.snapshot(dir.path().join("snap2"))
        .expect("snapshot a paused VM");
    assert!(c.is_paused());
    c.resume();
    assert!(!c.is_paused());
    assert_eq!(c.kill().reason, ExitReason::Stopped);

    // A clone does not re-run the boot: its console starts empty.
    assert!(
        !a.console().contains("tiny guest up"),
        "{}",
        a.console().text()
    );
    assert!(vm.console().contains("tiny guest up"));
    for v in [&a, &b, &vm] {
        assert_eq!(v.kill().reason, ExitReason::Stopped);
    }
    assert_eq!(
        a.metrics().boot_protocol,
        "restored",
        "the run says it was restored"
    );
}

#[test]
fn restore_refuses_missing_corrupt_and_truncated_snapshots() {
    if !osso_testkit::require_kvm("restore_refuses_bad_snapshots") {
        return;
    }
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = idle_guest(dir.path()).no_network().build();
    let missing = osso_sdk::restore(dir.path().join("nope"), config.clone()).unwrap_err();
    assert!(matches!(missing, Error::Snapshot(_)), "{missing}");

    let snap = dir.path().join("snap");
    let vm = osso_sdk::spawn(config.clone()).unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let (state, memory) = (snap.join(STATE_FILE), snap.join(MEMORY_FILE));

    // Truncated memory file.
    let len = std::fs::metadata(&memory).unwrap().len();
    let keep = std::fs::read(&memory).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = osso_sdk::restore(&snap, config.clone()).unwrap_err();
    assert!(
        matches!(e, Error::Snapshot(_)) && e.to_string().contains("truncated"),
        "{e}"
    );
    std::fs::write(&memory, &keep).unwrap();
    osso_sdk::restore(&snap, config.clone())
        .expect("the repaired snapshot restores")
        .kill();

    // Corrupt state file.
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad.truncate(mid);
    std::fs::write(&state, &bad).unwrap();
    let e = osso_sdk::restore(&snap, config.clone()).unwrap_err();
    assert!(matches!(e, Error::Snapshot(_)), "{e}");
    std::fs::write(&state, &good).unwrap();

    // Readiness by ping needs a network the snapshot does not have.
    let ping = Config {
        ready: ReadyWhen::GuestPing,
        network: osso_sdk::Network::default(),
        ..config
    };
    let e = osso_sdk::restore(&snap, ping).unwrap_err();
    assert!(e.to_string().contains("no network device"), "{e}");
}

#[test]
fn a_snapshot_with_a_network_device_needs_a_network_to_restore() {
    if !osso_testkit::require_kvm("a_snapshot_with_a_network_device") {
        return;
    }
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let config = idle_guest(dir.path()).build(); // user network
    let vm = osso_sdk::spawn(config.clone()).unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);
    let none = Config {
        network: osso_sdk::Network::None,
        ..config.clone()
    };
    let e = osso_sdk::restore(&snap, none).unwrap_err();
    assert!(e.to_string().contains("network"), "{e}");
    // With a user network, each clone gets its own: forwards bind apart.
    let fwd = Config {
        network: osso_sdk::Network::User {
            forwards: vec![(0, 80)],
            allowed_host_ports: vec![],
        },
        ..config
    };
    let a = osso_sdk::restore(&snap, fwd.clone()).expect("restore with a network");
    let b = osso_sdk::restore(&snap, fwd).expect("restore with a network");
    assert_eq!((a.forwards().len(), b.forwards().len()), (1, 1));
    assert_ne!(a.forwards()[0], b.forwards()[0]);
}

#[test]
fn a_warm_pool_hands_out_ready_clones_and_cleans_up() {
    if !osso_testkit::require_kvm("a_warm_pool_hands_out_ready_clones") {
        return;
    }
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = idle_guest(dir.path()).no_network().build();
    let (threads0, fds0) = (thread_count(), fd_count());
    {
        let pool = Pool::boot(config.clone(), 2).expect("pool");
        let cold = pool.template_metrics().expect("the template's figures");
        assert!(cold.boot.total_us.is_some(), "the template booted cold");
        assert!(cold.restore.is_none());
        assert_eq!(pool.wait_ready(2, Duration::from_secs(10)).unwrap(), 2);
        let snapshot = pool.snapshot_dir().to_path_buf();
        assert!(snapshot.is_dir());
        // Three requests: two from the pool, one restored on the spot.
        let vms: Vec<_> = (0..3).map(|_| pool.take().expect("a clone")).collect();
        for v in &vms {
            assert!(v.is_restored() && !v.has_ended());
            assert!(v.metrics().restore.unwrap().ready_us.is_some());
        }
        // The pool refills behind the requests.
        assert_eq!(pool.wait_ready(2, Duration::from_secs(10)).unwrap(), 2);
        // A second pool from the same snapshot directory.
        let again = Pool::from_snapshot(&snapshot, config.clone(), 1).unwrap();
        again.take().unwrap().kill();
        drop(again);
        drop(pool);
        assert!(!snapshot.exists(), "the pool's own snapshot goes with it");
        // Clones handed out outlive the pool.
        for v in &vms {
            assert!(!v.has_ended());
        }
    }
    // Everything released: threads and fds back (allow the test harness a little).
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        thread_count() <= threads0 + 1,
        "threads {threads0} -> {}",
        thread_count()
    );
    assert!(fd_count() <= fds0 + 2, "fds {fds0} -> {}", fd_count());
    // A pool over a snapshot that is not one fails at once.
    let e = Pool::from_snapshot(dir.path(), config, 1).unwrap_err();
    assert!(matches!(e, Error::Snapshot(_)), "{e}");
}

#[test]
fn a_warm_pool_replaces_clones_that_ended_while_waiting() {
    if !osso_testkit::require_kvm("a_warm_pool_replaces_clones_that_ended") {
        return;
    }
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    // The template has no lifetime: however slow this host, it cannot end
    // before its snapshot is taken.
    let template = osso_sdk::spawn(idle_guest(dir.path()).no_network().build()).expect("template");
    template.snapshot(&snap).expect("snapshot");
    drop(template);
    // Every clone lives 300 ms from the start of its own restore: those
    // waiting in the pool end and must be replaced by fresh ones.
    let clones = idle_guest(dir.path())
        .no_network()
        .lifetime(Duration::from_millis(300))
        .build();
    let pool = Pool::from_snapshot(&snap, clones.clone(), 2).expect("pool");
    assert_eq!(pool.wait_ready(2, Duration::from_secs(10)).unwrap(), 2);
    for round in 0..3 {
        // A witness restored now ends after every clone already waiting in
        // the pool (each ends 300 ms after its restore began, and theirs
        // began before this one): once it has ended, so have they. Waiting
        // for that event, not for a fixed time, holds at any CPU speed.
        let witness = osso_sdk::restore(&snap, clones.clone()).expect("a witness clone");
        let exit = witness.wait();
        assert_eq!(
            exit.reason,
            ExitReason::Timeout,
            "round {round}: the witness ended by its lifetime"
        );
        // The refill thread prunes the ended clones and restores new ones.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.ready_count() < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            pool.ready_count() >= 1,
            "round {round}: the pool did not replace its ended clones"
        );
        let vm = pool.take().expect("a clone");
        assert!(
            !vm.has_ended(),
            "round {round}: take handed out an ended clone"
        );
    }
}
