//! One Osso real-kernel run (osso_vmm wired as osso_sdk::spawn does, with the
//! first console byte timestamped), and the protocol that runs it in a fresh
//! process (this bench binary run again) so that its RSS is one VM's.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use osso_sdk::HostKvm;
use osso_vmm::metrics::memory_figures;
use osso_vmm::net::{MacAddr, NetBackendConfig, NetConfig};
use osso_vmm::{MachineBuilder, VmConfig};
use serde_json::json;

use crate::report::fmt_num;
use crate::{us_to_ms, INIT_LINE, MEM_MIB, ONLINE_LINE};

/// What one real-kernel run of either system measured (ms from start; bytes).
#[derive(Default, Debug)]
pub(crate) struct KernelRun {
    pub(crate) setup_ms: Option<f64>,
    pub(crate) first_byte_ms: Option<f64>,
    pub(crate) init_ms: Option<f64>,
    pub(crate) ready_ms: Option<f64>,
    /// Start to the guest's `SUCCESS: ONLINE` line (guest user space only).
    pub(crate) online_ms: Option<f64>,
    pub(crate) rss: Option<f64>,
    pub(crate) own_rss: Option<f64>,
    pub(crate) guest_resident: Option<f64>,
}

/// A console sink recording the first byte's time (us from `start`). Lines
/// come from the VMM (`VmConfig::console_lines`), which cuts them once.
struct FirstByte {
    start: Instant,
    first: Arc<AtomicU64>,
}

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.first.load(Ordering::Relaxed) == u64::MAX {
            let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            self.first.store(us, Ordering::Relaxed);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One Osso boot of the real kernel, through osso_vmm wired as osso_sdk::spawn
/// does. Stops at the /init line under PVM, at the boot timer on hardware.
fn osso_kernel_run(
    vmlinux: &Path,
    initrd: &Path,
    host: HostKvm,
    limit: Duration,
) -> Result<KernelRun, String> {
    let start = Instant::now();
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let online = Arc::new(AtomicU64::new(u64::MAX));
    let last_line = Arc::new(std::sync::Mutex::new(String::new()));
    let mut vmc = VmConfig::kernel(vmlinux, Some(initrd.to_path_buf()));
    vmc.mem_mib = MEM_MIB;
    vmc.vcpus = 1;
    vmc.timeout = Some(limit);
    vmc.start = Some(start);
    vmc.console = Box::new(FirstByte {
        start,
        first: first.clone(),
    });
    {
        let (online, last_line) = (online.clone(), last_line.clone());
        vmc.console_lines = Some(Box::new(move |line: &str| {
            if line.contains(ONLINE_LINE) && online.load(Ordering::Relaxed) == u64::MAX {
                let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
                online.store(us, Ordering::Relaxed);
            }
            *last_line.lock().unwrap_or_else(|p| p.into_inner()) = line.trim_end().to_string();
        }));
    }
    let mut builder = MachineBuilder::new(vmc).map_err(|e| e.to_string())?;
    let net_config = NetConfig {
        mac: MacAddr::random_local(),
        backend: NetBackendConfig::User,
        ..NetConfig::default()
    };
    builder.attach_net(&net_config).map_err(|e| e.to_string())?;
    let timeline = builder.timeline();
    let mem = builder.guest_memory();
    let machine = builder.start().map_err(|e| e.to_string())?;
    let mut run = KernelRun::default();
    let deadline = start + limit;
    let mut failure = None;
    loop {
        if run.init_ms.is_none() {
            if let Some(us) = timeline.init_started_us() {
                run.init_ms = Some(us_to_ms(us));
                let m = memory_figures(&mem);
                run.rss = Some(m.process_rss_bytes as f64);
                run.own_rss = Some(m.vmm_rss_bytes as f64);
                run.guest_resident = Some(m.guest_resident_bytes as f64);
                if host != HostKvm::Hardware {
                    break;
                }
            }
        }
        if let Some(us) = timeline.boot_timer_us() {
            run.ready_ms = Some(us_to_ms(us));
        }
        let on = online.load(Ordering::Relaxed);
        if on != u64::MAX {
            run.online_ms = Some(us_to_ms(on));
        }
        // On hardware KVM: on to the boot timer and the ONLINE line.
        if run.init_ms.is_some() && run.ready_ms.is_some() && run.online_ms.is_some() {
            break;
        }
        if let Some(exit) = machine.exit_reason() {
            failure = Some(format!("the VM ended first: {exit}"));
            break;
        }
        if Instant::now() >= deadline {
            failure = Some(format!("no {INIT_LINE:?} within {} s", limit.as_secs()));
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    run.setup_ms = timeline.first_kvm_run_us().map(us_to_ms);
    let fb = first.load(Ordering::Relaxed);
    run.first_byte_ms = (fb != u64::MAX).then(|| us_to_ms(fb));
    machine.stop();
    let _ = machine.wait();
    machine.release_devices();
    drop(mem);
    match failure {
        Some(f) if run.init_ms.is_none() => Err(format!(
            "{f}; first console byte at {} ms; last console line {:?}",
            fmt_num(run.first_byte_ms.unwrap_or(f64::NAN)),
            last_line.lock().unwrap_or_else(|p| p.into_inner())
        )),
        _ => Ok(run),
    }
}

pub(crate) const CHILD_ENV: &str = "OSSO_BENCH_CHILD_KERNEL_RUN";
const RESULT_TAG: &str = "OSSO_BENCH_RESULT ";

impl KernelRun {
    fn to_json(&self) -> serde_json::Value {
        json!([
            self.setup_ms,
            self.first_byte_ms,
            self.init_ms,
            self.ready_ms,
            self.rss,
            self.own_rss,
            self.guest_resident,
            self.online_ms
        ])
    }
    fn from_json(v: &serde_json::Value) -> KernelRun {
        let f = |i: usize| v.get(i).and_then(|x| x.as_f64());
        KernelRun {
            setup_ms: f(0),
            first_byte_ms: f(1),
            init_ms: f(2),
            ready_ms: f(3),
            rss: f(4),
            own_rss: f(5),
            guest_resident: f(6),
            online_ms: f(7),
        }
    }
}

/// In the child process: one Osso real-kernel run, its result on stdout.
pub(crate) fn child_kernel_run(spec: &str) -> ! {
    let parts: Vec<&str> = spec.split('\n').collect();
    let result = match parts.as_slice() {
        [vmlinux, initrd, limit_s] => {
            let host = HostKvm::detect();
            let limit = Duration::from_secs(limit_s.parse().unwrap_or(240));
            osso_kernel_run(Path::new(vmlinux), Path::new(initrd), host, limit)
        }
        _ => Err(format!("bad {CHILD_ENV} value")),
    };
    match result {
        Ok(r) => {
            println!("{RESULT_TAG}{}", r.to_json());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

/// One Osso real-kernel run in a fresh process (this bench binary run again),
/// so that its RSS is that of one VM, as QEMU's is.
pub(crate) fn osso_kernel_run_in_child(
    vmlinux: &Path,
    initrd: &Path,
    limit: Duration,
) -> Result<KernelRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let spec = format!(
        "{}\n{}\n{}",
        vmlinux.display(),
        initrd.display(),
        limit.as_secs()
    );
    let out = Command::new(exe)
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("start the child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix(RESULT_TAG)) {
        Some(j) if out.status.success() => serde_json::from_str(j)
            .map(|v| KernelRun::from_json(&v))
            .map_err(|e| format!("child result {j:?}: {e}")),
        _ => Err(format!(
            "child {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
