//! The machine's network device: [`MachineBuilder::attach_net`] opens the
//! backend and attaches a virtio-net device (device, transport, MMIO slot,
//! irqfd, ioeventfds and the command-line declaration) in one call shared by
//! the CLI, the SDK and restore. The machine owns it from then on
//! ([`crate::Machine::net`]) and releases it when it stops.

use std::sync::{Arc, Mutex};

use super::{MachineBuilder, MmioSlot, VmmError};
use crate::net::{NetConfig, NetConfigError, UserNetHandle};
use crate::virtio::mmio::{MmioError, MmioTransport, NOTIFY_REG_OFFSET};
use crate::virtio::net::{NetDevice, NetMetrics};

/// Errors attaching a network device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("network backend: {0}")]
    Backend(#[from] NetConfigError),
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] MmioError),
    #[error("wiring the network device: {0}")]
    Machine(#[from] VmmError),
    #[error("the machine has a network device already")]
    AlreadyAttached,
}

/// A network device attached to a machine, which owns it: dropping the
/// machine (or [`crate::Machine::release_devices`]) stops the device thread
/// and closes the backend (the TAP fd, or the user-mode network).
pub struct AttachedNet {
    /// The transport (also on the machine's MMIO bus).
    pub transport: Arc<Mutex<MmioTransport<NetDevice>>>,
    /// The device's slot (address and IRQ).
    pub slot: MmioSlot,
    /// Frame, byte and error counters.
    pub metrics: Arc<NetMetrics>,
    /// The host side of the user network (`user` backend only).
    pub user: Option<UserNetHandle>,
}

impl std::fmt::Debug for AttachedNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedNet")
            .field("slot", &self.slot)
            .field("user", &self.user.is_some())
            .finish_non_exhaustive()
    }
}

impl AttachedNet {
    /// Stops the device thread and closes the backend (idempotent).
    pub(crate) fn release(&self) {
        let mut t = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        t.shutdown();
        t.device_mut().release_backend();
    }
}

impl MachineBuilder {
    /// Opens `config`'s backend and attaches a virtio-net device for it; the
    /// machine keeps it ([`MachineBuilder::net`], then
    /// [`crate::Machine::net`]). With backend `none` nothing is attached.
    /// One network device per machine.
    pub fn attach_net(&mut self, config: &NetConfig) -> Result<(), AttachError> {
        if self.net.is_some() {
            return Err(AttachError::AlreadyAttached);
        }
        if config.backend == crate::net::NetBackendConfig::None {
            if !config.forwards.is_empty() {
                return Err(NetConfigError::ForwardsNeedUser(config.backend.to_string()).into());
            }
            return Ok(());
        }
        let opened = config.open()?;
        let mut device = NetDevice::new(config.mac, opened.backend);
        device.set_seccomp(self.seccomp());
        let metrics = device.metrics();
        let transport = Arc::new(Mutex::new(MmioTransport::new(device, self.guest_memory())?));
        let slot = self.add_virtio_mmio_device(transport.clone())?;
        {
            let t = transport.lock().unwrap_or_else(|p| p.into_inner());
            self.register_irqfd(t.irq_evt(), slot.irq)?;
            for (i, evt) in t.queue_evts().iter().enumerate() {
                self.register_ioevent(evt, slot.addr + NOTIFY_REG_OFFSET, Some(i as u32))?;
            }
        }
        self.net = Some(AttachedNet {
            transport,
            slot,
            metrics,
            user: opened.user,
        });
        Ok(())
    }

    /// The network device attached so far, if any.
    pub fn net(&self) -> Option<&AttachedNet> {
        self.net.as_ref()
    }
}
