//! Where the guest kernel's boot goes: the Osso image booted once under
//! Osso's VMM with `initcall_debug` and printk timestamps, and the slowest
//! initcalls and the longest silences printed.
//!
//! ```sh
//! cargo bench --bench kernel_profile                      # here (PVM: to /init)
//! cargo run --release -p osso-nested -- bench kernel_profile   # in level 1
//! ```
//!
//! How it measures: the kernel's own clock (`printk.time=1`, microseconds
//! since the kernel started). An initcall's time is what the kernel reports
//! in `initcall ... returned N after M usecs`: the call alone, without the
//! printing of the `calling` line before it. A silence is the gap between
//! two consecutive timestamped lines, named by the line that ends it: work
//! that is no initcall (calibration, the decompressor's successors, waits)
//! shows there. The console carries every line at one VM exit per byte, so
//! the whole boot is slower than without `initcall_debug`; the initcall
//! figures are not, the silences partly are.
//!
//! Settings (environment): `OSSO_PROFILE_TOP` (default 15),
//! `OSSO_PROFILE_LIMIT_S` (the most the boot may take, default 300),
//! `OSSO_PROFILE_CMDLINE` (more kernel arguments, to try a cut).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osso_guest::klog::BootProfile;
use osso_sdk::HostKvm;
use osso_vmm::net::{MacAddr, NetBackendConfig, NetConfig};
use osso_vmm::{MachineBuilder, VmConfig};

/// The kernel arguments that make the profile.
const PROFILE_ARGS: &str = "initcall_debug printk.time=1 loglevel=8";
/// What the image's /init prints once the network is up: the end of the boot.
const ONLINE_LINE: &str = "SUCCESS: ONLINE";
const INIT_LINE: &str = "Run /init as init process";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let top = env_num("OSSO_PROFILE_TOP", 15) as usize;
    let limit = Duration::from_secs(env_num("OSSO_PROFILE_LIMIT_S", 300));
    let img = match osso_guest::find_built() {
        Ok(img) => img,
        Err(e) => {
            println!(
                "SKIPPED kernel_profile: the Osso image is not built ({e}); build it with `cargo run --release -p osso-guest -- build`"
            );
            return;
        }
    };
    let host = HostKvm::detect();
    if host == HostKvm::Missing {
        println!("SKIPPED kernel_profile: /dev/kvm cannot be opened here");
        return;
    }
    let extra = std::env::var("OSSO_PROFILE_CMDLINE").unwrap_or_default();
    let lines = Arc::new(Mutex::new(Vec::<(Duration, String)>::new()));
    let start = Instant::now();
    let m = &img.manifest;
    let mut vmc = VmConfig::kernel(&m.vmlinux_path, Some(m.initramfs_path.clone()));
    vmc.mem_mib = 128;
    vmc.timeout = Some(limit);
    vmc.start = Some(start);
    vmc.cmdline_extra = Some(format!("{PROFILE_ARGS} {extra}").trim().to_string());
    {
        let lines = lines.clone();
        vmc.console_lines = Some(Box::new(move |l: &str| {
            let mut v = lines.lock().unwrap_or_else(|p| p.into_inner());
            v.push((start.elapsed(), l.to_string()));
        }));
    }
    let run = || -> Result<_, String> {
        let mut b = MachineBuilder::new(vmc).map_err(|e| e.to_string())?;
        let net = NetConfig {
            mac: MacAddr::random_local(),
            backend: NetBackendConfig::User,
            ..NetConfig::default()
        };
        b.attach_net(&net).map_err(|e| e.to_string())?;
        b.start().map_err(|e| e.to_string())
    };
    let machine = match run() {
        Ok(m) => m,
        Err(e) => {
            println!("kernel_profile: the VM did not start: {e}");
            std::process::exit(1);
        }
    };
    // The end: the ONLINE line where guest user space runs, the /init line
    // under PVM (where it never does), or the VM's end.
    let end_line = if host == HostKvm::Pvm {
        INIT_LINE
    } else {
        ONLINE_LINE
    };
    let seen = |needle: &str| {
        lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(_, l)| l.contains(needle))
    };
    // Polled: the figures come from the kernel's clock, not from when this
    // loop notices the line.
    let deadline = start + limit;
    while !seen(end_line) && machine.exit_reason().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    machine.stop();
    let out = machine.wait();
    let lines = lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(&(reached, _)) = lines.iter().find(|(_, l)| l.contains(end_line)) else {
        println!(
            "kernel_profile: no {end_line:?} line ({}); last lines:\n{}",
            out.exit,
            lines
                .iter()
                .rev()
                .take(10)
                .rev()
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::process::exit(1);
    };
    report(&lines, reached, end_line, host, top, &extra);
}

fn report(
    lines: &[(Duration, String)],
    reached: Duration,
    end_line: &str,
    host: HostKvm,
    top: usize,
    extra: &str,
) {
    let p = BootProfile::from_lines(lines.iter().map(|(_, l)| l.as_str()), INIT_LINE);
    let total_calls: u64 = p.initcalls.iter().map(|c| c.0).sum();
    println!(
        "kernel profile: Osso image under Osso's VMM ({host:?} KVM), 128 MiB, 1 vCPU, user network; kernel arguments + \"{PROFILE_ARGS}{}{extra}\"",
        if extra.is_empty() { "" } else { " " }
    );
    println!(
        "  VMM start to {end_line:?}: {:.0} ms (host clock); kernel clock at the /init line: {}",
        reached.as_secs_f64() * 1e3,
        p.marker_at
            .map_or("-".into(), |t| format!("{:.0} ms", t * 1e3))
    );
    println!(
        "  {} initcalls took {:.0} ms together (the kernel's own figures)",
        p.initcalls.len(),
        total_calls as f64 / 1e3
    );
    println!("\n  the {top} slowest initcalls:");
    for (us, name) in p.initcalls.iter().take(top) {
        println!("    {:>9.2} ms  {name}", *us as f64 / 1e3);
    }
    println!("\n  the {top} longest silences between two kernel lines (the lines on either side):");
    let cut = |s: &str| s.chars().take(100).collect::<String>();
    for s in p.silences.iter().take(top) {
        println!(
            "    {:>9.2} ms  at {:>8.3} s  after: {}\n                              before: {}",
            s.seconds * 1e3,
            s.at,
            cut(&s.after),
            cut(&s.before)
        );
    }
    println!(
        "\n  (addresses: the image has no kallsyms; look them up in the kernel build's System.map)"
    );
}
