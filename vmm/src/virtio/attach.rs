//! Attaching a virtio-net device to a machine being built: backend, device,
//! transport, MMIO slot, irqfd, ioeventfds and the command-line declaration,
//! in one call shared by the CLI and the SDK.

use std::sync::{Arc, Mutex};

use crate::machine::{MachineBuilder, MmioSlot, VmmError};
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
}

/// A network device attached to a machine. Keep it as long as the VM lives:
/// dropping it stops the device thread and the user-mode network.
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

/// Opens `config`'s backend and attaches a virtio-net device for it to
/// `builder`. With backend `none` no device is attached and `None` is returned.
pub fn attach_net(
    builder: &mut MachineBuilder,
    config: &NetConfig,
) -> Result<Option<AttachedNet>, AttachError> {
    if config.backend == crate::net::NetBackendConfig::None {
        if !config.forwards.is_empty() {
            return Err(NetConfigError::ForwardsNeedUser(config.backend.to_string()).into());
        }
        return Ok(None);
    }
    let opened = config.open()?;
    let mut device = NetDevice::new(config.mac, opened.backend);
    device.set_seccomp(builder.seccomp());
    let metrics = device.metrics();
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        builder.guest_memory(),
    )?));
    let slot = builder.add_virtio_mmio_device(transport.clone())?;
    {
        let t = transport.lock().unwrap_or_else(|p| p.into_inner());
        builder.register_irqfd(t.irq_evt(), slot.irq)?;
        for (i, evt) in t.queue_evts().iter().enumerate() {
            builder.register_ioevent(evt, slot.addr + NOTIFY_REG_OFFSET, Some(i as u32))?;
        }
    }
    Ok(Some(AttachedNet {
        transport,
        slot,
        metrics,
        user: opened.user,
    }))
}
