//! The SDK end to end with the real Osso image and its guest user space:
//! readiness by the boot timer, the default readiness, jobs (`run`: output,
//! exit status, 1 MiB of output, timeout), snapshots restored into clones,
//! and the warm pool.
//!
//! Needs a KVM that runs guest user space (hardware KVM, or the nested KVM of
//! layer 5): under PVM these checks say SKIPPED (or fail under
//! `OSSO_REQUIRE_E2E=1`, unless `OSSO_DEFER_USERSPACE=1` defers them to layer
//! 5), see `osso_testkit::require_guest_user_space`. The image comes from
//! `OSSO_KERNEL` / `OSSO_INITRD` (the test command sets them from the image
//! manifest), else from the guest build cache (`osso_guest::find_built`: `OSSO_IMAGE_DIR`, else the sources' cache keys); none is
//! built here.
//!
//! Deadlines are generous (minutes): under nested KVM everything runs about
//! fifty times slower than on hardware. The tests wait for events (the boot
//! timer, console lines, ping replies, the VM's end), never for fixed sleeps,
//! and run one at a time (they share this process's threads and file
//! descriptors, and a one-vCPU nested machine gains nothing from overlap).
//!
//! Network: the only traffic is between a guest and its own VMM's user-mode
//! stack (the guest pings its gateway 10.0.2.2; the host pings the guest
//! through that stack). Nothing leaves the process.

use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use osso_sdk::ExitReason;
use osso_sdk::{Config, ConfigBuilder, Error, HostKvm, Image, Job, Pool, ReadyWhen, Vm};

/// A cold boot to ready, a restore to ready, a ping's answer: each within
/// this (nested KVM boots in about 5 s; hardware in well under one).
const BOOT: Duration = Duration::from_secs(300);

/// What the image's `/init` prints once it reached its gateway.
const ONLINE: &str = "SUCCESS: ONLINE";
/// What `/init` prints after readiness with `osso.stay`, before it sleeps.
const STAYING: &str = "osso: ready, staying up (osso.stay)";
/// What `/init` prints before it reboots (without `osso.stay`).
const INIT_DONE: &str = "osso: init done, rebooting";

/// One test at a time (see the module docs).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The image's kernel (ELF vmlinux) and initramfs.
#[derive(Clone)]
struct TestImage {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl TestImage {
    fn image(&self) -> Image {
        Image::Custom {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
        }
    }

    /// The default configuration with this image and the generous boot timeout.
    fn config(&self) -> ConfigBuilder {
        Config::builder()
            .custom_image(self.kernel.clone(), Some(self.initrd.clone()))
            .boot_timeout(BOOT)
    }
}

/// Whether `check` can run here (a KVM that runs guest user space, and the
/// image); otherwise it says SKIPPED (or fails, as `osso_testkit` rules).
fn prerequisites(check: &str) -> Option<TestImage> {
    if !osso_testkit::require_guest_user_space(check) {
        return None;
    }
    let found = match (
        std::env::var_os("OSSO_KERNEL"),
        std::env::var_os("OSSO_INITRD"),
    ) {
        (Some(kernel), Some(initrd)) => Ok(TestImage {
            kernel: kernel.into(),
            initrd: initrd.into(),
        }),
        _ => osso_guest::find_built()
            .map(|i| TestImage {
                kernel: i.vmlinux().to_path_buf(),
                initrd: i.initramfs().to_path_buf(),
            })
            .map_err(|e| {
                format!(
                    "no Osso image (set OSSO_KERNEL and OSSO_INITRD, or build one with \
                     `cargo run -p osso-guest --release -- build`): {e}"
                )
            }),
    };
    osso_testkit::require(check, found)
}

/// Waits until a console line of `vm` contains `needle`; false if `within`
/// passes or the console ends (the VM is gone) first.
fn wait_for_line(vm: &Vm, needle: &str, within: Duration) -> bool {
    // Subscribed before looking: a line is either captured already or comes
    // through the stream.
    let lines = vm.console().subscribe();
    if vm.console().contains(needle) {
        return true;
    }
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return true,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return vm.console().contains(needle)
            }
        }
    }
}

