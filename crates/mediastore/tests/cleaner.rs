//! The cleaner handle waits for a sweep in progress when stopped or dropped.
//!
//! A wrapper store makes each sweep take a while and records when sweeps
//! start and finish, so the tests can stop the cleaner mid-sweep.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mediastore::{
    Cleaner, CleanerConfig, Expiry, FileStatus, MediaMeta, MediaRef, MediaStore, MemoryStore,
    ReleaseReport, Resolved, Result, Stats, SweepReport,
};

/// Delegates to a memory store; every sweep sleeps before it returns.
struct SlowSweeps {
    inner: MemoryStore,
    started: AtomicU32,
    finished: AtomicU32,
}

const SWEEP_TAKES: Duration = Duration::from_millis(300);

impl MediaStore for SlowSweeps {
    async fn store(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        self.inner.store(path, meta, scope).await
    }
    async fn resolve(&self, r: MediaRef) -> Result<Arc<Path>> {
        self.inner.resolve(r).await
    }
    async fn resolve_with_meta(&self, r: MediaRef) -> Result<Arc<Resolved>> {
        self.inner.resolve_with_meta(r).await
    }
    async fn open(&self, r: MediaRef) -> Result<(File, Arc<Resolved>)> {
        self.inner.open(r).await
    }
    async fn retain(&self, r: MediaRef, scope: &str) -> Result<()> {
        self.inner.retain(r, scope).await
    }
    async fn release_all(&self, scope: &str) -> Result<ReleaseReport> {
        self.inner.release_all(scope).await
    }
    async fn touch(&self, scope: &str) -> Result<usize> {
        self.inner.touch(scope).await
    }
    async fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<()> {
        self.inner.set_scope_expiry(scope, expiry).await
    }
    async fn clean_expired(&self) -> Result<SweepReport> {
        self.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(SWEEP_TAKES);
        let report = self.inner.clean_expired().await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        report
    }
    async fn scopes_of(&self, r: MediaRef) -> Result<Vec<String>> {
        self.inner.scopes_of(r).await
    }
    async fn refs_in(&self, scope: &str) -> Result<Vec<MediaRef>> {
        self.inner.refs_in(scope).await
    }
    async fn file_status(&self, path: &Path) -> Result<Option<FileStatus>> {
        self.inner.file_status(path).await
    }
    async fn stats(&self) -> Result<Stats> {
        self.inner.stats().await
    }
    fn expiry_configured(&self) -> bool {
        self.inner.expiry_configured()
    }
}

fn slow_store() -> Arc<SlowSweeps> {
    Arc::new(SlowSweeps {
        inner: MemoryStore::builder()
            .max_age(Duration::from_secs(60))
            .build()
            .unwrap(),
        started: AtomicU32::new(0),
        finished: AtomicU32::new(0),
    })
}

fn wait_for_sweep_to_start(store: &SlowSweeps) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.started.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no sweep started");
        std::thread::sleep(Duration::from_millis(1));
    }
}

const FAST: CleanerConfig = CleanerConfig {
    enabled: true,
    interval: Duration::from_millis(5),
};

#[test]
fn stop_waits_for_the_sweep_in_progress() {
    let store = slow_store();
    let cleaner = Cleaner::new(store.clone(), FAST);
    assert!(cleaner.start().unwrap());
    wait_for_sweep_to_start(&store);
    let asked = Instant::now();
    cleaner.stop();
    let started = store.started.load(Ordering::SeqCst);
    assert_eq!(
        store.finished.load(Ordering::SeqCst),
        started,
        "stop returned while a sweep was still running"
    );
    assert!(
        asked.elapsed() >= SWEEP_TAKES / 3,
        "stop cannot have waited for a 300 ms sweep"
    );
    // Nothing sweeps after stop returned.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(store.started.load(Ordering::SeqCst), started);
}

#[test]
fn drop_waits_for_the_sweep_in_progress() {
    let store = slow_store();
    let cleaner = Cleaner::new(store.clone(), FAST);
    cleaner.start().unwrap();
    wait_for_sweep_to_start(&store);
    drop(cleaner);
    assert_eq!(
        store.finished.load(Ordering::SeqCst),
        store.started.load(Ordering::SeqCst)
    );
}

#[test]
fn restart_after_stop_sweeps_again() {
    let store = slow_store();
    let cleaner = Cleaner::new(store.clone(), FAST);
    cleaner.start().unwrap();
    wait_for_sweep_to_start(&store);
    cleaner.stop();
    let before = store.finished.load(Ordering::SeqCst);
    assert!(cleaner.start().unwrap());
    assert!(cleaner.is_running());
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.finished.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "restarted cleaner never swept");
        std::thread::sleep(Duration::from_millis(5));
    }
    cleaner.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_inside_a_runtime() {
    let store = slow_store();
    let cleaner = Cleaner::new(store.clone(), FAST);
    cleaner.start().unwrap();
    tokio::task::spawn_blocking(move || {
        wait_for_sweep_to_start(&store);
        cleaner.stop();
        assert_eq!(
            store.finished.load(Ordering::SeqCst),
            store.started.load(Ordering::SeqCst)
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn works_inside_a_current_thread_runtime() {
    let store = slow_store();
    let cleaner = Cleaner::new(store.clone(), FAST);
    cleaner.start().unwrap();
    // Block this runtime's only thread while the sweeper runs: it must not
    // depend on this thread to make progress.
    wait_for_sweep_to_start(&store);
    cleaner.stop();
    assert!(store.finished.load(Ordering::SeqCst) >= 1);
}

#[test]
fn on_sweep_sees_every_sweep_report() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.jpg");
    std::fs::write(&file, b"x").unwrap();
    let clock = mediastore::ManualClock::new(mediastore::conformance::epoch());
    let store = Arc::new(
        MemoryStore::builder()
            .owned_root(dir.path())
            .max_age(Duration::from_secs(60))
            .clock(clock.clone())
            .build()
            .unwrap(),
    );
    mediastore::conformance::block_on(store.store(
        &file,
        &MediaMeta::new("old.jpg", "image/jpeg", "t"),
        "chat:1",
    ))
    .unwrap();
    clock.advance(Duration::from_secs(61));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let cleaner = {
        let seen = seen.clone();
        Cleaner::new(store, FAST).on_sweep(move |r| {
            seen.lock()
                .push(r.as_ref().map(|r| (r.refs_expired, r.files_deleted)).ok());
        })
    };
    cleaner.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().len() < 2 {
        assert!(Instant::now() < deadline, "no sweeps reported");
        std::thread::sleep(Duration::from_millis(1));
    }
    cleaner.stop();
    let seen = seen.lock();
    // The first sweep expired the ref and deleted its file; later ones found nothing.
    assert_eq!(seen[0], Some((1, 1)));
    assert!(seen[1..].iter().all(|s| *s == Some((0, 0))), "{seen:?}");
    assert!(!file.exists());
}
