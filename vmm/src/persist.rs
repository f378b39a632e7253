//! [`Persist`]: the one small trait a component with guest-visible state
//! implements, so that a snapshot saves and restores each piece through the
//! same two calls, and the state type lives with the component that owns it
//! (the UART's in `devices/serial.rs`, the virtio transport's in
//! `virtio/state.rs`). The format (`snapshot/format.rs`) only arranges them.

/// A component whose state a snapshot keeps.
pub trait Persist {
    /// What a snapshot keeps of it (serialisable, in the snapshot's body).
    type State;
    /// Why a saved state could not be loaded.
    type Error: std::fmt::Display;

    /// Its state now.
    fn save_state(&self) -> Self::State;

    /// Replaces its state with `state` (a restore, before the VM runs). A
    /// state it cannot take is refused and nothing changes.
    fn restore_state(&self, state: &Self::State) -> Result<(), Self::Error>;
}