/// Pings the guest through its own user network (from its gateway) until it
/// answers or `within` passes; each echo waits up to 5 s for its reply.
fn answers(vm: &Vm, first_seq: u16, within: Duration) -> Result<Duration, String> {
    let deadline = Instant::now() + within;
    let mut seq = first_seq;
    let mut last = String::from("no ping sent");
    while Instant::now() < deadline && !vm.has_ended() {
        match vm.ping(seq, Duration::from_secs(5)) {
            Ok(rtt) => return Ok(rtt),
            Err(e) => last = e.to_string(),
        }
        seq = seq.wrapping_add(1);
    }
    Err(format!(
        "no answer within {within:?} (ended: {}): {last}",
        vm.has_ended()
    ))
}

/// The last lines of a VM's console, for failure messages.
fn tail(vm: &Vm) -> String {
    vm.console().tail(40)
}

#[test]
fn boot_timer_spawn_to_ready() {
    const T: &str = "boot_timer_spawn_to_ready";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    let called = Instant::now();
    let vm = osso_sdk::spawn(
        image
            .config()
            .cmdline("osso.stay")
            // The kernel's log on: the `Run /init` line is checked below.
            .kernel_log(true)
            .ready_when(ReadyWhen::BootTimer)
            .build(),
    )
    .expect("spawn until the guest's /init writes the boot timer");
    let wall_us = called.elapsed().as_micros() as u64;
    let m = vm.metrics();
    eprintln!("{T}: {m}");
    let boot_timer = m.boot.total_us.expect("the boot timer was written");
    let setup = m.boot.vmm_setup_us.expect("the first KVM_RUN was recorded");
    let kernel = m
        .boot
        .kernel_us
        .expect("the console line `Run /init as init process` was seen");
    let init = m.boot.init_us.expect("the init phase was measured");
    assert!(
        boot_timer > 0 && kernel > 0 && init > 0,
        "{:?}: spawn -> first KVM_RUN -> /init -> boot timer, each later than the last",
        m.boot
    );
    assert_eq!(
        setup + kernel + init,
        boot_timer,
        "the phases are in order and add up to spawn-to-boot-timer: {:?}",
        m.boot
    );
    let ready = m.ready_us.expect("spawn to ready was recorded");
    assert!(
        boot_timer <= ready && ready <= wall_us,
        "boot timer {boot_timer} us <= ready {ready} us <= spawn() as the caller timed it {wall_us} us"
    );
    assert!(
        vm.console().contains("Run /init as init process"),
        "the kernel handed over to /init before ready:\n{}",
        tail(&vm)
    );
    assert_eq!(m.host_kvm, HostKvm::Hardware);
    assert_eq!(m.guest_mem_bytes, 128 << 20);
    let file_len = |p: &PathBuf| std::fs::metadata(p).unwrap().len();
    assert_eq!(m.image.kernel_bytes, file_len(&image.kernel));
    assert_eq!(m.image.initramfs_bytes, file_len(&image.initrd));
    assert!(m.exit.is_none(), "the guest stays up (osso.stay)");
    // What the boot timer stands for: /init went online, then signalled.
    assert!(
        wait_for_line(&vm, ONLINE, BOOT),
        "/init went online before signalling ready:\n{}",
        tail(&vm)
    );
    assert!(
        wait_for_line(&vm, STAYING, BOOT),
        "/init stays up after ready:\n{}",
        tail(&vm)
    );
    let rtt = answers(&vm, 1, BOOT).unwrap_or_else(|e| panic!("{e}\n{}", tail(&vm)));
    eprintln!("{T}: ready in {ready} us, guest answers ping in {rtt:?}");
    assert!(!vm.has_ended(), "the guest stays up (osso.stay)");
    assert_eq!(vm.kill().reason, ExitReason::Stopped);
}

/// The VMM's timeline needs no console line: with the kernel quiet (the
/// SDK's default: no `Run /init as init process` on the console), `/init`'s
/// write of 1 to the boot timer marks init started, and its 123 marks ready.
#[test]
fn quiet_kernel_keeps_the_timeline() {
    const T: &str = "quiet_kernel_keeps_the_timeline";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    let vm = osso_sdk::spawn(
        image
            .config()
            .cmdline("osso.stay")
            .ready_when(ReadyWhen::BootTimer)
            .build(),
    )
    .expect("spawn a quiet kernel until /init writes the boot timer");
    let m = vm.metrics();
    eprintln!("{T}: {m}");
    assert!(
        wait_for_line(&vm, STAYING, BOOT),
        "/init ran and stays up:\n{}",
        tail(&vm)
    );
    assert!(
        !vm.console().contains("Run /init as init process"),
        "the kernel was quiet:\n{}",
        tail(&vm)
    );
    let kernel = m
        .boot
        .kernel_us
        .expect("/init's boot-timer write marked init started");
    let init = m.boot.init_us.expect("the init phase was measured");
    let setup = m.boot.vmm_setup_us.expect("the first KVM_RUN was recorded");
    assert_eq!(
        Some(setup + kernel + init),
        m.boot.total_us,
        "the phases are in order and add up: {:?}",
        m.boot
    );
    assert!(kernel > 0 && init > 0, "{:?}", m.boot);
    assert_eq!(vm.kill().reason, ExitReason::Stopped);
}

