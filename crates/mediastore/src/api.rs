//! The API every engine implements.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mediastore_core::{CoreStats, Expiry, FileStatus, MediaMeta, MediaRef, Resolved, Result};
use serde::Serialize;

/// A file the store tried to delete and could not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeleteFailure {
    /// The path it tried.
    pub path: PathBuf,
    /// The reason.
    pub error: String,
    /// True when a later sweep will try again (an I/O error); false when
    /// retrying cannot help (the file resolves outside every owned root).
    pub will_retry: bool,
}

/// What `release_all` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReleaseReport {
    /// Refs the scope held; each lost this scope's hold.
    pub refs_released: u64,
    /// Refs that had no other holder and are now gone.
    pub refs_removed: u64,
    /// Files deleted.
    pub files_deleted: u64,
    /// Bytes those files held.
    pub bytes_freed: u64,
    /// Files that could not be deleted; they are retried by later sweeps.
    pub failures: Vec<DeleteFailure>,
}

/// What a sweep (`clean_expired`) did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Refs that lost their last hold to expiry and are gone (the seed's
    /// return value).
    pub refs_expired: u64,
    /// Holds that expired (a ref held by two scopes has two).
    pub holds_expired: u64,
    /// Scopes that became empty and were removed.
    pub scopes_removed: u64,
    /// Files deleted, including retries of earlier failures.
    pub files_deleted: u64,
    /// Bytes those files held.
    pub bytes_freed: u64,
    /// Earlier failed deletions attempted again.
    pub retried: u64,
    /// Files that could not be deleted.
    pub failures: Vec<DeleteFailure>,
}

/// Counters of a store.
pub type Stats = CoreStats;

/// The async API of a media store, implemented by every engine.
///
/// # Contract
///
/// - `store` checks the file exists and records a new ref under the scope;
///   it never copies or moves the file. A path outside the owned roots is
///   `forget_only`; asking `delete_on_cleanup` for one is refused.
/// - A file is deleted only when its last ref is gone and no `forget_only`
///   ref was registered for it while it had refs. Refs are counted per file
///   identity (device + inode), not per spelling of the path.
/// - A file is never deleted while any ref to it exists, including refs made
///   concurrently with a release or a sweep.
/// - Every hold expires on its own: strictly older than its scope's max age
///   since it was made or renewed (`retain`, `touch`).
/// - `resolve` and `resolve_with_meta` are lookups: they do not stat the
///   file. [`MediaStore::open`] opens it and tells a vanished file apart.
pub trait MediaStore: Send + Sync + 'static {
    /// Registers an existing file under `scope` and returns its new ref.
    fn store(
        &self,
        path: &Path,
        meta: &MediaMeta,
        scope: &str,
    ) -> impl Future<Output = Result<MediaRef>> + Send;

    /// The path a ref was registered with.
    fn resolve(&self, media_ref: MediaRef) -> impl Future<Output = Result<Arc<Path>>> + Send;

    /// The path and metadata of a ref.
    fn resolve_with_meta(
        &self,
        media_ref: MediaRef,
    ) -> impl Future<Output = Result<Arc<Resolved>>> + Send;

    /// Opens the ref's file for reading, checking it is still the file that
    /// was registered (`Error::FileVanished` otherwise).
    fn open(
        &self,
        media_ref: MediaRef,
    ) -> impl Future<Output = Result<(std::fs::File, Arc<Resolved>)>> + Send;

    /// Adds `scope` as a holder of the ref (renewing its hold if it is one).
    fn retain(&self, media_ref: MediaRef, scope: &str) -> impl Future<Output = Result<()>> + Send;

    /// Drops every hold of `scope`; deletes files whose last ref went.
    fn release_all(&self, scope: &str) -> impl Future<Output = Result<ReleaseReport>> + Send;

    /// Renews every hold of `scope`; returns how many it has.
    fn touch(&self, scope: &str) -> impl Future<Output = Result<usize>> + Send;

    /// Sets how long holds of `scope` live (also for its future holds).
    fn set_scope_expiry(
        &self,
        scope: &str,
        expiry: Expiry,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Drops expired holds, deletes files whose last ref went, and retries
    /// earlier failed deletions.
    fn clean_expired(&self) -> impl Future<Output = Result<SweepReport>> + Send;

    /// The scopes holding a ref, sorted.
    fn scopes_of(&self, media_ref: MediaRef) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// The refs a scope holds, oldest hold first.
    fn refs_in(&self, scope: &str) -> impl Future<Output = Result<Vec<MediaRef>>> + Send;

    /// The count record of the file at `path` (any spelling), if tracked.
    fn file_status(&self, path: &Path) -> impl Future<Output = Result<Option<FileStatus>>> + Send;

    /// Counters.
    fn stats(&self) -> impl Future<Output = Result<Stats>> + Send;

    /// True when some hold can expire, i.e. a cleaner has work to do.
    fn expiry_configured(&self) -> bool;
}
