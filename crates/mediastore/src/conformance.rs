//! Scenarios every engine must pass, run unchanged against each of them.
//!
//! An engine's test file implements [`Engine`] and expands
//! [`conformance_tests!`](crate::conformance_tests), which makes one `#[test]`
//! per scenario. The seed's 24 peer tests are the `peer_*` scenarios
//! (restated from `PEER_SUITE.md`); the rest pin the defects we fix.
//! Scenarios panic on failure, like assertions.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mediastore_core::{CleanupPolicy, Error, Expiry, MediaMeta, MediaRef, Result};

use crate::api::MediaStore;
use crate::cleaner::{Cleaner, CleanerConfig};
use crate::clock::{Clock, ManualClock};

pub mod seed_port;

/// How a scenario wants its store.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The directory the store owns (and may delete in).
    pub owned_root: PathBuf,
    /// Default max age of holds; `None`: no expiry.
    pub max_age: Option<Duration>,
    /// The clock the store must read.
    pub clock: ManualClock,
    /// An empty directory the engine may keep its own state in (an index,
    /// managed files); removed with the fixture, after the store is dropped.
    pub data_dir: PathBuf,
}

/// Builds stores of one engine for the scenarios.
pub trait Engine: Send + Sync + 'static {
    /// The engine's store.
    type Store: MediaStore;
    /// A fresh, empty store configured as `setup` says.
    fn open(&self, setup: &Setup) -> impl Future<Output = Result<Self::Store>> + Send;
}

/// Runs a scenario to completion on a two-worker runtime.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(fut)
}

/// A store plus the temp dir, clock and helpers a scenario needs.
pub struct Fixture<S> {
    /// The store under test.
    pub store: Arc<S>,
    /// Its clock.
    pub clock: ManualClock,
    /// The owned root (a temp dir, removed on drop).
    pub root: PathBuf,
    /// A directory outside every owned root.
    pub outside: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir, tempfile::TempDir),
}

/// Where scenario clocks start.
pub fn epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

impl<S: MediaStore> Fixture<S> {
    /// Opens a store with the given default max age.
    pub async fn new<E: Engine<Store = S>>(engine: &E, max_age: Option<Duration>) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let data = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(epoch());
        let setup = Setup {
            owned_root: root.path().to_path_buf(),
            max_age,
            clock: clock.clone(),
            data_dir: data.path().to_path_buf(),
        };
        let store = engine.open(&setup).await.expect("engine opens");
        Self {
            store: Arc::new(store),
            clock,
            root: root.path().to_path_buf(),
            outside: outside.path().to_path_buf(),
            _dirs: (root, outside, data),
        }
    }

    /// Writes a file in the owned root.
    pub fn file(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).expect("mkdir");
        }
        fs::write(&p, name.as_bytes()).expect("write");
        p
    }

    /// Stores with an explicit policy.
    pub async fn put(&self, path: &Path, policy: CleanupPolicy, scope: &str) -> MediaRef {
        self.store
            .store(path, &meta().with_policy(policy), scope)
            .await
            .expect("store")
    }

    /// True when the ref no longer resolves (and fails the right way).
    pub async fn gone(&self, r: MediaRef) -> bool {
        match self.store.resolve(r).await {
            Err(Error::UnknownRef(x)) => {
                assert_eq!(x, r, "unknown-ref error names the ref");
                true
            }
            Err(e) => panic!("unexpected error resolving {r}: {e}"),
            Ok(_) => false,
        }
    }
}

/// The metadata the scenarios register.
pub fn meta() -> MediaMeta {
    MediaMeta::new("photo.jpg", "image/jpeg", "telegram")
}

const OWNED: CleanupPolicy = CleanupPolicy::DeleteOnCleanup;
const BORROWED: CleanupPolicy = CleanupPolicy::ForgetOnly;

/// Peer 1: store then resolve.
pub async fn peer_01_store_then_resolve<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    assert!(r.to_string().starts_with("media://"));
    assert_eq!(&*f.store.resolve(r).await.unwrap(), p.as_path());
}

/// Peer 2: releasing a scope of three owned files deletes them all.
pub async fn peer_02_release_deletes_owned<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let mut refs = Vec::new();
    let mut paths = Vec::new();
    for i in 0..3 {
        let p = f.file(&format!("f{i}.jpg"));
        refs.push(f.put(&p, OWNED, "s").await);
        paths.push(p);
    }
    let report = f.store.release_all("s").await.unwrap();
    assert_eq!(report.files_deleted, 3);
    assert_eq!(report.refs_removed, 3);
    for (r, p) in refs.into_iter().zip(paths) {
        assert!(!p.exists(), "{} deleted", p.display());
        assert!(f.gone(r).await);
    }
}

