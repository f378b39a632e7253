//! Network backends for virtio-net: the user-mode stack, TAP, none.
