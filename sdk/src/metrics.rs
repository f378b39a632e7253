//! [`Metrics`]: what a user of microVMs asks of each VM: boot time in phases,
//! memory, image size. Every figure says how it was measured.
//!
//! - Image preparation is its own phase, outside boot time: from the call to
//!   [`crate::spawn`] (or [`crate::run`]) to the VMM's start, finding,
//!   checking or building the guest image (minutes when the first spawn on a
//!   machine builds it) and, for `run`, appending the job.
//! - Boot time counts from the VMM's start (the boot clock starts there, after
//!   image preparation): VMM setup ends at the first `KVM_RUN`, the kernel
//!   phase when `/init` starts (the kernel's console line `Run /init as init
//!   process`, or `/init`'s write of 1 to the boot-timer device when the
//!   kernel is quiet: the first of the two), the init phase at the guest's
//!   write of 123 to the boot-timer device (the guest is ready).
//!   A restored VM's clock starts at the call to [`crate::restore`].
//! - Memory: the process RSS is taken just before the VMM starts on this VM
//!   (the baseline: the application, an image build that ran first, other
//!   VMs); the VMM's own resident memory for this VM is the growth since,
//!   less this VM's guest RAM pages in the process (mincore over a cold VM's
//!   anonymous RAM; `/proc/self/smaps` Rss of a restored clone's file
//!   mapping, whose page-cache pages mincore would count even where this
//!   process never mapped them). Memory the application or other VMs
//!   allocate after the baseline counts too (see
//!   [`osso_vmm::metrics::vmm_rss_since`]). Guest RAM resident is this VM's
//!   alone.
//! - Image size: the files booted (kernel + initramfs), with the compressed
//!   kernel (bzImage) beside the ELF vmlinux the PVH path boots.

use serde::Serialize;

/// Boot phases in microseconds; None where the guest never got there.
/// `vmm_setup_us + kernel_us + init_us == total_us`; image preparation
/// comes before and is in none of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BootPhases {
    /// spawn() (or run()) to the VMM's start: finding, checking or building
    /// the image (and appending a job). Not boot time. None for a restored VM.
    pub image_prepare_us: Option<u64>,
    /// The VMM's start to the first KVM_RUN.
    pub vmm_setup_us: Option<u64>,
    /// First KVM_RUN to the kernel's `/init` hand-off.
    pub kernel_us: Option<u64>,
    /// `/init` hand-off to the boot-timer write (ready).
    pub init_us: Option<u64>,
    /// The VMM's start to ready (the boot-timer write).
    pub total_us: Option<u64>,
}

/// Image sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImageSize {
    /// The kernel file as booted (ELF vmlinux for PVH, bzImage otherwise).
    pub kernel_bytes: u64,
    /// The initramfs as booted (gzip cpio; with a job appended for `run`).
    pub initramfs_bytes: u64,
    /// kernel_bytes + initramfs_bytes.
    pub total_bytes: u64,
    /// The default image's compressed kernel (bzImage), when known.
    pub bzimage_bytes: Option<u64>,
    /// The initramfs uncompressed, when known.
    pub initramfs_uncompressed_bytes: Option<u64>,
}

/// The phases of a restore, each measured with the monotonic clock around
/// its own step, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RestorePhases {
    /// Open /dev/kvm, read and check the state file, check the memory file.
    pub read_state_us: u64,
    /// Map the memory file copy-on-write.
    pub map_memory_us: u64,
    /// Create the VM (memory slot, irqchip, PIT) and the legacy devices.
    pub create_vm_us: u64,
    /// Load the irqchip, PIT and clock state.
    pub irqchip_us: u64,
    /// Load the device state (UART, virtio-net).
    pub devices_us: u64,
    /// Create the vCPUs and load their state.
    pub vcpus_us: u64,
    /// The call to restore up to starting the vCPU threads.
    pub total_us: u64,
}

impl From<osso_vmm::metrics::RestoreMetrics> for RestorePhases {
    fn from(m: osso_vmm::metrics::RestoreMetrics) -> Self {
        RestorePhases {
            read_state_us: m.read_state_us,
            map_memory_us: m.map_memory_us,
            create_vm_us: m.create_vm_us,
            irqchip_us: m.irqchip_us,
            devices_us: m.devices_us,
            vcpus_us: m.vcpus_us,
            total_us: m.total_us,
        }
    }
}

