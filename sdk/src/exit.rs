//! How a VM ended ([`Exit`], [`ExitReason`]): the SDK's own types, so that
//! its API does not expose `osso_vmm`'s. They convert both ways with the
//! VMM's reason, whose `Display` gives the text.

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest reset itself (i8042 reset, triple fault, KVM reset event).
    Reset,
    /// The guest shut down.
    Shutdown,
    /// The guest kernel panicked (a KVM crash event, or a reset or shutdown
    /// after a `Kernel panic - not syncing` console line).
    Panic,
    /// The VM's lifetime ([`crate::ConfigBuilder::lifetime`]) passed.
    Timeout,
    /// The host stopped it.
    Stopped,
    /// KVM reported an internal error or a failed VM entry on `vcpu`.
    InternalError {
        /// KVM's suberror (1 = emulation failure), or the entry failure reason.
        suberror: u64,
        /// The vCPU.
        vcpu: u8,
        /// The registers and extra data at the failure, as text.
        registers: String,
    },
    /// A vCPU ioctl failed or KVM exited in a way the VMM does not handle.
    VcpuError(String),
}

impl ExitReason {
    /// Whether the guest ended by itself (reset or shutdown).
    pub fn guest_ended_by_itself(&self) -> bool {
        matches!(self, ExitReason::Reset | ExitReason::Shutdown)
    }
}

impl From<&osso_vmm::ExitReason> for ExitReason {
    fn from(r: &osso_vmm::ExitReason) -> Self {
        use osso_vmm::ExitReason as V;
        match r {
            V::Reset => ExitReason::Reset,
            V::Shutdown => ExitReason::Shutdown,
            V::Panic => ExitReason::Panic,
            V::Timeout => ExitReason::Timeout,
            V::Stopped => ExitReason::Stopped,
            V::InternalError {
                suberror,
                vcpu,
                registers,
            } => ExitReason::InternalError {
                suberror: *suberror,
                vcpu: *vcpu,
                registers: registers.clone(),
            },
            V::VcpuError(e) => ExitReason::VcpuError(e.clone()),
        }
    }
}

impl From<&ExitReason> for osso_vmm::ExitReason {
    fn from(r: &ExitReason) -> Self {
        use osso_vmm::ExitReason as V;
        match r {
            ExitReason::Reset => V::Reset,
            ExitReason::Shutdown => V::Shutdown,
            ExitReason::Panic => V::Panic,
            ExitReason::Timeout => V::Timeout,
            ExitReason::Stopped => V::Stopped,
            ExitReason::InternalError {
                suberror,
                vcpu,
                registers,
            } => V::InternalError {
                suberror: *suberror,
                vcpu: *vcpu,
                registers: registers.clone(),
            },
            ExitReason::VcpuError(e) => V::VcpuError(e.clone()),
        }
    }
}

/// The VMM's words for each reason: one text, kept where the reasons arise.
impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        osso_vmm::ExitReason::from(self).fmt(f)
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
}

impl Exit {
    /// Whether the guest ended by itself (reset or shutdown).
    pub fn guest_ended_by_itself(&self) -> bool {
        self.reason.guest_ended_by_itself()
    }

    /// Whether the guest kernel panicked (a console `Kernel panic - not
    /// syncing` line before it reset, or a KVM crash event): not a clean exit.
    pub fn panicked(&self) -> bool {
        self.reason == ExitReason::Panic
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reason.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_goes_there_and_back_with_the_vmms_text() {
        use osso_vmm::ExitReason as V;
        for v in [
            V::Reset,
            V::Shutdown,
            V::Panic,
            V::Timeout,
            V::Stopped,
            V::InternalError {
                suberror: 1,
                vcpu: 2,
                registers: "rip=0".into(),
            },
            V::VcpuError("x".into()),
        ] {
            let ours = ExitReason::from(&v);
            assert_eq!(V::from(&ours), v);
            assert_eq!(ours.to_string(), v.to_string());
        }
        let e = Exit {
            reason: ExitReason::Panic,
        };
        assert!(e.panicked() && !e.guest_ended_by_itself());
        assert_eq!(e.to_string(), "guest kernel panic");
    }
}
