//! The durable embedded engine: the in-memory core for every read, a SQLite
//! index written through a group-commit journal for every change, and a
//! managed, content-addressed file store for ingested bytes.
//!
//! Layout of a data dir:
//!
//! ```text
//! <data>/LOCK                  flock'ed while a store has the dir open
//! <data>/index.sqlite (+ -wal) refs, holds, scopes, pending deletions
//! <data>/blobs/<aa>/<sha256>   managed files, named by their digest
//! <data>/blobs/<aa>/.tmp-*     uploads in progress (ext4 without a journal)
//! <data>/blobs/.incoming/      uploads in progress (elsewhere; unnamed
//!                              O_TMPFILE inodes where supported)
//! ```
//!
//! Temp files left by a crash are removed on open.

mod index;
mod ingest;
mod journal;
mod sweep;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mediastore_core::{
    CleanupPolicy, Core, Deletion, Dropped, Error, Expiry, FileKey, MediaMeta, MediaRef,
    Registration, Resolved, Result, Timestamp,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use index::FORMAT_VERSION;
pub use ingest::{decide_content_type, sanitize_filename};
pub use journal::JournalStats;

use crate::api::{MediaStore, ReleaseReport, SweepReport};
use crate::fsops::{self, Deleted};
use crate::local::{Local, Op, Settings};
use journal::SqliteJournal;

const INDEX_FILE: &str = "index.sqlite";
const LOCK_FILE: &str = "LOCK";
const BLOBS: &str = "blobs";
const INCOMING: &str = ".incoming";
/// Bytes of a stream kept for content sniffing.
const SNIFF_BYTES: usize = 8192;
/// Read size while streaming into a managed file.
const CHUNK: usize = 256 * 1024;
/// Bytes written between background syncs of a large upload.
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Size limits of managed ingest. `None` means unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Largest single object a `put` accepts.
    pub max_object_bytes: Option<u64>,
    /// Most bytes the refs held by one scope may add up to (checked by `put`).
    pub max_scope_bytes: Option<u64>,
    /// Most bytes the managed dir may hold.
    pub max_total_bytes: Option<u64>,
}

impl Default for Quotas {
    /// 1 GiB per object; no scope or total limit.
    fn default() -> Self {
        Self {
            max_object_bytes: Some(1 << 30),
            max_scope_bytes: None,
            max_total_bytes: None,
        }
    }
}

/// Per-call limits of a `put`, on top of the store's [`Quotas`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutLimits {
    /// Largest object this call accepts.
    pub max_bytes: Option<u64>,
}

/// What a `put` stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PutReport {
    /// The new ref.
    pub media_ref: MediaRef,
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
    /// The content type decided (see [`decide_content_type`]).
    pub content_type: String,
    /// The sanitised filename kept as metadata.
    pub filename: String,
    /// True when identical bytes were already stored and are now shared.
    pub deduplicated: bool,
}

/// What an orphan sweep removed from the managed dir.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OrphanReport {
    /// Managed files no ref names, removed: older than the grace period,
    /// or torn (counted in `torn_removed` too).
    pub files_removed: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Unreferenced files kept because they are younger than the grace.
    pub kept_young: u64,
    /// Symlinks and other non-files found in the managed dir, removed
    /// without being followed.
    pub strays_removed: u64,
    /// Young unreferenced files whose bytes do not match their name (a
    /// crash before they were synced), removed.
    pub torn_removed: u64,
    /// Upload temp files in shard dirs left by an interrupted put, removed.
    pub temp_files_removed: u64,
}

/// What opening a data dir found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpenReport {
    /// Refs restored.
    pub refs: u64,
    /// Holds restored.
    pub holds: u64,
    /// Refs whose file is missing or was replaced while the store was
    /// closed. They stay registered (resolving works, opening reports
    /// `FileVanished`) until released or expired.
    pub vanished: Vec<(MediaRef, PathBuf)>,
    /// Refs recorded by puts that crashed before their bytes were durable
    /// (so they were never acknowledged): removed, their files left to
    /// the orphan sweep.
    pub unfinished_puts: u64,
    /// Deletions that were due at the last shutdown or crash and are now done.
    pub deletions_completed: u64,
    /// Ingest temp files left by an interrupted `put`, removed.
    pub temp_files_removed: u64,
    /// The orphan sweep run at open.
    pub orphans: OrphanReport,
    /// How long opening took.
    pub took_ms: u64,
}

/// Builds a [`DurableStore`].
pub struct DurableStoreBuilder {
    data_dir: PathBuf,
    settings: Settings,
    orphan_grace: Duration,
    quotas: Quotas,
}

impl DurableStoreBuilder {
    crate::local::settings_setters!();

    /// How old an unreferenced managed file must be before an orphan sweep
    /// removes it (default one hour). A crash between writing a managed
    /// file and recording its ref leaves such a file.
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Sets the ingest quotas.
    pub fn quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Opens the data dir (creating it if needed), recovers its state and
    /// starts the journal writer. Blocking: call it before serving, or from
    /// `spawn_blocking`.
    pub fn open(self) -> Result<DurableStore> {
        DurableStore::open_with(self)
    }
}

/// The durable embedded engine.
///
/// Every change (`store`, `put`, `retain`, `touch`, `set_scope_expiry`,
/// `release_all`, sweeps) is applied in memory, journaled, and returns only
/// once the journal has committed it to disk; concurrent changes share one
/// commit (group commit). Lookups never touch the disk.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use mediastore::{DurableStore, MediaMeta, MediaStore, PutLimits};
/// let dir = tempfile::tempdir()?;
/// let store = DurableStore::builder(dir.path().join("data")).open()?;
/// let meta = MediaMeta::new("note.txt", "text/plain", "doc");
/// let put = store.put(&b"hello"[..], &meta, "chat:1", &PutLimits::default()).await?;
/// assert_eq!(put.size, 5);
/// let path = store.resolve(put.media_ref).await?;
/// assert_eq!(std::fs::read(&*path)?, b"hello");
/// drop(store);
/// // Reopening restores the ref.
/// let store = DurableStore::builder(dir.path().join("data")).open()?;
/// assert_eq!(store.refs_in("chat:1").await?, vec![put.media_ref]);
/// store.release_all("chat:1").await?;
/// assert!(!path.exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct DurableStore {
    local: Local,
    journal: Arc<SqliteJournal>,
    data_dir: PathBuf,
    blobs: PathBuf,
    incoming: PathBuf,
    quotas: Quotas,
    orphan_grace: Duration,
    /// Bytes of managed files with refs, plus bytes reserved by puts in
    /// flight (`reserved`).
    managed_bytes: AtomicU64,
    reserved: Mutex<Reservations>,
    /// How uploads are staged and placed.
    placement: Placement,
    /// Puts hold it shared from placing a managed file until its ref is
    /// recorded; orphan sweeps hold it exclusively.
    ingest: tokio::sync::RwLock<()>,
    report: OpenReport,
    /// Dropped last: the data dir stays locked until the journal is closed.
    _lock: File,
}

