//! Level 0: `qemu-system-x86_64` in software mode (TCG) with `-cpu max`, an
//! emulated AMD CPU with SVM and nested paging, booting the level-1 kernel and
//! root file system with no network device at all (`-nic none`: nothing in
//! level 1 or 2 can reach a real network). One vCPU: with `-smp 2`, QEMU
//! 7.2's multi-threaded TCG livelocked level 1 in 4 of 6 measured runs.
//!
//! The serial console is level 1's only channel: every line is echoed live,
//! protocol lines ([`crate::plan::Event`]) are parsed, and a level 1 that
//! prints nothing (not even `/init`'s heartbeat) for the hang limit is taken
//! for hung and killed. Before it is killed, QEMU's monitor (a Unix socket
//! in the run's directory) is asked for the level-1 CPU's registers, so a
//! hang leaves a trace of where the CPU was.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
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
    /// QEMU's human monitor listens here (asked for registers on a hang).
    pub monitor: PathBuf,
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
    /// The monitor's `info registers` at the hang, when it answered.
    pub registers: Option<String>,
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
    /// The kernel command line of level 1. `nohz=off highres=off`: its
    /// local APIC timer runs in periodic mode, which QEMU re-arms by itself,
    /// instead of one-shot mode, which only the guest's timer interrupt
    /// re-arms. Level 1 was found stopped for good (halted, or inside a
    /// level-2 guest that never exits) as if that one interrupt had been
    /// lost; a periodic timer raises it again at the next tick. `nokaslr`:
    /// a hung CPU's RIP can be looked up by hand in the kernel's symbols
    /// (Debian ships the real System.map in the kernel's -dbg package).
    fn append() -> &'static str {
        "console=ttyS0 loglevel=4 panic=-1 mitigations=off nokaslr nohz=off highres=off rdinit=/init"
    }

    fn command(&self) -> Command {
        let mut monitor = std::ffi::OsString::from("unix:");
        monitor.push(&self.monitor);
        monitor.push(",server=on,wait=off");
        let mut c = Command::new(&self.qemu);
        c.args(["-nodefaults", "-no-user-config", "-nic", "none"])
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-display", "none", "-serial", "stdio", "-monitor"])
            .arg(monitor)
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
        // A socket left by an earlier run would make QEMU refuse to start.
        let _ = std::fs::remove_file(&self.monitor);
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
                        run.registers = ask_monitor(&self.monitor, "info registers");
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
        let _ = std::fs::remove_file(&self.monitor);
        run.seconds = started.elapsed().as_secs_f64();
        Ok(run)
    }
}

/// Sends one command to QEMU's human monitor and returns what it printed
/// before its next prompt (None if it did not answer within a few seconds).
fn ask_monitor(socket: &Path, command: &str) -> Option<String> {
    const PROMPT: &str = "(qemu) ";
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    // The banner ends with the first prompt; the command's answer with the
    // second.
    let mut sent = false;
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if !sent && text.contains(PROMPT) {
            s.write_all(format!("{command}\n").as_bytes()).ok()?;
            text.clear();
            sent = true;
        } else if sent && text.trim_end().ends_with(PROMPT.trim_end()) {
            let answer = text.trim_end().trim_end_matches(PROMPT.trim_end());
            // The monitor echoes the command (with terminal escapes) first.
            let answer = answer
                .split_once('\n')
                .map(|(_, rest)| rest)
                .unwrap_or(answer);
            return Some(answer.replace('\r', ""));
        }
    }
}

/// The value of register `name` (e.g. "RIP") in `info registers` output.
pub fn register(registers: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    registers.split_whitespace().find_map(|w| {
        w.strip_prefix(&key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
    })
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
    fn registers_are_read_from_info_registers() {
        let text = "RAX=0000000000000000 RBX=ffff888100000000\nRIP=ffffffff81a3c0d2 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1";
        assert_eq!(register(text, "RIP"), Some(0xffff_ffff_81a3_c0d2));
        assert_eq!(register(text, "RBX"), Some(0xffff_8881_0000_0000));
        assert_eq!(register(text, "RSP"), None);
    }

    #[test]
    fn the_monitor_is_asked_and_its_answer_kept() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("osso-nested-mon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let fake_qemu = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
                .unwrap();
            let mut got = [0u8; 64];
            let n = s.read(&mut got).unwrap();
            assert_eq!(&got[..n], b"info registers\n");
            s.write_all(b"info registers\r\nRIP=ffffffff81000000 HLT=0\r\n(qemu) ")
                .unwrap();
        });
        let answer = ask_monitor(&socket, "info registers").unwrap();
        fake_qemu.join().unwrap();
        assert_eq!(answer.trim(), "RIP=ffffffff81000000 HLT=0");
        // Nobody listening: no answer, no error.
        std::fs::remove_file(&socket).unwrap();
        assert!(ask_monitor(&socket, "info registers").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
