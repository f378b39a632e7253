//! The real Osso kernel under this machine's KVM, with virtio-net, both ways,
//! and no guest user space needed: the kernel configures eth0 itself (`ip=`),
//! finds no init (`rdinit=/nonexistent`) and waits for a root device that
//! never comes (`rootdelay=`, see `PARKED_KERNEL_CMDLINE`), answering ARP, ICMP and TCP.
//!
//! - user network: the host pings the guest 20 times through the VMM's
//!   user-mode stack and opens a TCP connection to a guest port with no
//!   listener, which the guest kernel answers with a reset.
//! - TAP: the same through a TAP device inside a network namespace the test
//!   creates and removes (host side 10.0.2.2 there; never the real host network).
//!
//! Slow under PVM (about a minute of emulated boot each). SKIPPED without
//! /dev/kvm, a built image, or (TAP only) root and `ip`, unless
//! `OSSO_REQUIRE_E2E=1`, where a missing prerequisite fails the test (the
//! rule is `osso_testkit`'s).

use std::process::Command;
use std::time::Duration;

use osso_sdk::{Config, ReadyWhen};

use osso_sdk::PARKED_KERNEL_CMDLINE as PARKED;
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// The built image, or `None` after `osso_testkit::skip_or_fail`.
fn image_built(check: &str) -> Option<osso_guest::Image> {
    osso_testkit::require(
        check,
        osso_guest::find_built().map_err(|e| format!("no image: {e}")),
    )
}

/// The image's kernel alone: the parked kernel never runs an init, so the
/// initramfs is left out (unpacking it is slow under PVM's emulation).
fn parked_kernel(image: &osso_guest::Image) -> osso_sdk::ConfigBuilder {
    Config::builder()
        .custom_image(image.vmlinux(), None)
        // These tests read the kernel's own lines (banner, IP-Config).
        .kernel_log(true)
        .cmdline(PARKED)
        .boot_timeout(BOOT_LIMIT)
}

fn median_ms(v: Vec<Duration>) -> f64 {
    let ms = osso_testkit::stats::sorted(v.iter().map(|d| d.as_secs_f64() * 1000.0));
    osso_testkit::stats::median(&ms).unwrap_or(f64::NAN)
}

