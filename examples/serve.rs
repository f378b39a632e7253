//! One VM per request: a small host loop that reads shell commands, one per
//! line, from stdin and runs each in a fresh Osso microVM (`osso_sdk::run`),
//! printing its output, exit status and the VM's metrics. Up to `--parallel`
//! requests run at once, each in its own VM.
//!
//! ```sh
//! printf 'uname -a\necho hello; exit 3\n' | cargo run --release --example serve -- --parallel 2
//! ```
//!
//! Needs hardware KVM (guest user space); on other hosts each request fails at
//! once with the reason.

use std::io::BufRead;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(about = "Run each stdin line as a shell command in a fresh microVM")]
struct Args {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Per-request timeout once the guest is ready, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Jobs boot the default image: find it, or build it once up front
    // (minutes the first time, with progress bars) rather than in a request.
    if let Err(e) = osso_sdk::build_image(&osso_sdk::Config::default()) {
        eprintln!("serve: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let workers: Vec<_> = (0..args.parallel.max(1))
        .map(|_| {
            let rx = rx.clone();
            let timeout = Duration::from_secs(args.timeout);
            std::thread::spawn(move || {
                let mut failures = 0;
                loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok((n, cmd))) = next else { break };
                    let t = Instant::now();
                    let mut job = osso_sdk::Job::new(cmd.clone());
                    job.timeout = timeout;
                    match osso_sdk::run(job) {
                        Ok(r) => println!(
                            "[{n}] `{cmd}` -> exit {} in {:.1} ms\n[{n}] stdout: {}\n[{n}] stderr: {}\n[{n}] {}",
                            r.output.status,
                            t.elapsed().as_secs_f64() * 1000.0,
                            r.output.stdout_text().trim_end(),
                            r.output.stderr_text().trim_end(),
                            r.metrics
                        ),
                        Err(e) => {
                            failures += 1;
                            println!("[{n}] `{cmd}` failed: {e}");
                        }
                    }
                }
                failures
            })
        })
        .collect();
    for (n, line) in std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .enumerate()
    {
        if !line.trim().is_empty() && tx.send((n + 1, line)).is_err() {
            break;
        }
    }
    drop(tx);
    let failures: usize = workers.into_iter().map(|w| w.join().unwrap_or(1)).sum();
    if failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