/// A limit on the size of a put.
enum Limit {
    /// The largest object accepted.
    Object(u64),
    /// A quota: its limit and what is in use.
    Quota {
        quota: &'static str,
        limit: u64,
        used: u64,
    },
}

impl Limit {
    /// Bytes an object may have under this limit.
    fn left(&self) -> u64 {
        match *self {
            Limit::Object(limit) => limit,
            Limit::Quota { limit, used, .. } => limit.saturating_sub(used),
        }
    }

    fn fits(&self, size: u64) -> bool {
        match *self {
            Limit::Object(limit) => size <= limit,
            Limit::Quota { limit, used, .. } => used.saturating_add(size) <= limit,
        }
    }

    /// The error for an object of `wanted` bytes that does not fit.
    fn exceeded(&self, wanted: u64) -> Error {
        match *self {
            Limit::Object(limit) => Error::TooLarge { limit },
            Limit::Quota { quota, limit, used } => Error::QuotaExceeded {
                quota,
                limit,
                used,
                wanted,
            },
        }
    }
}

#[derive(Default)]
struct Reservations {
    total: u64,
    by_scope: HashMap<String, u64>,
}

fn lock_data_dir(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    // Never through a symlink: a planted one would make us truncate and
    // write whatever it points to.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(Error::io(
            format!("{} must be a regular file", path.display()),
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::InUse {
                path: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    String::new()
                } else {
                    format!(" ({holder})")
                },
            });
        }
        Err(e) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
    file.set_len(0)
        .and_then(|()| write!(file, "pid {}", std::process::id()))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(file)
}

fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(path)
                .map_err(|e| Error::io(format!("checking {}", path.display()), e))?;
            if meta.is_dir() {
                Ok(())
            } else {
                Err(Error::io(
                    format!("{} must be a directory", path.display()),
                    io::Error::from(io::ErrorKind::NotADirectory),
                ))
            }
        }
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", path.display()), e))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// How uploads are staged and put in place, chosen at open from what the
/// file system guarantees. In every case the file's one fsync (with the
/// directory's, where needed) makes both its bytes and its name durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// XFS, btrfs, ext4 with a journal: an unnamed `O_TMPFILE` inode,
    /// linked into place. The log carries the link with the inode.
    Unnamed,
    /// The same file systems without `O_TMPFILE`: a named temp file in
    /// `.incoming`, linked into place. The log carries the link.
    LinkedTemp,
    /// ext4 without a journal: a named temp file created in a shard dir and
    /// renamed into place. ext4 syncs the directory holding a newly
    /// created name together with the file, wherever that name has moved.
    RenamedTemp,
    /// Anything else: a named temp file in `.incoming`, linked into place,
    /// and the directory synced on its own.
    Portable,
}

impl Placement {
    fn choose(blobs: &Path, incoming: &Path) -> Self {
        const EXT4: u64 = 0xEF53;
        if links_persist_with_file(blobs) {
            let probe = incoming.join("probe");
            let unnamed = Staged::create(incoming, Placement::Unnamed)
                .and_then(|s| s.place(&probe))
                .is_ok();
            let _ = fs::remove_file(&probe);
            return if unnamed {
                Placement::Unnamed
            } else {
                Placement::LinkedTemp
            };
        }
        if rustix::fs::statfs(blobs).is_ok_and(|s| s.f_type as u64 == EXT4) {
            return Placement::RenamedTemp;
        }
        Placement::Portable
    }

    /// True when the shard directory must be synced after placing a file.
    fn syncs_directory(self) -> bool {
        self == Placement::Portable
    }
}

/// Prefix of temp names inside shard dirs ([`Placement::RenamedTemp`]).
const TEMP_PREFIX: &str = ".tmp-";

/// An upload being written. A named temp file is removed on drop if it
/// was not placed; an unnamed one is freed by the kernel. A crash leaves
/// named temps behind; opening removes them.
struct Staged {
    file: File,
    /// The temp name, for a named temp file.
    temp: Option<PathBuf>,
    how: Placement,
}