/// Peer 3: a forget_only file survives its release.
pub async fn peer_03_forget_only_kept<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let r = f.put(&p, BORROWED, "s").await;
    let report = f.store.release_all("s").await.unwrap();
    assert_eq!(report.files_deleted, 0);
    assert!(f.gone(r).await);
    assert!(p.exists());
}

/// Peer 4: one owned file in two scopes is deleted with the second release.
pub async fn peer_04_shared_file_counts<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let ra = f.put(&p, OWNED, "A").await;
    let rb = f.put(&p, OWNED, "B").await;
    f.store.release_all("A").await.unwrap();
    assert!(f.gone(ra).await);
    assert_eq!(&*f.store.resolve(rb).await.unwrap(), p.as_path());
    assert!(p.exists());
    let report = f.store.release_all("B").await.unwrap();
    assert_eq!(report.files_deleted, 1);
    assert!(!p.exists());
}

/// Peer 5: owned then borrowed: the borrow pins the file for good.
pub async fn peer_05_forget_only_pins<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    f.put(&p, OWNED, "owned").await;
    f.put(&p, BORROWED, "borrowed").await;
    f.store.release_all("owned").await.unwrap();
    assert!(p.exists());
    f.store.release_all("borrowed").await.unwrap();
    assert!(p.exists());
}

/// Peer 6: releasing one scope leaves another's file alone.
pub async fn peer_06_scopes_independent<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let pa = f.file("a.jpg");
    let pb = f.file("b.jpg");
    let ra = f.put(&pa, OWNED, "A").await;
    let rb = f.put(&pb, OWNED, "B").await;
    f.store.release_all("A").await.unwrap();
    assert!(!pa.exists());
    assert!(f.gone(ra).await);
    assert!(pb.exists());
    assert_eq!(&*f.store.resolve(rb).await.unwrap(), pb.as_path());
}

/// Peer 7: unknown scope and double release are no-ops.
pub async fn peer_07_release_idempotent<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let report = f.store.release_all("never-seen").await.unwrap();
    assert_eq!(report, Default::default());
    let p = f.file("a.jpg");
    f.put(&p, OWNED, "s").await;
    assert_eq!(f.store.release_all("s").await.unwrap().files_deleted, 1);
    assert_eq!(f.store.release_all("s").await.unwrap(), Default::default());
}

/// Peer 8, restated: the seed could lose a ref record behind a scope; ours
/// cannot, so we check the nearest thing: a scope whose file vanished and
/// whose ref is also held elsewhere releases cleanly and leaves no mapping.
pub async fn peer_08_release_after_file_lost<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    f.store.retain(r, "other").await.unwrap();
    fs::remove_file(&p).unwrap();
    f.store.release_all("s").await.unwrap();
    assert_eq!(
        f.store.scopes_of(r).await.unwrap(),
        vec!["other".to_string()]
    );
    let report = f.store.release_all("other").await.unwrap();
    assert_eq!(report.files_deleted, 0, "already gone is not an error");
    assert!(report.failures.is_empty());
    assert!(f.gone(r).await);
    assert!(f.store.refs_in("s").await.unwrap().is_empty());
    assert!(f.store.refs_in("other").await.unwrap().is_empty());
    let stats = f.store.stats().await.unwrap();
    assert_eq!((stats.refs, stats.scopes, stats.files), (0, 0, 0));
}

/// Peer 9: a missing file is refused with the OS reason; nothing registered.
pub async fn peer_09_missing_file<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.root.join("nope.jpg");
    let err = f.store.store(&p, &meta(), "s").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("nope.jpg"), "names the path: {msg}");
    assert!(
        msg.to_lowercase().contains("no such file"),
        "carries the OS reason: {msg}"
    );
    assert_eq!(f.store.stats().await.unwrap(), Default::default());
    assert!(f.store.refs_in("s").await.unwrap().is_empty());
}

