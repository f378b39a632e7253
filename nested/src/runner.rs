//! One harness run: the level-1 image assembled from the artifacts, the Osso
//! image and the Debian packages, then the plan run in level 1, with retries
//! of what had not finished when level 1 hung; or, on hardware KVM, the same
//! checks run directly on this host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::artifacts::Artifact;
use crate::debs;
use crate::error::{Error, Result};
use crate::layer5::Entry;
use crate::level0::Level0;
use crate::plan::{Check, Outcome, Plan, PLAN_PATH};
use crate::rootfs::Rootfs;

/// Level 1's `/init` says it is alive this often while a check runs, so a
/// silent console for many of these means level 1 itself stopped.
pub const HEARTBEAT_S: u64 = 10;

/// Lines of a failing check's output shown by a quiet run.
const FAILED_TAIL_LINES: usize = 120;

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub workspace: PathBuf,
    pub mem_mib: u32,
    pub hang: Duration,
    /// Added to the sum of the checks' limits for the whole run.
    pub margin: Duration,
    /// Boots after a hang. QEMU 7.2's emulated SVM sometimes stops level 1
    /// for good (measured: see nested-kvm.md and the README); a hang costs
    /// `hang` plus a boot, and the checks that had finished keep their
    /// results.
    pub retries: u32,
    pub echo: bool,
}

/// The Osso guest image as the checks see it.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub bzimage: PathBuf,
}

impl GuestImage {
    /// The image `osso-guest build` made (built now if it is missing).
    pub fn find_or_build() -> Result<GuestImage> {
        let opts = osso_guest::BuildOptions::from_env()?;
        let img = osso_guest::build(&opts)?;
        Ok(GuestImage {
            vmlinux: img.manifest.vmlinux_path.clone(),
            initramfs: img.manifest.initramfs_path.clone(),
            bzimage: img.manifest.bzimage_path.clone(),
            dir: img.dir,
        })
    }
}

/// The environment every check gets.
pub fn check_env(image: &GuestImage, nested: bool) -> Vec<(String, String)> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut env = vec![
        ("OSSO_REQUIRE_E2E".to_string(), "1".to_string()),
        ("OSSO_KERNEL".into(), s(&image.vmlinux)),
        ("OSSO_INITRD".into(), s(&image.initramfs)),
        ("OSSO_IMAGE_DIR".into(), s(&image.dir)),
        ("RUST_BACKTRACE".into(), "1".into()),
    ];
    if nested {
        env.extend([
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME".into(), "/root".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("USER".into(), "root".into()),
            ("TERM".into(), "dumb".into()),
        ]);
    }
    env
}

/// Host programs the checks use in level 1: (name, needed by).
const HOST_PROGRAMS: &[(&str, &str)] = &[
    ("ip", "the TAP tests (Busybox's ip has no tuntap)"),
    ("ping", "the network tests"),
    ("cpio", "the cpio writer's cross-check"),
];

/// What level 1 takes from this host and Debian's archive, found (and
/// fetched, checked) once per run, whatever the number of boots.
pub struct HostInputs {
    pub kernel: debs::Kernel,
    pub busybox: PathBuf,
    pub qemu: PathBuf,
}

impl HostInputs {
    pub fn find() -> Result<HostInputs> {
        let cache = osso_guest::cache::cache_root();
        Ok(HostInputs {
            kernel: debs::kernel(&cache)?,
            busybox: debs::busybox(&cache)?,
            qemu: debs::need_tool("qemu-system-x86_64", "apt-get install qemu-system-x86")?,
        })
    }
}

