//! Layer 5: every check that needs a KVM which runs guest user space, as one
//! plan, run either in level 1 of a nested KVM ([`crate::level0`]) or, on a
//! host with hardware KVM, directly; and its report, `target/layer5.json`.
//!
//! The plan: the named checks first (each one test or program), then every
//! test binary of the workspace (the whole `cargo test` suite meeting a KVM
//! with guest user space), skipping the tests already run by name.

use std::path::Path;

use serde::Serialize;

use crate::artifacts::{self, Artifact, Kind};
use crate::error::{Error, Result};
use crate::plan::{Check, Outcome};

/// A program of the workspace, by kind and name.
#[derive(Debug, Clone, Copy)]
pub enum Program {
    /// A test binary: (package, cargo target name).
    Test(&'static str, &'static str),
    Example(&'static str),
    Bench(&'static str),
}

/// A check before its program is resolved to a built file.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    /// The program, then its arguments.
    pub program: Program,
    pub args: Vec<String>,
    /// When set, the check is `sh -c` of this script with `$PROGRAM` set to the
    /// program's path (for stdin and output checks); `args` is then unused.
    pub script: Option<&'static str>,
    pub timeout_s: u64,
}

fn test(
    name: &'static str,
    package: &'static str,
    bin: &'static str,
    exact: &str,
    timeout_s: u64,
) -> Spec {
    Spec {
        name,
        program: Program::Test(package, bin),
        args: vec![
            "--exact".into(),
            exact.into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ],
        script: None,
        timeout_s,
    }
}

/// The named checks, in the order they run.
pub fn named_checks() -> Vec<Spec> {
    let sdk = "osso-sdk";
    vec![
        test("cli_init_online", "osso-vmm", "cli", "cli_boots_the_image_and_init_goes_online", 600),
        test("boot_timer_spawn_to_ready", sdk, "userspace", "boot_timer_spawn_to_ready", 600),
        test("quiet_kernel_keeps_the_timeline", sdk, "userspace", "quiet_kernel_keeps_the_timeline", 600),
        test("spawn_default_readiness", sdk, "userspace", "spawn_default_readiness", 600),
        test("run_job_exit_status", sdk, "userspace", "run_job_exit_status", 600),
        test("run_job_one_mib", sdk, "userspace", "run_job_one_mib", 1200),
        test("run_job_timeout", sdk, "userspace", "run_job_timeout", 600),
        test("snapshot_clones", sdk, "userspace", "snapshot_clones", 900),
        test("pool_take", sdk, "userspace", "pool_take", 900),
        Spec {
            name: "ping_example",
            program: Program::Example("ping"),
            args: vec!["--json".into()],
            script: None,
            timeout_s: 600,
        },
        Spec {
            name: "serve_example",
            program: Program::Example("serve"),
            args: Vec::new(),
            script: Some(
                "set -o pipefail; printf 'echo hello from serve\\necho oops >&2; exit 3\\n' | \"$PROGRAM\" --parallel 1 --timeout 300 | tee /tmp/serve.out && grep -q 'stdout: hello from serve' /tmp/serve.out && grep -q -- '-> exit 3' /tmp/serve.out && grep -q 'stderr: oops' /tmp/serve.out",
            ),
            timeout_s: 900,
        },
        Spec {
            name: "restore_example",
            program: Program::Example("restore"),
            args: vec!["--json".into()],
            script: None,
            timeout_s: 1200,
        },
        Spec {
            name: "boot_bench",
            program: Program::Bench("boot"),
            args: Vec::new(),
            script: Some(
                "set -o pipefail; OSSO_BENCH_KERNEL_RUNS=5 OSSO_BENCH_KERNEL_LIMIT_S=240 \"$PROGRAM\" --bench | tee /tmp/bench.out && ! grep -q 'SKIPPED' /tmp/bench.out && grep -q '| osso/qemu | start to SUCCESS: ONLINE |' /tmp/bench.out && grep -q '| osso | start to ready (boot timer) |' /tmp/bench.out",
            ),
            timeout_s: 1800,
        },
    ]
}

/// Test binaries whose ignored tests also run in level 1: the real-kernel
/// boots the test command runs with `--ignored` on the host, which only in
/// level 1 meet a KVM that runs the guest's user space.
pub const INCLUDE_IGNORED: &[&str] = &["osso-vmm/real_kernel", "osso-vmm/snapshot_real_kernel"];

/// Test binaries not run as a whole in level 1, with the reason. They touch
/// no KVM and already ran on the host: running them again in level 1 only
/// repeats the same code under emulation, tens of times slower (layer 4's
/// QEMU TCG boots would be emulation inside emulation; the device fuzzers
/// are pure computation over guest memory).
pub const NOT_IN_LEVEL1: &[(&str, &str)] = &[
    ("osso-vmm/fuzz", "device fuzzing, no KVM: runs on the host"),
    (
        "osso-vmm/fuzz_long",
        "device fuzzing, no KVM (ignored by default): runs on the host",
    ),
    (
        "osso-guest/qemu_tcg_boot",
        "layer 4 (QEMU TCG, no KVM): runs on the host",
    ),
    (
        "osso-sdk/job_qemu_tcg",
        "layer 4 (QEMU TCG, no KVM): runs on the host",
    ),
];

fn find(artifacts: &[Artifact], program: Program) -> Result<&Artifact> {
    match program {
        Program::Test(package, name) => {
            artifacts::find(artifacts, Kind::Test, &format!("{package}/{name}"))
        }
        Program::Example(name) => artifacts::find(artifacts, Kind::Example, name),
        Program::Bench(name) => artifacts::find(artifacts, Kind::Bench, name),
    }
}

/// A check running `artifact` with `args` in its package directory.
pub fn check_for(name: String, artifact: &Artifact, args: Vec<String>, timeout_s: u64) -> Check {
    let mut argv = vec![artifact.path.to_string_lossy().into_owned()];
    argv.extend(args);
    Check {
        name,
        argv,
        env: vec![
            (
                "CARGO_MANIFEST_DIR".into(),
                artifact.package_dir.to_string_lossy().into_owned(),
            ),
            ("CARGO_PKG_NAME".into(), artifact.package.clone()),
        ],
        cwd: Some(artifact.package_dir.to_string_lossy().into_owned()),
        timeout_s,
    }
}

/// The whole layer-5 plan's checks, resolved against the built artifacts.
pub fn checks(artifacts: &[Artifact]) -> Result<Vec<Check>> {
    let specs = named_checks();
    let mut out = Vec::new();
    for s in &specs {
        let a = find(artifacts, s.program)?;
        let mut c = check_for(s.name.to_string(), a, s.args.clone(), s.timeout_s);
        if let Some(script) = s.script {
            c.env
                .push(("PROGRAM".into(), a.path.to_string_lossy().into_owned()));
            c.argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
        }
        out.push(c);
    }
    for a in artifacts.iter().filter(|a| a.kind == Kind::Test) {
        let label = a.label();
        if NOT_IN_LEVEL1.iter().any(|(l, _)| *l == label) {
            continue;
        }
        let mut args = Vec::new();
        for s in &specs {
            if let (Program::Test(p, n), Some(exact)) = (s.program, s.args.get(1)) {
                if p == a.package && n == a.name {
                    args.extend(["--skip".to_string(), exact.clone()]);
                }
            }
        }
        if !args.is_empty() {
            args.push("--exact".into());
        }
        if INCLUDE_IGNORED.contains(&label.as_str()) {
            args.push("--include-ignored".into());
        }
        out.push(check_for(format!("test {label}"), a, args, 1200));
    }
    Ok(out)
}

/// One line of `target/layer5.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    pub check: String,
    /// "pass", "fail" or "skipped".
    pub status: &'static str,
    pub seconds: f64,
    pub detail: String,
}