impl Staged {
    /// Creates the temp in `dir` (`.incoming`, or a shard dir for
    /// [`Placement::RenamedTemp`]).
    fn create(dir: &Path, how: Placement) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if how == Placement::Unnamed {
            let file = fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::TMPFILE.bits() as i32)
                .mode(0o644)
                .open(dir)?;
            return Ok(Self {
                file,
                temp: None,
                how,
            });
        }
        let name = format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let path = dir.join(name);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Self {
            file,
            temp: Some(path),
            how,
        })
    }

    /// Gives the file the name `target`; never replaces an existing file
    /// (`AlreadyExists` then).
    fn place(&self, target: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        match (&self.temp, self.how) {
            (Some(temp), Placement::RenamedTemp) => rustix::fs::renameat_with(
                rustix::fs::CWD,
                temp,
                rustix::fs::CWD,
                target,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(io::Error::from),
            (Some(temp), _) => fs::hard_link(temp, target),
            // Naming an unnamed file through /proc needs no privilege
            // (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
            (None, _) => rustix::fs::linkat(
                rustix::fs::CWD,
                format!("/proc/self/fd/{}", self.file.as_raw_fd()),
                rustix::fs::CWD,
                target,
                rustix::fs::AtFlags::SYMLINK_FOLLOW,
            )
            .map_err(io::Error::from),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a rename the temp name is gone and this fails harmlessly.
        if let Some(temp) = &self.temp {
            let _ = fs::remove_file(temp);
        }
    }
}

/// The data dir used when none is given: `./mediastore-data`.
pub const DEFAULT_DATA_DIR: &str = "./mediastore-data";

impl Default for DurableStoreBuilder {
    /// A builder for [`DEFAULT_DATA_DIR`].
    fn default() -> Self {
        DurableStore::builder(DEFAULT_DATA_DIR)
    }
}

impl DurableStore {
    /// A builder for the data dir at `data_dir` ([`DEFAULT_DATA_DIR`] via
    /// `DurableStoreBuilder::default()`).
    pub fn builder(data_dir: impl Into<PathBuf>) -> DurableStoreBuilder {
        DurableStoreBuilder {
            data_dir: data_dir.into(),
            settings: Settings::default(),
            orphan_grace: Duration::from_secs(3600),
            quotas: Quotas::default(),
        }
    }

    fn open_with(b: DurableStoreBuilder) -> Result<Self> {
        let started = Instant::now();
        fs::create_dir_all(&b.data_dir)
            .map_err(|e| Error::io(format!("creating data dir {}", b.data_dir.display()), e))?;
        let data_dir = fs::canonicalize(&b.data_dir)
            .map_err(|e| Error::io(format!("resolving {}", b.data_dir.display()), e))?;
        let lock = lock_data_dir(&data_dir)?;
        let blobs = data_dir.join(BLOBS);
        create_dir(&blobs)?;
        let incoming = blobs.join(INCOMING);
        create_dir(&incoming)?;
        // All 256 shard dirs up front: a put then never creates a directory
        // (and syncs its parent) on its own path.
        let mut created = false;
        let mut strays = 0;
        for shard in 0..=255u8 {
            let dir = blobs.join(format!("{shard:02x}"));
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => continue,
                // A symlink (or file) planted where a shard dir belongs is
                // removed, never followed.
                Ok(_) => {
                    tracing::warn!(path = %dir.display(), "removing a non-directory from the managed dir");
                    fs::remove_file(&dir)
                        .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
                    strays += 1;
                }
                Err(_) => {}
            }
            create_dir(&dir)?;
            created = true;
        }
        if created {
            sync_dir(&blobs)?;
        }
        let mut report = OpenReport {
            temp_files_removed: clear_incoming(&incoming)?,
            ..OpenReport::default()
        };

        let index_path = data_dir.join(INDEX_FILE);
        let conn = index::open(&index_path)?;
        let (snap, conn) = index::load_parallel(&index_path, conn)?;

        // The managed dir is always an owned root.
        let local = b.settings.into_local(std::slice::from_ref(&blobs), true)?;
        let restored = restore(&local.core, &snap, &blobs, &mut report)?;

        let placement = Placement::choose(&blobs, &incoming);
        let journal = Arc::new(SqliteJournal::start(conn, index_path, snap.max_seq)?);
        let local = local.with_journal(journal.clone());
        let store = Self {
            local,
            journal,
            data_dir,
            blobs,
            incoming,
            quotas: b.quotas,
            orphan_grace: b.orphan_grace,
            managed_bytes: AtomicU64::new(0),
            reserved: Mutex::new(Reservations::default()),
            ingest: tokio::sync::RwLock::new(()),
            placement,
            report,
            _lock: lock,
        };
        let mut report = store.report.clone();
        for id in restored.verified {
            store.local.note(Op::Verified { id });
        }
        for (id, scopes) in restored.forget {
            store.local.note(Op::Forget { id, scopes });
        }
        report.deletions_completed = store.finish_pending(snap.pending);
        let (orphans, managed_bytes) = store.sweep_orphans_locked(store.orphan_grace, true)?;
        report.orphans = orphans;
        report.temp_files_removed += report.orphans.temp_files_removed;
        report.orphans.strays_removed += strays;
        store.journal.flush_blocking()?;
        store.managed_bytes.store(managed_bytes, Ordering::Relaxed);
        report.took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            refs = report.refs,
            vanished = report.vanished.len(),
            deletions = report.deletions_completed,
            orphans = report.orphans.files_removed,
            took_ms = report.took_ms,
            "media store opened"
        );
        Ok(Self { report, ..store })
    }

    /// What opening the data dir found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The data dir, canonicalised.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The managed dir (inside the data dir).
    pub fn managed_dir(&self) -> &Path {
        &self.blobs
    }

    /// The state machine, for introspection and invariant checks in tests.
    pub fn core(&self) -> &Core {
        &self.local.core
    }

    /// Commits made by the journal so far.
    pub fn journal_stats(&self) -> JournalStats {
        self.journal.stats()
    }

    /// Bytes of managed files (plus puts in flight).
    pub fn managed_bytes(&self) -> u64 {
        self.managed_bytes.load(Ordering::Relaxed)
    }

    /// The SHA-256 of a managed ref's bytes (its managed file's name), or
    /// `None` for a ref to an external file.
    pub fn digest(&self, resolved: &Resolved) -> Option<String> {
        let rel = resolved.path.strip_prefix(&self.blobs).ok()?;
        let name = rel.file_name()?.to_str()?;
        (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_string())
    }

    /// Fails when the store takes no changes: it is closing, or a commit
    /// failed (disk full, read-only file system) and it must be reopened.
    /// A cheap check for readiness probes.
    pub fn check_writable(&self) -> Result<()> {
        use crate::local::Journal;
        self.journal.check()
    }

    /// Commits everything queued and closes the index. Later changes fail;
    /// dropping the store does the same.
    pub fn close(&self) -> Result<()> {
        self.journal.close()
    }

    /// Removes managed files that no ref names and that are older than
    /// `grace`, and anything in the managed dir that is not a plain file.
    pub async fn sweep_orphans(&self, grace: Duration) -> Result<OrphanReport> {
        let _exclusive = self.ingest.write().await;
        Ok(self.sweep_orphans_locked(grace, false)?.0)
    }

    /// The sweep; the caller holds `ingest` exclusively (or is opening).
    /// Also returns the bytes of the managed files it leaves, which is the
    /// managed total when no put is in flight (at open).
    fn sweep_orphans_locked(&self, grace: Duration, at_open: bool) -> Result<(OrphanReport, u64)> {
        use rustix::fs::FileType;
        let mut report = OrphanReport::default();
        let mut kept = 0;
        let root = sweep::open_root(&self.blobs)?;
        for shard in sweep::entries(&root, "the managed dir")? {
            if shard.name() == Path::new(INCOMING) {
                continue;
            }
            if shard.kind != FileType::Directory {
                // Only our two-level layout belongs here; a planted symlink
                // is removed itself, never followed.
                stray(&root, &shard, &self.blobs, &mut report);
                continue;
            }
            let dir = match sweep::open_dir(&root, shard.name.as_c_str()) {
                Ok(dir) => dir,
                Err(e) => {
                    tracing::warn!(dir = %shard.name().display(), error = %e, "cannot sweep a shard dir");
                    continue;
                }
            };
            let where_ = self.blobs.join(shard.name());
            for entry in sweep::entries(&dir, "a shard dir")? {
                let path = where_.join(entry.name());
                if entry.kind == FileType::Directory {
                    tracing::warn!(path = %path.display(), "unexpected directory in the managed dir; left alone");
                    continue;
                }
                if entry.kind != FileType::RegularFile {
                    stray(&dir, &entry, &where_, &mut report);
                    continue;
                }
                if self.local.core.file_status(entry.key).is_some() {
                    kept += entry.size;
                    continue;
                }
                let is_temp = entry
                    .name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(TEMP_PREFIX));
                if is_temp {
                    // An upload being written, or one a crash interrupted:
                    // at open (`at_open`) none can be in flight.
                    if (at_open || entry.age >= grace) && sweep::remove(&dir, &entry.name).is_ok() {
                        report.temp_files_removed += 1;
                    }
                    continue;
                }
                if entry.age < grace {
                    // A crash between placing a file and syncing it can
                    // leave its name with other bytes; identical content
                    // put later would be deduplicated onto it. Young
                    // orphans are kept only if their bytes match their name.
                    let matches = sweep::open_file(&dir, entry.name.as_c_str())
                        .and_then(digest_of)
                        .is_ok_and(|d| entry.name().to_str() == Some(hex(&d).as_str()));
                    if matches {
                        report.kept_young += 1;
                        kept += entry.size;
                        continue;
                    }
                    report.torn_removed += 1;
                }
                match sweep::remove(&dir, &entry.name) {
                    Ok(()) => {
                        report.files_removed += 1;
                        report.bytes_freed += entry.size;
                        // At open the total is counted after the sweep.
                        if !at_open {
                            let _ = self.managed_bytes.fetch_update(
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                                |v| Some(v.saturating_sub(entry.size)),
                            );
                        }
                    }
                    Err(e) => {
                        kept += entry.size;
                        tracing::warn!(path = %path.display(), error = %e, "could not remove orphan")
                    }
                }
            }
        }
        Ok((report, kept))
    }

    /// Completes deletions that were decided and committed but not
    /// confirmed before the last shutdown.
    fn finish_pending(&self, pending: Vec<(FileKey, Vec<PathBuf>)>) -> u64 {
        let mut done = 0;
        for (file, paths) in pending {
            if self.local.core.file_status(file).is_some() {
                // Registered again since: the file is live, not due.
                self.local.note(Op::Deleted { file });
                continue;
            }
            let d = Deletion {
                file,
                paths: paths.into_iter().map(Arc::from).collect(),
                size: 0,
            };
            match fsops::delete_file(&d, &self.local.roots) {
                Deleted::Done { files, .. } => {
                    done += files;
                    self.local.note(Op::Deleted { file });
                }
                Deleted::Failed { path, error, retry } => {
                    tracing::warn!(path = %path.display(), %error, "could not finish a deletion due before the last shutdown");
                    if !retry {
                        self.local.note(Op::Deleted { file });
                    }
                }
            }
        }
        done
    }

    /// Bytes held by `scope`'s refs.
    fn scope_bytes(&self, scope: &str) -> Result<u64> {
        let core = &self.local.core;
        let mut total = 0;
        for r in core.refs_in(scope)? {
            if let Ok(res) = core.resolve(r) {
                total += core.file_size(res.file).unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Every limit a put into `scope` must fit, with usage counted as of
    /// now plus other puts' reservations (`r`, held locked by the caller).
    /// The total quota applies only to content not stored yet.
    fn limits(
        &self,
        scope: &str,
        r: &Reservations,
        put: &PutLimits,
        new_blob: bool,
    ) -> Result<Vec<Limit>> {
        let mut out: Vec<Limit> = [put.max_bytes, self.quotas.max_object_bytes]
            .into_iter()
            .flatten()
            .map(Limit::Object)
            .collect();
        if let Some(limit) = self.quotas.max_scope_bytes {
            let used = self.scope_bytes(scope)? + r.by_scope.get(scope).copied().unwrap_or(0);
            out.push(Limit::Quota {
                quota: "scope",
                limit,
                used,
            });
        }
        if let (Some(limit), true) = (self.quotas.max_total_bytes, new_blob) {
            let used = self.managed_bytes() + r.total;
            out.push(Limit::Quota {
                quota: "total",
                limit,
                used,
            });
        }
        Ok(out)
    }

    /// The tightest limit for a put into `scope` as things stand: streams
    /// are cut off past it. The exact check is [`DurableStore::reserve`],
    /// once the size (and whether the content is new) is known.
    fn room(&self, scope: &str, put: &PutLimits) -> Result<Option<Limit>> {
        let r = self.reserved.lock();
        Ok(self
            .limits(scope, &r, put, true)?
            .into_iter()
            .min_by_key(Limit::left))
    }

    /// Checks every limit for an object of `size` bytes and reserves it.
    /// Identical content already stored (`new_blob` false) adds nothing to
    /// the total.
    fn reserve(&self, scope: &str, size: u64, new_blob: bool, put: &PutLimits) -> Result<()> {
        let mut r = self.reserved.lock();
        if let Some(over) = self
            .limits(scope, &r, put, new_blob)?
            .into_iter()
            .find(|l| !l.fits(size))
        {
            return Err(over.exceeded(size));
        }
        *r.by_scope.entry(scope.to_string()).or_default() += size;
        if new_blob {
            r.total += size;
        }
        Ok(())
    }

    fn unreserve(&self, scope: &str, size: u64, new_blob: bool) {
        let mut r = self.reserved.lock();
        if let Some(v) = r.by_scope.get_mut(scope) {
            *v -= size;
            if *v == 0 {
                r.by_scope.remove(scope);
            }
        }
        if new_blob {
            r.total -= size;
        }
    }

    /// Streams `reader` into the managed dir and registers it under `scope`.
    ///
    /// The bytes go to a temp file in the managed dir, are hashed on the
    /// way, fsync'ed, and linked into place under their digest (identical
    /// content is stored once and shared); the directory is fsync'ed before
    /// the ref is recorded. A stream over the size limit or a quota is cut
    /// off while streaming and leaves nothing behind. `meta.filename` is
    /// kept only after [`sanitize_filename`]; the content type is decided by
    /// [`decide_content_type`]. Managed files are always `delete_on_cleanup`.
    pub async fn put<R: AsyncRead + Unpin + Send>(
        &self,
        mut reader: R,
        meta: &MediaMeta,
        scope: &str,
        limits: &PutLimits,
    ) -> Result<PutReport> {
        mediastore_core::validate_scope(scope)?;
        let room = self.room(scope, limits)?;
        let stage_dir = match self.placement {
            // Created where it will live: any shard dir will do.
            Placement::RenamedTemp => self
                .blobs
                .join(format!("{:02x}", uuid::Uuid::new_v4().as_bytes()[0])),
            _ => self.incoming.clone(),
        };
        let staged = Staged::create(&stage_dir, self.placement)
            .map_err(|e| Error::io("creating an ingest temp file", e))?;
        let mut file = &staged.file;
        let mut hashing = Hashing::Inline(Sha256::new());
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        let mut size: u64 = 0;
        let mut buf = vec![0u8; CHUNK];
        let mut unsynced = 0u64;
        let mut early_sync: Option<tokio::task::JoinHandle<io::Result<()>>> = None;
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| Error::io("reading the upload", e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if let Some(over) = room.as_ref().filter(|l| !l.fits(size)) {
                return Err(over.exceeded(size));
            }
            let chunk = &buf[..n];
            if head.len() < SNIFF_BYTES {
                let take = (SNIFF_BYTES - head.len()).min(n);
                head.extend_from_slice(&chunk[..take]);
            }
            file.write_all(chunk)
                .map_err(|e| Error::io("writing an ingest temp file", e))?;
            buf = hashing.update(buf, n, size).await;
            // Start writeback of what has been written so far, in the
            // background, so the final fsync only waits for the tail.
            unsynced += n as u64;
            if unsynced >= WRITEBACK_EVERY && early_sync.as_ref().is_none_or(|t| t.is_finished()) {
                unsynced = 0;
                // The kernel reports a writeback error once per open file:
                // an error a background sync saw must fail the put, or
                // the final sync would find nothing wrong.
                if let Some(done) = early_sync.take() {
                    background_synced(done.await)?;
                }
                let clone = file
                    .try_clone()
                    .map_err(|e| Error::io("syncing an ingest temp file", e))?;
                early_sync = Some(tokio::task::spawn_blocking(move || clone.sync_data()));
            }
        }
        if let Some(done) = early_sync {
            background_synced(done.await)?;
        }
        let digest = hashing.finish().await?;
        let sha = hex(&digest);
        let filename = sanitize_filename(meta.filename.as_bytes());
        let content_type = decide_content_type(&head, &meta.content_type, &filename);
        let stored_meta =
            MediaMeta::new(filename.clone(), content_type.clone(), meta.source.clone())
                .with_policy(CleanupPolicy::DeleteOnCleanup);
        let shard_dir = self.blobs.join(&sha[..2]);
        let target = shard_dir.join(&sha);

        let new_blob = fs::symlink_metadata(&target).is_err();
        self.reserve(scope, size, new_blob, limits)?;
        // Released however this ends, a cancelled put included.
        let reserved = Reserved {
            store: self,
            scope,
            size,
            new_blob,
        };
        let result = self
            .place_and_register(&staged, &shard_dir, &target, &stored_meta, scope, &digest)
            .await;
        drop(reserved);
        let (media_ref, created) = result?;
        if created {
            self.managed_bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(PutReport {
            media_ref,
            size,
            sha256: sha,
            content_type,
            filename,
            deduplicated: !created,
        })
    }

    /// Links the temp file into place (or finds identical content already
    /// there) and records the ref; durable on return.
    async fn place_and_register(
        &self,
        staged: &Staged,
        shard_dir: &Path,
        target: &Path,
        meta: &MediaMeta,
        scope: &str,
        digest: &[u8],
    ) -> Result<(MediaRef, bool)> {
        let sha: [u8; 32] = digest.try_into().expect("sha256 is 32 bytes");
        for _ in 0..10_000 {
            // Held from placing the file until its ref is recorded, so an
            // orphan sweep never sees it unreferenced.
            let shared = self.ingest.read().await;
            if fs::symlink_metadata(shard_dir).is_err() {
                create_dir(shard_dir)?;
                sync_dir(&self.blobs)?;
            }
            // A hard link never replaces: a file that is already there (same
            // digest, same bytes) is shared instead.
            let created = match staged.place(target) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(Error::io(format!("placing {}", target.display()), e)),
            };
            // One fsync of the file makes its bytes durable and, on XFS,
            // btrfs and journaled ext4, its new name with them: they log
            // the link and the inode in one transaction and an fsync forces
            // the log up to it. Elsewhere the directory is synced too. It runs
            // while the ref is committed: the ref is recorded as
            // unverified, so if we crash before both are done, opening
            // finds bytes that do not match the digest and drops the ref
            // (it was never acknowledged). A shared file is synced too: the
            // put that placed it may still be syncing.
            let (file, dir) = (target.to_path_buf(), shard_dir.to_path_buf());
            let sync_dir_too = self.placement.syncs_directory();
            // Ours is synced through the handle we wrote with; a shared file
            // is opened by name.
            let ours = if created {
                staged.file.try_clone().ok()
            } else {
                None
            };
            let sync = move || -> Result<()> {
                ours.map_or_else(|| sweep::open_file(rustix::fs::CWD, &file), Ok)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(format!("syncing {}", file.display()), e))?;
                if sync_dir_too {
                    sync_dir(&dir)?;
                }
                Ok(())
            };
            match self.local.store(target, meta, scope, Some(sha)) {
                Ok(pending) => {
                    // The journal commits the ref while this thread syncs
                    // the bytes. On a multi-thread runtime the sync blocks
                    // in place (the worker's other tasks move to another
                    // thread) instead of hopping to the blocking pool and
                    // back: two wake-ups fewer per put.
                    let synced = match tokio::runtime::Handle::current().runtime_flavor() {
                        tokio::runtime::RuntimeFlavor::MultiThread => {
                            tokio::task::block_in_place(sync)
                        }
                        _ => tokio::task::spawn_blocking(sync).await.map_err(|e| {
                            Error::io("syncing a managed file", io::Error::other(e))
                        })?,
                    };
                    let commit = self.journal.wait(pending.seq).await;
                    if let Err(e) = synced {
                        // The bytes may not be on disk. Take the name away
                        // so no later put shares them; the ref, never
                        // acknowledged and never verified, then resolves to
                        // nothing and is dropped by the next open.
                        if created {
                            let _ = fs::remove_file(target);
                        }
                        drop(shared);
                        return Err(e);
                    }
                    drop(shared);
                    commit?;
                    self.local.note(Op::Verified { id: pending.value });
                    return Ok((pending.value, created));
                }
                // The existing copy is being deleted: let the deletion
                // finish, then place ours.
                Err(e) if e.is_not_found() => {
                    drop(shared);
                    tokio::task::yield_now().await
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(
            "managed file kept being deleted during put",
        ))
    }

    /// Waits until the change that dropped these holds is durable, then
    /// hands back the files it made due for deletion. If the wait fails or
    /// the caller is cancelled first, the files are handed back to the
    /// core as failed deletions, which a later sweep retries once the
    /// journal has caught up.
    async fn drop_and_delete(&self, dropped: Dropped, seq: u64) -> Result<Dropped> {
        let mut due = DueDeletions {
            core: &self.local.core,
            dropped: Some(dropped),
        };
        self.journal.wait(seq).await?;
        let dropped = due.dropped.take().expect("taken once");
        let managed: u64 = dropped
            .deletions
            .iter()
            .filter(|d| d.paths.iter().any(|p| p.starts_with(&self.blobs)))
            .map(|d| d.size)
            .sum();
        let _ = self
            .managed_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(managed))
            });
        Ok(dropped)
    }
}

