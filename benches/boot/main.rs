//! Boot benchmark: Osso beside QEMU `microvm`, on the same kernel and
//! initramfs, in the same run.
//!
//! ```sh
//! cargo bench --bench boot
//! ```
//!
//! What it measures (every figure is printed with how it was measured):
//!
//! - Osso, real kernel (the built Osso image: PVH `vmlinux` + initramfs, 128 MiB,
//!   1 vCPU, virtio-net on the user-mode network, as `osso_sdk::spawn` sets it up):
//!   - VMM setup: the VMM's start inside `osso_sdk::spawn` (after the image
//!     is resolved: image preparation is its own phase, not VMM setup) to the
//!     first `KVM_RUN` (`ReadyWhen::Started`, the VM is dropped at once), many runs;
//!   - start to first console byte, to the `Run /init as init process` line,
//!     and (hardware KVM only) to ready (the boot timer), plus the VMM RSS
//!     and guest RAM resident sampled at the `/init` line. These runs drive
//!     `osso_vmm` directly, wired exactly as `osso_sdk::spawn` does
//!     (`MachineBuilder` + `MachineBuilder::attach_net` with the user backend), so the bench
//!     can timestamp the first console byte itself, each in a fresh process
//!     (this bench binary run again), so that the RSS is one VM's, as QEMU's is;
//!   - image size (kernel + initramfs as booted).
//! - QEMU (`qemu-system-x86_64 -M microvm`, KVM where `/dev/kvm` opens): process
//!   start to first console byte and to the `/init` line, and its RSS
//!   (`VmRSS`, and `VmRSS` less its guest RAM mapping) sampled at that line.
//! - Spawn capacity with a tiny PVH guest: VMs per second spawned to ready and
//!   dropped (1 and 2 threads), and the memory of 50 tiny VMs alive at once.
//!
//! Under PVM (`/sys/module/kvm_pvm`) a real kernel takes about a minute to
//! reach `/init` and guest user space never runs: each real-kernel run stops
//! at the `/init` line, the boot-timer figure is skipped, and only a few runs
//! are made (`OSSO_BENCH_KERNEL_RUNS`, default 3 under PVM, 20 on hardware).
//!
//! Settings (environment): `OSSO_BENCH_KERNEL_RUNS`, `OSSO_BENCH_SETUP_RUNS`
//! (default 30), `OSSO_BENCH_TINY_RUNS` (default 60), `OSSO_BENCH_ALIVE`
//! (default 50), `OSSO_BENCH_BUDGET_S` (default 540: no new real-kernel run
//! starts once the bench has run this long), `OSSO_BENCH_KERNEL_LIMIT_S` (the
//! most one real-kernel boot may take: 300 under PVM, 30 on hardware),
//! `OSSO_BENCH_NO_QEMU` (set: Osso only), `OSSO_BENCH_OUT` (default
//! `<workspace>/target/osso-bench`, whatever `CARGO_TARGET_DIR` says).
//!
//! Output: a table on stdout, and `<out>/boot.json`: a JSON list of
//! `{system, metric, unit, median, p95, runs}` (ratios as system
//! `"osso/qemu"`), with `<out>/boot-machine.json` describing the machine and
//! how each figure was measured.

mod osso_run;
mod qemu;
mod report;
mod tiny;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use osso_sdk::{Config, HostKvm, ReadyWhen};
use serde_json::json;

use osso_run::{child_kernel_run, osso_kernel_run_in_child, KernelRun, CHILD_ENV};
use qemu::{qemu_kernel_run, qemu_version};
use report::{add_ratios, machine_description, print_table, targets, Report};
use tiny::tiny_capacity;

const INIT_LINE: &str = "Run /init as init process";
/// What the image's /init prints once eth0 is up and 10.0.2.2 answered.
const ONLINE_LINE: &str = "SUCCESS: ONLINE";
const MEM_MIB: u64 = 128;
const MIB: f64 = 1024.0 * 1024.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

