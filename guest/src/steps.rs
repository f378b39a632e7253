//! Running the build's external commands (make, patch, strip, apt-get) with
//! progress shown and their output kept in a log file.
//!
//! Each long step gets an indicatif spinner that shows the command's latest
//! output line and the elapsed time; the full output goes to a log next to the
//! build, and an error names that log and quotes its last lines.

use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Spinners and bars on stderr (hidden automatically when it is not a terminal).
    Bars,
    /// Nothing but the builder's own log lines.
    Quiet,
}

/// A spinner for one step, or a hidden one.
pub fn spinner(mode: ProgressMode, msg: &str) -> ProgressBar {
    let pb = match mode {
        ProgressMode::Bars => ProgressBar::new_spinner(),
        ProgressMode::Quiet => ProgressBar::hidden(),
    };
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed:>4}] {prefix}: {wide_msg}")
    {
        pb.set_style(style);
    }
    pb.set_prefix(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A byte-count bar for reading an archive of `len` bytes.
pub fn byte_bar(mode: ProgressMode, msg: &str, len: u64) -> ProgressBar {
    let pb = match mode {
        ProgressMode::Bars => ProgressBar::new(len),
        ProgressMode::Quiet => ProgressBar::hidden(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed:>4}] {prefix}: [{bar:30}] {bytes}/{total_bytes}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(msg.to_string());
    pb
}

/// Runs `cmd` to completion as step `what`, its output appended to `log`.
/// Fails with the log's path and tail when the command fails or cannot start.
pub fn run(mode: ProgressMode, what: &str, cmd: &mut Command, log: &Path) -> Result<()> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(log, e))?;
    let _ = writeln!(logf, "$ {cmd:?}");
    tracing::debug!(?cmd, "running");
    let pb = spinner(mode, what);
    // Spinners are invisible off a terminal (CI logs): say what runs instead.
    let plain = mode == ProgressMode::Bars && !std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    if plain {
        eprintln!("osso-guest: {what} ...");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            what: what.to_string(),
            detail: format!("could not start {:?}: {e}", cmd.get_program()),
            log: log.to_path_buf(),
        })?;
    let logf = Arc::new(Mutex::new(logf));
    let mut pumps = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let logf = Arc::clone(&logf);
        let pb = pb.clone();
        pumps.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                if let Ok(mut f) = logf.lock() {
                    let _ = writeln!(f, "{line}");
                }
                pb.set_message(line.trim().to_string());
            }
        }));
    }
    let status = child.wait().map_err(|e| Error::io(log, e))?;
    for p in pumps {
        let _ = p.join();
    }
    pb.finish_and_clear();
    if plain {
        eprintln!(
            "osso-guest: {what}: {status} after {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            what: what.to_string(),
            detail: format!("{status}; last lines:\n{}", tail(log, 15)),
            log: log.to_path_buf(),
        })
    }
}

/// Runs a short command and returns its stdout, or None if it failed.
pub fn capture(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader
/// never sees half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp-osso");
    fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