/// The result of a background sync of an upload.
fn background_synced(r: std::result::Result<io::Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| Error::io("syncing an ingest temp file", io::Error::other(e)))?
        .map_err(|e| Error::io("syncing an ingest temp file", e))
}

/// A put's quota reservation, given back on drop.
struct Reserved<'a> {
    store: &'a DurableStore,
    scope: &'a str,
    size: u64,
    new_blob: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.store.unreserve(self.scope, self.size, self.new_blob);
    }
}

/// Deletions not yet handed to the engine; see
/// [`DurableStore::drop_and_delete`].
struct DueDeletions<'a> {
    core: &'a Core,
    dropped: Option<Dropped>,
}

impl Drop for DueDeletions<'_> {
    fn drop(&mut self) {
        if let Some(dropped) = self.dropped.take() {
            for d in dropped.deletions {
                self.core
                    .finish_deletion(d.file, mediastore_core::DeleteOutcome::Failed);
            }
        }
    }
}

/// True when `dir` is on XFS, btrfs or ext4 *with a journal*. These log a
/// link (or a create) together with the inode, and fsync of the file
/// forces the log up to its last change, so the new name is durable once
/// the file is synced and the directory needs no fsync of its own. ext4
/// without a journal syncs the parent only for newly created names, not
/// for links; it and anything else (or an unknown answer) get the
/// directory fsync.
fn links_persist_with_file(dir: &Path) -> bool {
    const EXT4: u64 = 0xEF53;
    const XFS: u64 = 0x5846_5342;
    const BTRFS: u64 = 0x9123_683E;
    match rustix::fs::statfs(dir).map(|s| s.f_type as u64) {
        Ok(XFS | BTRFS) => true,
        Ok(EXT4) => ext4_has_journal(dir),
        _ => false,
    }
}

