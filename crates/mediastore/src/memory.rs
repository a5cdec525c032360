//! The in-memory engine: the core plus local files, no persistence.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mediastore_core::{
    Core, CoreConfig, DeleteOutcome, Deletion, Error, Expiry, FileStatus, MediaMeta, MediaRef,
    Registration, Resolved, Result, ScopeRule, Timestamp,
};

use crate::api::{DeleteFailure, MediaStore, ReleaseReport, Stats, SweepReport};
use crate::clock::{Clock, SystemClock};
use crate::fsops::{self, Deleted, OwnedRoots};

/// Holds dropped per core call during a sweep; between calls no lock is held.
const SWEEP_BATCH: usize = 1024;

/// Builds a [`MemoryStore`].
pub struct MemoryStoreBuilder {
    owned_roots: Vec<PathBuf>,
    max_age: Option<Duration>,
    rules: Vec<ScopeRule>,
    clock: Arc<dyn Clock>,
}

impl MemoryStoreBuilder {
    /// Adds a directory under which the store owns (and may delete) files.
    pub fn owned_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.owned_roots.push(dir.into());
        self
    }

    /// Default max age of holds; zero means holds never expire.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// Adds a per-prefix expiry rule (longest prefix wins).
    pub fn scope_rule(mut self, prefix: impl Into<String>, expiry: Expiry) -> Self {
        self.rules.push(ScopeRule {
            prefix: prefix.into(),
            expiry,
        });
        self
    }

    /// Replaces the system clock (tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store. Fails when an owned root does not exist.
    pub fn build(self) -> Result<MemoryStore> {
        Ok(MemoryStore {
            core: Core::new(CoreConfig {
                default_max_age: self.max_age,
                scope_rules: self.rules,
                record_drops: false,
            }),
            roots: OwnedRoots::new(&self.owned_roots)?,
            clock: self.clock,
        })
    }
}

/// The in-memory engine.
///
/// Refs live only as long as the process; files are never copied. The file
/// system calls it makes (`stat` on store, `unlink` on the last release) run
/// inline on the calling task: they take microseconds on local disks, much
/// less than a hop to a blocking thread pool.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use mediastore::{MediaMeta, MediaStore, MemoryStore};
/// let dir = std::env::temp_dir();
/// let path = dir.join(format!("mediastore-doc-{}.txt", std::process::id()));
/// std::fs::write(&path, b"hi")?;
/// let store = MemoryStore::builder().owned_root(&dir).build()?;
/// let r = store.store(&path, &MediaMeta::new("hi.txt", "text/plain", "doc"), "chat:1").await?;
/// assert_eq!(&*store.resolve(r).await?, path.as_path());
/// let report = store.release_all("chat:1").await?;
/// assert_eq!(report.files_deleted, 1);
/// assert!(!path.exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct MemoryStore {
    core: Core,
    roots: OwnedRoots,
    clock: Arc<dyn Clock>,
}

/// Tally of deletions, shared by releases and sweeps.
#[derive(Default)]
struct Tally {
    files: u64,
    bytes: u64,
    failures: Vec<DeleteFailure>,
}

