//! The long randomised run, on demand:
//!
//! ```text
//! OSSO_FUZZ_TOTAL=1000000 cargo test -p osso-vmm --release --test fuzz_long -- --ignored --nocapture
//! ```
//!
//! `OSSO_FUZZ_TOTAL` (default 1,000,000) cases in all, split between the
//! targets of `fuzz_targets` by cost (virtio-net 40 %, serial 20 %, i8042
//! 15 %, boot timer 15 %, virtio-mmio 10 %). Prints the cases and the time of
//! each target and the total.

mod fuzz_targets;

#[test]
#[ignore = "long run (minutes): cargo test -p osso-vmm --release --test fuzz_long -- --ignored"]
fn fuzz_long_run() {
    let total: u64 = std::env::var("OSSO_FUZZ_TOTAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let t0 = std::time::Instant::now();
    let mut ran = 0;
    for (name, cases) in fuzz_targets::split(total) {
        let t = std::time::Instant::now();
        let n = fuzz_targets::run_target(name, cases);
        ran += n;
        eprintln!(
            "fuzz_long {name}: {n} cases, 0 failures, {:.1?}",
            t.elapsed()
        );
    }
    eprintln!(
        "fuzz_long: {ran} cases in all, 0 failures, 0 panics, {:.1?}",
        t0.elapsed()
    );
    eprintln!("fuzz_long: {}", fuzz_targets::storm_summary());
    assert!(ran >= total * 99 / 100);
}