impl Entry {
    pub fn from_outcome(check: &str, outcome: Option<(Outcome, u64)>, why_missing: &str) -> Entry {
        match outcome {
            Some((o, ms)) => Entry {
                check: check.into(),
                status: if o.passed() { "pass" } else { "fail" },
                seconds: ms as f64 / 1000.0,
                detail: o.to_string(),
            },
            None => Entry {
                check: check.into(),
                status: "fail",
                seconds: 0.0,
                detail: why_missing.into(),
            },
        }
    }
}

/// Writes the report (a JSON list of entries).
pub fn write_report(path: &Path, entries: &[Entry]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let text = serde_json::to_string_pretty(entries).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn art(kind: Kind, package: &str, name: &str) -> Artifact {
        Artifact {
            kind,
            name: name.into(),
            package: package.into(),
            package_dir: PathBuf::from(format!("/w/{package}")),
            path: PathBuf::from(format!("/w/target/{name}")),
        }
    }

    fn all() -> Vec<Artifact> {
        vec![
            art(Kind::Test, "osso-vmm", "cli"),
            art(Kind::Test, "osso-vmm", "osso_vmm"),
            art(Kind::Test, "osso-sdk", "userspace"),
            art(Kind::Test, "osso-guest", "qemu_tcg_boot"),
            art(Kind::Example, "osso", "ping"),
            art(Kind::Example, "osso", "serve"),
            art(Kind::Example, "osso", "restore"),
            art(Kind::Bench, "osso", "boot"),
        ]
    }

    #[test]
    fn named_checks_come_first_and_the_suite_skips_them() {
        let c = checks(&all()).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names[..named_checks().len()],
            named_checks().iter().map(|s| s.name).collect::<Vec<_>>()[..]
        );
        let suite: Vec<&Check> = c.iter().filter(|c| c.name.starts_with("test ")).collect();
        assert_eq!(
            suite.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            [
                "test osso-vmm/cli",
                "test osso-vmm/osso_vmm",
                "test osso-sdk/userspace"
            ]
        );
        let userspace = suite[2];
        // The whole-binary run skips each test a named check already ran.
        let named_userspace = named_checks()
            .iter()
            .filter(|s| matches!(s.program, Program::Test("osso-sdk", "userspace")))
            .count();
        assert!(named_userspace >= 8, "{named_userspace}");
        assert_eq!(
            userspace.argv.iter().filter(|a| *a == "--skip").count(),
            named_userspace
        );
        assert!(userspace
            .argv
            .contains(&"quiet_kernel_keeps_the_timeline".to_string()));
        assert!(userspace.argv.contains(&"pool_take".to_string()));
        assert_eq!(userspace.argv.last().map(String::as_str), Some("--exact"));
        assert_eq!(suite[1].argv.len(), 1, "{:?}", suite[1].argv);
        assert_eq!(userspace.cwd.as_deref(), Some("/w/osso-sdk"));
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let mut a = all();
        a.retain(|a| a.name != "serve");
        let e = checks(&a).unwrap_err().to_string();
        assert!(e.contains("serve"), "{e}");
    }

    #[test]
    fn scripts_get_their_program() {
        let c = checks(&all()).unwrap();
        let serve = c.iter().find(|c| c.name == "serve_example").unwrap();
        assert_eq!(serve.argv[..2], ["/bin/sh".to_string(), "-c".to_string()]);
        assert!(serve
            .env
            .contains(&("PROGRAM".into(), "/w/target/serve".into())));
    }

    #[test]
    fn a_check_that_never_ended_fails() {
        let e = Entry::from_outcome("x", None, "level 1 hung");
        assert_eq!((e.status, e.detail.as_str()), ("fail", "level 1 hung"));
        let e = Entry::from_outcome("x", Some((Outcome::Exit(0), 1500)), "");
        assert_eq!((e.status, e.seconds), ("pass", 1.5));
        let e = Entry::from_outcome("x", Some((Outcome::TimedOut, 1)), "");
        assert_eq!(e.status, "fail");
    }
}
