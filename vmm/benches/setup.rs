//! VMM setup time and VMM RSS, measured on a tiny guest.
//!
//! Each run creates a VM (KVM VM, 128 MiB guest RAM, irqchip, PIT, UART,
//! i8042, boot timer), loads a 9-byte guest, configures one vCPU and starts
//! it; the guest resets at once through the i8042. Reported:
//! - setup: `VmConfig::start` (taken just before `MachineBuilder::new`) to the
//!   first `KVM_RUN`, in microseconds;
//! - VMM RSS: process RSS minus guest RAM resident, at the end of the run.
//!
//! Run: `cargo bench -p osso-vmm --bench setup` (`OSSO_BENCH_RUNS=N` to change
//! the run count, default 50). Without `/dev/kvm` it prints SKIPPED.

use std::time::{Duration, Instant};

use osso_vmm::{CpuMode, ExitReason, VmConfig};

/// The nearest-rank percentile (0 for no samples).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    osso_testkit::stats::percentile(sorted, p).unwrap_or(0)
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm is not available");
        return;
    }
    let runs: usize = std::env::var("OSSO_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // Real mode at 0x1000: mov dx,0x3f8 (BA F8 03); mov al,0xfe (B0 FE);
    // out 0x64,al (E6 64): i8042 reset; jmp $ (EB FE).
    let code = vec![0xba, 0xf8, 0x03, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];
    let mut setup = Vec::with_capacity(runs);
    let mut rss = Vec::with_capacity(runs);
    let mut anon = Vec::with_capacity(runs);
    let mut total = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut cfg = VmConfig::raw_code(code.clone(), 0x1000, 0x1000, CpuMode::Real);
        cfg.mem_mib = 128;
        cfg.timeout = Some(Duration::from_secs(10));
        cfg.start = Some(Instant::now());
        let out = match osso_vmm::run(cfg) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("run failed: {e}");
                std::process::exit(1);
            }
        };
        if out.exit != ExitReason::Reset {
            eprintln!("unexpected exit: {}", out.exit);
            std::process::exit(1);
        }
        setup.push(out.metrics.first_kvm_run_us.unwrap_or(u64::MAX));
        rss.push(out.metrics.vmm_rss_bytes);
        anon.push(out.metrics.vmm_anon_rss_bytes);
        total.push(out.metrics.end_us);
    }
    setup.sort_unstable();
    rss.sort_unstable();
    anon.sort_unstable();
    total.sort_unstable();
    println!("osso-vmm setup bench: {runs} runs, 128 MiB guest, 1 vCPU, tiny guest");
    println!(
        "  setup (start -> first KVM_RUN): median {} us, p95 {} us, min {} us",
        percentile(&setup, 0.5),
        percentile(&setup, 0.95),
        percentile(&setup, 0.0)
    );
    println!(
        "  start -> guest reset (VM ended): median {} us, p95 {} us",
        percentile(&total, 0.5),
        percentile(&total, 0.95)
    );
    println!(
        "  VMM RSS without guest RAM: median {} KiB, p95 {} KiB (this bench process)",
        percentile(&rss, 0.5) / 1024,
        percentile(&rss, 0.95) / 1024
    );
    println!(
        "  VMM anonymous RSS (heap, stacks) without guest RAM: median {} KiB, p95 {} KiB",
        percentile(&anon, 0.5) / 1024,
        percentile(&anon, 0.95) / 1024
    );
}