/// Peer 10: resolve with meta returns what was stored.
pub async fn peer_10_resolve_with_meta<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let m = MediaMeta::new("cat.jpg", "image/jpeg", "discord").with_policy(BORROWED);
    let r = f.store.store(&p, &m, "s").await.unwrap();
    let got = f.store.resolve_with_meta(r).await.unwrap();
    assert_eq!(&*got.path, p.as_path());
    assert_eq!(got.meta.filename, "cat.jpg");
    assert_eq!(got.meta.content_type, "image/jpeg");
    assert_eq!(got.meta.source, "discord");
    assert_eq!(got.meta.policy, Some(BORROWED));
    assert_eq!(got.stored_at.to_system(), epoch());
    let unknown = MediaRef::from_random_bytes([9; 16]);
    assert!(matches!(
        f.store.resolve_with_meta(unknown).await,
        Err(Error::UnknownRef(x)) if x == unknown
    ));
}

/// Peer 11: 20 concurrent workers, each its own scope and 5 files.
pub async fn peer_11_concurrent_workers<E: Engine>(e: &E) {
    let f = Arc::new(Fixture::new(e, None).await);
    let mut tasks = Vec::new();
    for w in 0..20 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let scope = format!("worker:{w}");
            let mut refs = Vec::new();
            for i in 0..5 {
                let p = f.file(&format!("w{w}/f{i}.jpg"));
                refs.push((f.put(&p, OWNED, &scope).await, p));
            }
            for (r, p) in &refs {
                assert_eq!(&*f.store.resolve(*r).await.unwrap(), p.as_path());
            }
            let report = f.store.release_all(&scope).await.unwrap();
            assert_eq!(report.files_deleted, 5);
            for (_, p) in &refs {
                assert!(!p.exists());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(f.store.stats().await.unwrap(), Default::default());
}

async fn stored_minutes_ago<S: MediaStore>(
    f: &Fixture<S>,
    p: &Path,
    policy: CleanupPolicy,
    scope: &str,
    minutes: u64,
) -> MediaRef {
    let now = Clock::now(&f.clock);
    f.clock.set(now - Duration::from_secs(60 * minutes));
    let r = f.put(p, policy, scope).await;
    f.clock.set(now);
    r
}

/// Peer 12: an owned entry older than the TTL expires and is deleted.
pub async fn peer_12_ttl_expires_owned<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let p = f.file("a.jpg");
    let r = stored_minutes_ago(&f, &p, OWNED, "s", 20).await;
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!(report.refs_expired, 1);
    assert_eq!(report.files_deleted, 1);
    assert_eq!(report.bytes_freed, "a.jpg".len() as u64);
    assert!(f.gone(r).await);
    assert!(!p.exists());
}

/// Peer 13: as 12, forget_only: the file is kept.
pub async fn peer_13_ttl_expires_borrowed<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let p = f.file("a.jpg");
    let r = stored_minutes_ago(&f, &p, BORROWED, "s", 20).await;
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!(report.refs_expired, 1);
    assert_eq!(report.files_deleted, 0);
    assert!(f.gone(r).await);
    assert!(p.exists());
}

/// Peer 14: a fresh entry does not expire.
pub async fn peer_14_fresh_survives<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let p = f.file("a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    assert_eq!(f.store.clean_expired().await.unwrap().refs_expired, 0);
    assert!(f.store.resolve(r).await.is_ok());
    assert!(p.exists());
}

/// Peer 15: old and fresh in one scope: only the old one expires.
pub async fn peer_15_ttl_per_ref<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let old = f.file("old.jpg");
    let fresh = f.file("fresh.jpg");
    let r_old = stored_minutes_ago(&f, &old, OWNED, "s", 20).await;
    let r_fresh = f.put(&fresh, OWNED, "s").await;
    assert_eq!(f.store.clean_expired().await.unwrap().refs_expired, 1);
    assert!(f.gone(r_old).await);
    assert!(f.store.resolve(r_fresh).await.is_ok());
    assert!(!old.exists());
    assert!(fresh.exists());
    assert_eq!(f.store.refs_in("s").await.unwrap(), vec![r_fresh]);
}

/// Peer 16: one file, an old ref and a fresh ref in two scopes.
pub async fn peer_16_ttl_shared_file<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let p = f.file("a.jpg");
    stored_minutes_ago(&f, &p, OWNED, "old", 20).await;
    let fresh = f.put(&p, OWNED, "fresh").await;
    assert_eq!(f.store.clean_expired().await.unwrap().refs_expired, 1);
    assert!(f.store.resolve(fresh).await.is_ok());
    assert!(p.exists());
    assert_eq!(f.store.release_all("fresh").await.unwrap().files_deleted, 1);
    assert!(!p.exists());
}

