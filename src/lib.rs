//! Osso workspace root. The crates that do the work are `osso-sdk` (what
//! applications use), `osso-vmm` (the VMM) and `osso-guest` (the guest image).
//! This package only hosts the workspace-level `examples/` and `benches/`, and
//! re-exports the three crates for them.

pub use osso_guest as guest;
pub use osso_sdk as sdk;
pub use osso_vmm as vmm;
