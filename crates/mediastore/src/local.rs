//! The engine logic shared by the in-memory and the durable engine: the core
//! plus local files, with an optional journal that records every change in
//! the order the core applied it.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mediastore_core::{
    CleanupPolicy, Core, CoreConfig, DeleteOutcome, Deletion, Dropped, Error, Expiry, FileKey,
    MediaMeta, MediaRef, Registration, Resolved, Result, ScopeRule, Timestamp,
};
use parking_lot::Mutex;

use crate::api::{DeleteFailure, ReleaseReport, SweepReport};
use crate::clock::{Clock, SystemClock};
use crate::fsops::{self, Deleted, OwnedRoots};

/// Holds dropped per core call during a sweep; between calls no lock is held.
pub(crate) const SWEEP_BATCH: usize = 1024;

/// One change, as a journal records it.
#[derive(Debug)]
pub(crate) enum Op {
    /// A new ref held by one scope.
    Register {
        id: MediaRef,
        path: Arc<Path>,
        file: FileKey,
        size: u64,
        meta: Arc<MediaMeta>,
        policy: CleanupPolicy,
        scope: Box<str>,
        at: Timestamp,
        sha256: Option<[u8; 32]>,
    },
    /// A hold added or renewed.
    Retain {
        id: MediaRef,
        scope: Box<str>,
        at: Timestamp,
    },
    /// A scope's holds renewed.
    Touch { scope: Box<str>, at: Timestamp },
    /// A scope's expiry override set or removed.
    SetExpiry { scope: Box<str>, expiry: Expiry },
    /// Every hold of a scope dropped, with the refs that lost their last
    /// hold and the files that lost their last ref and will be deleted once
    /// this is durable.
    Release {
        scope: Box<str>,
        removed: Vec<MediaRef>,
        deletions: Vec<(FileKey, Vec<Arc<Path>>)>,
    },
    /// Holds dropped by a sweep batch, likewise.
    Drop {
        released: Vec<(MediaRef, Arc<str>)>,
        removed: Vec<MediaRef>,
        deletions: Vec<(FileKey, Vec<Arc<Path>>)>,
    },
    /// A deletion finished (the file is gone, or was not ours to delete).
    Deleted { file: FileKey },
    /// A managed ref's bytes are known to be durable (see
    /// `DurableStore::put`).
    Verified { id: MediaRef },
    /// A ref found at open to have been recorded for bytes that never
    /// became durable (a crash during its put, before it was
    /// acknowledged): removed with its holds.
    Forget { id: MediaRef, scopes: Vec<Arc<str>> },
}

/// Where a journaling engine sends its changes.
pub(crate) trait Journal: Send + Sync + 'static {
    /// Queues a change; returns its sequence number. Called with the
    /// engine's order lock held, so the journal sees changes in core order.
    fn push(&self, op: Op) -> Result<u64>;

    /// Fails when the journal takes no more changes (closing, or a commit
    /// failed), so the engine can refuse a change before making it.
    fn check(&self) -> Result<()>;
}

/// The builder setters every local engine shares, forwarded to the
/// builder's `settings` field (a [`Settings`]).
macro_rules! settings_setters {
    () => {
        /// Adds a directory under which the store owns (and may delete)
        /// files registered with `store`.
        pub fn owned_root(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
            self.settings.owned_root(dir.into());
            self
        }

        /// Default max age of holds; zero means holds never expire.
        pub fn max_age(mut self, max_age: std::time::Duration) -> Self {
            self.settings.max_age(max_age);
            self
        }

        /// Adds a per-prefix expiry rule (longest prefix wins).
        pub fn scope_rule(
            mut self,
            prefix: impl Into<String>,
            expiry: mediastore_core::Expiry,
        ) -> Self {
            self.settings.scope_rule(prefix.into(), expiry);
            self
        }

        /// Replaces the system clock (tests).
        pub fn clock(mut self, clock: impl crate::clock::Clock) -> Self {
            self.settings.clock(std::sync::Arc::new(clock));
            self
        }
    };
}
pub(crate) use settings_setters;