/// Assembles the level-1 root file system into `out`.
pub fn assemble(
    out: &Path,
    host: &HostInputs,
    artifacts: &[Artifact],
    image: &GuestImage,
    plan: &Plan,
    init: &Path,
    workspace: &Path,
) -> Result<u64> {
    let mut fs = Rootfs::new();
    fs.copy(init, "/init")?;
    let plan_json = serde_json::to_vec_pretty(plan).map_err(|e| Error::Other(e.to_string()))?;
    fs.bytes(PLAN_PATH, 0o644, plan_json)?;
    for a in artifacts {
        fs.copy_same(&a.path)?;
    }
    for f in [&image.vmlinux, &image.initramfs, &image.bzimage] {
        fs.copy_same(f)?;
    }
    let manifest = image.dir.join("manifest.json");
    if manifest.exists() {
        fs.copy_same(&manifest)?;
    }
    for m in &host.kernel.modules {
        fs.copy_same(m)?;
    }
    fs.qemu(&host.qemu)?;
    for (name, why) in HOST_PROGRAMS {
        match osso_guest::tools::which(name) {
            Some(p) => {
                fs.program_with_libraries(&p)?;
            }
            None => {
                eprintln!("osso-nested: {name} not found on this host; level 1 lacks it ({why})")
            }
        }
    }
    // Real programs first: Busybox links only where nothing else stands.
    fs.busybox(&host.busybox)?;
    for f in tracked_files(workspace) {
        if f.is_file() {
            fs.copy_same(&f)?;
        }
    }
    fs.write(out)?;
    Ok(fs.data_bytes())
}

