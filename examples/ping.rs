//! The first thing to run: boot Osso Linux and check its network.
//!
//! ```sh
//! cargo run --release --example ping [-- --json]
//! ```
//!
//! Builds the guest image on first use (or boots the prebuilt one named by
//! `OSSO_IMAGE_DIR`), boots it, shows the console, then the metrics line:
//! boot phases from the VMM's start, with the image preparation (minutes when
//! this run built the image) reported apart, and the VMM's RSS for this VM
//! alone (the process's growth since just before the VMM started, less
//! guest RAM). On hardware KVM the guest's `/init` pings its gateway 10.0.2.2
//! (the VMM's user-mode network) and prints `SUCCESS: ONLINE`. On a host whose
//! KVM is PVM (no guest user space) the kernel configures its own address
//! (`ip=`), parks waiting for a root device, and the host pings it through the
//! user network instead. Exit status 0 only if the network check succeeded.
//! With `--json` the last line is the metrics as JSON, with `"online"`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use osso_sdk::{Config, HostKvm, ReadyWhen};

use osso_sdk::PARKED_KERNEL_CMDLINE as PARKED_KERNEL;

#[derive(Parser)]
#[command(about = "Boot Osso Linux and check its network")]
struct Args {
    /// Print the metrics as JSON on the last line.
    #[arg(long)]
    json: bool,
    /// Host pings to send on a PVM host.
    #[arg(long, default_value_t = 5)]
    pings: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let host = HostKvm::detect();
    println!("osso ping: host KVM is {host}");
    // The image first: built here from Debian's kernel and Toybox sources the
    // first time (minutes, with progress bars), found in milliseconds after.
    println!("osso ping: finding the Osso image (building it if this is the first run)");
    match osso_sdk::build_image(&Config::default()) {
        Ok(size) => println!(
            "osso ping: image ready, {:.2} MB (kernel {:.2} + initramfs {:.2})",
            size.total_bytes as f64 / 1e6,
            size.kernel_bytes as f64 / 1e6,
            size.initramfs_bytes as f64 / 1e6
        ),
        Err(e) => {
            eprintln!("osso ping: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match host {
        HostKvm::Hardware => guest_pings_gateway(),
        HostKvm::Pvm => host_pings_parked_kernel(args.pings),
        HostKvm::Missing => Err(osso_sdk::Error::Config("no /dev/kvm on this host".into())),
    };
    let (online, metrics) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("osso ping: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("osso ping: {}", if online { "ONLINE" } else { "OFFLINE" });
    println!("metrics: {metrics}");
    if args.json {
        let mut v = serde_json::to_value(&metrics).unwrap_or_default();
        v["online"] = serde_json::Value::Bool(online);
        println!("{v}");
    }
    if online {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Hardware KVM: the guest's own /init pings 10.0.2.2 and reports.
fn guest_pings_gateway() -> Result<(bool, osso_sdk::Metrics), osso_sdk::Error> {
    println!("osso ping: booting Osso Linux; its /init pings the gateway 10.0.2.2");
    let vm = osso_sdk::spawn(Config::builder().echo_console(true).build())?;
    let exit = vm.shutdown(Duration::from_secs(10));
    let online = vm.console().contains("SUCCESS: ONLINE");
    println!("osso ping: guest ended ({exit})");
    Ok((online, vm.metrics()))
}

/// PVM: guest user space cannot run; the host pings the guest kernel instead.
fn host_pings_parked_kernel(pings: u16) -> Result<(bool, osso_sdk::Metrics), osso_sdk::Error> {
    println!(
        "osso ping: this host's KVM (PVM) cannot run guest user space, so /init cannot ping.\n\
         osso ping: booting the kernel with `{PARKED_KERNEL}` instead, and pinging it from the host\n\
         osso ping: through the user network (the guest kernel answers by itself; this takes a minute or so here)"
    );
    let vm = osso_sdk::spawn(
        Config::builder()
            .echo_console(true)
            .cmdline(PARKED_KERNEL)
            .ready_when(ReadyWhen::GuestPing)
            .boot_timeout(Duration::from_secs(600))
            .build(),
    )?;
    println!("osso ping: the guest kernel answers; pinging 10.0.2.15 from 10.0.2.2");
    let mut ok = 0;
    for seq in 1..=pings {
        match vm.ping(seq, Duration::from_secs(2)) {
            Ok(rtt) => {
                ok += 1;
                println!(
                    "reply from 10.0.2.15: seq={seq} time={:.1} ms",
                    rtt.as_secs_f64() * 1000.0
                );
            }
            Err(e) => println!("no reply for seq={seq}: {e}"),
        }
    }
    println!("osso ping: {ok}/{pings} replies");
    let metrics = vm.metrics();
    vm.kill();
    Ok((ok == pings, metrics))
}
