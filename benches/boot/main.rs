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
//!     (`MachineBuilder` + `attach_net` with the user backend), so the bench
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

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use osso_sdk::{Config, HostKvm, ReadyWhen};
use osso_testkit::stats;
use osso_vmm::metrics::{memory_figures, process_rss_bytes};
use osso_vmm::net::{MacAddr, NetBackendConfig, NetConfig};
use osso_vmm::testing::{tiny_elf, Then};
use osso_vmm::virtio::attach::attach_net;
use osso_vmm::{MachineBuilder, VmConfig};
use serde_json::json;

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

/// One figure: a set of samples of one metric of one system.
struct Figure {
    system: String,
    metric: String,
    unit: &'static str,
    median: f64,
    p95: f64,
    runs: usize,
    how: String,
}

#[derive(Default)]
struct Report {
    figures: Vec<Figure>,
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, system: &str, metric: &str, unit: &'static str, samples: &[f64], how: &str) {
        let s = stats::sorted(samples.iter().copied().filter(|v| v.is_finite()));
        let (Some(median), Some(p95)) = (stats::median(&s), stats::percentile(&s, 0.95)) else {
            self.note(format!("{system} {metric}: no samples"));
            return;
        };
        self.figures.push(Figure {
            system: system.into(),
            metric: metric.into(),
            unit,
            median,
            p95,
            runs: s.len(),
            how: how.into(),
        });
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("NOTE: {s}");
        self.notes.push(s);
    }

    fn get(&self, system: &str, metric: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.system == system && f.metric == metric)
    }
}

/// The machine, for the report.
fn machine_description(host: HostKvm) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kvm = match host {
        HostKvm::Hardware => "hardware KVM",
        HostKvm::Pvm => "PVM (software KVM, /sys/module/kvm_pvm)",
        HostKvm::Missing => "none (no /dev/kvm)",
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({
        "cpu": model,
        "cores": cores,
        "kvm": kvm,
        "host_kernel": kernel,
        "load_average_at_start": load,
        "qemu": qemu_version(),
    })
}

fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
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

// ---------------------------------------------------------------- tiny guests