/// Peer 17: a scope whose only ref expires disappears.
pub async fn peer_17_empty_scope_removed<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(600))).await;
    let p = f.file("a.jpg");
    stored_minutes_ago(&f, &p, OWNED, "s", 20).await;
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!(report.scopes_removed, 1);
    assert!(f.store.refs_in("s").await.unwrap().is_empty());
    assert_eq!(f.store.stats().await.unwrap().scopes, 0);
}

/// Peer 18: cleaner on: start twice, wait, stop twice.
pub async fn peer_18_cleaner_start_stop<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(60))).await;
    let p = f.file("a.jpg");
    let r = stored_minutes_ago(&f, &p, OWNED, "s", 2).await;
    let cleaner = Cleaner::new(
        f.store.clone(),
        CleanerConfig {
            enabled: true,
            interval: Duration::from_millis(50),
        },
    );
    assert!(cleaner.start().unwrap());
    assert!(cleaner.start().unwrap());
    wait_until(|| async { !p.exists() }).await;
    cleaner.stop();
    cleaner.stop();
    assert!(!cleaner.is_running());
    assert!(f.gone(r).await);
}

/// Peer 19: max age zero: nothing expires.
pub async fn peer_19_max_age_zero<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::ZERO)).await;
    let p = f.file("a.jpg");
    let r = stored_minutes_ago(&f, &p, OWNED, "s", 60 * 24 * 365).await;
    assert_eq!(f.store.clean_expired().await.unwrap().refs_expired, 0);
    assert!(f.store.resolve(r).await.is_ok());
}

/// Peer 20: a disabled cleaner does nothing and fails nothing.
pub async fn peer_20_cleaner_disabled<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(60))).await;
    let cleaner = Cleaner::new(
        f.store.clone(),
        CleanerConfig {
            enabled: false,
            interval: Duration::from_millis(10),
        },
    );
    assert!(!cleaner.start().unwrap());
    assert!(!cleaner.is_running());
    cleaner.stop();
}

/// Peer 21: interval zero is refused.
pub async fn peer_21_interval_zero_refused<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(60))).await;
    let cleaner = Cleaner::new(
        f.store.clone(),
        CleanerConfig {
            enabled: true,
            interval: Duration::ZERO,
        },
    );
    assert!(matches!(cleaner.start(), Err(Error::InvalidConfig(_))));
    assert!(!cleaner.is_running());
}

/// Peer 22: max age zero with a valid interval is refused.
pub async fn peer_22_max_age_zero_refused<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::ZERO)).await;
    let cleaner = Cleaner::new(
        f.store.clone(),
        CleanerConfig {
            enabled: true,
            interval: Duration::from_millis(50),
        },
    );
    assert!(matches!(cleaner.start(), Err(Error::InvalidConfig(_))));
    assert!(!cleaner.is_running());
}

