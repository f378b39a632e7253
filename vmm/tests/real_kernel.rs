//! The real Osso kernel booted under this machine's KVM (test layer 3). Slow
//! under PVM (about a minute), so it is `#[ignore]`d: run it with
//! `cargo test -p osso-vmm --test real_kernel -- --ignored --nocapture`.
//!
//! The kernel and initramfs come from `OSSO_KERNEL` / `OSSO_INITRD`, or the
//! first directory of `~/.cache/osso/images/` holding `vmlinux` and
//! `initramfs.cpio.gz`; without them the test prints SKIPPED.
//!
//! Under PVM the guest cannot run user space: `/init` dies on its first
//! system call, the kernel panics and (`panic=-1`) resets. The test checks the
//! banner, the hand-off line and a clean end, and says it could not check the
//! boot timer. On hardware KVM it also expects the boot timer.

mod common;

use std::time::Duration;

use common::Console;

use osso_vmm::{ExitReason, VmConfig};

/// Prints SKIPPED, or fails where the project's test command requires this
/// layer (`OSSO_REQUIRE_E2E=1`).
fn skip_or_fail(reason: &str) {
    if std::env::var("OSSO_REQUIRE_E2E").as_deref() == Ok("1") {
        panic!("required layer cannot run: {reason}");
    }
    println!("SKIPPED: {reason}");
}

#[test]
#[ignore = "boots a real kernel: about a minute under PVM"]
fn osso_kernel_boots_to_init() {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip_or_fail("/dev/kvm does not exist on this host");
        return;
    }
    let Some((kernel, initrd)) = common::find_image() else {
        skip_or_fail("no Osso image (set OSSO_KERNEL and OSSO_INITRD, or build one)");
        return;
    };
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let console = Console::default();
    let mut cfg = VmConfig::kernel(kernel, Some(initrd));
    cfg.console = Box::new(console.clone());
    cfg.timeout = Some(Duration::from_secs(600));
    let out = osso_vmm::run(cfg).expect("machine runs");
    let text = console.text();
    println!("metrics: {:?}", out.metrics);
    assert!(text.contains("Linux version"), "no banner:\n{text}");
    assert!(
        text.contains("Run /init as init process"),
        "no hand-off:\n{text}"
    );
    assert!(out.metrics.init_started_us.is_some());
    assert_eq!(out.metrics.boot_protocol, "pvh");
    if pvm {
        assert!(text.contains("noxsave clearcpuid=cx16,popcnt,smap nosmap"));
        // init dies on its first syscall, the kernel panics, panic=-1
        // resets: reported as a panic, with the time of the panic line.
        assert_eq!(out.exit, ExitReason::Panic, "panic=-1 resets:\n{text}");
        assert!(out.metrics.kernel_panic_us.is_some());
        println!(
            "NOT CHECKED: the boot timer and a clean reboot from user space \
             (this host's KVM is PVM, which cannot run guest user space)"
        );
    } else {
        assert!(!text.contains("noxsave"));
        assert!(out.exit.guest_ended_by_itself(), "{}", out.exit);
        assert!(
            out.metrics.boot_timer_us.is_some(),
            "init wrote the boot timer"
        );
    }
}
