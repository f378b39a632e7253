//! Bad host input through the SDK: each a clear error, the calling process
//! alive, and nothing left behind (threads, file descriptors, temporary
//! files), counted in a test binary of its own so no other test disturbs
//! the counts. Complements `api.rs` (sizes, vCPUs, missing files, TAP names,
//! garbage and empty kernels). SKIPPED without /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{fd_count, thread_count, tiny_elf, tiny_kernel, Then};
use osso_sdk::{Config, Error};

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    if !osso_testkit::require_kvm("bad_input") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_kernel(dir.path(), "good", "ok", Then::ReadyThenSpin);
    let random = dir.path().join("random");
    std::fs::write(&random, osso_testkit::noise(256 * 1024, 5)).unwrap();
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &tiny_elf("x", Then::Spin)[..100]).unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let tiny = |k: &std::path::Path| {
        Config::builder()
            .custom_image(k, None)
            .mem_mib(16)
            .boot_timeout(Duration::from_secs(5))
    };
    let cases: Vec<(Config, &str)> = vec![
        (tiny(&random).build(), "random"),
        (tiny(&truncated).build(), "truncated"),
        (tiny(&good).mem_mib(1).build(), "MiB"),
        (tiny(&good).mem_mib(u64::MAX).build(), "MiB"),
        (tiny(&good).cmdline("a\u{1}b").build(), "command line"),
        (tiny(&good).cmdline("a\nb").build(), "command line"),
        (
            tiny(&good).cmdline("z".repeat(1 << 20)).build(),
            "command line",
        ),
        (tiny(&good).forward(busy_port, 80).build(), "in use"),
        (
            Config::builder()
                .custom_image(&good, Some(dir.path().to_path_buf()))
                .mem_mib(16)
                .build(),
            "no such file",
        ),
        (tiny(&good).tap("0123456789abcdefg").build(), "TAP name"),
    ];
    // Warm up process-wide state (signal handler, lazily started pieces).
    drop(osso_sdk::spawn(tiny(&good).build()).expect("a good spawn"));
    let tmp_before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    let (threads, fds) = (thread_count(), fd_count());
    for round in 0..3 {
        for (cfg, needle) in &cases {
            let err = osso_sdk::spawn(cfg.clone()).expect_err(&format!("{cfg:?} must fail"));
            let text = err.to_string();
            assert!(
                text.to_lowercase().contains(&needle.to_lowercase()),
                "round {round}: {cfg:?}: {text}"
            );
            assert!(
                !matches!(err, Error::BootTimeout { .. }),
                "refused up front: {text}"
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while (thread_count(), fd_count()) != (threads, fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "bad_input: {} refusals; threads {threads} -> {}, fds {fds} -> {}",
        3 * cases.len(),
        thread_count(),
        fd_count()
    );
    assert_eq!(thread_count(), threads, "threads left behind");
    assert_eq!(fd_count(), fds, "file descriptors left behind");
    let tmp_after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| !tmp_before.contains(n))
        .filter(|n| n.to_string_lossy().starts_with(".tmp") || n.to_string_lossy().contains("osso"))
        .collect();
    assert!(tmp_after.is_empty(), "temporary files left: {tmp_after:?}");
    // And the process still spawns VMs.
    let vm = osso_sdk::spawn(tiny(&good).build()).expect("spawn after the bad input");
    assert!(vm.console().contains("ok"));
}