/// Peer 23: 40 workers mixing store, unknown resolves, releases and sweeps
/// with a 50 ms TTL; afterwards every invariant holds.
pub async fn peer_23_mixed_concurrency<E: Engine>(e: &E) {
    let f = Arc::new(Fixture::new(e, Some(Duration::from_millis(50))).await);
    let mut tasks = Vec::new();
    for w in 0..40 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let scope = format!("w:{w}");
            for i in 0..25 {
                match (w + i) % 4 {
                    0 | 1 => {
                        let p = f.file(&format!("w{w}/f{i}.jpg"));
                        let r = f.put(&p, OWNED, &scope).await;
                        // Alive until its scope is released or it expires.
                        let _ = f.store.resolve(r).await;
                    }
                    2 => {
                        let unknown = MediaRef::from_random_bytes([(w * 31 + i) as u8; 16]);
                        assert!(f.store.resolve(unknown).await.is_err());
                        f.store.release_all(&scope).await.unwrap();
                    }
                    _ => {
                        f.clock.advance(Duration::from_millis(20));
                        let report = f.store.clean_expired().await.unwrap();
                        assert!(report.failures.is_empty(), "{report:?}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    check_live_refs_resolve_to_files(&*f.store).await;
    f.clock.advance(Duration::from_secs(1));
    f.store.clean_expired().await.unwrap();
    let stats = f.store.stats().await.unwrap();
    assert_eq!(
        (stats.refs, stats.scopes, stats.holds, stats.files),
        (0, 0, 0, 0)
    );
    assert_eq!(stats.pending_deletions, 0);
}

async fn check_live_refs_resolve_to_files<S: MediaStore>(store: &S) {
    for w in 0..40 {
        for r in store.refs_in(&format!("w:{w}")).await.unwrap() {
            let p = store.resolve(r).await.unwrap();
            assert!(p.exists(), "live ref {r} points at a deleted file");
        }
    }
}

/// Peer 24: each ref reports its scope; releasing one scope leaves the other.
pub async fn peer_24_scope_introspection<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let a = f.put(&f.file("a"), OWNED, "s1").await;
    let b = f.put(&f.file("b"), OWNED, "s1").await;
    let c = f.put(&f.file("c"), OWNED, "s2").await;
    assert_eq!(f.store.scopes_of(a).await.unwrap(), ["s1"]);
    assert_eq!(f.store.scopes_of(b).await.unwrap(), ["s1"]);
    assert_eq!(f.store.scopes_of(c).await.unwrap(), ["s2"]);
    assert_eq!(f.store.refs_in("s1").await.unwrap(), vec![a, b]);
    f.store.release_all("s1").await.unwrap();
    assert!(f.gone(a).await && f.gone(b).await);
    assert_eq!(f.store.scopes_of(c).await.unwrap(), ["s2"]);
}

/// Custody: a ref retained by a session survives its message scope.
pub async fn custody_retain_outlives_message<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("voice.ogg");
    let r = f.put(&p, OWNED, "telegram:1:10").await;
    f.store.retain(r, "session:abc").await.unwrap();
    assert_eq!(
        f.store.scopes_of(r).await.unwrap(),
        ["session:abc", "telegram:1:10"]
    );
    let report = f.store.release_all("telegram:1:10").await.unwrap();
    assert_eq!((report.refs_released, report.refs_removed), (1, 0));
    assert_eq!(&*f.store.resolve(r).await.unwrap(), p.as_path());
    assert!(p.exists());
    // Retaining twice keeps one hold.
    f.store.retain(r, "session:abc").await.unwrap();
    assert_eq!(f.store.refs_in("session:abc").await.unwrap(), vec![r]);
    let report = f.store.release_all("session:abc").await.unwrap();
    assert_eq!(
        (
            report.refs_removed,
            report.files_deleted,
            report.bytes_freed
        ),
        (1, 1, "voice.ogg".len() as u64)
    );
    assert!(!p.exists());
    let unknown = MediaRef::from_random_bytes([1; 16]);
    assert!(matches!(
        f.store.retain(unknown, "session:abc").await,
        Err(Error::UnknownRef(_))
    ));
    assert_eq!(f.store.stats().await.unwrap().scopes, 0, "no scope created");
}

/// Each hold expires on its own clock; `touch` and per-scope expiry renew
/// and override it.
pub async fn custody_holds_expire_separately<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(30 * 60))).await;
    f.store
        .set_scope_expiry("session:abc", Expiry::After(Duration::from_secs(7 * 86400)))
        .await
        .unwrap();
    let p = f.file("img.png");
    let r = f.put(&p, OWNED, "telegram:1:10").await;
    f.store.retain(r, "session:abc").await.unwrap();
    // Exactly max age old survives; one nanosecond more expires.
    f.clock.advance(Duration::from_secs(30 * 60));
    assert_eq!(f.store.clean_expired().await.unwrap().holds_expired, 0);
    f.clock.advance(Duration::from_nanos(1));
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!((report.holds_expired, report.refs_expired), (1, 0));
    assert_eq!(f.store.scopes_of(r).await.unwrap(), ["session:abc"]);
    // Touch renews: six days later, touch; another six days: still alive.
    f.clock.advance(Duration::from_secs(6 * 86400));
    assert_eq!(f.store.touch("session:abc").await.unwrap(), 1);
    f.clock.advance(Duration::from_secs(6 * 86400));
    assert_eq!(f.store.clean_expired().await.unwrap().holds_expired, 0);
    f.clock.advance(Duration::from_secs(2 * 86400));
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!((report.refs_expired, report.files_deleted), (1, 1));
    assert!(!p.exists());
    // A scope set to never expire keeps its holds.
    f.store
        .set_scope_expiry("pinned", Expiry::Never)
        .await
        .unwrap();
    let q = f.file("keep.png");
    let rq = f.put(&q, OWNED, "pinned").await;
    f.clock.advance(Duration::from_secs(365 * 86400));
    f.store.clean_expired().await.unwrap();
    assert!(f.store.resolve(rq).await.is_ok());
    assert_eq!(f.store.touch("never-seen").await.unwrap(), 0);
}