impl MemoryStore {
    /// A builder with no owned roots, no expiry and the system clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            owned_roots: Vec::new(),
            max_age: None,
            rules: Vec::new(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The state machine, for introspection and invariant checks in tests.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The owned roots, canonicalised.
    pub fn owned_roots(&self) -> &[PathBuf] {
        self.roots.roots()
    }

    fn now(&self) -> Timestamp {
        self.clock.timestamp()
    }

    fn store_sync(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        // The scope is validated by the core before anything changes; the
        // stat before it only reads.
        let mut attempts = 0;
        loop {
            let ticket = self.core.deletion_ticket();
            let st = fsops::stat_for_store(path)?;
            let policy = self.roots.decide(path, &st, meta.policy)?;
            let id = MediaRef::from_random_bytes(uuid::Uuid::new_v4().into_bytes());
            let reg = Registration {
                id,
                ticket,
                file: st.key,
                path,
                size: st.size,
                meta,
                policy,
                scope,
            };
            match self.core.register(self.now(), reg) {
                Ok(()) => return Ok(id),
                // A deletion finished between our stat and the core: the
                // stat may describe a file that is gone, so take it again.
                Err(Error::Conflict(_)) if attempts < 100 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    fn delete_all(&self, deletions: Vec<Deletion>, tally: &mut Tally) {
        for d in deletions {
            match fsops::delete_file(&d, &self.roots) {
                Deleted::Done { files, bytes } => {
                    tally.files += files;
                    tally.bytes += bytes;
                    self.core.finish_deletion(d.file, DeleteOutcome::Deleted);
                }
                Deleted::Failed { path, error, retry } => {
                    tracing::warn!(path = %path.display(), %error, retry, "could not delete media file");
                    let outcome = if retry {
                        DeleteOutcome::Failed
                    } else {
                        DeleteOutcome::Deleted
                    };
                    self.core.finish_deletion(d.file, outcome);
                    tally.failures.push(DeleteFailure {
                        path,
                        error,
                        will_retry: retry,
                    });
                }
            }
        }
    }

    fn release_sync(&self, scope: &str) -> Result<ReleaseReport> {
        let dropped = self.core.release_all(scope)?;
        let mut tally = Tally::default();
        self.delete_all(dropped.deletions, &mut tally);
        Ok(ReleaseReport {
            refs_released: dropped.holds,
            refs_removed: dropped.refs_removed,
            files_deleted: tally.files,
            bytes_freed: tally.bytes,
            failures: tally.failures,
        })
    }

    fn sweep_sync(&self) -> SweepReport {
        let now = self.now();
        let mut tally = Tally::default();
        let retries = self.core.retry_deletions();
        let mut report = SweepReport {
            retried: retries.len() as u64,
            ..SweepReport::default()
        };
        self.delete_all(retries, &mut tally);
        loop {
            let dropped = self.core.expire(now, SWEEP_BATCH);
            report.refs_expired += dropped.refs_removed;
            report.holds_expired += dropped.holds;
            report.scopes_removed += dropped.scopes_removed;
            self.delete_all(dropped.deletions, &mut tally);
            if !dropped.more {
                break;
            }
        }
        report.files_deleted = tally.files;
        report.bytes_freed = tally.bytes;
        report.failures = tally.failures;
        report
    }

    fn open_sync(&self, media_ref: MediaRef) -> Result<(File, Arc<Resolved>)> {
        let resolved = self.core.resolve(media_ref)?;
        let vanished = || Error::FileVanished {
            media_ref,
            path: resolved.path.to_path_buf(),
        };
        let file = match File::open(&resolved.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(vanished()),
            Err(e) => return Err(Error::file(resolved.path.to_path_buf(), e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::file(resolved.path.to_path_buf(), e))?;
        if fsops::file_key(&meta) != resolved.file {
            return Err(vanished());
        }
        Ok((file, resolved))
    }
}

impl MediaStore for MemoryStore {
    async fn store(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        self.store_sync(path, meta, scope)
    }

    async fn resolve(&self, media_ref: MediaRef) -> Result<Arc<Path>> {
        Ok(self.core.resolve(media_ref)?.path.clone())
    }

    async fn resolve_with_meta(&self, media_ref: MediaRef) -> Result<Arc<Resolved>> {
        self.core.resolve(media_ref)
    }

    async fn open(&self, media_ref: MediaRef) -> Result<(File, Arc<Resolved>)> {
        self.open_sync(media_ref)
    }

    async fn retain(&self, media_ref: MediaRef, scope: &str) -> Result<()> {
        self.core.retain(self.now(), media_ref, scope)
    }

    async fn release_all(&self, scope: &str) -> Result<ReleaseReport> {
        self.release_sync(scope)
    }

    async fn touch(&self, scope: &str) -> Result<usize> {
        self.core.touch(self.now(), scope)
    }

    async fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<()> {
        self.core.set_scope_expiry(scope, expiry)
    }

    async fn clean_expired(&self) -> Result<SweepReport> {
        Ok(self.sweep_sync())
    }

    async fn scopes_of(&self, media_ref: MediaRef) -> Result<Vec<String>> {
        self.core.scopes_of(media_ref)
    }

    async fn refs_in(&self, scope: &str) -> Result<Vec<MediaRef>> {
        self.core.refs_in(scope)
    }

    async fn file_status(&self, path: &Path) -> Result<Option<FileStatus>> {
        let st = fsops::stat_for_store(path)?;
        Ok(self.core.file_status(st.key))
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(self.core.stats())
    }

    fn expiry_configured(&self) -> bool {
        self.core.expiry_configured()
    }
}