/// True when the ext4 file system holding `dir` has a journal: the kernel
/// lists journals in /proc/fs/jbd2 as `<device>-<journal inode>`.
fn ext4_has_journal(dir: &Path) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
    let Ok(st) = statx(CWD, dir, AtFlags::empty(), StatxFlags::BASIC_STATS) else {
        return false;
    };
    let uevent = format!(
        "/sys/dev/block/{}:{}/uevent",
        st.stx_dev_major, st.stx_dev_minor
    );
    let Ok(uevent) = fs::read_to_string(uevent) else {
        return false;
    };
    let Some(device) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
        return false;
    };
    let Ok(journals) = fs::read_dir("/proc/fs/jbd2") else {
        return false;
    };
    journals.flatten().any(|j| {
        j.file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(device))
            .is_some_and(|rest| rest.starts_with('-'))
    })
}

/// Bytes of an upload after which it is hashed on a thread of its own.
const HASH_THREAD_AFTER: u64 = 2 << 20;

/// The SHA-256 of an upload. Small uploads are hashed inline; once one is
/// large, hashing moves to a blocking thread and overlaps with reading and
/// writing the next chunks (the two cores each do one).
enum Hashing {
    Inline(Sha256),
    Threaded {
        chunks: tokio::sync::mpsc::Sender<(Vec<u8>, usize)>,
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        done: tokio::task::JoinHandle<Sha256>,
    },
}