/// Ownership by location: outside the owned roots a file is borrowed, and
/// asking to delete it is refused with nothing registered.
pub async fn ownership_by_location<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let outside = f.outside.join("user.txt");
    fs::write(&outside, b"mine").unwrap();
    let err = f
        .store
        .store(&outside, &meta().with_policy(OWNED), "s")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotOwned { .. }), "{err}");
    assert_eq!(f.store.stats().await.unwrap(), Default::default());
    let r = f.store.store(&outside, &meta(), "s").await.unwrap();
    assert_eq!(
        f.store.resolve_with_meta(r).await.unwrap().meta.policy,
        Some(BORROWED)
    );
    let inside = f.file("dl.jpg");
    let ri = f.store.store(&inside, &meta(), "s").await.unwrap();
    assert_eq!(
        f.store.resolve_with_meta(ri).await.unwrap().meta.policy,
        Some(OWNED)
    );
    f.store.release_all("s").await.unwrap();
    assert!(outside.exists());
    assert!(!inside.exists());
    // A symlink inside the root pointing outside is judged by its target.
    let link = f.root.join("link.txt");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let err = f
        .store
        .store(&link, &meta().with_policy(OWNED), "s")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotOwned { .. }), "{err}");
}

/// A directory swapped for a symlink after registration cannot make the
/// store delete outside its roots: the deletion is refused and reported.
pub async fn never_deletes_outside_roots<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("sub/a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    let moved = f.outside.join("sub");
    fs::rename(f.root.join("sub"), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, f.root.join("sub")).unwrap();
    let report = f.store.release_all("s").await.unwrap();
    assert_eq!(report.files_deleted, 0);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert!(!report.failures[0].will_retry);
    assert!(
        moved.join("a.jpg").exists(),
        "file outside the root survived"
    );
    assert!(f.gone(r).await);
}

/// A deletion that fails is reported, kept pending, and retried by the next
/// sweep; nothing is lost.
pub async fn failed_deletions_are_retried<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("sub/a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    // Make the path unresolvable (a symlink loop where its directory was):
    // the store cannot prove the file is inside its root, so it must not
    // delete, but the condition may pass.
    let aside = f.root.join("sub.aside");
    fs::rename(f.root.join("sub"), &aside).unwrap();
    std::os::unix::fs::symlink(f.root.join("sub"), f.root.join("sub")).unwrap();
    let report = f.store.release_all("s").await.unwrap();
    assert!(f.gone(r).await);
    assert_eq!(report.files_deleted, 0);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert!(report.failures[0].will_retry, "{report:?}");
    assert_eq!(f.store.stats().await.unwrap().pending_deletions, 1);
    assert!(aside.join("a.jpg").exists());

    // Still failing: reported again, still pending.
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!((report.retried, report.files_deleted), (1, 0));
    assert_eq!(report.failures.len(), 1);
    assert_eq!(f.store.stats().await.unwrap().pending_deletions, 1);

    fs::remove_file(f.root.join("sub")).unwrap();
    fs::rename(&aside, f.root.join("sub")).unwrap();
    let report = f.store.clean_expired().await.unwrap();
    assert_eq!((report.retried, report.files_deleted), (1, 1), "{report:?}");
    assert_eq!(report.bytes_freed, "sub/a.jpg".len() as u64);
    assert!(report.failures.is_empty());
    assert!(!p.exists());
    assert_eq!(f.store.stats().await.unwrap(), Default::default());
}

/// Spellings of one file share one count: `./`, `..`, relative, symlink and
/// hard link. A forget_only ref under any spelling pins the file.
pub async fn aliasing_shares_one_count<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("d/a.jpg");
    let dotted = f.root.join("d/./a.jpg");
    let parent = f.root.join("d/../d/a.jpg");
    let link = f.root.join("link.jpg");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let hard = f.root.join("hard.jpg");
    fs::hard_link(&p, &hard).unwrap();
    let relative = relative_spelling(&p);
    let spellings = [&p, &dotted, &parent, &link, &hard, &relative];
    for (i, s) in spellings.iter().enumerate() {
        f.put(s, OWNED, &format!("s{i}")).await;
    }
    let status = f.store.file_status(&p).await.unwrap().unwrap();
    assert_eq!(status.refs, spellings.len() as u32);
    for i in 0..spellings.len() - 1 {
        f.store.release_all(&format!("s{i}")).await.unwrap();
        assert!(
            p.exists(),
            "deleted while a ref under another spelling lives"
        );
    }
    let report = f
        .store
        .release_all(&format!("s{}", spellings.len() - 1))
        .await
        .unwrap();
    assert_eq!(report.files_deleted, 1);
    assert!(
        !p.exists() && !hard.exists(),
        "both names of the file removed"
    );
    assert!(
        fs::symlink_metadata(&link).is_ok(),
        "the symlink is not the file"
    );

    // forget_only under one spelling protects the file under all.
    let q = f.file("d/b.jpg");
    let qlink = f.root.join("blink.jpg");
    std::os::unix::fs::symlink(&q, &qlink).unwrap();
    f.put(&q, OWNED, "x").await;
    f.put(&qlink, BORROWED, "y").await;
    f.put(&f.root.join("d/./b.jpg"), OWNED, "z").await;
    for s in ["x", "z", "y"] {
        f.store.release_all(s).await.unwrap();
    }
    assert!(q.exists());
}

