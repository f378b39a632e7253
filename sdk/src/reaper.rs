//! Background teardown: the last, slow step of dropping a VM (closing the
//! KVM VM, which makes the host kernel destroy it, then unmapping guest RAM)
//! handed to one process-wide thread, "osso-reaper", so that a request path
//! that drops a VM and restores the next does not wait for it.
//!
//! Measured here (PVM): dropping a restored VM took about 21 ms, of which
//! stopping and joining its vCPU thread took 1.6 ms, its network threads
//! under 0.01 ms, and closing the VM 12 to 16 ms. Only that last part moves
//! here: the vCPU, device and network threads are still stopped and joined
//! by `drop` itself, and the network backend is closed there too. At most
//! 32 VMs wait for the reaper; past that a drop closes its VM inline. Opt in
//! per VM with `Config::background_teardown`.
//!
//! Hand-written rather than a crate: a channel and a counter of pending
//! items is all it is.

use std::sync::mpsc::{self, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

type Item = Box<dyn Send>;

struct Reaper {
    tx: Mutex<Option<Sender<Item>>>,
    pending: Mutex<usize>,
    idle: Condvar,
}

impl Reaper {
    /// One pending item is gone; wakes the waiters when none is left.
    fn one_done(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *p = p.saturating_sub(1);
        if *p == 0 {
            self.idle.notify_all();
        }
    }
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Item>();
        let spawned = std::thread::Builder::new()
            .name("osso-reaper".into())
            .spawn(move || {
                for item in rx {
                    // A panicking destructor must not take the reaper down.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(item)));
                    reaper().one_done();
                }
            });
        Reaper {
            // Without the thread (it failed to start once), every later item
            // is dropped inline by `defer`, for the life of the process.
            tx: Mutex::new(spawned.ok().map(|_| tx)),
            pending: Mutex::new(0),
            idle: Condvar::new(),
        }
    })
}

/// At most this many VMs wait for the reaper; past that, `defer` drops
/// inline, so a caller dropping VMs faster than the reaper closes them is
/// slowed to its pace instead of piling up VMs, memory and fds.
const MAX_PENDING: usize = 32;

/// Drops `item` on the reaper thread (inline if the thread could not start,
/// or if [`MAX_PENDING`] items already wait).
pub(crate) fn defer(item: Item) {
    let r = reaper();
    {
        let mut p = r.pending.lock().unwrap_or_else(|p| p.into_inner());
        if *p >= MAX_PENDING {
            drop(p);
            drop(item);
            return;
        }
        *p += 1;
    }
    let unsent = match &*r.tx.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(tx) => tx.send(item).err().map(|e| e.0),
        None => Some(item),
    };
    if let Some(item) = unsent {
        drop(item);
        r.one_done();
    }
}

/// Waits until every VM handed to the background teardown is gone, at most
/// `timeout`; returns whether it is. For callers that count the process's
/// file descriptors or memory after dropping VMs.
pub fn wait_for_background_teardown(timeout: Duration) -> bool {
    let Some(r) = REAPER.get() else {
        return true; // nothing was ever deferred
    };
    let deadline = Instant::now() + timeout;
    let mut p = r.pending.lock().unwrap_or_else(|p| p.into_inner());
    while *p > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        p = r
            .idle
            .wait_timeout(p, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Slow(Arc<AtomicUsize>);
    impl Drop for Slow {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(20));
            if std::thread::current().name() == Some("osso-reaper") {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn deferred_items_are_dropped_on_the_reaper_thread() {
        let done = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        for _ in 0..5 {
            defer(Box::new(Slow(done.clone())));
        }
        assert!(
            t.elapsed() < Duration::from_millis(20),
            "defer does not wait"
        );
        assert!(wait_for_background_teardown(Duration::from_secs(5)));
        assert_eq!(
            done.load(Ordering::SeqCst),
            5,
            "all dropped on the reaper thread"
        );
    }
}
