//! The SDK through its public API, with tiny guests (a few dozen bytes of code
//! in an ELF with a PVH note, see `common`): spawn, ready, console, metrics,
//! exit, many VMs from many threads, timeouts, bad configurations.
//! Under any KVM (tiny guests need no guest kernel); SKIPPED without /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::{tiny_kernel, Then};
use osso_sdk::ExitReason;
use osso_sdk::{Config, Error, ReadyWhen};

fn tiny(dir: &std::path::Path, name: &str, msg: &str, then: Then) -> osso_sdk::ConfigBuilder {
    Config::builder()
        .custom_image(tiny_kernel(dir, name, msg, then), None)
        .mem_mib(16)
        .boot_timeout(Duration::from_secs(10))
}

#[test]
fn spawn_waits_for_ready_and_reports_console_metrics_and_exit() {
    if !osso_testkit::require_kvm("spawn_waits_for_ready") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = osso_sdk::spawn(
        tiny(
            dir.path(),
            "k",
            "hello from a tiny guest",
            Then::ReadyThenReset,
        )
        .build(),
    )
    .expect("spawn");
    let m = vm.metrics();
    let total = m.boot.total_us.expect("ready was recorded");
    let setup = m.boot.vmm_setup_us.expect("first KVM_RUN was recorded");
    assert!(setup <= total, "setup {setup} us after ready {total} us");
    assert_eq!(m.guest_mem_bytes, 16 << 20);
    assert!(m.image.kernel_bytes > 0 && m.image.initramfs_bytes == 0);
    let exit = vm.wait();
    assert_eq!(
        exit.reason,
        ExitReason::Reset,
        "the i8042 reset ends the VM"
    );
    assert!(exit.guest_ended_by_itself());
    assert!(
        vm.console().contains("hello from a tiny guest"),
        "console: {}",
        vm.console().text()
    );
    assert_eq!(vm.metrics().exit.as_deref(), Some("reset"));
    let line = vm.metrics().to_string();
    assert!(line.starts_with("boot ") && !line.contains('\n'), "{line}");
    // Image preparation is its own phase, and the VMM's RSS is this VM's
    // growth over the baseline taken before the VMM started.
    assert!(m.boot.image_prepare_us.is_some(), "{m:?}");
    assert!(line.contains("image prepared in"), "{line}");
    assert!(m.rss_baseline_bytes > 0, "{m:?}");
    assert!(m.process_rss_bytes >= m.vmm_rss_bytes, "{m:?}");
}

/// A prebuilt image directory (`Config::image_dir`): its manifest checked,
/// its vmlinux booted, its sizes reported; a broken one refused before any
/// VM starts, naming the directory.
#[test]
fn spawn_boots_a_checked_image_directory() {
    if !osso_testkit::require_kvm("spawn_boots_a_checked_image_directory") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("image");
    let mut m = osso_guest::image_dir::write_fake_image_dir(&dir).unwrap();
    let kernel = tiny_kernel(
        &dir,
        "vmlinux",
        "booted from an image dir",
        Then::ReadyThenReset,
    );
    m.vmlinux_bytes = std::fs::metadata(&kernel).unwrap().len();
    m.vmlinux_sha256 = osso_guest::cache::sha256_file(&kernel).unwrap();
    std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
    let config = || {
        Config::builder()
            .image_dir(&dir)
            .mem_mib(16)
            .boot_timeout(Duration::from_secs(10))
            .build()
    };
    let vm = osso_sdk::spawn(config()).expect("spawn from the image directory");
    vm.wait();
    assert!(
        vm.console().contains("booted from an image dir"),
        "{}",
        vm.console().text()
    );
    let metrics = vm.metrics();
    assert_eq!(metrics.image.kernel_bytes, m.vmlinux_bytes);
    assert_eq!(metrics.image.initramfs_bytes, m.initramfs_bytes);
    assert_eq!(metrics.image.bzimage_bytes, Some(m.bzimage_bytes));
    drop(vm);
    // One byte changed, same size: the checksum no longer matches.
    let mut body = std::fs::read(&kernel).unwrap();
    let last = body.len() - 1;
    body[last] ^= 0xff;
    std::fs::write(&kernel, body).unwrap();
    match osso_sdk::spawn(config()) {
        Err(e @ Error::ImageDir { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&dir.display().to_string()), "{text}");
            assert!(text.contains("vmlinux: sha256"), "{text}");
        }
        other => panic!("expected Error::ImageDir, got {other:?}"),
    }
}

