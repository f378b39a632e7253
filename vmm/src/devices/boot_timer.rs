//! Boot timer: a one-register MMIO device. The guest's init writes the magic
//! value 123 at offset 0 when it is ready (Toybox: `devmem <addr> 8 123`, or a
//! 32-bit write of 123); the first such write is recorded on the timeline.
//! Any other value, offset or a non-zero high byte is ignored. Reads return 0.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::metrics::Timeline;

/// The magic value that marks "guest ready".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot timer device.
pub struct BootTimer {
    timeline: Arc<Timeline>,
}

impl BootTimer {
    /// A boot timer recording into `timeline`.
    pub fn new(timeline: Arc<Timeline>) -> Self {
        BootTimer { timeline }
    }

    /// Whether an access is the "ready" write.
    pub fn is_ready_write(offset: u64, data: &[u8]) -> bool {
        offset == 0
            && data.first() == Some(&BOOT_TIMER_MAGIC)
            && data.iter().skip(1).all(|b| *b == 0)
    }
}

impl BusDevice for BootTimer {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if Self::is_ready_write(offset, data) {
            self.timeline.mark_boot_timer();
            tracing::info!(
                us = self.timeline.boot_timer_us().unwrap_or(0),
                "guest wrote the boot timer"
            );
        } else {
            tracing::debug!(offset, ?data, "boot timer: ignored write");
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
}