impl Hashing {
    /// Hashes `buf[..n]`; `total` bytes have been read so far. Returns a
    /// buffer to read the next chunk into.
    async fn update(&mut self, buf: Vec<u8>, n: usize, total: u64) -> Vec<u8> {
        if let Hashing::Inline(h) = self {
            h.update(&buf[..n]);
            if total < HASH_THREAD_AFTER {
                return buf;
            }
            let state = std::mem::take(h);
            let (chunks, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize)>(4);
            let (give_back, spare) = std::sync::mpsc::channel();
            let done = tokio::task::spawn_blocking(move || {
                let mut h = state;
                while let Some((chunk, n)) = rx.blocking_recv() {
                    h.update(&chunk[..n]);
                    let _ = give_back.send(chunk);
                }
                h
            });
            *self = Hashing::Threaded {
                chunks,
                spare,
                done,
            };
            return buf;
        }
        let Hashing::Threaded { chunks, spare, .. } = self else {
            unreachable!("handled above")
        };
        let len = buf.len();
        if chunks.send((buf, n)).await.is_err() {
            // The thread is gone; `finish` reports it.
            return vec![0; len];
        }
        spare.try_recv().unwrap_or_else(|_| vec![0; len])
    }

    async fn finish(self) -> Result<[u8; 32]> {
        match self {
            Hashing::Inline(h) => Ok(h.finalize().into()),
            Hashing::Threaded { chunks, done, .. } => {
                drop(chunks);
                let h = done
                    .await
                    .map_err(|e| Error::io("hashing an upload", io::Error::other(e)))?;
                Ok(h.finalize().into())
            }
        }
    }
}