#[test]
fn spawn_default_readiness() {
    const T: &str = "spawn_default_readiness";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    assert_eq!(
        Config::default().ready,
        ReadyWhen::BootTimer,
        "the SDK's default readiness is the boot-timer write"
    );
    // The default configuration but for the image (not built here) and a
    // boot timeout long enough for nested KVM.
    let config = Config {
        image: image.image(),
        boot_timeout: BOOT,
        ..Config::default()
    };
    let vm = osso_sdk::spawn(config.clone()).expect("spawn with the default readiness");
    let m = vm.metrics();
    eprintln!("{T}: {m}");
    let boot_timer = m
        .boot
        .total_us
        .expect("spawn returned once /init wrote the boot timer");
    let ready = m.ready_us.expect("spawn to ready was recorded");
    assert!(boot_timer > 0 && boot_timer <= ready, "{m:?}");
    // Without osso.stay the default /init goes on to the end: it went
    // online, says it is done, and reboots; the VM ends by itself.
    let exit = vm
        .wait_timeout(BOOT)
        .unwrap_or_else(|| panic!("the default /init ends the VM:\n{}", tail(&vm)));
    assert_eq!(exit.reason, ExitReason::Reset, "{}", tail(&vm));
    assert!(exit.guest_ended_by_itself() && !exit.panicked());
    let text = vm.console().text();
    for line in [ONLINE, INIT_DONE] {
        assert!(text.contains(line), "{line:?} on the console:\n{text}");
    }
    assert!(!text.contains(STAYING), "{text}");
    assert_eq!(vm.metrics().exit.as_deref(), Some("reset"));
    drop(vm);

    // The same readiness with osso.stay: the guest is alive after spawn
    // returns and stays so.
    let mut stay = config;
    stay.cmdline_extra.push("osso.stay".into());
    let vm = osso_sdk::spawn(stay).expect("spawn an osso.stay guest");
    assert!(vm.metrics().boot.total_us.is_some());
    assert!(
        wait_for_line(&vm, STAYING, BOOT),
        "/init stays up:\n{}",
        tail(&vm)
    );
    answers(&vm, 1, BOOT).unwrap_or_else(|e| panic!("{e}\n{}", tail(&vm)));
    assert!(!vm.console().contains(INIT_DONE), "{}", tail(&vm));
    assert!(!vm.has_ended());
    assert_eq!(vm.kill().reason, ExitReason::Stopped);
}

#[test]
fn run_job_exit_status() {
    const T: &str = "run_job_exit_status";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    let job = Job {
        script: "echo 'to stdout'\necho 'to stderr' >&2\nexit 3\n".into(),
        config: image.config().build(),
        timeout: BOOT,
    };
    let r = osso_sdk::run(job).expect("the job runs and its result comes back");
    eprintln!("{T}: {}", r.metrics);
    assert_eq!(r.output.stdout_text(), "to stdout\n");
    assert_eq!(r.output.stderr_text(), "to stderr\n");
    assert_eq!(r.output.status, 3);
    assert!(r.metrics.boot.total_us.is_some(), "the guest was ready");
    assert_eq!(
        r.metrics.exit.as_deref(),
        Some("reset"),
        "the guest ended by itself after the job"
    );
    let base = std::fs::metadata(&image.initrd).unwrap().len();
    assert!(
        r.metrics.image.initramfs_bytes > base,
        "the initramfs as booted has the job appended"
    );
}

