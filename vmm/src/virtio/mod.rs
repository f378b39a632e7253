//! virtio-mmio transport and virtio devices (virtio-net).