#[test]
fn eight_vms_from_eight_threads_each_with_its_own_console_and_metrics() {
    if !osso_testkit::require_kvm("eight_vms") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let cfg = tiny(
                    &path,
                    &format!("k{i}"),
                    &format!("I am VM number {i}"),
                    Then::ReadyThenSpin,
                )
                .build();
                let vm = osso_sdk::spawn(cfg).expect("spawn");
                let m = vm.metrics();
                let rx = vm.console().subscribe();
                let text = vm.console().text();
                let exit = vm.kill();
                drop(rx);
                (i, text, m, exit)
            })
        })
        .collect();
    for h in handles {
        let (i, text, m, exit) = h.join().expect("thread");
        assert!(
            text.contains(&format!("I am VM number {i}")),
            "VM {i}: {text}"
        );
        for j in (0..8).filter(|&j| j != i) {
            assert!(
                !text.contains(&format!("number {j}")),
                "VM {i} saw VM {j}'s console"
            );
        }
        assert!(m.boot.total_us.is_some(), "VM {i} became ready");
        assert_eq!(exit.reason, ExitReason::Stopped);
    }
}

#[test]
fn boot_timeout_stops_a_guest_that_never_gets_ready() {
    if !osso_testkit::require_kvm("boot_timeout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let err = osso_sdk::spawn(
        tiny(dir.path(), "k", "never ready", Then::Spin)
            .boot_timeout(Duration::from_millis(300))
            .build(),
    )
    .expect_err("must time out");
    assert!(matches!(err, Error::BootTimeout { .. }), "{err}");
    assert!(
        err.to_string().contains("never ready"),
        "the error shows the console: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "timed out promptly: {:?}",
        t.elapsed()
    );
}

#[test]
fn kernel_panic_then_reset_is_reported_as_a_panic() {
    if !osso_testkit::require_kvm("kernel_panic") {
        return;
    }
    // What a kernel with panic=-1 does: the panic line, then an immediate reset.
    let dir = tempfile::tempdir().unwrap();
    let vm = osso_sdk::spawn(
        tiny(
            dir.path(),
            "k",
            "Kernel panic - not syncing: x",
            Then::ReadyThenReset,
        )
        .build(),
    )
    .expect("spawn");
    let exit = vm.wait();
    assert_eq!(exit.reason, ExitReason::Panic, "{exit}");
    assert!(exit.panicked());
    assert!(!exit.guest_ended_by_itself(), "a panic is not a clean exit");
    assert_eq!(vm.metrics().exit.as_deref(), Some("guest kernel panic"));
    // The same guest without the panic line is a clean reset.
    let vm = osso_sdk::spawn(tiny(dir.path(), "k2", "all good", Then::ReadyThenReset).build())
        .expect("spawn");
    let exit = vm.wait();
    assert_eq!(exit.reason, ExitReason::Reset);
    assert!(!exit.panicked());
}

#[test]
fn lifetime_ends_a_running_guest_with_reason_timeout() {
    if !osso_testkit::require_kvm("lifetime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = osso_sdk::spawn(
        tiny(dir.path(), "k", "spin", Then::Spin)
            .ready_when(ReadyWhen::ConsoleLine("spin".into()))
            .lifetime(Duration::from_millis(300))
            .build(),
    )
    .expect("spawn");
    let exit = vm
        .wait_timeout(Duration::from_secs(5))
        .expect("ended within 5 s");
    assert_eq!(exit.reason, ExitReason::Timeout);
    assert!(!exit.guest_ended_by_itself());
}