#[test]
fn run_job_one_mib() {
    const T: &str = "run_job_one_mib";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    // The image's Toybox has no head, tr or dd: a 16-byte line doubled 16
    // times with cat is 16 << 16 = 1 MiB.
    let script = "\
echo 0123456789abcde > /tmp/a
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do
  cat /tmp/a /tmp/a > /tmp/b || exit 1
  cat /tmp/b > /tmp/a || exit 1
done
cat /tmp/a
";
    let job = Job {
        script: script.into(),
        config: image.config().build(),
        // The output crosses the serial console as about 1.4 MB of base64:
        // seconds on hardware, minutes under nested KVM.
        timeout: Duration::from_secs(1200),
    };
    let t = Instant::now();
    let r = osso_sdk::run(job).expect("the job runs and its 1 MiB comes back");
    eprintln!("{T}: {:?} in all; {}", t.elapsed(), r.metrics);
    assert_eq!(r.output.status, 0, "stderr: {}", r.output.stderr_text());
    assert_eq!(r.output.stderr_text(), "");
    assert_eq!(r.output.stdout.len(), 1 << 20, "exactly 1 MiB of stdout");
    let expected = b"0123456789abcde\n".repeat(1 << 16);
    if let Some(at) = r
        .output
        .stdout
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
    {
        panic!(
            "stdout differs from the pattern at byte {at}: {:?}",
            String::from_utf8_lossy(
                &r.output.stdout[at.saturating_sub(16)..(at + 16).min(1 << 20)]
            )
        );
    }
    assert_eq!(r.metrics.exit.as_deref(), Some("reset"));
}

/// This process's threads that belong to a VM (vCPUs, the virtio-net
/// device, the user network), by name. (A VM has no thread that only waits
/// for it; the process-wide `osso-deadlines` thread is not any VM's.)
fn vm_threads() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim_end().to_string())
        .filter(|c| {
            c.starts_with("osso-vcpu") || c.starts_with("osso-virtio") || c == "osso-usernet"
        })
        .collect()
}

/// This process's KVM VM and vCPU file descriptors.
fn kvm_fds() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
        .filter(|l| {
            let l = l.to_string_lossy();
            l.contains("kvm-vm") || l.contains("kvm-vcpu")
        })
        .count()
}

#[test]
fn run_job_timeout() {
    const T: &str = "run_job_timeout";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    let (threads0, fds0) = (vm_threads().len(), kvm_fds());
    const TIMEOUT: Duration = Duration::from_secs(15);
    let job = Job {
        script: "sleep 600\necho never\n".into(),
        config: image.config().build(),
        timeout: TIMEOUT,
    };
    let t = Instant::now();
    let err = osso_sdk::run(job).expect_err("the job outlives its timeout");
    let took = t.elapsed();
    eprintln!("{T}: run returned after {took:?}: {err}");
    match &err {
        Error::JobTimeout {
            timeout,
            console_tail,
        } => {
            assert_eq!(*timeout, TIMEOUT);
            // /init prints nothing between going online and the job's
            // result: the console ends where the guest became ready.
            assert!(
                console_tail.contains(ONLINE) && !console_tail.contains("OSSO-JOB"),
                "stopped while the job slept, after ready and before any result:\n{console_tail}"
            );
        }
        other => panic!("wanted Error::JobTimeout, got: {other}"),
    }
    // The timeout counts from ready, so run took at least that; and not
    // much more than a boot plus the timeout.
    assert!(took >= TIMEOUT, "{took:?}");
    assert!(took <= BOOT + TIMEOUT + Duration::from_secs(60), "{took:?}");
    // The VM is gone: its threads and KVM file descriptors with it (the
    // threads end just after they are joined: allow them a moment).
    let deadline = Instant::now() + Duration::from_secs(60);
    while (vm_threads().len() > threads0 || kvm_fds() > fds0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        vm_threads().len() <= threads0,
        "VM threads left behind: {:?} (before: {threads0})",
        vm_threads()
    );
    assert!(
        kvm_fds() <= fds0,
        "KVM file descriptors left behind: {} (before: {fds0})",
        kvm_fds()
    );
}