/// The SHA-256 of the regular file at `path` (a managed file: never
/// through a symlink, and never a FIFO or device, which could block or
/// never end). Anything else is `InvalidInput`.
fn file_digest(path: &Path) -> io::Result<[u8; 32]> {
    digest_of(sweep::open_file(rustix::fs::CWD, path)?)
}

/// The SHA-256 of everything left to read in `f`.
fn digest_of(mut f: File) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher)?;
    Ok(hasher.finalize().into())
}

/// Removes a non-file (a symlink, a FIFO, ...) found in the managed dir;
/// it is never followed.
fn stray(
    dir: &std::os::fd::OwnedFd,
    entry: &sweep::Entry,
    where_: &Path,
    report: &mut OrphanReport,
) {
    let path = where_.join(entry.name());
    tracing::warn!(path = %path.display(), "removing a non-file from the managed dir");
    if sweep::remove(dir, &entry.name).is_ok() {
        report.strays_removed += 1;
    }
}

/// Removes every entry of the ingest dir (at open: no upload is in flight).
fn clear_incoming(dir: &Path) -> Result<u64> {
    let fd = sweep::open_root(dir)?;
    let mut removed = 0;
    for entry in sweep::entries(&fd, "the ingest dir")? {
        if entry.kind != rustix::fs::FileType::Directory && sweep::remove(&fd, &entry.name).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// What restoring leaves for the journal once it runs.
#[derive(Default)]
struct Restored {
    /// Managed refs whose bytes were checked against their digest.
    verified: Vec<MediaRef>,
    /// Refs of puts that crashed before their bytes were durable.
    forget: Vec<(MediaRef, Vec<Arc<str>>)>,
}

/// Loads the index snapshot into a fresh core.
fn restore(
    core: &Core,
    snap: &index::Snapshot,
    blobs: &Path,
    report: &mut OpenReport,
) -> Result<Restored> {
    let mut restored = Restored::default();
    for (scope, expiry) in &snap.expiry {
        core.set_scope_expiry(scope, *expiry)?;
    }
    let refs = &snap.refs;
    // A managed file lives at `blobs/<aa>/<digest>` wherever the data dir
    // is now: a data dir that was moved, copied back from a backup or
    // mounted elsewhere keeps its managed refs.
    let managed: Vec<Option<PathBuf>> = refs
        .rows
        .iter()
        .map(|row| {
            row.sha256.map(|d| {
                let name = hex(&d);
                blobs.join(&name[..2]).join(name)
            })
        })
        .collect();
    let path_of = |i: usize| {
        managed[i]
            .as_deref()
            .unwrap_or_else(|| refs.path(&refs.rows[i]))
    };
    // Stat each distinct path once; many refs usually share a file.
    // foldhash, not SipHash: a million lookups of long paths at open.
    let mut keys: hashbrown::HashMap<&Path, Option<FileKey>> = hashbrown::HashMap::new();
    let mut files = Vec::with_capacity(refs.len());
    for (i, row) in refs.rows.iter().enumerate() {
        let path = path_of(i);
        let fresh = *keys
            .entry(path)
            .or_insert_with(|| fs::metadata(path).ok().map(|m| fsops::file_key(&m)));
        // Same inode and birth time: the same file (the device number may
        // change across reboots on some file systems). A managed file is
        // named by its bytes, so whatever file has its name is it.
        files.push(match fresh {
            Some(k) if k.ino == row.file.ino && k.born == row.file.born => k,
            Some(k) if row.sha256.is_some() => k,
            _ => {
                report.vanished.push((refs.id(i), path.to_path_buf()));
                row.file
            }
        });
    }
    drop(keys);
    // A put records its ref while its bytes are being synced; if it
    // crashed before both were done, it was never acknowledged and its
    // file may hold anything. Such refs are still marked unverified.
    let mut torn: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
    for (i, row) in refs.rows.iter().enumerate() {
        if let (Some(want), true) = (row.sha256, row.unverified) {
            // Only bytes that differ (or a name that never became durable)
            // mean torn; an error reading them proves nothing, and dropping
            // an acknowledged ref on a transient error would lose it.
            match file_digest(path_of(i)) {
                Ok(got) if got == want => restored.verified.push(refs.id(i)),
                Ok(_) => {
                    torn.insert(i, Vec::new());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    torn.insert(i, Vec::new());
                }
                Err(e) => {
                    return Err(Error::io(format!("verifying {}", path_of(i).display()), e));
                }
            }
        }
    }
    // Replay holds in the order they were made or last renewed, so each
    // scope's queue comes back in the same order. Scopes are split between
    // threads, each replaying its scopes' holds in that order: a ref is
    // registered by the thread owning the scope of its first hold, and a
    // thread that retains it elsewhere first waits for that. Waits only
    // ever point to an earlier hold, which its thread has passed or will
    // reach without waiting on us, so they end.
    core.reserve(refs.len(), snap.scopes.len());
    let mut first = vec![u32::MAX; refs.len()];
    for (k, h) in snap.holds.iter().enumerate() {
        let i = h.row as usize;
        if let Some(scopes) = torn.get_mut(&i) {
            scopes.push(snap.scopes[h.scope as usize].clone());
            continue;
        }
        if first[i] == u32::MAX {
            first[i] = k as u32;
        }
    }
    let registered: Vec<std::sync::atomic::AtomicBool> =
        (0..refs.len()).map(|_| Default::default()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    // Set when a thread fails, so that no other waits for a ref it will
    // never register.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let replay_part = |part: usize| -> Result<()> {
        let mut meta = MediaMeta::new("", "", "");
        for (k, h) in snap.holds.iter().enumerate() {
            if h.scope as usize % threads != part {
                continue;
            }
            let i = h.row as usize;
            if first[i] == u32::MAX {
                continue; // torn
            }
            let (id, scope) = (refs.id(i), &*snap.scopes[h.scope as usize]);
            if first[i] as usize != k {
                while !registered[i].load(Ordering::Acquire) {
                    if failed.load(Ordering::Acquire) {
                        return Err(Error::io(
                            "restoring",
                            io::Error::other("another restore thread failed"),
                        ));
                    }
                    std::thread::yield_now();
                }
                core.retain(Timestamp(h.made_at), id, scope)?;
                continue;
            }
            let row = &refs.rows[i];
            // Consecutive refs often share their metadata; reuse buffers.
            for (field, span) in [
                (&mut meta.filename, row.filename),
                (&mut meta.content_type, row.content_type),
                (&mut meta.source, row.source),
            ] {
                let text = refs.text(span);
                if field != text {
                    field.clear();
                    field.push_str(text);
                }
            }
            let done = core
                .register(
                    Timestamp(row.stored_at),
                    Registration {
                        id,
                        ticket: core.deletion_ticket(),
                        file: files[i],
                        path: path_of(i),
                        size: row.size,
                        meta: &meta,
                        policy: row.policy,
                        scope,
                    },
                )
                .and_then(|()| {
                    if h.made_at > row.stored_at {
                        core.retain(Timestamp(h.made_at), id, scope)
                    } else {
                        Ok(())
                    }
                });
            // Set even on failure, so no other thread waits forever.
            registered[i].store(true, Ordering::Release);
            done?;
        }
        Ok(())
    };
    let replay = |part: usize| -> Result<()> {
        // Marks the restore failed unless disarmed: on an error and on a
        // panic alike, no other thread keeps waiting.
        struct Failing<'a>(&'a std::sync::atomic::AtomicBool, bool);
        impl Drop for Failing<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.store(true, Ordering::Release);
                }
            }
        }
        let mut guard = Failing(&failed, false);
        let result = replay_part(part);
        guard.1 = result.is_ok();
        result
    };
    std::thread::scope(|s| {
        let replay = &replay;
        let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || replay(t))).collect();
        let mut result = replay(0);
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(Error::io(
                    "restoring",
                    io::Error::other("a restore thread panicked"),
                ))
            });
            result = result.and(r);
        }
        result
    })?;
    let registered: Vec<bool> = first.iter().map(|f| *f != u32::MAX).collect();
    report.refs = registered.iter().filter(|r| **r).count() as u64;
    report.unfinished_puts = torn.len() as u64;
    report.holds = snap.holds.len() as u64 - torn.values().map(|s| s.len() as u64).sum::<u64>();
    let unheld = refs.len() as u64 - report.refs - report.unfinished_puts;
    for (i, scopes) in torn {
        report.vanished.retain(|(r, _)| *r != refs.id(i));
        restored.forget.push((refs.id(i), scopes));
    }
    for (scope, at) in &snap.touches {
        core.touch(Timestamp(*at), scope)?;
    }
    if unheld > 0 || snap.dangling > 0 {
        tracing::warn!(
            unheld,
            dangling = snap.dangling,
            "index rows without a ref or a hold; ignored"
        );
    }
    Ok(restored)
}