/// Spawn capacity: tiny VMs spawned to ready and dropped, and many alive.
fn tiny_capacity(report: &mut Report, dir: &Path) {
    let runs = env_usize("OSSO_BENCH_TINY_RUNS", 60).max(1);
    let alive = env_usize("OSSO_BENCH_ALIVE", 50).max(1);
    let kernel = dir.join("tiny-guest-halt.elf");
    if let Err(e) = std::fs::write(&kernel, tiny_elf("osso tiny guest", Then::ReadyThenHalt)) {
        report.note(format!(
            "SKIPPED tiny-guest capacity: cannot write {}: {e}",
            kernel.display()
        ));
        return;
    }
    let config = || {
        Config::builder()
            .custom_image(&kernel, None)
            .boot_timeout(Duration::from_secs(10))
            .build()
    };
    println!("tiny guests: {runs} sequential spawn+drop cycles ...");
    // Warm-up (the first spawn reads the supported CPUID once per process).
    match osso_sdk::spawn(config()) {
        Ok(vm) => drop(vm),
        Err(e) => {
            report.note(format!("SKIPPED tiny-guest capacity: spawn failed: {e}"));
            return;
        }
    }
    let (mut setup, mut ready, mut teardown, mut cycle) = (vec![], vec![], vec![], vec![]);
    let t_all = Instant::now();
    for _ in 0..runs {
        let t0 = Instant::now();
        let vm = match osso_sdk::spawn(config()) {
            Ok(vm) => vm,
            Err(e) => {
                report.note(format!("tiny guest spawn failed: {e}"));
                continue;
            }
        };
        let t1 = Instant::now();
        let m = vm.metrics();
        drop(vm);
        let t2 = Instant::now();
        if let Some(us) = m.boot.vmm_setup_us {
            setup.push(us_to_ms(us));
        }
        ready.push(ms(t1 - t0));
        teardown.push(ms(t2 - t1));
        cycle.push(ms(t2 - t0));
    }
    let seq_rate = cycle.len() as f64 / t_all.elapsed().as_secs_f64();
    let sdk = "osso_sdk::spawn of a tiny PVH ELF guest (prints a line, writes the boot timer, then cli;hlt), 128 MiB, 1 vCPU, user network, ReadyWhen::BootTimer";
    report.add(
        "osso",
        "tiny guest: VMM setup (spawn to first KVM_RUN)",
        "ms",
        &setup,
        &format!(
            "{sdk}; the VMM's timeline: its start (after image preparation) to the first KVM_RUN"
        ),
    );
    report.add(
        "osso",
        "tiny guest: spawn to ready (boot timer)",
        "ms",
        &ready,
        &format!("{sdk}; wall clock around spawn(), which returns once the boot-timer write was seen (1 ms polling)"),
    );
    report.add(
        "osso",
        "tiny guest: teardown (drop)",
        "ms",
        &teardown,
        "wall clock around drop(Vm): stop the vCPU, join its threads, shut the device down, unmap guest RAM",
    );
    report.add(
        "osso",
        "spawn+teardown rate, 1 thread",
        "VMs/s",
        &[seq_rate],
        &format!(
            "{} sequential spawn-to-ready + drop cycles / wall time",
            cycle.len()
        ),
    );

    // Two threads.
    let per = runs.div_ceil(2);
    println!("tiny guests: 2 threads x {per} spawn+drop cycles ...");
    let t_all = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let kernel = kernel.clone();
            std::thread::spawn(move || {
                let mut ok = 0usize;
                for _ in 0..per {
                    let c = Config::builder()
                        .custom_image(&kernel, None)
                        .boot_timeout(Duration::from_secs(10))
                        .build();
                    if let Ok(vm) = osso_sdk::spawn(c) {
                        drop(vm);
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let done: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let par_rate = done as f64 / t_all.elapsed().as_secs_f64();
    report.add(
        "osso",
        "spawn+teardown rate, 2 threads",
        "VMs/s",
        &[par_rate],
        &format!("{done} spawn-to-ready + drop cycles from 2 threads at once / wall time"),
    );

    // Many alive at once.
    println!("tiny guests: {alive} alive at once ...");
    let rss_before = process_rss_bytes();
    let threads_before = count_dir("/proc/self/task");
    let fds_before = count_dir("/proc/self/fd");
    let t0 = Instant::now();
    let mut vms = Vec::with_capacity(alive);
    for _ in 0..alive {
        match osso_sdk::spawn(config()) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                report.note(format!(
                    "{alive} alive: spawn {} failed: {e}",
                    vms.len() + 1
                ));
                break;
            }
        }
    }
    let spawned_in = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let rss_after = process_rss_bytes();
    let n = vms.len().max(1) as f64;
    let guest_res: Vec<f64> = vms
        .iter()
        .map(|v| v.metrics().guest_resident_bytes as f64 / 1024.0)
        .collect();
    let threads = count_dir("/proc/self/task").saturating_sub(threads_before);
    let fds = count_dir("/proc/self/fd").saturating_sub(fds_before);
    let t1 = Instant::now();
    let count = vms.len();
    drop(vms);
    let dropped_in = t1.elapsed();
    let delta = rss_after.saturating_sub(rss_before) as f64;
    report.add(
        "osso",
        &format!("{count} tiny VMs alive: process RSS delta"),
        "MiB",
        &[delta / MIB],
        "process RSS (/proc/self/statm) with all of them ready minus before the first (guest RAM resident included)",
    );
    report.add(
        "osso",
        &format!("{count} tiny VMs alive: RSS delta per VM"),
        "KiB",
        &[delta / n / 1024.0],
        "the process RSS delta / number of VMs",
    );
    report.add(
        "osso",
        "tiny VM: guest RAM resident",
        "KiB",
        &guest_res,
        "per VM, mincore(2) over its 128 MiB guest mapping (Vm::metrics)",
    );
    report.note(format!(
        "{count} tiny VMs alive: spawned one after another in {:.0} ms, {threads} more threads and {fds} more fds than before, all dropped in {:.0} ms",
        ms(spawned_in),
        ms(dropped_in)
    ));
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
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

/// What one real-kernel run of either system measured (ms from start; bytes).
#[derive(Default, Debug)]
struct KernelRun {
    setup_ms: Option<f64>,
    first_byte_ms: Option<f64>,
    init_ms: Option<f64>,
    ready_ms: Option<f64>,
    /// Start to the guest's `SUCCESS: ONLINE` line (guest user space only).
    online_ms: Option<f64>,
    rss: Option<f64>,
    own_rss: Option<f64>,
    guest_resident: Option<f64>,
}

/// A console sink recording the first byte's time (us from `start`).
struct FirstByte {
    start: Instant,
    first: Arc<AtomicU64>,
    /// Microseconds from `start` to the ONLINE line (u64::MAX: not yet).
    online: Arc<AtomicU64>,
    line: Vec<u8>,
    last_line: Arc<std::sync::Mutex<String>>,
}

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.first.load(Ordering::Relaxed) == u64::MAX {
            let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            self.first.store(us, Ordering::Relaxed);
        }
        for &b in buf {
            if b == b'\n' {
                let l = String::from_utf8_lossy(&self.line).trim_end().to_string();
                if l.contains(ONLINE_LINE) && self.online.load(Ordering::Relaxed) == u64::MAX {
                    let us =
                        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
                    self.online.store(us, Ordering::Relaxed);
                }
                *self.last_line.lock().unwrap_or_else(|p| p.into_inner()) = l;
                self.line.clear();
            } else if self.line.len() < 512 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One Osso boot of the real kernel, through osso_vmm wired as osso_sdk::spawn
/// does. Stops at the /init line under PVM, at the boot timer on hardware.
fn osso_kernel_run(
    vmlinux: &Path,
    initrd: &Path,
    host: HostKvm,
    limit: Duration,
) -> Result<KernelRun, String> {
    let start = Instant::now();
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let online = Arc::new(AtomicU64::new(u64::MAX));
    let last_line = Arc::new(std::sync::Mutex::new(String::new()));
    let mut vmc = VmConfig::kernel(vmlinux, Some(initrd.to_path_buf()));
    vmc.mem_mib = MEM_MIB;
    vmc.vcpus = 1;
    vmc.timeout = Some(limit);
    vmc.start = Some(start);
    vmc.console = Box::new(FirstByte {
        start,
        first: first.clone(),
        online: online.clone(),
        line: Vec::new(),
        last_line: last_line.clone(),
    });
    let mut builder = MachineBuilder::new(vmc).map_err(|e| e.to_string())?;
    let net_config = NetConfig {
        mac: MacAddr::random_local(),
        backend: NetBackendConfig::User,
        ..NetConfig::default()
    };
    let net = attach_net(&mut builder, &net_config).map_err(|e| e.to_string())?;
    let timeline = builder.timeline();
    let mem = builder.guest_memory();
    let machine = builder.start().map_err(|e| e.to_string())?;
    let mut run = KernelRun::default();
    let deadline = start + limit;
    let mut failure = None;
    loop {
        if run.init_ms.is_none() {
            if let Some(us) = timeline.init_started_us() {
                run.init_ms = Some(us_to_ms(us));
                let m = memory_figures(&mem);
                run.rss = Some(m.process_rss_bytes as f64);
                run.own_rss = Some(m.vmm_rss_bytes as f64);
                run.guest_resident = Some(m.guest_resident_bytes as f64);
                if host != HostKvm::Hardware {
                    break;
                }
            }
        }
        if let Some(us) = timeline.boot_timer_us() {
            run.ready_ms = Some(us_to_ms(us));
        }
        let on = online.load(Ordering::Relaxed);
        if on != u64::MAX {
            run.online_ms = Some(us_to_ms(on));
        }
        // On hardware KVM: on to the boot timer and the ONLINE line.
        if run.init_ms.is_some() && run.ready_ms.is_some() && run.online_ms.is_some() {
            break;
        }
        if let Some(exit) = machine.exit_reason() {
            failure = Some(format!("the VM ended first: {exit}"));
            break;
        }
        if Instant::now() >= deadline {
            failure = Some(format!("no {INIT_LINE:?} within {} s", limit.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    run.setup_ms = timeline.first_kvm_run_us().map(us_to_ms);
    let fb = first.load(Ordering::Relaxed);
    run.first_byte_ms = (fb != u64::MAX).then(|| us_to_ms(fb));
    machine.stop();
    let _ = machine.wait();
    if let Some(net) = net {
        net.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
    drop(mem);
    match failure {
        Some(f) if run.init_ms.is_none() => Err(format!(
            "{f}; first console byte at {} ms; last console line {:?}",
            fmt_num(run.first_byte_ms.unwrap_or(f64::NAN)),
            last_line.lock().unwrap_or_else(|p| p.into_inner())
        )),
        _ => Ok(run),
    }
}

const CHILD_ENV: &str = "OSSO_BENCH_CHILD_KERNEL_RUN";
const RESULT_TAG: &str = "OSSO_BENCH_RESULT ";

impl KernelRun {
    fn to_json(&self) -> serde_json::Value {
        json!([
            self.setup_ms,
            self.first_byte_ms,
            self.init_ms,
            self.ready_ms,
            self.rss,
            self.own_rss,
            self.guest_resident,
            self.online_ms
        ])
    }
    fn from_json(v: &serde_json::Value) -> KernelRun {
        let f = |i: usize| v.get(i).and_then(|x| x.as_f64());
        KernelRun {
            setup_ms: f(0),
            first_byte_ms: f(1),
            init_ms: f(2),
            ready_ms: f(3),
            rss: f(4),
            own_rss: f(5),
            guest_resident: f(6),
            online_ms: f(7),
        }
    }
}

/// In the child process: one Osso real-kernel run, its result on stdout.
fn child_kernel_run(spec: &str) -> ! {
    let parts: Vec<&str> = spec.split('\n').collect();
    let result = match parts.as_slice() {
        [vmlinux, initrd, limit_s] => {
            let host = HostKvm::detect();
            let limit = Duration::from_secs(limit_s.parse().unwrap_or(240));
            osso_kernel_run(Path::new(vmlinux), Path::new(initrd), host, limit)
        }
        _ => Err(format!("bad {CHILD_ENV} value")),
    };
    match result {
        Ok(r) => {
            println!("{RESULT_TAG}{}", r.to_json());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

/// One Osso real-kernel run in a fresh process (this bench binary run again),
/// so that its RSS is that of one VM, as QEMU's is.
fn osso_kernel_run_in_child(
    vmlinux: &Path,
    initrd: &Path,
    limit: Duration,
) -> Result<KernelRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let spec = format!(
        "{}\n{}\n{}",
        vmlinux.display(),
        initrd.display(),
        limit.as_secs()
    );
    let out = Command::new(exe)
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("start the child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix(RESULT_TAG)) {
        Some(j) if out.status.success() => serde_json::from_str(j)
            .map(|v| KernelRun::from_json(&v))
            .map_err(|e| format!("child result {j:?}: {e}")),
        _ => Err(format!(
            "child {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Kills and reaps a QEMU this bench started (by its handle).
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// VmRSS of `pid` and the resident part of its guest RAM mapping (the
/// anonymous mapping of exactly the guest RAM size in /proc/<pid>/smaps).
fn qemu_memory(pid: u32) -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |s: &str| s.split_whitespace().nth(1)?.parse::<f64>().ok();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(kib)
        .map(|k| k * 1024.0);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut size = None;
    let mut guest = None;
    for l in smaps.lines() {
        if l.starts_with("Size:") {
            size = kib(l);
        } else if l.starts_with("Rss:") && size == Some((MEM_MIB * 1024) as f64) {
            guest = Some(guest.unwrap_or(0.0) + kib(l).unwrap_or(0.0) * 1024.0);
            size = None;
        }
    }
    (rss, guest)
}

/// The console line a QEMU run was waiting for when it stopped.
fn awaited(run: &KernelRun) -> &'static str {
    if run.init_ms.is_none() {
        INIT_LINE
    } else {
        ONLINE_LINE
    }
}

/// One QEMU boot of the same kernel and initramfs; killed at the /init line,
/// or with `wait_online` (guest user space runs) at the ONLINE line.
fn qemu_kernel_run(
    vmlinux: &Path,
    initrd: &Path,
    append: &str,
    use_kvm: bool,
    wait_online: bool,
    limit: Duration,
) -> Result<KernelRun, String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,isa-serial=on,acpi=off"]);
    if use_kvm {
        // QEMU's default CPU model: `-cpu host` aborts under PVM (QEMU cannot
        // set MSR 0x10a there).
        cmd.arg("-enable-kvm");
    } else {
        cmd.args(["-cpu", "max"]);
    }
    cmd.args(["-m", &MEM_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("start QEMU: {e}"))?;
    let mut guard = QemuGuard(child);
    let pid = guard.0.id();
    let mut stdout = guard.0.stdout.take().ok_or("no QEMU stdout")?;
    let mut stderr = guard.0.stderr.take().ok_or("no QEMU stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // (event, ms from start): 0 = first byte, 1 = /init line, 2 = end of
    // output, 3 = the ONLINE line.
    let (tx, rx) = mpsc::channel::<(u8, f64)>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        let mut first = true;
        let mut tail = String::new();
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = ms(start.elapsed());
            if first {
                first = false;
                let _ = tx.send((0, now));
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let l = String::from_utf8_lossy(&line).into_owned();
                    if l.contains(INIT_LINE) {
                        let _ = tx.send((1, now));
                    }
                    if l.contains(ONLINE_LINE) {
                        let _ = tx.send((3, now));
                    }
                    tail = l;
                    line.clear();
                } else if line.len() < 4096 {
                    line.push(b);
                }
            }
        }
        let _ = tx.send((2, ms(start.elapsed())));
        tail
    });
    let mut run = KernelRun::default();
    let deadline = start + limit;
    let mut failure = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, t)) => run.first_byte_ms = Some(t),
            Ok((1, t)) => {
                run.init_ms = Some(t);
                let (rss, guest) = qemu_memory(pid);
                run.rss = rss;
                run.guest_resident = guest;
                run.own_rss = rss.zip(guest).map(|(r, g)| r - g);
                if !wait_online {
                    break;
                }
            }
            Ok((3, t)) => {
                run.online_ms = Some(t);
                break;
            }
            Ok(_) => {
                failure = Some(format!("QEMU ended before the {:?} line", awaited(&run)));
                break;
            }
            Err(_) => {
                failure = Some(format!(
                    "no {:?} within {} s",
                    awaited(&run),
                    limit.as_secs()
                ));
                break;
            }
        }
    }
    drop(guard); // kill and reap our QEMU
    let tail = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    match failure {
        Some(f) => Err(format!(
            "{f}; last console line {tail:?}; stderr {:?}",
            err.trim()
        )),
        None => Ok(run),
    }
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
    let osso_how = "osso_vmm driven as osso_sdk::spawn does it (MachineBuilder + attach_net, user network, 128 MiB, 1 vCPU, same vmlinux + initramfs), one fresh process per run (this bench binary re-run), start = just before MachineBuilder::new";
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

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Osso/QEMU ratios for the figures both have, plus the setup-vs-first-byte one.
fn add_ratios(report: &mut Report) {
    let qemu = if report
        .figures
        .iter()
        .any(|f| f.system == "qemu-tcg" && f.metric.starts_with("start to"))
    {
        "qemu-tcg"
    } else {
        "qemu"
    };
    let pairs: Vec<(String, String)> = report
        .figures
        .iter()
        .filter(|f| f.system == "osso")
        .filter_map(|f| {
            report
                .get(qemu, &f.metric)
                .map(|_| (f.metric.clone(), f.metric.clone()))
        })
        .chain(std::iter::once((
            "VMM setup (start to first KVM_RUN)".to_string(),
            "start to first console byte".to_string(),
        )))
        .collect();
    let mut ratios = Vec::new();
    for (om, qm) in pairs {
        let (Some(o), Some(q)) = (report.get("osso", &om), report.get(qemu, &qm)) else {
            continue;
        };
        let metric = if om == qm {
            om.clone()
        } else {
            format!("osso {om} / {qemu} {qm}")
        };
        ratios.push(Figure {
            system: format!("osso/{qemu}"),
            metric,
            unit: "x",
            median: o.median / q.median,
            p95: o.p95 / q.p95,
            runs: o.runs.min(q.runs),
            how: "ratio of the medians (and of the p95s); runs: the fewer of the two".into(),
        });
    }
    report.figures.extend(ratios);
}

fn print_table(report: &Report) {
    println!();
    println!("| system | metric | median | p95 | unit | runs |");
    println!("| --- | --- | ---: | ---: | --- | ---: |");
    for f in &report.figures {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            f.system,
            f.metric,
            fmt_num(f.median),
            fmt_num(f.p95),
            f.unit,
            f.runs
        );
    }
    println!();
    println!("How each figure was measured:");
    let mut seen = Vec::new();
    for f in &report.figures {
        let key = format!("{} / {}", f.system, f.metric);
        if !seen.contains(&key) {
            println!("- {key}: {}", f.how);
            seen.push(key);
        }
    }
}

fn targets(report: &Report) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut t = |name: &str, verdict: String| out.push((name.to_string(), verdict));
    let setup = report.get("osso", "VMM setup (start to first KVM_RUN)");
    match setup {
        Some(s) => t(
            "VMM setup <= 1 ms median (real kernel)",
            format!(
                "{}: {:.2} ms",
                if s.median <= 1.0 { "MET" } else { "NOT MET" },
                s.median
            ),
        ),
        None => t("VMM setup <= 1 ms median", "not measured".into()),
    }
    if let Some(s) = report.get("osso", "tiny guest: VMM setup (spawn to first KVM_RUN)") {
        t(
            "VMM setup <= 1 ms median (tiny guest, no 14 MB kernel to load)",
            format!(
                "{}: {:.2} ms",
                if s.median <= 1.0 { "MET" } else { "NOT MET" },
                s.median
            ),
        );
    }
    let q = report
        .get("qemu", "start to first console byte")
        .or_else(|| report.get("qemu-tcg", "start to first console byte"));
    match (setup, q) {
        (Some(s), Some(q)) => t(
            "VMM setup <= 1/20 of QEMU start-to-first-console-byte",
            format!(
                "{}: {:.2} ms vs {:.2} ms / 20 = {:.2} ms (ratio 1/{:.0})",
                if s.median * 20.0 <= q.median {
                    "MET"
                } else {
                    "NOT MET"
                },
                s.median,
                q.median,
                q.median / 20.0,
                q.median / s.median
            ),
        ),
        _ => t(
            "VMM setup <= 1/20 of QEMU start-to-first-console-byte",
            "not measured (no QEMU figure)".into(),
        ),
    }
    match report.get("osso", "VMM RSS (without guest RAM) at /init") {
        Some(r) => t(
            "VMM RSS <= 2 MiB",
            format!(
                "{}: {:.2} MiB",
                if r.median <= 2.0 { "MET" } else { "NOT MET" },
                r.median
            ),
        ),
        None => t("VMM RSS <= 2 MiB", "not measured".into()),
    }
    let qk = report
        .get("qemu", "first console byte to /init line")
        .or_else(|| report.get("qemu-tcg", "first console byte to /init line"));
    match (report.get("osso", "first console byte to /init line"), qk) {
        (Some(o), Some(q)) => t(
            "Osso kernel-to-/init no slower than QEMU's",
            format!(
                "{}: {:.0} ms vs {:.0} ms (first console byte to /init, medians)",
                if o.median <= q.median {
                    "MET"
                } else {
                    "NOT MET"
                },
                o.median,
                q.median
            ),
        ),
        _ => t(
            "Osso kernel-to-/init no slower than QEMU's",
            "not measured".into(),
        ),
    }
    out
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