/// The workspace's tracked files (tests may read their sources' neighbours).
fn tracked_files(workspace: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(workspace)
        .output();
    match out {
        Ok(o) if o.status.success() => o
            .stdout
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| workspace.join(String::from_utf8_lossy(s).as_ref()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs `checks` in level 1: boots it, and once more for what was left if it hung.
/// Returns one entry per check plus a `level1` entry describing the runs.
pub fn run_nested(
    opts: &Options,
    checks: Vec<Check>,
    artifacts: &[Artifact],
    image: &GuestImage,
    init: &Path,
) -> Result<Vec<Entry>> {
    let host = HostInputs::find()?;
    let kernel = &host.kernel;
    let modules: Vec<(String, String)> = kernel
        .modules
        .iter()
        .map(|m| {
            let params = if m.ends_with("kvm-amd.ko") {
                "nested=1 vgif=0"
            } else {
                ""
            };
            (m.to_string_lossy().into_owned(), params.to_string())
        })
        .collect();
    let dir = opts.workspace.join("target/nested");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let cpio = dir.join("level1.cpio");
    let started = Instant::now();
    let mut results: Vec<Option<(Outcome, u64)>> = vec![None; checks.len()];
    let mut notes = vec![format!(
        "level-1 kernel {} (deb sha256 {})",
        kernel.abi,
        &kernel.sha256[..16.min(kernel.sha256.len())]
    )];
    if let Some(n) = &kernel.note {
        notes.push(n.clone());
    }
    let mut attempts = 0;
    let mut ok = true;
    loop {
        attempts += 1;
        let pending: Vec<usize> = (0..checks.len())
            .filter(|i| results[*i].is_none())
            .collect();
        if pending.is_empty() {
            break;
        }
        let plan = Plan {
            env: check_env(image, true),
            modules: modules.clone(),
            heartbeat_s: HEARTBEAT_S,
            checks: pending.iter().map(|i| checks[*i].clone()).collect(),
        };
        let t = Instant::now();
        let bytes = assemble(&cpio, &host, artifacts, image, &plan, init, &opts.workspace)?;
        eprintln!(
            "osso-nested: level-1 image {} ({:.0} MB of files) in {:.1} s; booting level 1 (attempt {attempts}, {} checks)",
            cpio.display(),
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64(),
            pending.len()
        );
        let limit: u64 = plan.checks.iter().map(|c| c.timeout_s).sum();
        let l0 = Level0 {
            qemu: host.qemu.clone(),
            kernel: kernel.vmlinuz.clone(),
            initrd: cpio.clone(),
            mem_mib: opts.mem_mib,
            hang: opts.hang,
            timeout: Duration::from_secs(limit) + opts.margin,
            echo: opts.echo,
            names: plan.checks.iter().map(|c| c.name.clone()).collect(),
            monitor: dir.join("monitor.sock"),
        };
        let run = l0.run(plan.checks.len())?;
        let log = dir.join(format!("console-{attempts}.txt"));
        let mut kept = run.console.clone();
        if let Some(r) = &run.registers {
            kept.push_str("\n--- osso-nested: level 1's CPU when it was taken for hung (QEMU monitor, info registers)\n");
            kept.push_str(r);
        }
        if let Err(e) = std::fs::write(&log, &kept) {
            eprintln!(
                "osso-nested: cannot keep level 1's console in {}: {e}",
                log.display()
            );
        }
        for (k, i) in pending.iter().enumerate() {
            results[*i] = run.ended[k];
            let failed = run.began[k] && !run.ended[k].is_some_and(|(o, _)| o.passed());
            if failed && !opts.echo {
                // Quiet runs still show what a failing check printed.
                let lines = crate::level0::check_output(&run.console, k);
                let from = lines.len().saturating_sub(FAILED_TAIL_LINES);
                eprintln!(
                    "osso-nested: {} did not pass; its last {} lines:",
                    checks[*i].name,
                    lines.len() - from
                );
                for l in &lines[from..] {
                    eprintln!("  | {l}");
                }
            }
        }
        let where_ = pending
            .iter()
            .enumerate()
            .find(|(k, _)| run.began[*k] && run.ended[*k].is_none())
            .map(|(_, i)| checks[*i].name.clone());
        let mut note = format!(
            "attempt {attempts}: {:.1} s (console in {})",
            run.seconds,
            log.display()
        );
        match &run.up {
            Some((kvm, d)) => note.push_str(&format!(
                ", /dev/kvm {}, {d}",
                if *kvm { "present" } else { "MISSING" }
            )),
            None => note.push_str(", level 1 never reported up"),
        }
        if let Some(s) = run.hung {
            note.push_str(&format!(
                ", HUNG (no console output for {s} s){}{}",
                where_
                    .as_ref()
                    .map(|w| format!(" during {w}"))
                    .unwrap_or_default(),
                run.registers.as_deref().map(hung_cpu).unwrap_or_default()
            ));
        }
        if run.timed_out {
            note.push_str(", stopped at the run's time limit");
            ok = false;
        }
        if !run.done && run.hung.is_none() && !run.timed_out {
            note.push_str(", level 1 ended before it finished the plan");
            ok = false;
        }
        notes.push(note);
        if run.hung.is_none() || attempts > opts.retries {
            if run.hung.is_some() {
                ok = false;
            }
            break;
        }
        eprintln!("osso-nested: level 1 hung; retrying what had not finished");
    }
    let mut entries: Vec<Entry> = checks
        .iter()
        .zip(&results)
        .map(|(c, r)| {
            Entry::from_outcome(
                &c.name,
                *r,
                "did not finish: level 1 hung, ended or ran out of time (see the level1 entry)",
            )
        })
        .collect();
    entries.insert(
        0,
        Entry {
            check: "level1".into(),
            status: if ok { "pass" } else { "fail" },
            seconds: started.elapsed().as_secs_f64(),
            detail: format!("{attempts} boot(s): {}", notes.join("; ")),
        },
    );
    Ok(entries)
}

/// Where a hung level 1's CPU was: RIP, halted or not, and CR3 (whether the
/// CPU was in level 1 or in a level-2 guest shows in CR3 and the segment
/// bases kept in the console file; Debian's package has no real System.map
/// to name the code with).
fn hung_cpu(registers: &str) -> String {
    use crate::level0::register;
    let Some(rip) = register(registers, "RIP") else {
        return ", registers unreadable".into();
    };
    let halted = register(registers, "HLT").map(|h| if h == 1 { ", halted" } else { ", running" });
    let cr3 = register(registers, "CR3").map(|c| format!(", CR3 {c:#x}"));
    format!(
        "; CPU at RIP {rip:#x}{}{}",
        halted.unwrap_or_default(),
        cr3.unwrap_or_default()
    )
}

/// Runs `checks` here, one after another (a host with hardware KVM).
pub fn run_direct(checks: &[Check], image: &GuestImage) -> Vec<Entry> {
    let env = check_env(image, false);
    checks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            println!("osso-nested: [{i}] {} ...", c.name);
            let t = Instant::now();
            let o = crate::init::run_check(i, c, &env, Duration::from_secs(60), false);
            let ms = t.elapsed().as_millis() as u64;
            println!("osso-nested: [{i}] {}: {o}", c.name);
            Entry::from_outcome(&c.name, Some((o, ms)), "")
        })
        .collect()
}
