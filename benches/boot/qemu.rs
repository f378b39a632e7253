//! QEMU `microvm` beside Osso: its version, and one boot of the same kernel and
//! initramfs with its console timestamped and its memory sampled.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::osso_run::KernelRun;
use crate::{ms, INIT_LINE, MEM_MIB, ONLINE_LINE};

pub(crate) fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    })
}

/// Kills and reaps a QEMU this bench started (by its handle).
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// VmRSS of `pid` and the resident part of its guest RAM mapping (the
/// anonymous mapping of exactly the guest RAM size in /proc/<pid>/smaps).
fn qemu_memory(pid: u32) -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |s: &str| s.split_whitespace().nth(1)?.parse::<f64>().ok();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(kib)
        .map(|k| k * 1024.0);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut size = None;
    let mut guest = None;
    for l in smaps.lines() {
        if l.starts_with("Size:") {
            size = kib(l);
        } else if l.starts_with("Rss:") && size == Some((MEM_MIB * 1024) as f64) {
            guest = Some(guest.unwrap_or(0.0) + kib(l).unwrap_or(0.0) * 1024.0);
            size = None;
        }
    }
    (rss, guest)
}

/// The console line a QEMU run was waiting for when it stopped.
fn awaited(run: &KernelRun) -> &'static str {
    if run.init_ms.is_none() {
        INIT_LINE
    } else {
        ONLINE_LINE
    }
}

/// One QEMU boot of the same kernel and initramfs; killed at the /init line,
/// or with `wait_online` (guest user space runs) at the ONLINE line.
pub(crate) fn qemu_kernel_run(
    vmlinux: &Path,
    initrd: &Path,
    append: &str,
    use_kvm: bool,
    wait_online: bool,
    limit: Duration,
) -> Result<KernelRun, String> {
    let mut cmd = osso_guest::qemu::microvm_command(vmlinux, initrd, append, use_kvm, MEM_MIB);
    cmd.stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("start QEMU: {e}"))?;
    let mut guard = QemuGuard(child);
    let pid = guard.0.id();
    let mut stdout = guard.0.stdout.take().ok_or("no QEMU stdout")?;
    let mut stderr = guard.0.stderr.take().ok_or("no QEMU stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // (event, ms from start): 0 = first byte, 1 = /init line, 2 = end of
    // output, 3 = the ONLINE line.
    let (tx, rx) = mpsc::channel::<(u8, f64)>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        let mut first = true;
        let mut tail = String::new();
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = ms(start.elapsed());
            if first {
                first = false;
                let _ = tx.send((0, now));
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let l = String::from_utf8_lossy(&line).into_owned();
                    if l.contains(INIT_LINE) {
                        let _ = tx.send((1, now));
                    }
                    if l.contains(ONLINE_LINE) {
                        let _ = tx.send((3, now));
                    }
                    tail = l;
                    line.clear();
                } else if line.len() < 4096 {
                    line.push(b);
                }
            }
        }
        let _ = tx.send((2, ms(start.elapsed())));
        tail
    });
    let mut run = KernelRun::default();
    let deadline = start + limit;
    let mut failure = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, t)) => run.first_byte_ms = Some(t),
            Ok((1, t)) => {
                run.init_ms = Some(t);
                let (rss, guest) = qemu_memory(pid);
                run.rss = rss;
                run.guest_resident = guest;
                run.own_rss = rss.zip(guest).map(|(r, g)| r - g);
                if !wait_online {
                    break;
                }
            }
            Ok((3, t)) => {
                run.online_ms = Some(t);
                break;
            }
            Ok(_) => {
                failure = Some(format!("QEMU ended before the {:?} line", awaited(&run)));
                break;
            }
            Err(_) => {
                failure = Some(format!(
                    "no {:?} within {} s",
                    awaited(&run),
                    limit.as_secs()
                ));
                break;
            }
        }
    }
    drop(guard); // kill and reap our QEMU
    let tail = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    match failure {
        Some(f) => Err(format!(
            "{f}; last console line {tail:?}; stderr {:?}",
            err.trim()
        )),
        None => Ok(run),
    }
}
