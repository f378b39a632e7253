//! Dropping a `Vm` releases what it held: threads and file descriptors are
//! counted before and after (in a test binary of its own, so no other test's
//! VMs run meanwhile). Tiny guests; SKIPPED without /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{fd_count, kvm_or_skip, thread_count, tiny_kernel, Then};
use osso_sdk::Config;

#[test]
fn drop_releases_threads_and_fds() {
    if !kvm_or_skip("drop_releases") {
        return;
    }
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
    // Threads end asynchronously after join handles are dropped; allow a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while (thread_count(), fd_count()) != (threads, fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "drop_releases: threads {threads} -> {}, fds {fds} -> {}",
        thread_count(),
        fd_count()
    );
    assert_eq!(thread_count(), threads, "threads left behind");
    assert_eq!(fd_count(), fds, "file descriptors left behind");
}
