//! A VM per request from a snapshot: boot Osso Linux once, snapshot it,
//! restore N clones, check that every clone answers on its own network.
//!
//! ```sh
//! cargo run --release --example restore [-- --clones 10 --json]
//! ```
//!
//! Prepares the image first (building it when none is built: not counted
//! anywhere below). Prints the cold boot time (the VMM's start to ready),
//! the restore time of each clone (from the call to `osso_sdk::restore` to
//! the clone's first reply to a host ping through its own user network:
//! median and p95), and the memory of all clones
//! together against N cold VMs. Memory is the process's proportional set
//! size (`Pss` of /proc/self/smaps_rollup): a page the clones share counts
//! once, which RSS would count once per clone. One cold VM's memory is the
//! Pss the template VM added; the clones' is the Pss they added together.
//!
//! On hardware KVM the template is the full image with `osso.stay` (its
//! /init goes online, signals ready, and stays up). On a PVM host (no guest
//! user space) it is the kernel parked with `PARKED_KERNEL_CMDLINE`, ready
//! once it answers a ping (the cold boot then takes tens of seconds).
//! With `--json` the last line is JSON. Exit status 0 only if every clone
//! answered.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use osso_sdk::{Config, HostKvm, ReadyWhen, Vm};
use osso_vmm::metrics::process_pss_bytes;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Boot once, snapshot, restore N clones that each answer on their own network")]
struct Args {
    /// Clones to restore.
    #[arg(long, default_value_t = 10)]
    clones: usize,
    /// Guest RAM of the template (and so of every clone), MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Then restore this many more one after the other, each dropped once
    /// its vCPU runs, for a restore rate (0: skip).
    #[arg(long, default_value_t = 50)]
    rate_restores: usize,
    /// Print the figures as JSON on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    host_kvm: String,
    clones: usize,
    /// The template's cold boot: the VMM's start to ready (the image was
    /// prepared before, and is not counted).
    cold_boot_ms: f64,
    snapshot_ms: f64,
    /// restore() to the first ping reply, per clone.
    restore_ms: Vec<f64>,
    restore_ms_median: f64,
    restore_ms_p95: f64,
    /// The VMM's restore phases (read state, map memory, create the VM,
    /// devices, vCPUs), median: the restore without the guest's part.
    restore_call_ms_median: f64,
    cold_over_restore: f64,
    all_online: bool,
    online: usize,
    /// Memory of all clones together (bytes): the Pss they added to this
    /// process (named rss for the issue's figure; Pss counts a page shared
    /// by the clones once, RSS would count it per clone).
    clones_rss_bytes: u64,
    /// N times one cold VM's memory (bytes, Pss as above).
    cold_vms_rss_bytes: u64,
    /// One cold VM's memory (bytes, Pss as above).
    cold_vm_rss_bytes: u64,
    /// Guest RAM pages the clones hold privately (copy-on-write), summed.
    clones_private_bytes: u64,
    /// Restores per second, one thread, each clone dropped once its vCPU
    /// runs (restore + teardown; no ping).
    restores_per_s: Option<f64>,
    /// The same with `Config::background_teardown`.
    restores_per_s_background_teardown: Option<f64>,
    /// In that loop: restore() to running (median, ms) and drop (median, ms).
    restore_to_running_ms_median: Option<f64>,
    teardown_ms_median: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            }
            if report.all_online {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("osso restore: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `q` quantile (0..=1) of sorted `v`, nearest rank.
/// The nearest-rank quantile of sorted samples (NaN for none).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    osso_testkit::stats::percentile(sorted, q).unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn run(args: &Args) -> Result<Report, osso_sdk::Error> {
    if args.clones == 0 {
        return Err(osso_sdk::Error::Config(
            "--clones must be at least 1".into(),
        ));
    }
    let host = HostKvm::detect();
    println!("osso restore: host KVM is {host}");
    let template_config = match host {
        HostKvm::Hardware => Config::builder()
            .cmdline("osso.stay")
            .ready_when(ReadyWhen::BootTimer),
        HostKvm::Pvm => {
            println!(
                "osso restore: PVM runs no guest user space: the template is the kernel parked \
                 with `{}`, ready when it answers a ping",
                osso_sdk::PARKED_KERNEL_CMDLINE
            );
            Config::builder()
                .cmdline(osso_sdk::PARKED_KERNEL_CMDLINE)
                .ready_when(ReadyWhen::GuestPing)
                .boot_timeout(Duration::from_secs(600))
        }
        HostKvm::Missing => {
            return Err(osso_sdk::Error::Config("no /dev/kvm on this host".into()));
        }
    }
    .mem_mib(args.mem_mib)
    .build();
    // Clones: ready when they answer a ping through their own network.
    let clone_config = Config::builder()
        .ready_when(ReadyWhen::GuestPing)
        .boot_timeout(Duration::from_secs(30))
        .build();

    let dir = tempfile::Builder::new()
        .prefix("osso-restore-example-")
        .tempdir()
        .map_err(|source| osso_sdk::Error::Io {
            what: "create the snapshot directory".into(),
            source,
        })?;

    // The image first (built here when nothing is built yet), so that
    // neither its time nor the builder's memory counts as the cold VM's.
    let t = Instant::now();
    osso_sdk::build_image(&template_config)?;
    println!("image prepared in {:.1} ms", ms(t.elapsed()));

    // Cold boot.
    let pss_before = process_pss_bytes();
    let t = Instant::now();
    let template = osso_sdk::spawn(template_config)?;
    let wall = t.elapsed();
    let m = template.metrics();
    // From the VMM's start, as a clone's restore counts from restore().
    let cold_boot = m.ready_us.map(Duration::from_micros).unwrap_or(wall);
    let cold_vm_rss_bytes = process_pss_bytes().saturating_sub(pss_before);
    println!(
        "cold boot: {:.1} ms to ready (image prepare {:.1} ms before it); one cold VM: {:.1} MiB (Pss)",
        ms(cold_boot),
        m.boot.image_prepare_us.unwrap_or(0) as f64 / 1e3,
        mib(cold_vm_rss_bytes)
    );
    let snapshot_ms = snapshot(&template, dir.path())?;
    drop(template);

    // Clones, one after the other, each kept running.
    let pss_before = process_pss_bytes();
    let mut clones: Vec<Vm> = Vec::with_capacity(args.clones);
    let mut restore_ms = Vec::with_capacity(args.clones);
    let mut call_ms = Vec::with_capacity(args.clones);
    for i in 0..args.clones {
        let vm = osso_sdk::restore(dir.path(), clone_config.clone())?;
        let r = vm.metrics().restore.unwrap_or_default();
        let ready = r.ready_us.unwrap_or(0) as f64 / 1e3;
        println!(
            "clone {i}: restored and answering ping in {ready:.1} ms (VMM restore phases {:.2} ms: state {:.2}, map {:.2}, VM {:.2}, devices {:.2}, vCPUs {:.2})",
            r.phases.total_us as f64 / 1e3,
            r.phases.read_state_us as f64 / 1e3,
            r.phases.map_memory_us as f64 / 1e3,
            r.phases.create_vm_us as f64 / 1e3,
            r.phases.devices_us as f64 / 1e3,
            r.phases.vcpus_us as f64 / 1e3,
        );
        restore_ms.push(ready);
        call_ms.push(r.phases.total_us as f64 / 1e3);
        clones.push(vm);
    }

    // Every clone at once, each through its own user network.
    let mut online = 0;
    for (i, vm) in clones.iter().enumerate() {
        match vm.ping(1000 + i as u16, Duration::from_secs(5)) {
            Ok(rtt) => {
                online += 1;
                println!("clone {i}: ping {:.1} ms", ms(rtt));
            }
            Err(e) => println!("clone {i}: no answer: {e}"),
        }
    }
    let clones_rss_bytes = process_pss_bytes().saturating_sub(pss_before);
    let clones_private_bytes = clones.iter().map(|v| v.metrics().guest_private_bytes).sum();

    drop(clones);

    // Restore rate: restore to running, then drop, one after the other;
    // with the VM's teardown on the request path, then left to the reaper.
    let (mut restores_per_s, mut restores_per_s_background_teardown) = (None, None);
    let (mut restore_to_running_ms_median, mut teardown_ms_median) = (None, None);
    if args.rate_restores > 0 {
        let started = Config::builder().ready_when(ReadyWhen::Started);
        let sync = restore_rate(dir.path(), started.clone().build(), args.rate_restores)?;
        println!(
            "restore rate: {:.0} per second, one thread, each restored to running then dropped \
             (restore median {:.2} ms, drop median {:.2} ms)",
            sync.0, sync.1, sync.2
        );
        let bg = restore_rate(
            dir.path(),
            started.background_teardown(true).build(),
            args.rate_restores,
        )?;
        let drain = Instant::now();
        if !osso_sdk::wait_for_background_teardown(Duration::from_secs(60)) {
            return Err(osso_sdk::Error::Config(
                "the background teardown did not finish within 60 s".into(),
            ));
        }
        let drain_ms = ms(drain.elapsed());
        println!(
            "restore rate with background teardown: {:.0} per second on the request path \
             (restore median {:.2} ms, drop median {:.2} ms); the reaper thread finished \
             closing the VMs {drain_ms:.0} ms after the last drop",
            bg.0, bg.1, bg.2
        );
        restores_per_s = Some(sync.0);
        restores_per_s_background_teardown = Some(bg.0);
        restore_to_running_ms_median = Some(sync.1);
        teardown_ms_median = Some(sync.2);
    }
    if host != HostKvm::Hardware {
        println!(
            "SKIPPED hardware-KVM restore targets (restore to ready <= 3 ms median, >= 200 restores/s on 2 cores): this host's KVM is {host}"
        );
    }

    let mut sorted = restore_ms.clone();
    sorted.sort_by(f64::total_cmp);
    call_ms.sort_by(f64::total_cmp);
    let median = quantile(&sorted, 0.5);
    let report = Report {
        host_kvm: host.to_string(),
        clones: args.clones,
        cold_boot_ms: ms(cold_boot),
        snapshot_ms,
        restore_ms_median: median,
        restore_ms_p95: quantile(&sorted, 0.95),
        restore_ms,
        restore_call_ms_median: quantile(&call_ms, 0.5),
        cold_over_restore: if median > 0.0 {
            ms(cold_boot) / median
        } else {
            0.0
        },
        all_online: online == args.clones,
        online,
        clones_rss_bytes,
        cold_vms_rss_bytes: cold_vm_rss_bytes * args.clones as u64,
        cold_vm_rss_bytes,
        clones_private_bytes,
        restores_per_s,
        restores_per_s_background_teardown,
        restore_to_running_ms_median,
        teardown_ms_median,
    };
    println!(
        "\n{} clones on {}: restore to first ping median {:.1} ms, p95 {:.1} ms \
         (cold boot {:.1} ms: {:.0}x); {}/{} online\n\
         memory: {} clones together {:.1} MiB (Pss; {:.1} MiB of it private copies) vs {} cold VMs {:.1} MiB",
        report.clones,
        report.host_kvm,
        report.restore_ms_median,
        report.restore_ms_p95,
        report.cold_boot_ms,
        report.cold_over_restore,
        report.online,
        report.clones,
        report.clones,
        mib(report.clones_rss_bytes),
        mib(report.clones_private_bytes),
        report.clones,
        mib(report.cold_vms_rss_bytes),
    );
    Ok(report)
}

/// Restores `n` VMs from `dir` one after the other, each dropped once
/// ready; returns restores per second and the medians (ms) of restore and
/// drop.
fn restore_rate(dir: &Path, config: Config, n: usize) -> Result<(f64, f64, f64), osso_sdk::Error> {
    let (mut up, mut down) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let t = Instant::now();
    for _ in 0..n {
        let r = Instant::now();
        let vm = osso_sdk::restore(dir, config.clone())?;
        up.push(ms(r.elapsed()));
        let d = Instant::now();
        drop(vm);
        down.push(ms(d.elapsed()));
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    up.sort_by(f64::total_cmp);
    down.sort_by(f64::total_cmp);
    Ok((rate, quantile(&up, 0.5), quantile(&down, 0.5)))
}

/// Snapshots `vm` into `dir`; returns the time it took, ms.
fn snapshot(vm: &Vm, dir: &Path) -> Result<f64, osso_sdk::Error> {
    let t = Instant::now();
    vm.snapshot(dir)?;
    let took = ms(t.elapsed());
    println!("snapshot: {took:.1} ms into {}", dir.display());
    Ok(took)
}
