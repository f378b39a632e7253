//! i8042 keyboard controller, only as much as `reboot=k` needs: the command
//! 0xFE (pulse the CPU reset line) on port 0x64 resets the guest. Built on
//! `vm_superio::I8042Device`; it covers ports 0x60..=0x64 (so reads of port
//! 0x61, the PC speaker / NMI status port, also land here and return 0).

use std::sync::Mutex;

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::devices::CallbackTrigger;

/// The i8042 device; `on_reset` runs when the guest asks for a CPU reset.
pub struct I8042 {
    inner: Mutex<I8042Device<CallbackTrigger>>,
}

impl I8042 {
    /// Ports covered from 0x60.
    pub const LEN: u64 = 5;

    /// An i8042 calling `on_reset` on a guest reset request.
    pub fn new(on_reset: impl Fn() + Send + Sync + 'static) -> Self {
        I8042 {
            inner: Mutex::new(I8042Device::new(CallbackTrigger::new(on_reset))),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(off);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let mut dev = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = dev.write(off, *b) {
                tracing::warn!(?e, "i8042 write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn fe_on_command_port_resets() {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let dev = I8042::new(move || {
            n2.fetch_add(1, Ordering::SeqCst);
        });
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]); // another command
        assert_eq!(n.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let mut b = [0xffu8];
        dev.read(1, &mut b);
        assert_eq!(b, [0]);
    }
}
