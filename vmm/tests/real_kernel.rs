//! The real Osso kernel booted under this machine's KVM (test layer 3). Slow
//! under PVM (about a minute), so it is `#[ignore]`d: run it with
//! `cargo test -p osso-vmm --test real_kernel -- --ignored --nocapture`.
//!
//! The kernel and initramfs come from `OSSO_KERNEL` / `OSSO_INITRD`, or the
//! first directory of `~/.cache/osso/images/` holding `vmlinux` and
//! `initramfs.cpio.gz`; without them (or without /dev/kvm) the test prints
//! SKIPPED, or fails under `OSSO_REQUIRE_E2E=1` (see `osso_testkit`).
//!
//! Under PVM the guest cannot run user space: `/init` dies on its first
//! system call, the kernel panics and (`panic=-1`) resets. The test checks the
//! banner, the hand-off line and a clean end; the boot timer, which needs
//! guest user space, goes through
//! `osso_testkit::require_guest_user_space`. On hardware KVM it also expects
//! the boot timer.

mod common;

use std::time::Duration;

use common::Console;

use osso_vmm::{ExitReason, VmConfig};

#[test]
#[ignore = "boots a real kernel: about a minute under PVM"]
fn osso_kernel_boots_to_init() {
    const T: &str = "osso_kernel_boots_to_init";
    if !osso_testkit::require_kvm(T) {
        return;
    }
    let Some((kernel, initrd)) = common::require_image(T) else {
        return;
    };
    let pvm = osso_testkit::Kvm::detect() == osso_testkit::Kvm::Pvm;
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
        // The rest needs guest user space: said as a skip (or a failure
        // under OSSO_REQUIRE_E2E=1 unless deferred to layer 5).
        osso_testkit::require_guest_user_space(
            "osso_kernel_boots_to_init: the boot timer and a clean reboot from user space",
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