#[test]
fn try_wait_and_wait_timeout_are_child_like() {
    if !osso_testkit::require_kvm("try_wait") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = osso_sdk::spawn(
        tiny(dir.path(), "k", "spin", Then::Spin)
            .ready_when(ReadyWhen::ConsoleLine("spin".into()))
            .build(),
    )
    .expect("spawn");
    // The guest spins for ever: nothing to report, however long we wait.
    assert!(vm.try_wait().is_none());
    assert!(vm.wait_timeout(Duration::from_millis(50)).is_none());
    assert!(!vm.has_ended());
    let killed = vm.kill();
    let after = vm.try_wait().expect("ended once killed");
    assert_eq!(after.reason, killed.reason);
    assert!(!after.guest_ended_by_itself());
    assert_eq!(
        vm.wait_timeout(Duration::ZERO).map(|e| e.reason),
        Some(killed.reason)
    );
}

#[test]
fn bad_configurations_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kernel");
    let garbage = dir.path().join("garbage");
    std::fs::write(
        &garbage,
        b"this is not a kernel at all, neither ELF nor bzImage",
    )
    .unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let cases: Vec<(Config, &str)> = vec![
        (Config::builder().mem_mib(0).build(), "MiB"),
        (Config::builder().mem_mib(1 << 40).build(), "MiB"),
        (Config::builder().vcpus(0).build(), "vCPU"),
        (
            Config::builder().custom_image(&missing, None).build(),
            "no such file",
        ),
        (Config::builder().tap("a/b").build(), "TAP name"),
        (Config::builder().tap("").build(), "TAP name"),
        (
            Config::builder()
                .no_network()
                .ready_when(ReadyWhen::GuestPing)
                .build(),
            "user network",
        ),
        (
            Config::builder().boot_timeout(Duration::ZERO).build(),
            "timeout",
        ),
    ];
    for (cfg, needle) in cases {
        let err = osso_sdk::spawn(cfg.clone()).expect_err(&format!("{cfg:?} must fail"));
        assert!(err.to_string().contains(needle), "{cfg:?}: {err}");
    }
    if !osso_testkit::require_kvm("bad_kernels") {
        return;
    }
    for k in [&garbage, &empty] {
        let err = osso_sdk::spawn(Config::builder().custom_image(k, None).mem_mib(16).build())
            .expect_err("a bad kernel must fail");
        assert!(matches!(err, Error::Vmm(_)), "{err}");
        assert!(
            err.to_string().contains(&k.display().to_string()),
            "names the file: {err}"
        );
    }
}

/// `run` under hardware KVM runs a real job in a fresh VM and brings back
/// its stdout and exit status; under any other KVM (or none) it refuses at
/// once, before booting anything.
#[test]
fn run_runs_a_job_on_hardware_kvm_and_refuses_at_once_elsewhere() {
    const T: &str = "run_runs_a_job_on_hardware_kvm_and_refuses_at_once_elsewhere";
    if osso_testkit::Kvm::detect() != osso_testkit::Kvm::Hardware {
        let t = Instant::now();
        let err = osso_sdk::run(osso_sdk::Job::new("true")).expect_err("no guest user space here");
        assert!(matches!(err, Error::NoGuestUserSpace), "{err}");
        assert!(t.elapsed() < Duration::from_millis(500), "failed at once");
        return;
    }
    // The built image, named explicitly: never a build hidden in a test.
    let Some(image) = osso_testkit::require(T, osso_guest::find_built()) else {
        return;
    };
    let mut job = osso_sdk::Job::new("echo ran; exit 3");
    job.config = Config::builder()
        .custom_image(image.vmlinux(), Some(image.initramfs().to_path_buf()))
        .build();
    let done = osso_sdk::run(job).expect("the job runs");
    assert_eq!(done.output.stdout_text(), "ran\n");
    assert_eq!(done.output.stderr_text(), "");
    assert_eq!(done.output.status, 3);
}
