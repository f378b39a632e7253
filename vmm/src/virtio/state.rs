//! What a snapshot keeps of a virtio device: the virtio-mmio transport's
//! registers and queue positions ([`VirtioMmioState`]), and virtio-net's
//! ([`VirtioNetState`]). The transport saves and restores its own
//! (`MmioTransport::save_state`, `restore_state`).

use serde::{Deserialize, Serialize};

/// One virtqueue as the transport knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
}

/// A virtio-mmio transport (registers and queues). For a device that was
/// running, the queue positions are the used rings' `idx` in guest memory
/// at snapshot time: the VMM's devices return every chain they take before
/// taking the next (so `next_avail == next_used` when idle); a frame in
/// flight at that instant is lost, as on a real network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// The device type (1 = net).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<VirtqueueState>,
}

/// A virtio-net device: its transport and MAC. The backend is not saved: a
/// restored VM gets a fresh one (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// MMIO slot base address.
    pub mmio_base: u64,
    /// GSI.
    pub irq: u32,
    /// The guest's MAC (the restored device must offer the same one).
    pub mac: [u8; 6],
    /// The transport.
    pub transport: VirtioMmioState,
}
