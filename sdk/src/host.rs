//! What kind of KVM this host has: the SDK adapts what it promises to it.

use std::path::Path;

/// The host's KVM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKvm {
    /// Hardware virtualisation (kvm_intel / kvm_amd): everything runs.
    Hardware,
    /// The PVM software KVM: a guest kernel boots (slowly), guest user space never runs.
    Pvm,
    /// No usable /dev/kvm.
    #[default]
    Missing,
}

impl HostKvm {
    /// Detects the host's KVM.
    pub fn detect() -> HostKvm {
        if !Path::new("/dev/kvm").exists() {
            HostKvm::Missing
        } else if osso_vmm::boot::cmdline::host_kvm_is_pvm() {
            HostKvm::Pvm
        } else {
            HostKvm::Hardware
        }
    }

    /// Whether guest user space (init, jobs) runs under this KVM.
    pub fn runs_guest_user_space(self) -> bool {
        self == HostKvm::Hardware
    }
}

impl std::fmt::Display for HostKvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKvm::Hardware => "hardware KVM",
            HostKvm::Pvm => "PVM (software KVM: guest kernel only, no guest user space)",
            HostKvm::Missing => "no KVM",
        })
    }
}
