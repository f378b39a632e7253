//! VM lifetimes ([`VmConfig::timeout`](super::VmConfig::timeout)): one
//! thread per process, started on first use, ends every VM whose deadline
//! has passed with [`ExitReason::Timeout`]. A VM that ends first is simply
//! skipped when its deadline comes (the thread holds it weakly).
//!
//! Why a thread of our own and no timer crate: the only need is "call this at
//! that instant" for a handful of entries, which a heap under a condvar does
//! in a few lines, and an async runtime would be a large dependency for it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Instant;

use crate::kvm::vcpu::run::{ExitReason, RunControl};

struct Entry {
    at: Instant,
    vm: Weak<RunControl>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

#[derive(Default)]
struct Deadlines {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    changed: Condvar,
}

fn deadlines() -> &'static Deadlines {
    static D: OnceLock<Deadlines> = OnceLock::new();
    D.get_or_init(Deadlines::default)
}

/// Ends `vm` with [`ExitReason::Timeout`] at `at` unless it has ended by
/// then. Fails only if the deadline thread cannot be started (the caller
/// then has no lifetime to enforce and says so).
pub(crate) fn arm(at: Instant, vm: &Arc<RunControl>) -> std::io::Result<()> {
    start_thread()?;
    let d = deadlines();
    d.heap
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Reverse(Entry {
            at,
            vm: Arc::downgrade(vm),
        }));
    d.changed.notify_all();
    Ok(())
}

fn start_thread() -> std::io::Result<()> {
    static STARTED: Mutex<bool> = Mutex::new(false);
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if !*started {
        std::thread::Builder::new()
            .name("osso-deadlines".into())
            .spawn(run)?;
        *started = true;
    }
    Ok(())
}

fn run() {
    let d = deadlines();
    let mut heap = d.heap.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        let next = heap.peek().map(|Reverse(e)| e.at);
        match next {
            Some(at) if at <= now => {
                if let Some(Reverse(e)) = heap.pop() {
                    // Outside the lock: ending a VM kicks its vCPUs and runs
                    // its exit observers.
                    drop(heap);
                    if let Some(vm) = e.vm.upgrade() {
                        vm.request_exit(ExitReason::Timeout);
                    }
                    heap = d.heap.lock().unwrap_or_else(|p| p.into_inner());
                }
            }
            Some(at) => {
                heap = d
                    .changed
                    .wait_timeout(heap, at - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            None => heap = d.changed.wait(heap).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::vcpu::run::tests::control;
    use std::time::Duration;

    #[test]
    fn a_passed_deadline_ends_the_vm_with_timeout_and_only_that_vm() {
        let late = control();
        let soon = control();
        let ended = control();
        let now = Instant::now();
        arm(now + Duration::from_secs(3600), &late).unwrap();
        arm(now + Duration::from_millis(50), &ended).unwrap();
        arm(now + Duration::from_millis(100), &soon).unwrap();
        ended.request_exit(ExitReason::Shutdown);
        // A dropped VM's entry is skipped, not a crash.
        arm(now + Duration::from_millis(10), &control()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        soon.on_exit(Box::new(move |r| {
            let _ = tx.send(r.clone());
        }));
        // Generous: the thread is told at once; a loaded host may be slow.
        let r = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(r, ExitReason::Timeout);
        assert_eq!(
            ended.reason(),
            Some(ExitReason::Shutdown),
            "kept its own end"
        );
        assert_eq!(late.reason(), None, "an hour away");
    }
}
