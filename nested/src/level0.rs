//! Level 0: `qemu-system-x86_64` in software mode (TCG) with `-cpu max`, an
//! emulated AMD CPU with SVM and nested paging, booting the level-1 kernel and
//! root file system with no network device at all (`-nic none`: nothing in
//! level 1 or 2 can reach a real network). One vCPU: with `-smp 2`, QEMU
//! 7.2's multi-threaded TCG livelocked level 1 in 4 of 6 measured runs.
//!
//! The serial console is level 1's only channel: every line is echoed live,
//! protocol lines ([`crate::plan::Event`]) are parsed, and a level 1 that
//! prints nothing (not even `/init`'s heartbeat) for the hang limit is taken
//! for hung and killed.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::plan::{Event, Outcome};

/// How to start level 0.
#[derive(Debug, Clone)]
pub struct Level0 {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mem_mib: u32,
    /// No console output for this long: level 1 is hung.
    pub hang: Duration,
    /// The whole run may take this long.
    pub timeout: Duration,
    /// Echo level 1's console to stdout; otherwise print only progress
    /// (level 1 up, each check's end) with the checks' names.
    pub echo: bool,
    /// The plan's check names, in order (for progress lines).
    pub names: Vec<String>,
}

/// What one level-0 run saw.
#[derive(Debug, Default)]
pub struct Run {
    /// `/init`'s "up" report: (`/dev/kvm` present, detail).
    pub up: Option<(bool, String)>,
    /// Per check: began, and how it ended with its milliseconds.
    pub began: Vec<bool>,
    pub ended: Vec<Option<(Outcome, u64)>>,
    /// Every check ran and level 1 said so.
    pub done: bool,
    /// Killed by the hang detector, after this many seconds of silence.
    pub hung: Option<u64>,
    /// Killed at the overall time limit.
    pub timed_out: bool,
    pub seconds: f64,
    /// Level 1's console, as text (also echoed live).
    pub console: String,
}

enum Msg {
    Line(String),
    Eof,
}

impl Level0 {
    /// The kernel command line of level 1.
    fn append() -> &'static str {
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off rdinit=/init"
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.qemu);
        c.args(["-nodefaults", "-no-user-config", "-nic", "none"])
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", Self::append()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    }

    fn progress(&self, event: &Option<Event>, started: Instant) {
        let t = started.elapsed().as_secs_f64();
        let name = |i: usize| self.names.get(i).map(String::as_str).unwrap_or("?");
        match event {
            Some(Event::Up { kvm, detail }) => println!(
                "osso-nested: {t:7.1} s level 1 up, /dev/kvm {}, {detail}",
                if *kvm { "present" } else { "MISSING" }
            ),
            Some(Event::End {
                index,
                outcome,
                millis,
            }) => println!(
                "osso-nested: {t:7.1} s [{}/{}] {}: {outcome} ({:.1} s)",
                index + 1,
                self.names.len(),
                name(*index),
                *millis as f64 / 1000.0
            ),
            _ => {}
        }
    }

    /// Boots level 1 and follows it until it powers off, hangs or runs out of time.
    pub fn run(&self, checks: usize) -> Result<Run> {
        let started = Instant::now();
        let mut child = self
            .command()
            .spawn()
            .map_err(|e| Error::io(format!("start {}", self.qemu.display()), e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Other("QEMU's stdout was not captured".into()))?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        if tx.send(Msg::Line(line)).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send(Msg::Eof);
        });
        let mut run = Run {
            began: vec![false; checks],
            ended: vec![None; checks],
            ..Run::default()
        };
        let deadline = started + self.timeout;
        let mut out = std::io::stdout();
        loop {
            let now = Instant::now();
            if now >= deadline {
                run.timed_out = true;
                stop(&mut child);
                break;
            }
            let wait = self.hang.min(deadline - now);
            match rx.recv_timeout(wait) {
                Ok(Msg::Line(line)) => {
                    if self.echo {
                        let _ = writeln!(out, "{line}");
                    }
                    run.console.push_str(&line);
                    run.console.push('\n');
                    let event = Event::parse(&line);
                    if !self.echo {
                        self.progress(&event, started);
                    }
                    match event {
                        Some(Event::Up { kvm, detail }) => run.up = Some((kvm, detail)),
                        Some(Event::Begin { index }) if index < checks => run.began[index] = true,
                        Some(Event::End {
                            index,
                            outcome,
                            millis,
                        }) if index < checks => run.ended[index] = Some((outcome, millis)),
                        Some(Event::Done) => run.done = true,
                        _ => {}
                    }
                }
                Ok(Msg::Eof) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() < deadline {
                        run.hung = Some(self.hang.as_secs());
                    } else {
                        run.timed_out = true;
                    }
                    stop(&mut child);
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.wait();
        let _ = reader.join();
        run.seconds = started.elapsed().as_secs_f64();
        Ok(run)
    }
}

/// Kills level 0 (our own child, by its handle).
fn stop(child: &mut Child) {
    let _ = child.kill();
}

/// The console lines check `index` printed (between its begin and end
/// lines; to the end of the console if it never ended).
pub fn check_output(console: &str, index: usize) -> Vec<&str> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in console.lines() {
        match Event::parse(line) {
            Some(Event::Begin { index: i }) => inside = i == index,
            Some(Event::End { index: i, .. }) if i == index => inside = false,
            Some(Event::Alive { .. }) => {}
            _ if inside => out.push(line),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checks_output_is_what_it_printed_between_its_marks() {
        let console = [
            Event::Begin { index: 0 }.line(),
            "zero".into(),
            Event::End {
                index: 0,
                outcome: Outcome::Exit(0),
                millis: 5,
            }
            .line(),
            Event::Begin { index: 1 }.line(),
            "one".into(),
            Event::Alive {
                index: 1,
                seconds: 20,
            }
            .line(),
            "still one".into(),
        ]
        .join("\n");
        assert_eq!(check_output(&console, 0), ["zero"]);
        assert_eq!(check_output(&console, 1), ["one", "still one"]);
        assert!(check_output(&console, 2).is_empty());
    }
}