fn relative_spelling(p: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let mut rel = PathBuf::new();
    for _ in cwd.components().skip(1) {
        rel.push("..");
    }
    rel.join(p.strip_prefix("/").unwrap())
}

/// A file replaced behind the store's back is not deleted; `open` of a ref
/// whose file vanished is a distinct error.
pub async fn replaced_and_vanished_files<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    let r = f.put(&p, OWNED, "s").await;
    let (_, resolved) = f.store.open(r).await.unwrap();
    assert_eq!(&*resolved.path, p.as_path());
    fs::remove_file(&p).unwrap();
    assert!(matches!(
        f.store.open(r).await,
        Err(Error::FileVanished { .. })
    ));
    fs::write(&p, b"a new file").unwrap();
    assert!(matches!(
        f.store.open(r).await,
        Err(Error::FileVanished { .. })
    ));
    let report = f.store.release_all("s").await.unwrap();
    assert_eq!(report.files_deleted, 0);
    assert_eq!(fs::read(&p).unwrap(), b"a new file");
}

/// Bad input changes nothing: invalid scopes, directories, missing files.
pub async fn bad_input_changes_nothing<E: Engine>(e: &E) {
    let f = Fixture::new(e, None).await;
    let p = f.file("a.jpg");
    for scope in ["", "a\0b", "line\nbreak", &"x".repeat(600)] {
        let err = f.store.store(&p, &meta(), scope).await.unwrap_err();
        assert!(matches!(err, Error::InvalidScope { .. }), "{err}");
        assert!(matches!(
            f.store.release_all(scope).await,
            Err(Error::InvalidScope { .. })
        ));
    }
    let err = f.store.store(&f.root, &meta(), "s").await.unwrap_err();
    assert!(matches!(err, Error::File { .. }), "{err}");
    assert_eq!(f.store.stats().await.unwrap(), Default::default());
}

/// Releases two threads within a few hundred nanoseconds of each other.
///
/// A `std::sync::Barrier` lets its last arrival run on while the other thread
/// waits to be woken by the scheduler, so the two racing calls rarely overlap.
/// Spinning makes them start together; round `r` waits for count `2(r+1)`.
fn spin_start(arrived: &AtomicU64, round: usize) {
    arrived.fetch_add(1, Ordering::AcqRel);
    let target = (round as u64 + 1) * 2;
    let mut spins = 0u32;
    while arrived.load(Ordering::Acquire) < target {
        if spins < 1 << 14 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            // The other thread is descheduled: stop burning its core.
            std::thread::yield_now();
        }
    }
}