#[test]
fn parked_kernel_answers_ping_and_tcp_through_the_user_network() {
    const T: &str = "kernel_user_network";
    if !osso_testkit::require_kvm(T) {
        return;
    }
    let Some(image) = image_built(T) else {
        return;
    };
    let vm = osso_sdk::spawn(
        parked_kernel(&image)
            .ready_when(ReadyWhen::GuestPing)
            .build(),
    )
    .expect("the guest kernel answers ping");
    let text = vm.console().text();
    assert!(text.contains("Linux version"), "kernel banner:\n{text}");
    assert!(
        text.contains("IP-Config: Complete"),
        "the kernel configured eth0:\n{text}"
    );
    let mut rtts = Vec::new();
    for seq in 1..=20 {
        match vm.ping(1000 + seq, Duration::from_secs(2)) {
            Ok(rtt) => rtts.push(rtt),
            Err(e) => eprintln!("{T}: ping {seq}: {e}"),
        }
    }
    assert!(rtts.len() >= 18, "only {} of 20 pings answered", rtts.len());
    eprintln!(
        "{T}: {}/20 replies, median round trip {:.2} ms (host -> guest, user network, KVM {})",
        rtts.len(),
        median_ms(rtts),
        osso_sdk::HostKvm::detect()
    );
    let err = vm
        .connect(7, Duration::from_secs(10))
        .expect_err("nothing listens on guest port 7");
    assert!(
        matches!(&err, osso_sdk::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "the guest kernel must answer the SYN with a reset: {err}"
    );
    let exit = vm.kill();
    assert_eq!(exit.reason, osso_sdk::ExitReason::Stopped);
}

/// A network namespace made by this test, removed when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("osso-test-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Netns(name))
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }
    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only the calling thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn parked_kernel_answers_ping_and_tcp_through_tap_in_a_private_namespace() {
    const T: &str = "kernel_tap_network";
    if !osso_testkit::require_kvm(T) {
        return;
    }
    let Some(image) = image_built(T) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        osso_testkit::skip_or_fail(
            T,
            "needs root to create a network namespace and a TAP device",
        );
        return;
    }
    let Some(ns) = Netns::create() else {
        osso_testkit::skip_or_fail(T, "`ip netns add` failed (iproute2 missing?)");
        return;
    };
    // The VM is created on a thread inside the namespace, so its TAP device
    // lives there; the host side is configured there too.
    let ns_name = ns.0.clone();
    let image_for_worker = image.clone();
    let worker = std::thread::spawn(move || {
        let image = image_for_worker;
        let ns = Netns(ns_name);
        ns.enter();
        let vm = osso_sdk::spawn(
            parked_kernel(&image)
                .tap("osso-tap0")
                .ready_when(ReadyWhen::ConsoleLine("IP-Config: Complete".into()))
                .build(),
        );
        std::mem::forget(ns); // the outer handle removes the namespace
        vm
    });
    let vm = worker
        .join()
        .expect("worker thread")
        .expect("boot with TAP");
    for cmd in [
        vec!["ip", "addr", "add", "10.0.2.2/24", "dev", "osso-tap0"],
        vec!["ip", "link", "set", "osso-tap0", "up"],
    ] {
        let out = ns.exec(&cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ns.exec(&["ping", "-c", "20", "-i", "0.2", "-W", "3", "10.0.2.15"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ping through TAP failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("min/avg"))
        .unwrap_or_default()
        .to_string();
    let mut rtts: Vec<Duration> = text
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect();
    assert!(rtts.len() >= 18, "only {} replies:\n{text}", rtts.len());
    rtts.sort();
    eprintln!(
        "{T}: {} replies, median round trip {:.2} ms (namespace -> guest, TAP); {summary}",
        rtts.len(),
        median_ms(rtts)
    );
    // A TCP connect from inside the namespace, on a thread that enters it
    // (no tool needed: level 1 has no python3 or nc of its own).
    let ns_name = ns.0.clone();
    let said = std::thread::spawn(move || {
        let ns = Netns(ns_name);
        ns.enter();
        std::mem::forget(ns); // the outer handle removes the namespace
        let addr = std::net::SocketAddr::from(([10, 0, 2, 15], 7));
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30)) {
            Ok(_) => "connected".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
            Err(e) => format!("other: {e}"),
        }
    })
    .join()
    .expect("connect thread");
    assert_eq!(said, "refused", "TCP to a closed guest port through TAP");
    vm.kill();
    drop(vm);
    drop(ns);
}

/// Layer 5, hardware KVM only: the guest's own `/init` pings its gateway
/// 10.0.2.2 (the VMM's user network), prints `SUCCESS: ONLINE`, signals ready
/// through the boot timer and reboots.
#[test]
fn guest_init_goes_online_on_hardware_kvm() {
    const T: &str = "guest_init_online";
    if !osso_testkit::require_guest_user_space(T) {
        return;
    }
    if image_built(T).is_none() {
        return;
    }
    let vm = osso_sdk::spawn(
        Config::builder()
            .boot_timeout(Duration::from_secs(30))
            .build(),
    )
    .expect("the guest becomes ready");
    let exit = vm.shutdown(Duration::from_secs(10));
    let text = vm.console().text();
    assert!(text.contains("SUCCESS: ONLINE"), "guest console:\n{text}");
    assert!(
        exit.guest_ended_by_itself(),
        "the guest rebooted itself: {exit}"
    );
    let m = vm.metrics();
    assert!(
        m.boot.total_us.is_some() && m.boot.kernel_us.is_some() && m.boot.init_us.is_some(),
        "{m}"
    );
    eprintln!("{T}: {m}");
}