/// How a VM was restored from a snapshot. `phases` are durations, each
/// timed around its own step with the monotonic clock (the VMM's part of
/// the restore, up to the vCPUs being ready to start); `first_run_us` and
/// `ready_us` count from the call to [`crate::restore`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RestoreFigures {
    /// The snapshot directory.
    pub snapshot: std::path::PathBuf,
    /// Read and check the state, map memory, create the VM, load irqchip,
    /// devices and vCPUs (`total_us`: the whole restore call).
    pub phases: RestorePhases,
    /// restore() to the first KVM_RUN.
    pub first_run_us: Option<u64>,
    /// restore() to ready (for a network VM: the first ping reply).
    pub ready_us: Option<u64>,
}

/// One VM's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub boot: BootPhases,
    /// The VMM's start (spawn() after image preparation; the call to
    /// restore()) to ready, as [`crate::Config::ready`] defines it. The
    /// whole spawn() is `boot.image_prepare_us` + this.
    pub ready_us: Option<u64>,
    /// Set for a VM made by [`crate::restore`].
    pub restore: Option<RestoreFigures>,
    /// This VM's guest RAM as proportional set size: pages shared with
    /// other clones of the same snapshot count 1/N each (`/proc/self/smaps`).
    pub guest_pss_bytes: u64,
    /// Guest RAM pages only this VM holds: a clone's copy-on-write copies
    /// and the snapshot pages no other clone maps at the moment.
    pub guest_private_bytes: u64,
    /// The VMM's own resident memory for this VM, bytes: the process RSS
    /// growth since [`Metrics::rss_baseline_bytes`] less this VM's guest
    /// RAM in it (the application, an image build and VMs started before
    /// are not counted).
    pub vmm_rss_bytes: u64,
    /// The whole process's RSS now (application, every VM, guest RAM), bytes.
    pub process_rss_bytes: u64,
    /// The process RSS just before the VMM started on this VM, bytes.
    pub rss_baseline_bytes: u64,
    /// This VM's guest RAM resident on the host, bytes.
    pub guest_resident_bytes: u64,
    /// This VM's guest RAM size, bytes.
    pub guest_mem_bytes: u64,
    pub image: ImageSize,
    /// How the VM ended, once it has.
    pub exit: Option<String>,
    /// The host's KVM (hardware or PVM).
    pub host_kvm: crate::HostKvm,
    /// How the guest was started: `pvh`, `linux-64bit` (a bzImage) or
    /// `restored`.
    pub boot_protocol: String,
}

fn ms(us: Option<u64>) -> String {
    us.map(|u| format!("{:.2} ms", u as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boot {} (vmm {}, kernel {}, init {}) | VMM RSS {} (process {}) | guest RAM {} resident of {} | image {:.2} MB (kernel {:.2} + initramfs {:.2})",
            ms(self.boot.total_us),
            ms(self.boot.vmm_setup_us),
            ms(self.boot.kernel_us),
            ms(self.boot.init_us),
            mib(self.vmm_rss_bytes),
            mib(self.process_rss_bytes),
            mib(self.guest_resident_bytes),
            mib(self.guest_mem_bytes),
            self.image.total_bytes as f64 / 1e6,
            self.image.kernel_bytes as f64 / 1e6,
            self.image.initramfs_bytes as f64 / 1e6,
        )?;
        if let Some(us) = self.boot.image_prepare_us {
            write!(f, " | image prepared in {} before boot", ms(Some(us)))?;
        }
        if let Some(r) = &self.restore {
            write!(
                f,
                " | restored in {} (ready {}), guest RAM private {}",
                ms(Some(r.phases.total_us)),
                ms(r.ready_us),
                mib(self.guest_private_bytes)
            )?;
        }
        if let Some(e) = &self.exit {
            write!(f, " | exit {e}")?;
        }
        Ok(())
    }
}

