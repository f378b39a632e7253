//! `osso-vmm` command line: boots a kernel and initrd with a serial console on
//! stdout; stdin is passed to the guest console byte for byte (unless
//! `--no-stdin`).
//!
//! Exit status: 0 when the guest ended by itself (reset or shutdown); 1 with a
//! one-line reason on stderr otherwise (timeout, KVM error, stop); 2 for bad
//! input (missing or bad kernel/initrd, bad sizes, over-long command line).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use osso_vmm::net::{MacAddr, NetBackendConfig, NetConfig, PortForward};
use osso_vmm::{MachineBuilder, VmConfig};

/// Boot a Linux kernel in an Osso microVM.
#[derive(Debug, Parser)]
#[command(name = "osso-vmm", version, about)]
struct Args {
    /// Kernel: an uncompressed ELF vmlinux (PVH entry, the fast path) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initrd / initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = VmConfig::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Appended to the kernel command line.
    #[arg(long)]
    cmdline_extra: Option<String>,
    /// Stop the VM after this many seconds (fractions allowed).
    #[arg(long)]
    timeout: Option<f64>,
    /// Write the run's metrics as JSON to this file.
    #[arg(long)]
    metrics_json: Option<PathBuf>,
    /// Do not pass stdin to the guest console.
    #[arg(long)]
    no_stdin: bool,
    /// Network backend: `user` (default; the VMM is the guest's gateway
    /// 10.0.2.2, no egress), `tap:NAME` (root or CAP_NET_ADMIN) or `none`.
    #[arg(long, default_value = "user")]
    net: NetBackendConfig,
    /// Forward host 127.0.0.1:HOST_PORT to guest port GUEST_PORT (user network; repeatable).
    #[arg(long = "forward", value_name = "HOST_PORT:GUEST_PORT")]
    forwards: Vec<PortForward>,
    /// Let the guest reach host 127.0.0.1:PORT at 10.0.2.2:PORT (user network;
    /// repeatable). Nothing else leaves the VM.
    #[arg(long = "allow-host-port", value_name = "PORT")]
    allowed_host_ports: Vec<u16>,
}

impl Args {
    fn net_config(&self) -> NetConfig {
        NetConfig {
            backend: self.net.clone(),
            forwards: self.forwards.clone(),
            allowed_host_ports: self.allowed_host_ports.clone(),
            mac: MacAddr::random_local(),
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OSSO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            eprintln!("osso-vmm: --timeout must be a positive number of seconds");
            return ExitCode::from(2);
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let mut config = VmConfig::kernel(args.kernel.clone(), args.initrd.clone());
    config.mem_mib = args.mem_mib;
    config.vcpus = args.vcpus;
    config.cmdline_extra = args.cmdline_extra.clone();
    config.timeout = timeout;
    config.console = Box::new(std::io::stdout());
    if !args.no_stdin {
        config.console_input = Some(Box::new(std::io::stdin()));
    }
    config.start = Some(start);

    let mut builder = match MachineBuilder::new(config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("osso-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    // The machine owns the device: it stops with the VM.
    match builder.attach_net(&args.net_config()) {
        Ok(()) => {
            for f in &args.forwards {
                eprintln!(
                    "osso-vmm: forwarding 127.0.0.1:{} to guest port {}",
                    f.host_port, f.guest_port
                );
            }
        }
        Err(e) => {
            eprintln!("osso-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let machine = match builder.start() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("osso-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let out = machine.wait();

    if let Some(path) = &args.metrics_json {
        let json = match serde_json::to_string_pretty(&out.metrics) {
            Ok(j) => j,
            Err(e) => format!("{{\"error\": \"{e}\"}}"),
        };
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("osso-vmm: cannot write {}: {e}", path.display());
        }
    }
    let panic_note = match out.metrics.kernel_panic_us {
        Some(us) => format!(" (after a kernel panic at {:.3} s)", us as f64 / 1e6),
        None => String::new(),
    };
    if out.exit.guest_ended_by_itself() {
        eprintln!("osso-vmm: guest ended: {}{panic_note}", out.exit);
        ExitCode::SUCCESS
    } else {
        eprintln!("osso-vmm: {}{panic_note}", out.exit);
        ExitCode::from(1)
    }
}