// ---------------------------------------------------------------- real kernel

/// VMM setup with the real kernel: spawn to the first KVM_RUN, many runs.
fn real_kernel_setup(report: &mut Report, vmlinux: &Path, initrd: &Path) {
    let runs = env_usize("OSSO_BENCH_SETUP_RUNS", 30).max(1);
    println!("real kernel: {runs} x VMM setup (spawn to first KVM_RUN, then drop) ...");
    let (mut setup, mut resident) = (vec![], vec![]);
    for _ in 0..runs {
        let c = Config::builder()
            .custom_image(vmlinux, Some(initrd.to_path_buf()))
            .ready_when(ReadyWhen::Started)
            .boot_timeout(Duration::from_secs(10))
            .build();
        match osso_sdk::spawn(c) {
            Ok(vm) => {
                let m = vm.metrics();
                if let Some(us) = m.boot.vmm_setup_us {
                    setup.push(us_to_ms(us));
                }
                resident.push(m.guest_resident_bytes as f64 / MIB);
                drop(vm);
            }
            Err(e) => report.note(format!("real-kernel setup run failed: {e}")),
        }
    }
    report.add(
        "osso",
        "VMM setup (start to first KVM_RUN)",
        "ms",
        &setup,
        "osso_sdk::spawn (Custom image: the Osso vmlinux + initramfs, 128 MiB, 1 vCPU, user network, ReadyWhen::Started): the VMM's start (after image preparation, which is not counted) to the first KVM_RUN (VMM timeline); includes reading and loading the 14 MB vmlinux and the initramfs; VM dropped right after",
    );
    report.add(
        "osso",
        "guest RAM resident at first KVM_RUN",
        "MiB",
        &resident,
        "mincore(2) over guest RAM just after the first KVM_RUN: the kernel and initramfs the VMM loaded",
    );
}