/// The lookups of the `MediaStore` API, the same in every local engine:
/// answered from memory (`self.local`), never from disk.
macro_rules! local_lookups {
    () => {
        async fn resolve(
            &self,
            media_ref: mediastore_core::MediaRef,
        ) -> mediastore_core::Result<std::sync::Arc<std::path::Path>> {
            Ok(self.local.core.resolve(media_ref)?.path.clone())
        }

        async fn resolve_with_meta(
            &self,
            media_ref: mediastore_core::MediaRef,
        ) -> mediastore_core::Result<std::sync::Arc<mediastore_core::Resolved>> {
            self.local.core.resolve(media_ref)
        }

        async fn open(
            &self,
            media_ref: mediastore_core::MediaRef,
        ) -> mediastore_core::Result<(std::fs::File, std::sync::Arc<mediastore_core::Resolved>)> {
            self.local.open(media_ref)
        }

        async fn scopes_of(
            &self,
            media_ref: mediastore_core::MediaRef,
        ) -> mediastore_core::Result<Vec<String>> {
            self.local.core.scopes_of(media_ref)
        }

        async fn refs_in(
            &self,
            scope: &str,
        ) -> mediastore_core::Result<Vec<mediastore_core::MediaRef>> {
            self.local.core.refs_in(scope)
        }

        async fn file_status(
            &self,
            path: &std::path::Path,
        ) -> mediastore_core::Result<Option<mediastore_core::FileStatus>> {
            let st = crate::fsops::stat_for_store(path)?;
            Ok(self.local.core.file_status(st.key))
        }

        async fn stats(&self) -> mediastore_core::Result<crate::api::Stats> {
            Ok(self.local.core.stats())
        }

        fn expiry_configured(&self) -> bool {
            self.local.core.expiry_configured()
        }
    };
}
pub(crate) use local_lookups;

