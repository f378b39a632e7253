//! Level 1's `/init`: the static `osso-nested` binary itself, run by the
//! level-1 kernel as PID 1. It mounts the kernel file systems, loads the KVM
//! modules, brings loopback up, runs the plan's checks one after another
//! (each in its own process group, with its time limit, output straight to
//! the console), reports each over the console with the [`crate::plan`]
//! protocol, and powers the machine off.
//!
//! Helpers (mount, insmod, ip, poweroff) are Busybox applets: the level-1
//! image carries Debian's `busybox-static`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::plan::{Event, Outcome, Plan, PLAN_PATH};

const BUSYBOX: &str = "/bin/busybox";

fn say(event: Event) {
    // A fresh line first: a check's last output may lack its newline.
    println!("\n{}", event.line());
}

fn busybox(args: &[&str]) -> Result<(), String> {
    let out = Command::new(BUSYBOX)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("busybox {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "busybox {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs as PID 1 of level 1; never returns.
pub fn run() -> ! {
    let started = Instant::now();
    let mut notes = Vec::new();
    for (fs, dir) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        ("tmpfs", "/dev/shm"),
        ("tmpfs", "/run"),
    ] {
        let _ = std::fs::create_dir_all(dir);
        if let Err(e) = busybox(&["mount", "-t", fs, fs, dir]) {
            notes.push(e);
        }
    }
    // /tmp stays on the root file system: a tmpfs over it would hide files
    // the image placed there (test binaries keep their build paths).
    let _ = std::fs::create_dir_all("/tmp");
    let _ = busybox(&["chmod", "1777", "/tmp"]);
    let plan: Result<Plan, String> = std::fs::read(PLAN_PATH)
        .map_err(|e| format!("read {PLAN_PATH}: {e}"))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("parse {PLAN_PATH}: {e}")));
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            println!("osso-nested init: {e}");
            power_off();
        }
    };
    for (module, params) in &plan.modules {
        let mut args = vec!["insmod", module.as_str()];
        args.extend(params.split_whitespace());
        if let Err(e) = busybox(&args) {
            notes.push(e);
        }
    }
    if let Err(e) = busybox(&["ip", "link", "set", "lo", "up"]) {
        notes.push(e);
    }
    let kvm = Path::new("/dev/kvm").exists();
    let nested = std::fs::read_to_string("/sys/module/kvm_amd/parameters/nested")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let mut detail = format!(
        "kvm_amd.nested={nested} booted_in_ms={}",
        started.elapsed().as_millis()
    );
    for n in notes {
        detail.push_str(" | ");
        detail.push_str(&n.replace('\n', " "));
    }
    say(Event::Up { kvm, detail });
    let heartbeat = Duration::from_secs(plan.heartbeat_s.max(1));
    for (index, check) in plan.checks.iter().enumerate() {
        say(Event::Begin { index });
        let t0 = Instant::now();
        let outcome = run_check(index, check, &plan.env, heartbeat, true);
        say(Event::End {
            index,
            outcome,
            millis: t0.elapsed().as_millis() as u64,
        });
    }
    say(Event::Done);
    power_off();
}

/// Runs one check to its end or its time limit, saying "alive" every
/// `heartbeat`. `clear_env`: the check gets only `env` and its own (level 1),
/// or this process's environment with those on top (a direct run).
pub fn run_check(
    index: usize,
    check: &crate::plan::Check,
    env: &[(String, String)],
    heartbeat: Duration,
    clear_env: bool,
) -> Outcome {
    let Some((program, args)) = check.argv.split_first() else {
        println!("osso-nested init: check {} has no program", check.name);
        return Outcome::NotStarted;
    };
    let mut cmd = Command::new(program);
    if clear_env {
        cmd.env_clear();
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(check.env.iter().map(|(k, v)| (k, v)))
        .current_dir(check.cwd.as_deref().unwrap_or("/"))
        .stdin(Stdio::null())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("osso-nested init: cannot start {program}: {e}");
            return Outcome::NotStarted;
        }
    };
    let t0 = Instant::now();
    let limit = Duration::from_secs(check.timeout_s);
    let mut next_beat = heartbeat;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                return match (status.code(), status.signal()) {
                    (Some(c), _) => Outcome::Exit(c),
                    (None, Some(s)) => Outcome::Signal(s),
                    (None, None) => Outcome::Exit(-1),
                };
            }
            Ok(None) => {}
            Err(e) => {
                println!("osso-nested init: waiting for {program}: {e}");
                return Outcome::Exit(-1);
            }
        }
        let elapsed = t0.elapsed();
        if elapsed >= limit {
            kill_group(child.id());
            let _ = child.wait();
            return Outcome::TimedOut;
        }
        if elapsed >= next_beat {
            say(Event::Alive {
                index,
                seconds: elapsed.as_secs(),
            });
            next_beat += heartbeat;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the process group the check leads (it was started with its own).
fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group the
    // check's process leads; it touches no memory of ours.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

fn power_off() -> ! {
    let _ = busybox(&["sync"]);
    let _ = busybox(&["poweroff", "-f"]);
    // poweroff -f does not return; if it failed, ending PID 1 panics the
    // kernel, and `panic=-1` with QEMU's `-no-reboot` ends level 0 as well.
    std::process::exit(1);
}