impl MediaStore for DurableStore {
    crate::local::local_lookups!();
    async fn store(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        let p = self.local.store(path, meta, scope, None)?;
        self.journal.wait(p.seq).await?;
        Ok(p.value)
    }

    async fn retain(&self, media_ref: MediaRef, scope: &str) -> Result<()> {
        let p = self.local.retain(media_ref, scope)?;
        self.journal.wait(p.seq).await
    }

    async fn release_all(&self, scope: &str) -> Result<ReleaseReport> {
        let p = self.local.release(scope)?;
        let dropped = self.drop_and_delete(p.value, p.seq).await?;
        Ok(self.local.finish_release(dropped))
    }

    async fn touch(&self, scope: &str) -> Result<usize> {
        let p = self.local.touch(scope)?;
        self.journal.wait(p.seq).await?;
        Ok(p.value)
    }

    async fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<()> {
        let p = self.local.set_scope_expiry(scope, expiry)?;
        self.journal.wait(p.seq).await
    }

    async fn clean_expired(&self) -> Result<SweepReport> {
        // A failed deletion may come from a release whose commit was still
        // pending when its caller gave up: retry only once it is durable.
        self.journal.wait_all().await?;
        self.local
            .sweep(|batch| self.drop_and_delete(batch.value, batch.seq))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placement_names_the_file_once_and_never_replaces() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        for how in [
            Placement::Unnamed,
            Placement::LinkedTemp,
            Placement::RenamedTemp,
            Placement::Portable,
        ] {
            let target = dir.path().join(format!("{how:?}"));
            let mut staged = Staged::create(dir.path(), how).unwrap();
            staged.file.write_all(b"bytes").unwrap();
            staged.place(&target).unwrap();
            let other = Staged::create(dir.path(), how).unwrap();
            let err = other.place(&target).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{how:?}");
            drop((staged, other));
            assert_eq!(fs::read(&target).unwrap(), b"bytes", "{how:?}");
        }
        // Only the placed files remain: no temp is left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["LinkedTemp", "Portable", "RenamedTemp", "Unnamed"]);
    }

    #[test]
    fn only_journaling_file_systems_skip_the_directory_fsync() {
        // tmpfs logs nothing: a new name needs its directory synced.
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on Linux");
        assert!(!links_persist_with_file(shm.path()));
        // Whatever the root is, the answer agrees with the kernel's list
        // of journals for an ext4 root.
        let root_is_ext4 = rustix::fs::statfs("/").is_ok_and(|s| s.f_type as u64 == 0xEF53);
        if root_is_ext4 {
            let journaled = fs::read_dir("/proc/fs/jbd2").is_ok_and(|mut d| d.next().is_some());
            assert!(!links_persist_with_file(Path::new("/")) || journaled);
        }
    }
}