/// What every local engine is configured with: owned roots, expiry and
/// the clock. Both builders keep one and forward their setters to it.
pub(crate) struct Settings {
    owned_roots: Vec<PathBuf>,
    max_age: Option<Duration>,
    rules: Vec<ScopeRule>,
    clock: Arc<dyn Clock>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            owned_roots: Vec::new(),
            max_age: None,
            rules: Vec::new(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl Settings {
    pub fn owned_root(&mut self, dir: PathBuf) {
        self.owned_roots.push(dir);
    }

    pub fn max_age(&mut self, max_age: Duration) {
        self.max_age = Some(max_age);
    }

    pub fn scope_rule(&mut self, prefix: String, expiry: Expiry) {
        self.rules.push(ScopeRule { prefix, expiry });
    }

    pub fn clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// The engine these settings describe. `own_roots` are roots the
    /// engine itself owns (the managed dir) besides the configured ones;
    /// `record_drops` is for engines that journal sweeps. Fails when a
    /// root does not exist.
    pub fn into_local(self, own_roots: &[PathBuf], record_drops: bool) -> Result<Local> {
        let core = Core::new(CoreConfig {
            default_max_age: self.max_age,
            scope_rules: self.rules,
            record_drops,
        });
        let mut roots = own_roots.to_vec();
        roots.extend(self.owned_roots);
        Ok(Local::new(core, OwnedRoots::new(&roots)?, self.clock))
    }
}

/// A tally of deletions, shared by releases and sweeps.
#[derive(Default)]
pub(crate) struct Tally {
    pub files: u64,
    pub bytes: u64,
    pub failures: Vec<DeleteFailure>,
}

/// The core, the owned roots, the clock and the optional journal.
pub(crate) struct Local {
    pub core: Core,
    pub roots: OwnedRoots,
    pub clock: Arc<dyn Clock>,
    journal: Option<(Arc<dyn Journal>, Mutex<()>)>,
}

/// A change made in memory and queued in the journal under `seq` (0 when
/// the engine has no journal): durable once the journal has committed it.
pub(crate) struct Pending<T> {
    pub value: T,
    pub seq: u64,
}

impl Local {
    pub fn new(core: Core, roots: OwnedRoots, clock: Arc<dyn Clock>) -> Self {
        Self {
            core,
            roots,
            clock,
            journal: None,
        }
    }

    pub fn with_journal(mut self, journal: Arc<dyn Journal>) -> Self {
        self.journal = Some((journal, Mutex::new(())));
        self
    }

    pub fn now(&self) -> Timestamp {
        self.clock.timestamp()
    }

    /// Applies `change` to the core and, if it succeeds, journals what
    /// `record` makes of its result, both under the order lock: two changes
    /// reach the journal in the order the core applied them.
    fn apply<T>(
        &self,
        change: impl FnOnce() -> Result<T>,
        record: impl FnOnce(&mut T) -> Option<Op>,
    ) -> Result<Pending<T>> {
        let Some((journal, order)) = &self.journal else {
            return change().map(|value| Pending { value, seq: 0 });
        };
        let _order = order.lock();
        // A journal that cannot record the change must not see the core
        // make it: memory and disk would disagree.
        journal.check()?;
        let mut value = change()?;
        let seq = match record(&mut value) {
            Some(op) => journal.push(op)?,
            None => 0,
        };
        Ok(Pending { value, seq })
    }

    /// Registers `path` (already stat'ed by the caller's `stat`) under a new
    /// ref. Retries when a deletion finished between the stat and the core.
    pub fn store(
        &self,
        path: &Path,
        meta: &MediaMeta,
        scope: &str,
        sha256: Option<[u8; 32]>,
    ) -> Result<Pending<MediaRef>> {
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
            let now = self.now();
            let done = self.apply(
                || self.core.register(now, reg),
                |_| {
                    let resolved = self.core.resolve(id).ok()?;
                    Some(Op::Register {
                        id,
                        path: resolved.path.clone(),
                        file: st.key,
                        size: st.size,
                        meta: resolved.meta.clone(),
                        policy,
                        scope: scope.into(),
                        at: now,
                        sha256,
                    })
                },
            );
            match done {
                Ok(p) => {
                    return Ok(Pending {
                        value: id,
                        seq: p.seq,
                    });
                }
                // A deletion finished between our stat and the core: the
                // stat may describe a file that is gone, so take it again.
                Err(Error::Conflict(_)) if attempts < 100 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn retain(&self, id: MediaRef, scope: &str) -> Result<Pending<()>> {
        let now = self.now();
        self.apply(
            || self.core.retain(now, id, scope),
            |_| {
                Some(Op::Retain {
                    id,
                    scope: scope.into(),
                    at: now,
                })
            },
        )
    }

    pub fn touch(&self, scope: &str) -> Result<Pending<usize>> {
        let now = self.now();
        self.apply(
            || self.core.touch(now, scope),
            |n| {
                (*n > 0).then(|| Op::Touch {
                    scope: scope.into(),
                    at: now,
                })
            },
        )
    }

    pub fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<Pending<()>> {
        self.apply(
            || self.core.set_scope_expiry(scope, expiry),
            |_| {
                Some(Op::SetExpiry {
                    scope: scope.into(),
                    expiry,
                })
            },
        )
    }

    /// Drops the scope's holds; the files to delete come back in the
    /// `Dropped`, to be deleted by [`Local::delete_all`] once durable.
    pub fn release(&self, scope: &str) -> Result<Pending<Dropped>> {
        self.apply(
            || self.core.release_all(scope),
            |dropped| {
                (dropped.holds > 0).then(|| Op::Release {
                    scope: scope.into(),
                    removed: std::mem::take(&mut dropped.removed),
                    deletions: deletion_list(dropped),
                })
            },
        )
    }

    /// One sweep batch of at most [`SWEEP_BATCH`] holds.
    pub fn expire_batch(&self, now: Timestamp) -> Result<Pending<Dropped>> {
        self.apply(|| Ok(self.core.expire(now, SWEEP_BATCH)), drop_op)
    }

    /// Queues a note: a change nobody waits for (a deletion finished, bytes
    /// verified), redone on the next open if it is lost.
    pub fn note(&self, op: Op) {
        if let Some((journal, order)) = &self.journal {
            let _order = order.lock();
            if let Err(e) = journal.push(op) {
                tracing::warn!(error = %e, "could not journal a note; it is redone on the next open");
            }
        }
    }

    pub fn delete_all(&self, deletions: Vec<Deletion>, tally: &mut Tally) {
        for d in deletions {
            let file = d.file;
            match fsops::delete_file(&d, &self.roots) {
                Deleted::Done { files, bytes } => {
                    tally.files += files;
                    tally.bytes += bytes;
                    self.core.finish_deletion(file, DeleteOutcome::Deleted);
                    self.note(Op::Deleted { file });
                }
                Deleted::Failed { path, error, retry } => {
                    tracing::warn!(path = %path.display(), %error, retry, "could not delete media file");
                    let outcome = if retry {
                        DeleteOutcome::Failed
                    } else {
                        self.note(Op::Deleted { file });
                        DeleteOutcome::Deleted
                    };
                    self.core.finish_deletion(file, outcome);
                    tally.failures.push(DeleteFailure {
                        path,
                        error,
                        will_retry: retry,
                    });
                }
            }
        }
    }

    /// Deletes a release's files and builds its report.
    pub fn finish_release(&self, dropped: Dropped) -> ReleaseReport {
        let mut tally = Tally::default();
        self.delete_all(dropped.deletions, &mut tally);
        ReleaseReport {
            refs_released: dropped.holds,
            refs_removed: dropped.refs_removed,
            files_deleted: tally.files,
            bytes_freed: tally.bytes,
            failures: tally.failures,
        }
    }

    /// One sweep: retries earlier failed deletions, then drops expired holds
    /// in bounded batches. `settle` turns each batch into the deletions that
    /// may be carried out now (at once in memory; once the batch is durable
    /// with a journal).
    pub async fn sweep<F, Fut>(&self, mut settle: F) -> Result<SweepReport>
    where
        F: FnMut(Pending<Dropped>) -> Fut,
        Fut: Future<Output = Result<Dropped>>,
    {
        let now = self.now();
        let mut tally = Tally::default();
        let retries = self.core.retry_deletions();
        let mut report = SweepReport {
            retried: retries.len() as u64,
            ..SweepReport::default()
        };
        self.delete_all(retries, &mut tally);
        loop {
            let dropped = settle(self.expire_batch(now)?).await?;
            report.refs_expired += dropped.refs_removed;
            report.holds_expired += dropped.holds;
            report.scopes_removed += dropped.scopes_removed;
            let more = dropped.more;
            self.delete_all(dropped.deletions, &mut tally);
            if !more {
                break;
            }
        }
        report.files_deleted = tally.files;
        report.bytes_freed = tally.bytes;
        report.failures = tally.failures;
        Ok(report)
    }

    pub fn open(&self, media_ref: MediaRef) -> Result<(File, Arc<Resolved>)> {
        let resolved = self.core.resolve(media_ref)?;
        let vanished = || Error::FileVanished {
            media_ref,
            path: resolved.path.to_path_buf(),
        };
        // Non-blocking, so a FIFO swapped in for the file cannot hang us;
        // its identity check below then fails. No effect on regular files.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&resolved.path)
        {
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

fn deletion_list(dropped: &Dropped) -> Vec<(FileKey, Vec<Arc<Path>>)> {
    dropped
        .deletions
        .iter()
        .map(|d| (d.file, d.paths.clone()))
        .collect()
}

fn drop_op(dropped: &mut Dropped) -> Option<Op> {
    (dropped.holds > 0).then(|| Op::Drop {
        released: std::mem::take(&mut dropped.released),
        removed: std::mem::take(&mut dropped.removed),
        deletions: deletion_list(dropped),
    })
}
