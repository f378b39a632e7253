//! Legacy devices: the 16550 UART console, the i8042 (for resets) and the
//! boot timer. Each is a [`crate::bus::BusDevice`].

pub mod boot_timer;
pub mod i8042;
pub mod serial;

/// A `vm_superio::Trigger` that calls a closure (used for the i8042 reset).
pub struct CallbackTrigger(Box<dyn Fn() + Send + Sync>);

impl CallbackTrigger {
    /// A trigger calling `f`.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        CallbackTrigger(Box::new(f))
    }
}

impl vm_superio::Trigger for CallbackTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// A `vm_superio::Trigger` that writes an `EventFd` (an irqfd: raises a GSI).
pub struct EventFdTrigger(pub vmm_sys_util::eventfd::EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
