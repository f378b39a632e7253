//! [`Pool`]: a warm pool of clones of one snapshot. It keeps a snapshot and
//! a few VMs already restored from it and ready, and hands one out per
//! request ([`Pool::take`]); a background thread restores the next ones.
//!
//! The template is booted once ([`Pool::boot`]) or an existing snapshot is
//! used ([`Pool::from_snapshot`]). Each clone is an ordinary [`Vm`] made by
//! [`crate::restore`]: its own vCPU threads, its own private user network,
//! guest RAM shared copy-on-write with the other clones.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::vm::{restore, spawn, Vm};

/// After a failed restore the refill thread waits this long before trying
/// again (and `take` reports the failure if nothing is ready).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// How often the refill thread looks for clones that ended while waiting.
const PRUNE_EVERY: Duration = Duration::from_millis(200);

struct State {
    ready: VecDeque<Vm>,
    /// The last refill failure, until a restore succeeds again.
    last_error: Option<String>,
}

struct Inner {
    snapshot: PathBuf,
    config: Config,
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refill thread: keeps `size` clones ready until stopped.
    fn refill(&self) {
        loop {
            let mut ended = Vec::new();
            {
                let mut st = self.lock();
                loop {
                    // Clones that ended while waiting (their lifetime passed,
                    // or the guest stopped) are replaced.
                    let (gone, alive): (VecDeque<Vm>, VecDeque<Vm>) =
                        st.ready.drain(..).partition(Vm::has_ended);
                    st.ready = alive;
                    ended.extend(gone);
                    if st.ready.len() < self.size || self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, PRUNE_EVERY)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            // Torn down outside the lock.
            drop(ended);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match restore(&self.snapshot, self.config.clone()) {
                Ok(vm) => {
                    let mut st = self.lock();
                    st.last_error = None;
                    st.ready.push_back(vm);
                    self.changed.notify_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "warm pool: restore failed");
                    self.lock().last_error = Some(e.to_string());
                    self.changed.notify_all();
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
    }
}

/// A warm pool of restored clones. Dropping it stops the refill thread and
/// every clone still waiting (clones already handed out live on).
pub struct Pool {
    inner: Arc<Inner>,
    refill: Option<JoinHandle<()>>,
    template: Option<Metrics>,
    // The snapshot directory when the pool made it (removed on drop).
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("snapshot", &self.inner.snapshot)
            .field("size", &self.inner.size)
            .field("ready", &self.ready_count())
            .finish()
    }
}

impl Pool {
    /// Boots a template VM with `config`, waits until it is ready (as
    /// `config.ready` says), snapshots it into a private directory, stops
    /// it, and starts keeping `size` clones ready (at least 1). Clones use
    /// `config`'s host side (network, console, readiness, timeouts).
    pub fn boot(config: Config, size: usize) -> Result<Pool, Error> {
        let dir = tempfile::Builder::new()
            .prefix("osso-pool-")
            .tempdir()
            .map_err(|source| Error::Io {
                what: "create the pool's snapshot directory".into(),
                source,
            })?;
        let template = spawn(config.clone())?;
        template.snapshot(dir.path())?;
        let metrics = template.metrics();
        drop(template);
        let mut pool = Pool::start(dir.path().to_path_buf(), config, size)?;
        pool.template = Some(metrics);
        pool._dir = Some(dir);
        Ok(pool)
    }

    /// A pool of clones of the snapshot in `dir` (made by
    /// [`Vm::snapshot`]). The snapshot is checked now: a bad one fails here.
    pub fn from_snapshot(
        dir: impl AsRef<Path>,
        config: Config,
        size: usize,
    ) -> Result<Pool, Error> {
        osso_vmm::snapshot::read_snapshot(dir.as_ref()).map_err(Error::snapshot)?;
        Pool::start(dir.as_ref().to_path_buf(), config, size)
    }

    fn start(snapshot: PathBuf, config: Config, size: usize) -> Result<Pool, Error> {
        if let crate::config::Network::User { forwards, .. } = &config.network {
            if let Some((host, _)) = forwards.iter().find(|(h, _)| *h != 0) {
                return Err(Error::Config(format!(
                    "a pool's clones cannot all bind host port {host}: forward from host port 0 \
                     (any free port; see Vm::forwards)"
                )));
            }
        }
        let inner = Arc::new(Inner {
            snapshot,
            config,
            size: size.max(1),
            state: Mutex::new(State {
                ready: VecDeque::new(),
                last_error: None,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let refill = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("osso-pool-refill".into())
                .spawn(move || inner.refill())
                .map_err(|source| Error::Io {
                    what: "spawn the pool's refill thread".into(),
                    source,
                })?
        };
        Ok(Pool {
            inner,
            refill: Some(refill),
            template: None,
            _dir: None,
        })
    }

    /// A ready clone: one the pool restored ahead if there is one, else one
    /// restored now (so `take` never waits for the refill thread). Fails
    /// only if the restore itself fails.
    pub fn take(&self) -> Result<Vm, Error> {
        let vm = {
            let mut st = self.inner.lock();
            let vm = st.ready.pop_front();
            self.inner.changed.notify_all();
            vm
        };
        match vm {
            Some(vm) if !vm.has_ended() => Ok(vm),
            // Ended while waiting (its lifetime passed): make a fresh one.
            _ => restore(&self.inner.snapshot, self.inner.config.clone()),
        }
    }

    /// Waits until `n` clones (at most the pool's size) are ready, or
    /// `timeout` passes; returns how many are ready. A refill failure ends
    /// the wait with that error.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> Result<usize, Error> {
        let n = n.min(self.inner.size);
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            if st.ready.len() >= n {
                return Ok(st.ready.len());
            }
            if let Some(e) = &st.last_error {
                return Err(Error::Pool(format!("cannot restore clones: {e}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(st.ready.len());
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Clones ready now (not counting any that ended while waiting).
    pub fn ready_count(&self) -> usize {
        self.inner
            .lock()
            .ready
            .iter()
            .filter(|v| !v.has_ended())
            .count()
    }

    /// The snapshot the clones come from.
    pub fn snapshot_dir(&self) -> &Path {
        &self.inner.snapshot
    }

    /// The template's figures (cold boot), for a pool made by [`Pool::boot`].
    pub fn template_metrics(&self) -> Option<&Metrics> {
        self.template.as_ref()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            // Under the lock, so the refill thread cannot miss the wake-up
            // between checking `stop` and waiting.
            let _st = self.inner.lock();
            self.inner.stop.store(true, Ordering::SeqCst);
            self.inner.changed.notify_all();
        }
        // Waits for a restore in progress (at most the config's boot timeout).
        if let Some(t) = self.refill.take() {
            let _ = t.join();
        }
        // The waiting clones stop here.
        self.inner.lock().ready.clear();
    }
}
