//! Spawn/teardown cycles through the public API with tiny guests: threads,
//! open file descriptors and RSS before and after, in a test binary of its own
//! so no other test's VMs disturb the counts. 200 cycles in CI; 1,000 (or
//! `OSSO_CYCLES`) on demand:
//!
//! ```text
//! cargo test -p osso-sdk --release --test cycles -- --ignored --nocapture
//! ```
//!
//! Each cycle alternates a guest that becomes ready and spins (stopped by the
//! drop) with one that becomes ready and resets itself (waited for, then
//! dropped); every VM has the user network with a host port forward, so the
//! network thread, its listener and the device's fds are counted too.
//! SKIPPED without /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{fd_count, thread_count, tiny_kernel, Then};
use osso_sdk::Config;

/// Resident set of this process, bytes (VmRSS).
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Waits for exiting threads to be gone (they end just after their join).
fn settle(threads: usize, fds: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while (thread_count(), fd_count()) != (threads, fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cycles(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let spin = tiny_kernel(dir.path(), "spin", "cycle", Then::ReadyThenSpin);
    let reset = tiny_kernel(dir.path(), "reset", "cycle", Then::ReadyThenReset);
    let cfg = |k: &std::path::Path| {
        Config::builder()
            .custom_image(k, None)
            .mem_mib(16)
            .forward(0, 80)
            .boot_timeout(Duration::from_secs(10))
            .build()
    };
    let one = |i: usize| {
        if i & 1 == 0 {
            let vm = osso_sdk::spawn(cfg(&spin)).expect("spawn");
            assert_eq!(vm.forwards().len(), 1);
            drop(vm);
        } else {
            let vm = osso_sdk::spawn(cfg(&reset)).expect("spawn");
            let exit = vm.wait_timeout(Duration::from_secs(10)).expect("ends");
            assert!(exit.guest_ended_by_itself(), "{exit}");
            drop(vm);
        }
    };
    // Warm-up: process-wide state created on first use is not a leak.
    for i in 0..10 {
        one(i);
    }
    let (threads, fds) = (thread_count(), fd_count());
    settle(threads, fds);
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let mut rss_mid = 0;
    for i in 0..n {
        one(i);
        if i + 1 == n / 2 {
            settle(threads, fds);
            rss_mid = rss_bytes();
        }
    }
    let elapsed = t0.elapsed();
    settle(threads, fds);
    let (threads1, fds1, rss1) = (thread_count(), fd_count(), rss_bytes());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "cycles: {n} spawn/teardown cycles in {:.1?} ({:.2} ms each): threads {threads} -> {threads1}, \
         fds {fds} -> {fds1}, RSS {:.1} MiB -> {:.1} MiB (half-way {:.1} MiB)",
        elapsed,
        elapsed.as_secs_f64() * 1e3 / n as f64,
        mib(rss0),
        mib(rss1),
        mib(rss_mid),
    );
    assert_eq!(threads1, threads, "threads left behind");
    assert_eq!(fds1, fds, "file descriptors left behind");
    // Noise: allocator caches. A leak of even 16 KiB a cycle would show as
    // several MiB between the half-way point and the end.
    assert!(
        rss1 <= rss0 + (16 << 20),
        "RSS grew {:.1} MiB over {n} cycles",
        mib(rss1.saturating_sub(rss0))
    );
    assert!(
        rss1 <= rss_mid + (4 << 20),
        "RSS still growing in the second half: {:.1} -> {:.1} MiB",
        mib(rss_mid),
        mib(rss1)
    );
}

#[test]
fn spawn_teardown_200_cycles_leave_nothing_behind() {
    if !osso_testkit::require_kvm("cycles") {
        return;
    }
    cycles(200);
}

#[test]
#[ignore = "1,000 cycles (about a minute): cargo test -p osso-sdk --release --test cycles -- --ignored"]
fn spawn_teardown_1000_cycles_leave_nothing_behind() {
    if !osso_testkit::require_kvm("cycles_1000") {
        return;
    }
    let n = std::env::var("OSSO_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    cycles(n);
}
