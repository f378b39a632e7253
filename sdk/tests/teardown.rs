//! Dropping a `Vm` releases what it held: threads and file descriptors are
//! counted before and after (in a test binary of its own, its tests one at a
//! time, so no other test's VMs run meanwhile); with background teardown,
//! once the reaper thread is done. Tiny guests; SKIPPED without /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{fd_count, thread_count, tiny_kernel, Then};
use osso_sdk::Config;

/// The tests here count the process's threads and fds: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits up to 3 s (threads end asynchronously after their join handles
/// are dropped) until the process has at most `threads` threads and `fds`
/// fds again, and asserts it. At most, not exactly: the other test's libtest
/// thread, counted in the baseline if it was still exiting, may be gone.
fn assert_back_to(test: &str, threads: usize, fds: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while (thread_count() > threads || fd_count() > fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "{test}: threads {threads} -> {}, fds {fds} -> {}",
        thread_count(),
        fd_count()
    );
    assert!(
        thread_count() <= threads,
        "threads left behind: {threads} -> {}",
        thread_count()
    );
    assert!(
        fd_count() <= fds,
        "file descriptors left behind: {fds} -> {}",
        fd_count()
    );
}

#[test]
fn drop_releases_threads_and_fds() {
    if !osso_testkit::require_kvm("drop_releases") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "k", "spinning", Then::ReadyThenSpin);
    let cfg = || {
        Config::builder()
            .custom_image(kernel.clone(), None)
            .mem_mib(16)
            .forward(0, 80)
            .build()
    };
    // Warm up once so lazily created process-wide state is not counted.
    drop(osso_sdk::spawn(cfg()).expect("spawn"));
    let (threads, fds) = (thread_count(), fd_count());
    for _ in 0..5 {
        let vm = osso_sdk::spawn(cfg()).expect("spawn");
        assert!(
            thread_count() > threads,
            "a running VM has threads of its own"
        );
        assert_eq!(vm.forwards().len(), 1);
        drop(vm);
    }
    assert_back_to("drop_releases", threads, fds);
}

#[test]
fn background_teardown_releases_everything_once_the_reaper_is_done() {
    if !osso_testkit::require_kvm("background_teardown") {
        return;
    }
    // Not beside the other test: both count the process's threads and fds.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "k", "idle", Then::ReadyThenHalt);
    let cfg = || {
        Config::builder()
            .custom_image(kernel.clone(), None)
            .mem_mib(16)
            .background_teardown(true)
            .build()
    };
    // Warm up: the reaper thread itself is process-wide and stays.
    drop(osso_sdk::spawn(cfg()).expect("spawn"));
    assert!(osso_sdk::wait_for_background_teardown(Duration::from_secs(
        5
    )));
    let (threads, fds) = (thread_count(), fd_count());
    for _ in 0..5 {
        drop(osso_sdk::spawn(cfg()).expect("spawn"));
    }
    assert!(
        osso_sdk::wait_for_background_teardown(Duration::from_secs(10)),
        "the reaper finished"
    );
    assert_back_to("background_teardown", threads, fds);
}
