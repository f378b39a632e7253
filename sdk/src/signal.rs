//! [`Signal`]: "something about this VM changed" (a console line arrived, a
//! boot milestone was recorded, the VM ended), so that a waiter sleeps until
//! then instead of polling.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// A change counter with a condition variable.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    /// Something changed: wake every waiter.
    pub(crate) fn notify(&self) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// The current generation: read it before checking the state, then wait
    /// past it, so that a change between the check and the wait is not lost.
    pub(crate) fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the generation is past `seen` or `deadline` passes.
    pub(crate) fn wait_past(&self, seen: u64, deadline: Instant) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        while *g == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_waiter_wakes_on_a_change_and_not_before() {
        let s = Arc::new(Signal::default());
        let seen = s.generation();
        // Nothing changes: the wait ends at its deadline.
        s.wait_past(seen, Instant::now() + Duration::from_millis(10));
        assert_eq!(s.generation(), seen);
        let t = {
            let s = s.clone();
            std::thread::spawn(move || s.notify())
        };
        // A change wakes it long before this deadline.
        s.wait_past(seen, Instant::now() + Duration::from_secs(3600));
        assert!(s.generation() > seen);
        t.join().unwrap();
        // A change made before the wait is not lost.
        let seen = s.generation();
        s.notify();
        s.wait_past(seen, Instant::now() + Duration::from_secs(3600));
    }
}
