//! The `osso-vmm` binary: exit statuses, one-line reasons, console on stdout
//! and the metrics JSON, with tiny PVH kernels (a few instructions in an ELF
//! with a PVH note) under KVM, and bad input (no KVM needed).

mod common;

use std::io::Write;
use std::process::{Command, Output};

use common::elf_kernel;

fn osso_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_osso-vmm"))
        .args(args)
        .arg("--no-stdin")
        .output()
        .expect("osso-vmm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

/// 32-bit protected mode, loaded and entered at 2 MiB through PVH.
const PADDR: u64 = 0x20_0000;

/// `mov dx, 0x3f8` (66 BA F8 03), then `mov al, c; out dx, al` (B0 c EE) per
/// byte of "ok\n", then `mov al, 0xfe; out 0x64, al` (B0 FE E6 64: i8042
/// reset), then `jmp $` (EB FE).
fn hello_and_reset() -> Vec<u8> {
    say_and_reset(b"ok\n")
}

/// Prints `msg` on COM1, then resets through the i8042.
fn say_and_reset(msg: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in msg {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    c
}

#[test]
fn bad_input_exits_2_with_one_line_naming_the_problem() {
    let garbage = temp_with(b"definitely not a kernel");
    let truncated = temp_with(&elf_kernel(PADDR, &[0x90; 4096], None)[..200]);
    let g = garbage.path().to_str().unwrap();
    let t = truncated.path().to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (vec!["--kernel", g], "neither an ELF vmlinux nor a bzImage"),
        (vec!["--kernel", t], "truncated"),
        (
            vec!["--kernel", g, "--mem-mib", "4"],
            "between 8 and 3072 MiB",
        ),
        (vec!["--kernel", g, "--timeout", "0"], "--timeout"),
    ];
    for (args, needle) in cases {
        let o = osso_vmm(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
    }
}

#[test]
fn over_long_command_line_and_missing_initrd() {
    if !osso_testkit::require_kvm("over_long_command_line_and_missing_initrd") {
        return;
    }
    let k = temp_with(&elf_kernel(PADDR, &hello_and_reset(), Some(PADDR as u32)));
    let kp = k.path().to_str().unwrap();
    let long = "x".repeat(3000);
    let o = osso_vmm(&["--kernel", kp, "--cmdline-extra", &long]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("command line"), "{}", stderr(&o));
    let o = osso_vmm(&["--kernel", kp, "--initrd", "/nonexistent/initrd"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/initrd"), "{}", stderr(&o));
}

#[test]
fn guest_reset_exits_0_with_console_and_metrics() {
    if !osso_testkit::require_kvm("guest_reset_exits_0_with_console_and_metrics") {
        return;
    }
    let k = temp_with(&elf_kernel(PADDR, &hello_and_reset(), Some(PADDR as u32)));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("metrics.json");
    let o = osso_vmm(&[
        "--kernel",
        k.path().to_str().unwrap(),
        "--timeout",
        "20",
        "--metrics-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
    assert!(stderr(&o).contains("guest ended: reset"));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(m["exit_reason"], "reset");
    assert_eq!(m["boot_protocol"], "pvh");
    assert!(m["first_kvm_run_us"].as_u64().is_some());
    assert!(m["end_us"].as_u64().unwrap() >= m["first_kvm_run_us"].as_u64().unwrap());
    assert!(m["vmm_rss_bytes"].as_u64().unwrap() > 0);
    assert!(m["guest_resident_bytes"].as_u64().unwrap() > 0);
    assert!(m["boot_timer_us"].is_null());
}

#[test]
fn timeout_exits_1_with_the_reason() {
    if !osso_testkit::require_kvm("timeout_exits_1_with_the_reason") {
        return;
    }
    // `jmp $` (EB FE): spins until the timeout.
    let k = temp_with(&elf_kernel(PADDR, &[0xeb, 0xfe], Some(PADDR as u32)));
    let o = osso_vmm(&["--kernel", k.path().to_str().unwrap(), "--timeout", "0.3"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim_end(), "osso-vmm: timeout");
}

#[test]
fn bad_network_options_exit_2_naming_the_problem() {
    let kernel = temp_with(&elf_kernel(PADDR, &hello_and_reset(), Some(PADDR as u32)));
    let k = kernel.path().to_str().unwrap();
    // Parse errors (clap exits 2 and names the option).
    for (args, needle) in [
        (vec!["--net", "bogus"], "--net"),
        (vec!["--forward", "80"], "--forward"),
        (vec!["--forward", "0:80"], "--forward"),
        (vec!["--allow-host-port", "http"], "--allow-host-port"),
    ] {
        let mut all = vec!["--kernel", k];
        all.extend(args.iter().copied());
        let o = osso_vmm(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    if !osso_testkit::require_kvm("bad_network_options_exit_2_naming_the_problem") {
        return;
    }
    // A forward whose host port is taken, and forwards without the user network.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let fwd = format!("{port}:80");
    for (args, needle) in [
        (vec!["--forward", fwd.as_str()], "in use"),
        (vec!["--net", "none", "--forward", "8080:80"], "user"),
    ] {
        let mut all = vec!["--kernel", k, "--timeout", "5"];
        all.extend(args.iter().copied());
        let o = osso_vmm(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.to_lowercase().contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn user_network_guest_runs_and_forwards_are_reported() {
    if !osso_testkit::require_kvm("user_network_guest_runs_and_forwards_are_reported") {
        return;
    }
    let kernel = temp_with(&elf_kernel(PADDR, &hello_and_reset(), Some(PADDR as u32)));
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fwd = format!("{port}:80");
    let o = osso_vmm(&[
        "--kernel",
        kernel.path().to_str().unwrap(),
        "--net",
        "user",
        "--forward",
        &fwd,
        "--timeout",
        "10",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("ok"),
        "console on stdout"
    );
    assert!(err.contains("forwarding 127.0.0.1:"), "{err}");
}

#[test]
fn kernel_panic_then_reset_exits_1_saying_guest_kernel_panic() {
    if !osso_testkit::require_kvm("kernel_panic_then_reset_exits_1_saying_guest_kernel_panic") {
        return;
    }
    // A kernel with panic=-1 prints the panic line and resets at once.
    let code = say_and_reset(b"Kernel panic - not syncing: x\n");
    let k = temp_with(&elf_kernel(PADDR, &code, Some(PADDR as u32)));
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("metrics.json");
    let o = osso_vmm(&[
        "--kernel",
        k.path().to_str().unwrap(),
        "--timeout",
        "20",
        "--metrics-json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("osso-vmm: guest kernel panic")),
        "{err}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(m["exit_reason"], "guest kernel panic");
    assert!(m["kernel_panic_us"].as_u64().is_some());
}

/// Runs osso-vmm with `TMPDIR` pointing at an empty directory of its own and
/// checks that it exits with 2 (not a signal, not a panic), one clear reason
/// naming `needle`, and leaves nothing in that directory.
fn refused(args: &[&str], needle: &str) {
    refused_with(args, needle, &[2]);
}

/// As [`refused`], accepting any of `codes` as the exit status.
fn refused_with(args: &[&str], needle: &str, codes: &[i32]) {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_osso-vmm"))
        .args(args)
        .args(["--no-stdin", "--timeout", "3"])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("osso-vmm runs");
    let err = stderr(&o);
    assert!(
        o.status.code().is_some_and(|c| codes.contains(&c)),
        "{args:?}: {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: wanted {needle:?} in: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?} left {left:?} behind");
}

#[test]
fn hostile_kernels_initrds_and_sizes_are_refused_cleanly() {
    let empty = temp_with(b"");
    let random = temp_with(&osso_testkit::noise(64 * 1024, 7));
    // Valid ELF header, then noise: program headers point anywhere.
    let mut elf_noise = elf_kernel(PADDR, &[0x90; 64], Some(PADDR as u32))[..64].to_vec();
    elf_noise.extend_from_slice(&osso_testkit::noise(8192, 9));
    let elf_noise = temp_with(&elf_noise);
    // A bzImage signature ("HdrS" at 0x202) in a file of noise.
    let mut bz = osso_testkit::noise(16 * 1024, 11);
    bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    let bz = temp_with(&bz);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let p = |f: &tempfile::NamedTempFile| f.path().to_str().unwrap().to_string();
    let (e, r, en, b) = (p(&empty), p(&random), p(&elf_noise), p(&bz));
    // Headers that parse with noise behind them may load: the guest then runs
    // noise, which ends it with a KVM error (1), or is refused (2).
    refused_with(&["--kernel", &en], "osso-vmm:", &[1, 2]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", &e], &e),
        (vec!["--kernel", &r], &r),
        (vec!["--kernel", &b], &b),
        (vec!["--kernel", d], d),
        (vec!["--kernel", &r, "--mem-mib", "0"], "MiB"),
        (vec!["--kernel", &r, "--mem-mib", "1"], "MiB"),
        (vec!["--kernel", &r, "--mem-mib", "1099511627776"], "MiB"),
        (
            vec!["--kernel", &r, "--mem-mib", "18446744073709551615"],
            "MiB",
        ),
        (vec!["--kernel", &r, "--mem-mib", "-1"], "'-1'"),
        (vec!["--kernel", &r, "--vcpus", "0"], "vCPU"),
        (vec!["--kernel", &r, "--net", "tap:a/b"], "TAP"),
        (
            vec!["--kernel", &r, "--net", "tap:0123456789abcdefg"],
            "TAP",
        ),
        (vec!["--kernel", &r, "--net", "tap:"], "TAP"),
        (vec!["--kernel", &r, "--net", "slirp"], "net"),
        (vec!["--kernel", &r, "--forward", "0:80"], "forward"),
        (vec!["--kernel", &r, "--forward", "80"], "forward"),
        (vec!["--kernel", &r, "--timeout", "nan"], "timeout"),
    ];
    for (args, needle) in cases {
        refused(&args, needle);
    }
}

#[test]
fn hostile_command_lines_initrds_and_busy_ports_are_refused_cleanly() {
    if !osso_testkit::require_kvm(
        "hostile_command_lines_initrds_and_busy_ports_are_refused_cleanly",
    ) {
        return;
    }
    let k = temp_with(&elf_kernel(PADDR, &hello_and_reset(), Some(PADDR as u32)));
    let kp = k.path().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // A port in use on 127.0.0.1.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fwd = format!("{}:80", busy.local_addr().unwrap().port());
    // Just under the kernel's 128 KiB limit on one exec argument.
    let huge = "y".repeat(100_000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", kp, "--cmdline-extra", "a\u{1}b"],
            "command line",
        ),
        (
            vec!["--kernel", kp, "--cmdline-extra", "a\nb"],
            "command line",
        ),
        (
            vec!["--kernel", kp, "--cmdline-extra", "\u{7f}"],
            "command line",
        ),
        (
            vec!["--kernel", kp, "--cmdline-extra", &huge],
            "command line",
        ),
        (vec!["--kernel", kp, "--initrd", d], d),
        (
            vec!["--kernel", kp, "--forward", &fwd],
            &fwd[..fwd.len() - 3],
        ),
    ];
    for (args, needle) in cases {
        refused(&args, needle);
    }
    // Initrd contents are the guest kernel's business: empty or random bytes
    // load (the tiny guest ignores them) and the guest runs.
    for bytes in [Vec::new(), osso_testkit::noise(100_000, 3)] {
        let i = temp_with(&bytes);
        let o = osso_vmm(&[
            "--kernel",
            kp,
            "--initrd",
            i.path().to_str().unwrap(),
            "--timeout",
            "20",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
}

/// The real Osso image booted by the binary with the user network: the
/// guest's `/init` pings its gateway (10.0.2.2, the VMM's own user-mode
/// stack: nothing leaves the process), says `SUCCESS: ONLINE`, writes the
/// boot timer and reboots, and osso-vmm exits 0. Needs a KVM that runs guest
/// user space (SKIPPED under PVM, see `osso_testkit`) and the image
/// (`OSSO_KERNEL` / `OSSO_INITRD`, or the guest build cache).
#[test]
fn cli_boots_the_image_and_init_goes_online() {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::Duration;

    const T: &str = "cli_boots_the_image_and_init_goes_online";
    // Generous: nested KVM boots this in about 5 s, hardware in well under 1.
    const VMM_TIMEOUT_S: &str = "540";
    const KILL_AFTER: Duration = Duration::from_secs(600);
    if !osso_testkit::require_guest_user_space(T) {
        return;
    }
    let Some((kernel, initrd)) = common::require_image(T) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("metrics.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_osso-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--net", "user", "--no-stdin", "--timeout", VMM_TIMEOUT_S])
        .arg("--metrics-json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("osso-vmm starts");
    // Each pipe is read to its end on a thread of its own; stdout's end (the
    // process closed it by exiting) is the event the test waits for.
    let (ended, end) = std::sync::mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        let _ = ended.send(());
        b
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let overran = end.recv_timeout(KILL_AFTER).is_err();
    if overran {
        // Killed by its pid (the Child handle), then reaped below.
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for osso-vmm");
    let out = String::from_utf8_lossy(&stdout.join().unwrap()).into_owned();
    let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    let tail: String = {
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        !overran,
        "osso-vmm still ran after {KILL_AFTER:?} (killed); stderr: {err}\nconsole:\n{tail}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "the guest ends by itself; stderr: {err}\nconsole:\n{tail}"
    );
    for line in [
        "Run /init as init process",
        "init started",
        "SUCCESS: ONLINE",
        "osso: init done, rebooting",
    ] {
        assert!(out.contains(line), "{line:?} on the console:\n{tail}");
    }
    assert!(!out.contains("FAIL: offline"), "{tail}");
    assert!(!out.contains("Kernel panic"), "{tail}");
    assert!(err.contains("osso-vmm: guest ended: reset"), "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("metrics JSON written"))
            .unwrap();
    assert_eq!(m["exit_reason"], "reset", "{m}");
    let us = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{k} in {m}"));
    let (first_run, init, ready) = (
        us("first_kvm_run_us"),
        us("init_started_us"),
        us("boot_timer_us"),
    );
    assert!(
        first_run <= init && init <= ready && ready <= us("end_us"),
        "first KVM_RUN {first_run} us <= /init {init} us <= boot timer {ready} us <= end: {m}"
    );
    eprintln!(
        "{T}: /init at {:.2} s, ready (boot timer) at {:.2} s",
        init as f64 / 1e6,
        ready as f64 / 1e6
    );
}
