//! The guest side of per-request jobs, end to end under QEMU TCG (which runs
//! guest user space on any machine): a job appended to the image's initramfs
//! is run by `/init`, and its stdout, stderr and exit status come back over the
//! console in the framing `osso_sdk::job` reads. Under Osso's own VMM this path
//! needs hardware KVM; the guest image and the framing are proven here.
//!
//! SKIPPED without a built image or QEMU, unless `OSSO_REQUIRE_E2E=1`
//! (`osso_testkit`).

use std::time::Duration;

#[test]
fn job_output_and_status_come_back_over_the_console() {
    const T: &str = "job_output_and_status_come_back_over_the_console";
    let Some(image) = osso_testkit::require(T, osso_guest::find_built()) else {
        return;
    };
    if !osso_guest::tools::on_path("qemu-system-x86_64") {
        return osso_testkit::skip_or_fail(
            T,
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)",
        );
    }
    let script = "echo \"hello from $(uname -s)\"\nls /osso\necho 'to stderr' >&2\nexit 7\n";
    let job = osso_sdk::job::prepare_from_file(image.initramfs(), script).expect("prepare job");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, &job.initrd).expect("write initrd");
    let run = osso_guest::qemu::boot_tcg(
        image.bzimage(),
        &initrd,
        "console=ttyS0 reboot=t panic=-1 quiet",
        Duration::from_secs(60),
        true,
    )
    .expect("start qemu");
    let text = run.text();
    let out = job
        .parse(&text)
        .unwrap_or_else(|e| panic!("{e}; console:\n{text}"));
    assert_eq!(
        out.stdout_text(),
        "hello from Linux\njob\n",
        "the nonce file is gone before the job runs"
    );
    assert_eq!(out.stderr_text(), "to stderr\n");
    assert_eq!(out.status, 7);
    assert!(
        run.status.is_some_and(|s| s.success()),
        "guest did not reboot by itself"
    );
}