/// The seed's race: one thread drops a file's last ref while another stores
/// the same file under another scope. A store that succeeds must leave a ref
/// whose file exists; a store that loses the race must fail with not-found.
/// Both calls start together; then, by rounds, one side or the other waits a
/// little longer, sweeping their offset across any window an engine leaves.
pub async fn release_store_race<E: Engine>(e: &E) {
    const ROUNDS: usize = 3000;
    let f = Arc::new(Fixture::new(e, None).await);
    let handle = tokio::runtime::Handle::current();
    let won = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let start = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let files: Vec<PathBuf> = (0..8).map(|i| f.file(&format!("race{i}.jpg"))).collect();
    let files = Arc::new(files);
    for side in 0..2 {
        let (f, handle, barrier, files) =
            (f.clone(), handle.clone(), barrier.clone(), files.clone());
        let start = start.clone();
        let (won, lost, failed) = (won.clone(), lost.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            for round in 0..ROUNDS {
                let p = &files[round % files.len()];
                if side == 0 {
                    handle.block_on(f.put(p, OWNED, &format!("a:{round}")));
                }
                spin_start(&start, round);
                if side == (round / 64) % 2 {
                    for _ in 0..(round % 64) * 4 {
                        std::hint::spin_loop();
                    }
                }
                if side == 0 {
                    handle
                        .block_on(f.store.release_all(&format!("a:{round}")))
                        .unwrap();
                } else {
                    match handle.block_on(f.store.store(
                        p,
                        &meta().with_policy(OWNED),
                        &format!("b:{round}"),
                    )) {
                        Ok(r) => {
                            won.fetch_add(1, Ordering::Relaxed);
                            let path = handle.block_on(f.store.resolve(r)).unwrap();
                            if !path.exists() {
                                failed.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) if e.is_not_found() => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                barrier.wait();
                if side == 1 {
                    // Every live ref's file exists after the round; then
                    // the file is recreated for the next round.
                    for r in handle
                        .block_on(f.store.refs_in(&format!("b:{round}")))
                        .unwrap()
                    {
                        let path = handle.block_on(f.store.resolve(r)).unwrap();
                        if !path.exists() {
                            failed.store(true, Ordering::Relaxed);
                        }
                    }
                    handle
                        .block_on(f.store.release_all(&format!("b:{round}")))
                        .unwrap();
                    if !p.exists() {
                        fs::write(p, b"again").unwrap();
                    }
                }
                barrier.wait();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        !failed.load(Ordering::Relaxed),
        "a live ref pointed at a deleted file"
    );
    assert_eq!(
        won.load(Ordering::Relaxed) + lost.load(Ordering::Relaxed),
        ROUNDS as u64
    );
    let stats = f.store.stats().await.unwrap();
    assert_eq!((stats.refs, stats.scopes, stats.files), (0, 0, 0));
}

async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..500 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

/// The cleaner stops after a sweep in progress and can be started again.
pub async fn cleaner_restart<E: Engine>(e: &E) {
    let f = Fixture::new(e, Some(Duration::from_secs(60))).await;
    let cleaner = Cleaner::new(
        f.store.clone(),
        CleanerConfig {
            enabled: true,
            interval: Duration::from_millis(20),
        },
    );
    for round in 0..3 {
        assert!(cleaner.start().unwrap());
        let p = f.file(&format!("r{round}.jpg"));
        stored_minutes_ago(&f, &p, OWNED, &format!("s{round}"), 5).await;
        wait_until(|| async { !p.exists() }).await;
        cleaner.stop();
        assert!(!cleaner.is_running());
        // Stopped: an expired file stays until the next start.
        let q = f.file(&format!("q{round}.jpg"));
        stored_minutes_ago(&f, &q, OWNED, &format!("q{round}"), 5).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(q.exists(), "no sweep runs while stopped");
        f.store.release_all(&format!("q{round}")).await.unwrap();
    }
}

/// Expands to one `#[test]` per conformance scenario for an engine.
///
/// ```text
/// struct Memory;
/// impl mediastore::conformance::Engine for Memory { /* … */ }
/// mediastore::conformance_tests!(Memory);
/// ```
///
/// `crates/mediastore/tests/memory_conformance.rs` is the complete example.
#[macro_export]
macro_rules! conformance_tests {
    ($engine:expr) => {
        $crate::conformance_tests!(@each $engine;
            peer_01_store_then_resolve, peer_02_release_deletes_owned,
            peer_03_forget_only_kept, peer_04_shared_file_counts,
            peer_05_forget_only_pins, peer_06_scopes_independent,
            peer_07_release_idempotent, peer_08_release_after_file_lost,
            peer_09_missing_file, peer_10_resolve_with_meta,
            peer_11_concurrent_workers, peer_12_ttl_expires_owned,
            peer_13_ttl_expires_borrowed, peer_14_fresh_survives,
            peer_15_ttl_per_ref, peer_16_ttl_shared_file,
            peer_17_empty_scope_removed, peer_18_cleaner_start_stop,
            peer_19_max_age_zero, peer_20_cleaner_disabled,
            peer_21_interval_zero_refused, peer_22_max_age_zero_refused,
            peer_23_mixed_concurrency, peer_24_scope_introspection,
            custody_retain_outlives_message, custody_holds_expire_separately,
            ownership_by_location, never_deletes_outside_roots,
            failed_deletions_are_retried,
            aliasing_shares_one_count, replaced_and_vanished_files,
            bad_input_changes_nothing, release_store_race, cleaner_restart,
        );
    };
    (@each $engine:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::block_on($crate::conformance::$name(&$engine));
            }
        )*
    };
}
