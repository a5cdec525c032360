//! The background cleaner: runs `clean_expired` every interval on its own
//! thread, as a handle that can be stopped (waiting for a running sweep) and
//! started again.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mediastore_core::{Error, Result};
use parking_lot::{Condvar, Mutex};

use crate::api::{MediaStore, SweepReport};

/// When the cleaner runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanerConfig {
    /// A disabled cleaner's `start` and `stop` do nothing.
    pub enabled: bool,
    /// Time between sweeps; must be above zero.
    pub interval: Duration,
}

impl Default for CleanerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(300),
        }
    }
}

#[derive(Default)]
struct Signal {
    stop: Mutex<bool>,
    wake: Condvar,
}

struct Running {
    signal: Arc<Signal>,
    thread: JoinHandle<()>,
}

/// A handle on the background sweep of one store.
///
/// Starting twice runs one sweeper; stopping twice is fine; stopping (or
/// dropping the handle) waits for a sweep in progress to finish, so nothing
/// is deleted after `stop` returns. The sweeps run on a dedicated thread;
/// started inside a multi-thread tokio runtime they are driven through that
/// runtime, so engines that need its I/O drivers work; otherwise through a
/// private current-thread runtime.
pub struct Cleaner<S: MediaStore> {
    store: Arc<S>,
    config: CleanerConfig,
    on_sweep: Option<OnSweep>,
    running: Mutex<Option<Running>>,
}

/// Called with the outcome of every sweep the cleaner runs.
type OnSweep = Arc<dyn Fn(&Result<SweepReport>) + Send + Sync>;

impl<S: MediaStore> Cleaner<S> {
    /// A stopped cleaner for `store`.
    pub fn new(store: Arc<S>, config: CleanerConfig) -> Self {
        Self {
            store,
            config,
            on_sweep: None,
            running: Mutex::new(None),
        }
    }

    /// Calls `f` with the outcome of every sweep (for metrics, say), on the
    /// cleaner's thread, before the next sweep is scheduled.
    pub fn on_sweep(mut self, f: impl Fn(&Result<SweepReport>) + Send + Sync + 'static) -> Self {
        self.on_sweep = Some(Arc::new(f));
        self
    }

    /// Starts sweeping. Returns `Ok(false)` if the cleaner is disabled,
    /// `Ok(true)` once a sweeper runs (also when it already did). Refuses an
    /// interval of zero, and a store on which nothing can expire.
    pub fn start(&self) -> Result<bool> {
        if !self.config.enabled {
            return Ok(false);
        }
        if self.config.interval.is_zero() {
            return Err(Error::InvalidConfig(
                "cleaner interval must be above zero".into(),
            ));
        }
        if !self.store.expiry_configured() {
            return Err(Error::InvalidConfig(
                "cleaner needs a max age above zero (nothing can expire)".into(),
            ));
        }
        let mut running = self.running.lock();
        if running.is_some() {
            return Ok(true);
        }
        let signal = Arc::new(Signal::default());
        let store = self.store.clone();
        let interval = self.config.interval;
        // A multi-thread runtime drives its I/O and timers from its own
        // workers, so the sweeper can borrow it. A current-thread runtime
        // only makes progress on its own thread, which may be the one
        // blocked in `stop`; the sweeper then builds a private runtime.
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let thread_signal = signal.clone();
        let on_sweep = self.on_sweep.clone();
        let thread = std::thread::Builder::new()
            .name("mediastore-cleaner".into())
            .spawn(move || sweep_loop(&*store, interval, &thread_signal, runtime, on_sweep))
            .map_err(|e| Error::Io {
                context: "starting the cleaner thread".into(),
                source: e,
            })?;
        *running = Some(Running { signal, thread });
        tracing::info!(?interval, "media cleaner started");
        Ok(true)
    }

    /// Stops sweeping and waits for a sweep in progress. Idempotent.
    pub fn stop(&self) {
        let Some(running) = self.running.lock().take() else {
            return;
        };
        *running.signal.stop.lock() = true;
        running.signal.wake.notify_all();
        if running.thread.join().is_err() {
            tracing::error!("media cleaner thread panicked");
        }
        tracing::info!("media cleaner stopped");
    }

    /// True while a sweeper runs.
    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }
}

impl<S: MediaStore> Drop for Cleaner<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sweep_loop<S: MediaStore>(
    store: &S,
    interval: Duration,
    signal: &Signal,
    runtime: Option<tokio::runtime::Handle>,
    on_sweep: Option<OnSweep>,
) {
    // Outside a runtime, a private current-thread one drives the futures.
    let own = match runtime {
        Some(_) => None,
        None => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::error!(error = %e, "media cleaner could not build a runtime");
                return;
            }
        },
    };
    loop {
        {
            let mut stop = signal.stop.lock();
            if !*stop {
                signal.wake.wait_for(&mut stop, interval);
            }
            if *stop {
                return;
            }
        }
        let fut = store.clean_expired();
        let result = match (&own, &runtime) {
            (Some(rt), _) => rt.block_on(fut),
            (None, Some(h)) => h.block_on(fut),
            (None, None) => unreachable!("one runtime is always set"),
        };
        if let Some(f) = &on_sweep {
            f(&result);
        }
        match result {
            Ok(r) if r.refs_expired > 0 || r.files_deleted > 0 || !r.failures.is_empty() => {
                tracing::info!(
                    refs_expired = r.refs_expired,
                    files_deleted = r.files_deleted,
                    bytes_freed = r.bytes_freed,
                    failures = r.failures.len(),
                    "media sweep"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "media sweep failed"),
        }
    }
}
