//! Spawn capacity with a tiny PVH guest: VMs per second spawned to ready and
//! dropped, and the memory of many tiny VMs alive at once.

use std::path::Path;
use std::time::{Duration, Instant};

use osso_sdk::Config;
use osso_vmm::metrics::process_rss_bytes;
use osso_vmm::testing::{tiny_elf, Then};

use crate::report::Report;
use crate::{env_usize, ms, us_to_ms, MIB};

/// Spawn capacity: tiny VMs spawned to ready and dropped, and many alive.
pub(crate) fn tiny_capacity(report: &mut Report, dir: &Path) {
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
        &format!("{sdk}; wall clock around spawn(), which returns once the boot-timer write was seen (an event from the VMM's timeline, no polling)"),
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
