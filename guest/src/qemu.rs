//! Booting an image under QEMU with software emulation (TCG, no KVM), to check
//! the guest image itself (kernel config, Toybox, `/init`) on any machine.
//!
//! QEMU's `microvm` machine with `acpi=off` puts the virtio-mmio device on the
//! kernel command line itself; `-netdev user` gives the guest QEMU's own
//! user-mode network, whose gateway is 10.0.2.2 inside the QEMU process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a QEMU run produced.
#[derive(Debug)]
pub struct QemuRun {
    /// Console lines, in order.
    pub console: Vec<String>,
    /// QEMU's exit status, or None if it was killed at the time limit.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
}

impl QemuRun {
    pub fn text(&self) -> String {
        self.console.join("\n")
    }
}

/// `qemu-system-x86_64 -M microvm` booting `kernel` + `initrd` with `append`:
/// `mem_mib` of RAM, one vCPU, the serial console on stdout (piped), QEMU's
/// user network on a virtio-mmio NIC, `-no-reboot` (a guest reboot ends
/// QEMU), stdin closed. `kvm`: `-enable-kvm` with QEMU's default CPU model
/// (`-cpu host` aborts under PVM: QEMU cannot set MSR 0x10a there);
/// otherwise TCG with `-cpu max`. The caller sets stderr and spawns it.
pub fn microvm_command(
    kernel: &Path,
    initrd: &Path,
    append: &str,
    kvm: bool,
    mem_mib: u64,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,isa-serial=on,acpi=off"]);
    if kvm {
        cmd.arg("-enable-kvm");
    } else {
        cmd.args(["-cpu", "max"]);
    }
    cmd.args(["-m", &mem_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// Boots `kernel` + `initrd` under `qemu-system-x86_64 -M microvm` (TCG),
/// 128 MiB, user networking, `-no-reboot` (a guest reboot ends QEMU), with
/// `append` as the kernel command line. Kills QEMU (the one it started, by its
/// handle) after `limit`. `echo` prints each console line as it arrives.
pub fn boot_tcg(
    kernel: &Path,
    initrd: &Path,
    append: &str,
    limit: Duration,
    echo: bool,
) -> std::io::Result<QemuRun> {
    let started = Instant::now();
    let mut cmd = microvm_command(kernel, initrd, append, false, 128);
    let mut child = cmd.stderr(Stdio::inherit()).spawn()?;
    let stdout = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in stdout
            .into_iter()
            .flat_map(|s| BufReader::new(s).lines().map_while(Result::ok))
        {
            if echo {
                println!("guest| {line}");
            }
            let _ = tx.send(line);
        }
    });
    let mut status = None;
    while started.elapsed() < limit {
        if let Some(s) = child.try_wait()? {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    // Reaps the child (returns the saved status when it had already exited).
    let _ = child.wait();
    let elapsed = started.elapsed();
    let _ = reader.join();
    Ok(QemuRun {
        console: rx.try_iter().collect(),
        status,
        elapsed,
    })
}
