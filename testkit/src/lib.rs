//! osso-testkit: what every Osso test crate shares: the rule for checks that
//! cannot run on this host (here), summary statistics ([`stats`]) and the
//! frames the network tests send ([`frames`]).
//!
//! One rule, in one place: a check whose prerequisite is missing says
//! `SKIPPED <check>: <reason>` and does not run; under `OSSO_REQUIRE_E2E=1`
//! (the project's test command) it fails instead. A test that returns early
//! must go through [`skip_or_fail`] (or one of the `require_*` helpers), so
//! that a check which did not run is never counted as passed.
//!
//! One exception, also in one place: `OSSO_DEFER_USERSPACE=1` says that the
//! checks needing guest user space will run in layer 5 (the nested-KVM
//! harness, `osso-nested`) with `OSSO_REQUIRE_E2E=1`, so on this host they
//! skip (saying where they run) even when end-to-end checks are required.
//! The test command sets it only for its direct run on a host without
//! hardware KVM, and then runs layer 5.

use std::path::Path;

pub mod elf;
pub mod frames;
pub mod stats;

/// The environment variable that turns a skip into a failure.
pub const REQUIRE_E2E: &str = "OSSO_REQUIRE_E2E";
/// The environment variable that defers guest-user-space checks to layer 5.
pub const DEFER_USERSPACE: &str = "OSSO_DEFER_USERSPACE";

/// The host's KVM, as the tests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    /// Hardware KVM (kvm_intel, kvm_amd; also a nested KVM): guest user space runs.
    Hardware,
    /// PVM, the software KVM of the project's machines: a guest kernel boots,
    /// guest user space never runs.
    Pvm,
    /// No /dev/kvm that this process can open read-write.
    Missing,
}

impl Kvm {
    /// Detects the host's KVM.
    pub fn detect() -> Kvm {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !usable {
            Kvm::Missing
        } else if Path::new("/sys/module/kvm_pvm").exists() {
            Kvm::Pvm
        } else {
            Kvm::Hardware
        }
    }
}

impl std::fmt::Display for Kvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kvm::Hardware => "hardware KVM",
            Kvm::Pvm => "PVM (software KVM: guest kernel only, no guest user space)",
            Kvm::Missing => "no usable /dev/kvm",
        })
    }
}

/// Whether end-to-end checks are required here (`OSSO_REQUIRE_E2E=1`).
pub fn e2e_required() -> bool {
    std::env::var(REQUIRE_E2E).as_deref() == Ok("1")
}

/// The check `check` cannot run, because of `reason`: prints
/// `SKIPPED <check>: <reason>` (stderr), or panics under `OSSO_REQUIRE_E2E=1`.
pub fn skip_or_fail(check: &str, reason: impl std::fmt::Display) {
    if e2e_required() {
        panic!("{check}: required ({REQUIRE_E2E}=1) but cannot run: {reason}");
    }
    skip(check, reason);
}

/// Prints the skip line without the `OSSO_REQUIRE_E2E` rule: only for
/// [`require_guest_user_space`]'s deferral and for checks that are
/// optional by design. One line on stderr (shown with `--nocapture`, and
/// with a failing test's output otherwise).
fn skip(check: &str, reason: impl std::fmt::Display) {
    eprintln!("SKIPPED {check}: {reason}");
}

/// True when /dev/kvm (of any kind) can be used; otherwise skips or fails.
pub fn require_kvm(check: &str) -> bool {
    match Kvm::detect() {
        Kvm::Missing => {
            skip_or_fail(
                check,
                "/dev/kvm does not exist or cannot be opened read-write",
            );
            false
        }
        _ => true,
    }
}

/// True when the host's KVM runs guest user space (hardware or nested KVM);
/// otherwise skips or fails. Under `OSSO_DEFER_USERSPACE=1` a host without
/// it skips even when end-to-end checks are required: layer 5 runs the check.
pub fn require_guest_user_space(check: &str) -> bool {
    let kvm = Kvm::detect();
    if kvm == Kvm::Hardware {
        return true;
    }
    let reason = format!("needs a KVM that runs guest user space; this host has {kvm}");
    if std::env::var(DEFER_USERSPACE).as_deref() == Ok("1") {
        skip(
            check,
            format!("{reason}; runs in layer 5 (nested KVM, osso-nested)"),
        );
    } else {
        skip_or_fail(check, reason);
    }
    false
}

/// The `Some(value)` of a prerequisite, or `None` after [`skip_or_fail`].
pub fn require<T, E: std::fmt::Display>(check: &str, what: Result<T, E>) -> Option<T> {
    match what {
        Ok(v) => Some(v),
        Err(e) => {
            skip_or_fail(check, e);
            None
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64 from `seed`): garbage for
/// bad-input tests that is the same on every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_passes_values_through() {
        assert_eq!(require::<_, String>("t", Ok(7)), Some(7));
    }

    #[test]
    fn detect_agrees_with_the_files_it_reads() {
        let kvm = Kvm::detect();
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        assert_eq!(kvm == Kvm::Missing, !dev);
        if dev {
            assert_eq!(kvm == Kvm::Pvm, Path::new("/sys/module/kvm_pvm").exists());
        }
    }
}