/// The real-kernel boots of both systems, in pairs started together (Osso and
/// QEMU side by side), so that load from other work falls on both alike.
fn real_kernel_boots(
    report: &mut Report,
    vmlinux: &Path,
    initrd: &Path,
    host: HostKvm,
    bench_start: Instant,
) {
    let default_runs = if host == HostKvm::Hardware { 20 } else { 3 };
    let runs = env_usize("OSSO_BENCH_KERNEL_RUNS", default_runs).max(1);
    let budget = Duration::from_secs(env_usize("OSSO_BENCH_BUDGET_S", 540) as u64);
    let limit = Duration::from_secs(env_usize(
        "OSSO_BENCH_KERNEL_LIMIT_S",
        if host == HostKvm::Hardware { 30 } else { 300 },
    ) as u64);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let qemu = qemu_version();
    let use_kvm = kvm_opens();
    let qemu_system = if use_kvm { "qemu" } else { "qemu-tcg" };
    let mut append = osso_vmm::boot::cmdline::DEFAULT_CMDLINE.to_string();
    if pvm {
        append.push(' ');
        append.push_str(osso_vmm::boot::cmdline::PVM_WORKAROUND);
    }
    // QEMU's microvm with -nodefaults has no i8042, so a guest rebooting with
    // reboot=k would hang there; reboot=t (triple fault) ends QEMU under
    // -no-reboot. (Osso's VMM emulates the i8042 reset line.)
    let qemu_append = append.replace("reboot=k", "reboot=t");
    let hardware = host == HostKvm::Hardware;
    match &qemu {
        None => report.note(
            "SKIPPED QEMU column: qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)",
        ),
        Some(v) => report.note(format!(
            "QEMU: {v}, {}; -append {qemu_append:?} (QEMU adds virtio_mmio.device= itself)",
            if use_kvm {
                "-enable-kvm (default CPU model)"
            } else {
                "/dev/kvm does not open: TCG (-cpu max), figures not comparable with Osso's"
            }
        )),
    }
    if host != HostKvm::Hardware {
        report.note(format!(
            "SKIPPED Osso start-to-ready (boot timer): this host's KVM is {host}; guest user space never runs, so /init never writes the boot timer. Each real-kernel run stops at the {INIT_LINE:?} line."
        ));
    }
    println!(
        "real kernel: {runs} boot(s) each of Osso{} (side by side, in pairs; up to {} s each) ...",
        if qemu.is_some() { " and QEMU" } else { "" },
        limit.as_secs()
    );
    let mut osso = Vec::new();
    let mut qemu_runs = Vec::new();
    for i in 0..runs {
        if i > 0 && bench_start.elapsed() > budget {
            report.note(format!(
                "real-kernel runs stopped after {i} of {runs}: the bench's time budget of {} s (OSSO_BENCH_BUDGET_S) is spent",
                budget.as_secs()
            ));
            break;
        }
        // Osso and QEMU boot side by side, started together, so that both see
        // the same machine load (sequential runs on a shared 2-core machine
        // were dominated by whatever else ran at the time).
        let want_qemu = qemu.is_some() && std::env::var_os("OSSO_BENCH_NO_QEMU").is_none();
        let t = Instant::now();
        let (osso_result, qemu_result) = std::thread::scope(|s| {
            let q = want_qemu.then(|| {
                s.spawn(|| qemu_kernel_run(vmlinux, initrd, &qemu_append, use_kvm, hardware, limit))
            });
            let o = osso_kernel_run_in_child(vmlinux, initrd, limit);
            let q = q.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the QEMU run's thread panicked".to_string()))
            });
            (o, q)
        });
        match osso_result {
            Ok(r) => {
                println!(
                    "  osso run {}: setup {:.2} ms, first byte {:.1} ms, /init {:.0} ms",
                    i + 1,
                    r.setup_ms.unwrap_or(f64::NAN),
                    r.first_byte_ms.unwrap_or(f64::NAN),
                    r.init_ms.unwrap_or(f64::NAN),
                );
                osso.push(r);
            }
            Err(e) => report.note(format!("osso real-kernel run {} failed: {e}", i + 1)),
        }
        match qemu_result {
            Some(Ok(r)) => {
                println!(
                    "  qemu run {}: first byte {:.1} ms, /init {:.0} ms",
                    i + 1,
                    r.first_byte_ms.unwrap_or(f64::NAN),
                    r.init_ms.unwrap_or(f64::NAN),
                );
                qemu_runs.push(r);
            }
            Some(Err(e)) => report.note(format!("qemu real-kernel run {} failed: {e}", i + 1)),
            None => {}
        }
        println!(
            "  pair {} took {:.0} s wall",
            i + 1,
            t.elapsed().as_secs_f64()
        );
    }
    let col = |v: &[KernelRun], f: fn(&KernelRun) -> Option<f64>| -> Vec<f64> {
        v.iter().filter_map(f).collect()
    };
    let osso_how = "osso_vmm driven as osso_sdk::spawn does it (MachineBuilder + MachineBuilder::attach_net, user network, 128 MiB, 1 vCPU, same vmlinux + initramfs), one fresh process per run (this bench binary re-run), start = just before MachineBuilder::new";
    report.add(
        "osso",
        "real kernel: VMM setup (start to first KVM_RUN)",
        "ms",
        &col(&osso, |r| r.setup_ms),
        &format!("{osso_how}; VMM timeline"),
    );
    report.add(
        "osso",
        "start to first console byte",
        "ms",
        &col(&osso, |r| r.first_byte_ms),
        &format!("{osso_how}; the first byte the UART hands to the console sink"),
    );
    report.add(
        "osso",
        "start to /init line",
        "ms",
        &col(&osso, |r| r.init_ms),
        &format!("{osso_how}; the VMM's serial device timestamps the line {INIT_LINE:?}"),
    );
    report.add(
        "osso",
        "first console byte to /init line",
        "ms",
        &col(&osso, |r| Some(r.init_ms? - r.first_byte_ms?)),
        "the kernel's own boot, measured between two console events",
    );
    if host == HostKvm::Hardware {
        report.add(
            "osso",
            "start to ready (boot timer)",
            "ms",
            &col(&osso, |r| r.ready_ms),
            &format!("{osso_how}; the guest's /init writes 123 to the boot timer"),
        );
        report.add(
            "osso",
            "start to SUCCESS: ONLINE",
            "ms",
            &col(&osso, |r| r.online_ms),
            &format!("{osso_how}; the console line {ONLINE_LINE:?} (/init brought eth0 up and 10.0.2.2 answered its ping)"),
        );
    }
    report.add(
        "osso",
        "process RSS at /init",
        "MiB",
        &col(&osso, |r| r.rss.map(|b| b / MIB)),
        "RSS (/proc/self/statm) of the fresh process running the one VM, at the /init line: VMM + guest RAM resident (the VMM is a library in that process)",
    );
    report.add(
        "osso",
        "VMM RSS (without guest RAM) at /init",
        "MiB",
        &col(&osso, |r| r.own_rss.map(|b| b / MIB)),
        "process RSS minus guest RAM resident (mincore), at the /init line (osso_vmm::metrics::memory_figures)",
    );
    report.add(
        "osso",
        "guest RAM resident at /init",
        "MiB",
        &col(&osso, |r| r.guest_resident.map(|b| b / MIB)),
        "mincore(2) over the 128 MiB guest mapping at the /init line",
    );
    let qemu_how = format!(
        "qemu-system-x86_64 -M microvm,isa-serial=on,acpi=off{} -m 128 -smp 1 -nodefaults -no-user-config -display none -serial stdio -kernel vmlinux -initrd initramfs -netdev user -device virtio-net-device -no-reboot; start = just before spawning the process",
        if use_kvm { " -enable-kvm" } else { " -cpu max (TCG)" }
    );
    report.add(
        qemu_system,
        "start to first console byte",
        "ms",
        &col(&qemu_runs, |r| r.first_byte_ms),
        &format!("{qemu_how}; first byte read from its stdout pipe"),
    );
    report.add(
        qemu_system,
        "start to /init line",
        "ms",
        &col(&qemu_runs, |r| r.init_ms),
        &format!("{qemu_how}; the line {INIT_LINE:?} read from its stdout"),
    );
    report.add(
        qemu_system,
        "first console byte to /init line",
        "ms",
        &col(&qemu_runs, |r| Some(r.init_ms? - r.first_byte_ms?)),
        "the kernel's own boot, measured between two console events",
    );
    if hardware {
        report.add(
            qemu_system,
            "start to SUCCESS: ONLINE",
            "ms",
            &col(&qemu_runs, |r| r.online_ms),
            &format!("{qemu_how}; the line {ONLINE_LINE:?} read from its stdout (guest booted with reboot=t)"),
        );
    }
    report.add(
        qemu_system,
        "process RSS at /init",
        "MiB",
        &col(&qemu_runs, |r| r.rss.map(|b| b / MIB)),
        "VmRSS of /proc/<pid>/status when the /init line was read (VMM + guest RAM resident)",
    );
    report.add(
        qemu_system,
        "VMM RSS (without guest RAM) at /init",
        "MiB",
        &col(&qemu_runs, |r| r.own_rss.map(|b| b / MIB)),
        "VmRSS minus the Rss of the 128 MiB guest RAM mapping in /proc/<pid>/smaps",
    );
    report.add(
        qemu_system,
        "guest RAM resident at /init",
        "MiB",
        &col(&qemu_runs, |r| r.guest_resident.map(|b| b / MIB)),
        "Rss of the 128 MiB guest RAM mapping in /proc/<pid>/smaps",
    );
}

