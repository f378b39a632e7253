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

fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm is not available");
        return false;
    }
    true
}

/// 32-bit protected mode, loaded and entered at 2 MiB through PVH.
const PADDR: u64 = 0x20_0000;

/// `mov dx, 0x3f8` (66 BA F8 03), then `mov al, c; out dx, al` (B0 c EE) per
/// byte of "ok\n", then `mov al, 0xfe; out 0x64, al` (B0 FE E6 64: i8042
/// reset), then `jmp $` (EB FE).
fn hello_and_reset() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in b"ok\n" {
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
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
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
