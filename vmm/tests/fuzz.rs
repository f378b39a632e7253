//! CI-sized randomised tests of the guest-facing devices (see
//! `fuzz_targets`): a few thousand generated cases per target, over real
//! guest memory. `OSSO_FUZZ_CASES` overrides the per-target count. The long
//! run (a million cases and more) is `fuzz_long`, ignored by default.

mod fuzz_targets;

fn cases(default: u32) -> u32 {
    std::env::var("OSSO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn go(name: &str, default: u32) {
    let t = std::time::Instant::now();
    let n = fuzz_targets::run_target(name, cases(default));
    eprintln!(
        "fuzz {name}: {n} cases, 0 failures, {:.2?}; {}",
        t.elapsed(),
        fuzz_targets::storm_summary()
    );
}

#[test]
fn fuzz_virtio_mmio_registers() {
    go("mmio", 3000);
}

#[test]
fn fuzz_virtio_net_chains() {
    go("net", 10000);
}

#[test]
fn fuzz_serial_ports() {
    go("serial", 10000);
}

#[test]
fn fuzz_i8042_ports() {
    go("i8042", 10000);
}

#[test]
fn fuzz_boot_timer() {
    go("boot_timer", 10000);
}