// ---------------------------------------------------------------- output

fn workspace_out_dir() -> PathBuf {
    match std::env::var_os("OSSO_BENCH_OUT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/osso-bench"),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_kernel_run(&spec);
    }
    let bench_start = Instant::now();
    let host = HostKvm::detect();
    let machine = machine_description(host);
    println!("osso boot bench: {}", machine);
    let out = workspace_out_dir();
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("cannot create {}: {e}", out.display());
        std::process::exit(1);
    }
    let mut report = Report::default();
    if host == HostKvm::Missing || !kvm_opens() {
        report.note("SKIPPED every Osso figure: /dev/kvm cannot be opened here");
    } else {
        tiny_capacity(&mut report, &out);
    }
    let image = osso_guest::find_built().map_err(|e| e.to_string());
    match image {
        Err(e) => report.note(format!(
            "SKIPPED every real-kernel figure (Osso and QEMU): the Osso image is not built ({e}); build it with `cargo run --release -p osso-guest -- build`"
        )),
        Ok(img) => {
            let m = &img.manifest;
            report.note(format!(
                "image: Linux {} + Toybox {} from {}",
                m.kernel_version,
                m.toybox_version,
                img.dir.display()
            ));
            let how = "file sizes from the image manifest";
            report.add(
                "osso",
                "image: vmlinux (PVH, as booted) + initramfs",
                "MB",
                &[(m.vmlinux_bytes + m.initramfs_bytes) as f64 / 1e6],
                how,
            );
            report.add(
                "osso",
                "image: bzImage + initramfs",
                "MB",
                &[(m.bzimage_bytes + m.initramfs_bytes) as f64 / 1e6],
                how,
            );
            report.add(
                "osso",
                "image: initramfs (gzip) / uncompressed",
                "MB",
                &[m.initramfs_bytes as f64 / 1e6],
                &format!(
                    "{how}; uncompressed {:.2} MB",
                    m.initramfs_uncompressed_bytes as f64 / 1e6
                ),
            );
            if host != HostKvm::Missing && kvm_opens() {
                real_kernel_setup(&mut report, img.vmlinux(), img.initramfs());
            }
            if host == HostKvm::Missing || !kvm_opens() {
                report.note("SKIPPED real-kernel boots: no usable /dev/kvm");
            } else {
                real_kernel_boots(
                    &mut report,
                    img.vmlinux(),
                    img.initramfs(),
                    host,
                    bench_start,
                );
            }
        }
    }
    add_ratios(&mut report);
    print_table(&report);
    let verdicts = targets(&report);
    println!();
    println!("Targets (issue 6):");
    for (name, v) in &verdicts {
        println!("- {name}: {v}");
    }
    if !report.notes.is_empty() {
        println!();
        println!("Notes:");
        for n in &report.notes {
            println!("- {n}");
        }
    }
    let rows: Vec<_> = report
        .figures
        .iter()
        .map(|f| {
            json!({
                "system": f.system,
                "metric": f.metric,
                "unit": f.unit,
                "median": f.median,
                "p95": f.p95,
                "runs": f.runs,
            })
        })
        .collect();
    let json_path = out.join("boot.json");
    let machine_path = out.join("boot-machine.json");
    let side = json!({
        "machine": machine,
        "date_utc_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "bench_seconds": bench_start.elapsed().as_secs_f64(),
        "how": report.figures.iter().map(|f| json!({"system": f.system, "metric": f.metric, "how": f.how})).collect::<Vec<_>>(),
        "targets": verdicts.iter().map(|(n, v)| json!({"target": n, "verdict": v})).collect::<Vec<_>>(),
        "notes": report.notes,
    });
    let write = |p: &Path, v: &serde_json::Value| {
        std::fs::write(
            p,
            serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
        )
    };
    for (p, v) in [(&json_path, &json!(rows)), (&machine_path, &side)] {
        if let Err(e) = write(p, v) {
            eprintln!("cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    println!();
    println!(
        "wrote {} and {} ({:.0} s in all)",
        json_path.display(),
        machine_path.display(),
        bench_start.elapsed().as_secs_f64()
    );
}