#[test]
fn snapshot_clones() {
    const T: &str = "snapshot_clones";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    // The template is snapshotted once /init sleeps (osso.stay), so every
    // clone wakes in the same quiet place.
    let template = osso_sdk::spawn(
        image
            .config()
            .cmdline("osso.stay")
            .ready_when(ReadyWhen::ConsoleLine(STAYING.into()))
            .build(),
    )
    .expect("boot the template");
    assert!(template.console().contains(ONLINE), "{}", tail(&template));
    assert!(
        template.metrics().boot.total_us.is_some(),
        "/init wrote the boot timer before it said it stays up"
    );
    template.snapshot(&snap).expect("snapshot the template");
    answers(&template, 1, BOOT)
        .unwrap_or_else(|e| panic!("the template runs on after its snapshot: {e}"));
    drop(template);

    // Clones: ready when they answer a ping through their own network.
    let clone_config = Config::builder()
        .ready_when(ReadyWhen::GuestPing)
        .boot_timeout(BOOT)
        .build();
    let clones: Vec<Vm> = (0..3)
        .map(|i| {
            osso_sdk::restore(&snap, clone_config.clone())
                .unwrap_or_else(|e| panic!("restore clone {i}: {e}"))
        })
        .collect();
    for (i, c) in clones.iter().enumerate() {
        let m = c.metrics();
        eprintln!("{T}: clone {i}: {m}");
        assert!(c.is_restored());
        let r = m.restore.as_ref().expect("restore figures");
        assert_eq!(r.snapshot, snap);
        let first = r.first_run_us.expect("the clone's vCPU ran");
        let ready = r
            .ready_us
            .expect("the clone answered a ping (its readiness)");
        assert!(first <= ready, "{r:?}");
        assert_eq!(m.guest_mem_bytes, 128 << 20, "RAM size from the snapshot");
        assert!(!c.has_ended(), "clone {i} ended:\n{}", tail(c));
    }
    // All clones at once, each through its own network.
    for (i, c) in clones.iter().enumerate() {
        let rtt = answers(c, 100 * (i as u16 + 1), BOOT)
            .unwrap_or_else(|e| panic!("clone {i}: {e}\n{}", tail(c)));
        eprintln!("{T}: clone {i} answers in {rtt:?}");
    }
    for (i, c) in clones.iter().enumerate() {
        assert!(!c.has_ended(), "clone {i} ended:\n{}", tail(c));
        assert!(
            !c.console().contains("Kernel panic"),
            "clone {i}:\n{}",
            tail(c)
        );
    }
    for c in &clones {
        assert_eq!(c.kill().reason, ExitReason::Stopped);
    }
}

#[test]
fn pool_take() {
    const T: &str = "pool_take";
    let Some(image) = prerequisites(T) else {
        return;
    };
    let _one = serial();
    // The template boots to the boot timer and is snapshotted there (it
    // stays up: osso.stay); each clone is ready once its vCPU runs (a
    // restored guest wrote its boot timer long ago) and then must answer.
    let pool = Pool::boot(
        image
            .config()
            .cmdline("osso.stay")
            .ready_when(ReadyWhen::BootTimer)
            .build(),
        2,
    )
    .expect("boot the template and start the pool");
    let cold = pool.template_metrics().expect("the template's figures");
    assert!(cold.boot.total_us.is_some(), "the template booted cold");
    assert!(cold.restore.is_none());
    assert_eq!(
        pool.wait_ready(2, BOOT).expect("the pool restores clones"),
        2,
        "two clones warm"
    );
    let mut taken = Vec::new();
    for n in 0..3u16 {
        let vm = pool.take().expect("take a clone");
        assert!(vm.is_restored(), "take {n}");
        assert!(!vm.has_ended(), "take {n}: an ended clone:\n{}", tail(&vm));
        let r = vm.metrics().restore.expect("restore figures");
        assert!(r.ready_us.is_some(), "take {n}: the clone was ready");
        let rtt = answers(&vm, 100 * (n + 1), BOOT)
            .unwrap_or_else(|e| panic!("take {n}: {e}\n{}", tail(&vm)));
        eprintln!("{T}: take {n}: answers in {rtt:?}; {}", vm.metrics());
        taken.push(vm);
    }
    // Clones handed out are independent and all alive together.
    for (n, vm) in taken.iter().enumerate() {
        answers(vm, 1000 + n as u16, BOOT).unwrap_or_else(|e| panic!("take {n}, again: {e}"));
        assert!(!vm.has_ended());
    }
    // The pool refills behind the requests.
    assert!(
        pool.wait_ready(1, BOOT).expect("the pool refills") >= 1,
        "the pool refilled"
    );
    drop(pool);
    for vm in &taken {
        assert!(!vm.has_ended(), "clones handed out outlive the pool");
        assert_eq!(vm.kill().reason, ExitReason::Stopped);
    }
}
