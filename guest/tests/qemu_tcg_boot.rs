//! End to end, real: the built Osso image boots under QEMU with software
//! emulation (TCG, no KVM) and user networking; its `/init` pings the gateway
//! 10.0.2.2 (QEMU's user-mode network, inside the QEMU process), prints
//! `SUCCESS: ONLINE`, and reboots the guest, which ends QEMU (`-no-reboot`).
//! This proves the kernel config, Toybox and `/init` together.
//!
//! Needs a built image (`cargo run -p osso-guest --release -- build`) and
//! `qemu-system-x86_64`. Without them the test says SKIPPED, unless
//! `OSSO_REQUIRE_E2E=1` (set by the project's test command), where it fails.
//! The rule is `osso_testkit`'s.

use std::time::Duration;

/// The built image, or None (after `osso_testkit::skip_or_fail` for the
/// check `check`) when it or QEMU is missing.
fn image_and_qemu(check: &str) -> Option<osso_guest::Image> {
    let image = osso_testkit::require(check, osso_guest::find_built())?;
    if !osso_guest::tools::on_path("qemu-system-x86_64") {
        osso_testkit::skip_or_fail(
            check,
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
        );
        return None;
    }
    Some(image)
}

#[test]
fn with_osso_stay_init_stays_up_after_ready() {
    let Some(image) = image_and_qemu("with_osso_stay_init_stays_up_after_ready") else {
        return;
    };
    // Ready takes about 2 s under TCG here; then init must not end the VM.
    let limit = Duration::from_secs(20);
    let run = osso_guest::qemu::boot_tcg(
        image.bzimage(),
        image.initramfs(),
        "console=ttyS0 reboot=t panic=-1 osso.stay",
        limit,
        false,
    )
    .expect("start qemu-system-x86_64");
    let text = run.text();
    assert!(text.contains("SUCCESS: ONLINE"), "not online:\n{text}");
    assert!(
        text.contains("osso: ready, staying up (osso.stay)"),
        "init did not stay:\n{text}"
    );
    assert!(!text.contains("rebooting"), "init rebooted:\n{text}");
    assert!(
        run.status.is_none(),
        "the guest ended ({:?}) instead of staying up:\n{text}",
        run.status
    );
}

#[test]
fn image_boots_under_qemu_tcg_and_goes_online() {
    let Some(image) = image_and_qemu("image_boots_under_qemu_tcg_and_goes_online") else {
        return;
    };
    let limit = Duration::from_secs(60);
    let run = osso_guest::qemu::boot_tcg(
        image.bzimage(),
        image.initramfs(),
        "console=ttyS0 reboot=t panic=-1",
        limit,
        true,
    )
    .expect("start qemu-system-x86_64");
    let text = run.text();
    let status = run
        .status
        .unwrap_or_else(|| panic!("guest still running after {limit:?}; console:\n{text}"));
    assert!(
        text.contains("Run /init as init process"),
        "no /init hand-off:\n{text}"
    );
    assert!(
        text.contains("SUCCESS: ONLINE"),
        "guest did not report ONLINE:\n{text}"
    );
    assert!(
        !text.contains("Kernel panic"),
        "guest kernel panicked:\n{text}"
    );
    assert!(
        text.contains("osso: init done, rebooting"),
        "init did not reach its end:\n{text}"
    );
    assert!(status.success(), "qemu exited with {status}");
    eprintln!(
        "qemu_tcg_boot: ONLINE and rebooted in {:.2}s (QEMU TCG, bzImage)",
        run.elapsed.as_secs_f64()
    );
}
