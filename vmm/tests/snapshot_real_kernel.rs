//! The real Osso kernel, parked (`ip=` configured, no init, waiting for a
//! root device, answering pings), snapshotted once it answers a host ping
//! through the user network, then restored twice: both clones must answer
//! pings through their own user networks at the same time. Slow under PVM
//! (the cold boot takes about a minute), so `#[ignore]`d:
//! `cargo test -p osso-vmm --release --test snapshot_real_kernel -- --ignored --nocapture`.
//!
//! The image comes from `OSSO_KERNEL` / `OSSO_INITRD`, or the first directory
//! of `~/.cache/osso/images/` holding `vmlinux` and `initramfs.cpio.gz`.

mod common;

use std::time::{Duration, Instant};

use osso_vmm::net::NetConfig;
use osso_vmm::snapshot::{self, RestoreOptions};
use osso_vmm::{MachineBuilder, VmConfig};

use osso_vmm::net::user::PARKED_KERNEL_CMDLINE as PARKED;

/// Pings until a reply or `limit`; returns the time to the first reply.
fn first_ping(user: &osso_vmm::net::UserNetHandle, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut seq = 1;
    while t.elapsed() < limit {
        let p = Instant::now();
        if user.ping_guest(seq, Duration::from_millis(200)).is_ok() {
            return Some(t.elapsed());
        }
        seq += 1;
        // ping_guest fails at once while the guest has no address: do not
        // spin (it would take the CPU from the emulated guest).
        std::thread::sleep(
            Duration::from_millis(5).max(Duration::from_millis(50).saturating_sub(p.elapsed())),
        );
    }
    None
}

#[test]
#[ignore = "boots a real kernel: about a minute under PVM"]
fn parked_kernel_snapshot_restored_twice_answers_pings() {
    const T: &str = "parked_kernel_snapshot_restored_twice_answers_pings";
    if !osso_testkit::require_kvm(T) {
        return;
    }
    let Some((kernel, initrd)) = common::require_image(T) else {
        return;
    };
    let mut cfg = VmConfig::kernel(kernel, Some(initrd));
    cfg.cmdline_extra = Some(PARKED.into());
    cfg.timeout = Some(Duration::from_secs(600));
    // OSSO_SNAPSHOT_NO_SECCOMP=1: run the VM's threads unconfined (to tell a
    // seccomp allowlist problem from a snapshot problem).
    let seccomp = std::env::var("OSSO_SNAPSHOT_NO_SECCOMP").as_deref() != Ok("1");
    cfg.seccomp = seccomp;
    let log = std::env::temp_dir().join("osso-snapshot-real-kernel-console.txt");
    println!("console: {}", log.display());
    cfg.console = Box::new(std::fs::File::create(&log).unwrap());
    let t0 = Instant::now();
    let mut builder = MachineBuilder::new(cfg).unwrap();
    builder.attach_net(&NetConfig::default()).unwrap();
    let m = builder.start().unwrap();
    let user = m.user_net().expect("user network handle");
    let boot = first_ping(user, Duration::from_secs(400)).expect("the parked kernel answers ping");
    let cold = t0.elapsed();
    println!("cold boot to first ping reply: {:.1} s", cold.as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    m.snapshot(dir.path()).expect("snapshot");
    println!(
        "snapshot: {:.1} ms (first ping after {:.1} s)",
        t.elapsed().as_secs_f64() * 1e3,
        boot.as_secs_f64()
    );
    let (_, body) = snapshot::read_snapshot(dir.path()).unwrap();
    let mem_file = dir.path().join(snapshot::format::MEMORY_FILE);
    let on_disk = std::fs::metadata(&mem_file).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    println!(
        "snapshot: rip {:#x}, mp_state {:?}, net {:?}",
        body.vcpus[0].regs.0.rip,
        body.vcpus[0].mp_state.as_ref().map(|m| m.0.mp_state),
        body.devices.net
    );
    println!(
        "memory file: {} MiB of RAM, {:?} bytes on disk (sparse)",
        body.mem_mib, on_disk
    );
    println!(
        "vCPU state this KVM did not give: {:?}; VM state: {:?}; MSRs saved: {}",
        body.vcpus[0].unsupported,
        body.vm.unsupported,
        body.vcpus[0].msrs.len()
    );
    m.stop();
    let _ = m.wait();
    drop(m);

    let mut clones = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        let mach = snapshot::restore(
            dir.path(),
            RestoreOptions {
                seccomp,
                net: Some(NetConfig::default()),
                ..Default::default()
            },
        )
        .expect("restore");
        let restored = t.elapsed();
        let attached = mach.net().expect("net re-created");
        let u = attached.user.as_ref().expect("user network");
        let ping = first_ping(u, Duration::from_secs(30));
        println!(
            "clone {i}: restore {:.1} ms, restore to first ping reply {:?}, phases {:?}",
            restored.as_secs_f64() * 1e3,
            ping.map(|p| (p + restored).as_secs_f64() * 1e3),
            mach.restore_metrics()
        );
        if ping.is_none() {
            use std::sync::atomic::Ordering::Relaxed;
            let m = &attached.metrics;
            println!(
                "clone {i} silent: user net {:?}; virtio-net rx {} tx {} irqs {}; exit {:?}",
                u.stats(),
                m.rx_frames.load(Relaxed),
                m.tx_frames.load(Relaxed),
                m.interrupts.load(Relaxed),
                mach.exit_reason()
            );
            let d = tempfile::tempdir().unwrap();
            if mach.snapshot(d.path()).is_ok() {
                let (_, b) = snapshot::read_snapshot(d.path()).unwrap();
                let r = &b.vcpus[0].regs.0;
                println!(
                    "clone {i} now: rip {:#x} rflags {:#x}; mp_state {:?}; net {:?}",
                    r.rip,
                    r.rflags,
                    b.vcpus[0].mp_state.as_ref().map(|m| m.0.mp_state),
                    b.devices.net
                );
            }
        }
        assert!(
            ping.is_some(),
            "clone {i} does not answer ping; exit {:?}",
            mach.exit_reason()
        );
        clones.push(mach);
    }
    // Both at once.
    for round in 0..3u16 {
        for (i, mach) in clones.iter().enumerate() {
            let u = mach.user_net().unwrap();
            let rtt = u.ping_guest(100 + round, Duration::from_secs(2));
            println!("clone {i} ping {round}: {rtt:?}");
            assert!(rtt.is_ok(), "clone {i} stopped answering");
        }
    }
    for mach in clones {
        mach.stop();
        let _ = mach.wait();
    }
}
