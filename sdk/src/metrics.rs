//! [`Metrics`]: what a user of microVMs asks of each VM: boot time in phases,
//! memory, image size. Every figure says how it was measured.
//!
//! - Boot time counts from the moment [`crate::spawn`] was called: VMM setup
//!   ends at the first `KVM_RUN`, the kernel phase at the console line
//!   `Run /init as init process`, the init phase at the guest's write of 123 to
//!   the boot-timer device (the guest is ready).
//! - Memory: the VMM's own resident memory is the process RSS minus the guest
//!   RAM pages resident (mincore over the guest mapping); with several VMs in
//!   one process it covers them all. Guest RAM resident is this VM's alone.
//! - Image size: the files booted (kernel + initramfs), with the compressed
//!   kernel (bzImage) beside the ELF vmlinux the PVH path boots.

use serde::Serialize;

/// Boot phases in microseconds; None where the guest never got there.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BootPhases {
    /// spawn() to the first KVM_RUN.
    pub vmm_setup_us: Option<u64>,
    /// First KVM_RUN to the kernel's `/init` hand-off.
    pub kernel_us: Option<u64>,
    /// `/init` hand-off to the boot-timer write (ready).
    pub init_us: Option<u64>,
    /// spawn() to ready (the boot-timer write).
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
    pub phases: osso_vmm::metrics::RestoreMetrics,
    /// restore() to the first KVM_RUN.
    pub first_run_us: Option<u64>,
    /// restore() to ready (for a network VM: the first ping reply).
    pub ready_us: Option<u64>,
}

/// One VM's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub boot: BootPhases,
    /// spawn() or restore() to ready, as [`crate::Config::ready`] defines it.
    pub ready_us: Option<u64>,
    /// Set for a VM made by [`crate::restore`].
    pub restore: Option<RestoreFigures>,
    /// This VM's guest RAM as proportional set size: pages shared with
    /// other clones of the same snapshot count 1/N each (`/proc/self/smaps`).
    pub guest_pss_bytes: u64,
    /// Guest RAM pages only this VM holds: a clone's copy-on-write copies
    /// and the snapshot pages no other clone maps at the moment.
    pub guest_private_bytes: u64,
    /// The VMM's own resident memory (process RSS without guest RAM), bytes.
    pub vmm_rss_bytes: u64,
    /// This VM's guest RAM resident on the host, bytes.
    pub guest_resident_bytes: u64,
    /// This VM's guest RAM size, bytes.
    pub guest_mem_bytes: u64,
    pub image: ImageSize,
    /// How the VM ended, once it has.
    pub exit: Option<String>,
    /// The host's KVM (hardware or PVM).
    pub host_kvm: crate::HostKvm,
    /// Boot protocol used (pvh or linux).
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
            "boot {} (vmm {}, kernel {}, init {}) | VMM RSS {} | guest RAM {} resident of {} | image {:.2} MB (kernel {:.2} + initramfs {:.2})",
            ms(self.boot.total_us),
            ms(self.boot.vmm_setup_us),
            ms(self.boot.kernel_us),
            ms(self.boot.init_us),
            mib(self.vmm_rss_bytes),
            mib(self.guest_resident_bytes),
            mib(self.guest_mem_bytes),
            self.image.total_bytes as f64 / 1e6,
            self.image.kernel_bytes as f64 / 1e6,
            self.image.initramfs_bytes as f64 / 1e6,
        )?;
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

impl Metrics {
    /// The phases from the VMM's timeline (microseconds since spawn()).
    pub(crate) fn phases(
        first_run: Option<u64>,
        init: Option<u64>,
        ready: Option<u64>,
    ) -> BootPhases {
        let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        BootPhases {
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
        let p = Metrics::phases(Some(800), Some(20_800), Some(25_000));
        assert_eq!(
            p,
            BootPhases {
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
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["boot"]["kernel_us"], 20_000);
        // A guest that never reached init has no kernel or init phase.
        let p = Metrics::phases(Some(800), None, None);
        assert_eq!((p.kernel_us, p.init_us, p.total_us), (None, None, None));
    }
}