/// When a spawn's clocks started: the call, and the VMM's start after the
/// image was prepared (the boot clock's zero).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpawnClock {
    pub called: std::time::Instant,
    pub vmm_start: std::time::Instant,
}

impl SpawnClock {
    /// The image preparation phase: the call to the VMM's start.
    pub fn image_prepare_us(&self) -> u64 {
        u64::try_from(
            self.vmm_start
                .saturating_duration_since(self.called)
                .as_micros(),
        )
        .unwrap_or(u64::MAX)
    }
}

impl Metrics {
    /// The phases from the VMM's timeline (microseconds since the VMM's
    /// start), with the image preparation that came before it beside them.
    pub(crate) fn phases(
        image_prepare: Option<u64>,
        first_run: Option<u64>,
        init: Option<u64>,
        ready: Option<u64>,
    ) -> BootPhases {
        let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        BootPhases {
            image_prepare_us: image_prepare,
            vmm_setup_us: first_run,
            kernel_us: diff(first_run, init),
            init_us: diff(init, ready),
            total_us: ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_display() {
        let p = Metrics::phases(None, Some(800), Some(20_800), Some(25_000));
        assert_eq!(
            p,
            BootPhases {
                image_prepare_us: None,
                vmm_setup_us: Some(800),
                kernel_us: Some(20_000),
                init_us: Some(4_200),
                total_us: Some(25_000)
            }
        );
        let m = Metrics {
            boot: p,
            vmm_rss_bytes: 2 << 20,
            guest_resident_bytes: 10 << 20,
            guest_mem_bytes: 128 << 20,
            ..Metrics::default()
        };
        let line = m.to_string();
        assert!(
            line.contains("boot 25.00 ms (vmm 0.80 ms, kernel 20.00 ms, init 4.20 ms)"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(!line.contains("image prepared"), "{line}");
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["boot"]["kernel_us"], 20_000);
        // A guest that never reached init has no kernel or init phase.
        let p = Metrics::phases(None, Some(800), None, None);
        assert_eq!((p.kernel_us, p.init_us, p.total_us), (None, None, None));
    }

    #[test]
    fn image_preparation_is_outside_every_boot_phase() {
        // The first spawn on a machine built the image for 400 s; the VMM
        // then set up in 0.8 ms and the guest was ready 25 ms after its start.
        let called = std::time::Instant::now();
        let clock = SpawnClock {
            called,
            vmm_start: called + std::time::Duration::from_secs(400),
        };
        assert_eq!(clock.image_prepare_us(), 400_000_000);
        let p = Metrics::phases(
            Some(clock.image_prepare_us()),
            Some(800),
            Some(20_800),
            Some(25_000),
        );
        assert_eq!(p.image_prepare_us, Some(400_000_000));
        assert_eq!(p.vmm_setup_us, Some(800), "VMM setup excludes the build");
        assert_eq!(p.total_us, Some(25_000), "boot excludes the build");
        assert_eq!(
            p.vmm_setup_us.unwrap() + p.kernel_us.unwrap() + p.init_us.unwrap(),
            p.total_us.unwrap(),
            "the boot phases add up to the boot"
        );
        // A clock that went backwards gives zero, not a wrap.
        let backwards = SpawnClock {
            called: clock.vmm_start,
            vmm_start: called,
        };
        assert_eq!(backwards.image_prepare_us(), 0);
        let m = Metrics {
            boot: p,
            vmm_rss_bytes: 2 << 20,
            process_rss_bytes: 60 << 20,
            ..Metrics::default()
        };
        let line = m.to_string();
        assert!(
            line.starts_with("boot 25.00 ms (vmm 0.80 ms, kernel 20.00 ms, init 4.20 ms)"),
            "{line}"
        );
        assert!(
            line.contains("VMM RSS 2.0 MiB (process 60.0 MiB)"),
            "{line}"
        );
        assert!(
            line.contains("image prepared in 400000.00 ms before boot"),
            "{line}"
        );
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["boot"]["image_prepare_us"], 400_000_000u64);
        assert_eq!(json["boot"]["vmm_setup_us"], 800);
        assert_eq!(json["process_rss_bytes"], 60u64 << 20);
    }
}
