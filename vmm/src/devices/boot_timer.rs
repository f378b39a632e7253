//! Boot timer: a one-register MMIO device through which the guest's init
//! marks the VMM's timeline, so that the timeline needs no console line (a
//! quiet kernel prints none). Two values, written as one byte at offset 0
//! (Toybox: `devmem <addr> 1 <value>`) or as a 32-bit write with zero high
//! bytes:
//! - [`BOOT_TIMER_INIT_STARTED`] (1): `/init` has started. The kernel's
//!   `Run /init as init process` console line marks the same milestone; the
//!   first of the two counts.
//! - [`BOOT_TIMER_MAGIC`] (123): the guest is ready.
//!
//! Only the first write of each value counts. Any other value, offset or a
//! non-zero high byte is ignored. Reads return 0.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::metrics::Timeline;

/// The magic value that marks "guest ready".
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// The value that marks "/init started".
pub const BOOT_TIMER_INIT_STARTED: u8 = 1;

/// The boot timer device.
pub struct BootTimer {
    timeline: Arc<Timeline>,
}

impl BootTimer {
    /// A boot timer recording into `timeline`.
    pub fn new(timeline: Arc<Timeline>) -> Self {
        BootTimer { timeline }
    }

    /// The value of a well-formed write (offset 0, high bytes zero).
    fn value(offset: u64, data: &[u8]) -> Option<u8> {
        let (&first, rest) = data.split_first()?;
        (offset == 0 && rest.iter().all(|b| *b == 0)).then_some(first)
    }

    /// Whether an access is the "ready" write.
    pub fn is_ready_write(offset: u64, data: &[u8]) -> bool {
        Self::value(offset, data) == Some(BOOT_TIMER_MAGIC)
    }
}

impl BusDevice for BootTimer {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match Self::value(offset, data) {
            Some(BOOT_TIMER_MAGIC) => {
                self.timeline.mark_boot_timer();
                tracing::info!(
                    us = self.timeline.boot_timer_us().unwrap_or(0),
                    "guest wrote the boot timer"
                );
            }
            Some(BOOT_TIMER_INIT_STARTED) => {
                self.timeline.mark_init_started();
                tracing::info!(
                    us = self.timeline.init_started_us().unwrap_or(0),
                    "guest /init started"
                );
            }
            _ => tracing::debug!(offset, ?data, "boot timer: ignored write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn only_123_counts() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let bt = BootTimer::new(t.clone());
        bt.write(0, &[122]);
        bt.write(0, &[124]);
        bt.write(1, &[123]);
        bt.write(0, &[123, 1, 0, 0]);
        bt.write(0, &[]);
        let mut r = [9u8; 4];
        bt.read(0, &mut r);
        assert_eq!(r, [0; 4]);
        assert_eq!(t.boot_timer_us(), None);
        bt.write(0, &[123, 0, 0, 0]);
        let first = t.boot_timer_us().expect("recorded");
        std::thread::sleep(std::time::Duration::from_millis(2));
        bt.write(0, &[123]);
        assert_eq!(
            t.boot_timer_us(),
            Some(first),
            "only the first write counts"
        );
    }

    #[test]
    fn one_marks_init_started_and_not_ready() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let bt = BootTimer::new(t.clone());
        bt.write(1, &[1]);
        bt.write(0, &[1, 1]);
        assert_eq!(t.init_started_us(), None);
        bt.write(0, &[1, 0, 0, 0]);
        let at = t.init_started_us().expect("recorded");
        assert_eq!(t.boot_timer_us(), None, "init started is not ready");
        std::thread::sleep(std::time::Duration::from_millis(2));
        bt.write(0, &[1]);
        assert_eq!(t.init_started_us(), Some(at), "only the first write counts");
    }
}
