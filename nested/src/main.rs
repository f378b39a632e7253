//! `osso-nested`: run Osso's layer-5 checks, or any test, example or shell
//! command, inside a nested KVM (level 1 under QEMU TCG with an emulated AMD
//! SVM CPU), where Osso's VMM runs guests with user space. See the crate docs.
//!
//! ```sh
//! cargo run --release -p osso-nested -- layer5            # all of layer 5, target/layer5.json
//! cargo run --release -p osso-nested -- test osso-sdk/api  # one test binary (args after --)
//! cargo run --release -p osso-nested -- example ping -- --json
//! cargo run --release -p osso-nested -- sh 'cat /proc/cpuinfo | grep -c svm'
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use osso_nested::artifacts::{self, Artifact, Kind};
use osso_nested::layer5::{self, Entry};
use osso_nested::runner::{self, GuestImage, Options};
use osso_nested::{init, Error, Result};

#[derive(Parser)]
#[command(about = "Run Osso's checks inside a nested KVM (QEMU TCG, emulated AMD SVM)")]
struct Args {
    /// Memory of level 1, MiB.
    #[arg(long, default_value_t = 4096, global = true)]
    mem_mib: u32,
    /// Seconds without any console output from level 1 before it counts as hung.
    #[arg(long, default_value_t = 120, global = true)]
    hang_secs: u64,
    /// Boots after a hang before giving up (each boot reruns only what had
    /// not finished).
    #[arg(long, default_value_t = 3, global = true)]
    retries: u32,
    /// Do not echo level 1's console.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Every layer-5 check; writes the report (default target/layer5.json).
    Layer5 {
        #[arg(long)]
        report: Option<PathBuf>,
        /// Where to run: nested (level 1), direct (this host, needs hardware
        /// KVM), or auto (direct on hardware KVM, else nested).
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Run only these checks (names as in the report, comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// One test binary, as package/name or name (arguments after --).
    Test {
        name: String,
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// One example (arguments after --).
    Example {
        name: String,
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// One bench (arguments after --).
    Bench {
        name: String,
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A shell command (Busybox sh) in level 1.
    Sh {
        command: String,
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
    },
    /// The workspace's executables level 1 can run.
    List,
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init::run();
    }
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("osso-nested: {e}");
            ExitCode::from(2)
        }
    }
}

fn workspace() -> Result<PathBuf> {
    // The workspace root: this crate's parent directory, where it was built.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Other("no workspace directory".into()))
}

/// The static osso-nested binary among the artifacts: it is level 1's /init.
fn init_binary(artifacts: &[Artifact]) -> Result<PathBuf> {
    artifacts
        .iter()
        .find(|a| a.kind == Kind::Bin && a.name == "osso-nested")
        .map(|a| a.path.clone())
        .ok_or_else(|| Error::NoSuchProgram("bin osso-nested".into()))
}

fn real_main(args: Args) -> Result<ExitCode> {
    let ws = workspace()?;
    let opts = Options {
        workspace: ws.clone(),
        mem_mib: args.mem_mib,
        hang: Duration::from_secs(args.hang_secs),
        margin: Duration::from_secs(600),
        retries: args.retries,
        echo: !args.quiet,
    };
    let artifacts = artifacts::build(&ws)?;
    if let What::List = args.what {
        for a in &artifacts {
            println!(
                "{:<8} {:<28} {}",
                format!("{:?}", a.kind).to_lowercase(),
                a.label(),
                a.path.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let image = GuestImage::find_or_build()?;
    let init = init_binary(&artifacts)?;
    let one =
        |name: String, a: &Artifact, args: Vec<String>, t: u64| layer5::check_for(name, a, args, t);
    let (checks, report) = match args.what {
        What::Layer5 { report, mode, only } => {
            let mut checks = layer5::checks(&artifacts)?;
            if !only.is_empty() {
                if let Some(unknown) = only.iter().find(|n| !checks.iter().any(|c| &c.name == *n)) {
                    return Err(Error::NoSuchProgram(format!("layer-5 check {unknown:?}")));
                }
                checks.retain(|c| only.contains(&c.name));
            }
            let direct = match mode.as_str() {
                "direct" => true,
                "nested" => false,
                "auto" => osso_testkit::Kvm::detect() == osso_testkit::Kvm::Hardware,
                other => {
                    return Err(Error::Other(format!(
                        "--mode {other}: use auto, nested or direct"
                    )))
                }
            };
            let report = report.unwrap_or_else(|| ws.join("target/layer5.json"));
            if direct {
                let entries = runner::run_direct(&checks, &image);
                return finish(&entries, &report, "directly on this host (hardware KVM)");
            }
            (checks, Some(report))
        }
        What::Test {
            name,
            timeout,
            args,
        } => {
            let a = artifacts::find(&artifacts, Kind::Test, &name)?;
            (
                vec![one(format!("test {}", a.label()), a, args, timeout)],
                None,
            )
        }
        What::Example {
            name,
            timeout,
            args,
        } => {
            let a = artifacts::find(&artifacts, Kind::Example, &name)?;
            (
                vec![one(format!("example {}", a.name), a, args, timeout)],
                None,
            )
        }
        What::Bench {
            name,
            timeout,
            mut args,
        } => {
            let a = artifacts::find(&artifacts, Kind::Bench, &name)?;
            args.insert(0, "--bench".into());
            (
                vec![one(format!("bench {}", a.name), a, args, timeout)],
                None,
            )
        }
        What::Sh { command, timeout } => (
            vec![osso_nested::plan::Check {
                name: "sh".into(),
                argv: vec!["/bin/sh".into(), "-c".into(), command],
                env: Vec::new(),
                cwd: Some(ws.to_string_lossy().into_owned()),
                timeout_s: timeout,
            }],
            None,
        ),
        What::List => unreachable!("handled above"),
    };
    let entries = runner::run_nested(&opts, checks, &artifacts, &image, &init)?;
    match report {
        Some(r) => finish(&entries, &r, "in level 1 of a nested KVM"),
        None => {
            summarise(&entries);
            Ok(if entries.iter().all(|e| e.status == "pass") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn summarise(entries: &[Entry]) {
    println!("osso-nested: results");
    for e in entries {
        println!(
            "  {:<7} {:>8.1} s  {}  ({})",
            e.status, e.seconds, e.check, e.detail
        );
    }
}

fn finish(entries: &[Entry], report: &Path, how: &str) -> Result<ExitCode> {
    layer5::write_report(report, entries)?;
    summarise(entries);
    let failed = entries.iter().filter(|e| e.status != "pass").count();
    println!(
        "osso-nested: layer 5 ran {how}: {} checks, {failed} not passing; report {}",
        entries.len(),
        report.display()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
