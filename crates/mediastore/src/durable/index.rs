//! The on-disk index: a SQLite database in WAL mode holding refs, holds,
//! scope touches, scope expiry overrides and deletions not yet finished.
//!
//! The index is written only by the journal's writer thread and read only
//! when the store opens; every lookup is served from memory.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mediastore_core::{CleanupPolicy, Error, Expiry, FileKey, MediaRef, Result};
use rusqlite::{Connection, OpenFlags, Transaction, params};

use crate::local::Op;

/// The index format this build writes. Opening an older index migrates it
/// step by step (plain SQL, one step per version); the index's
/// `user_version` records where it stands, and a newer one is refused.
pub const FORMAT_VERSION: i64 = 1;

/// SQL that takes the index from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: the first format.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
     INSERT INTO meta VALUES ('application', 'mediastore');
     CREATE TABLE refs (
        id BLOB PRIMARY KEY,
        path BLOB NOT NULL,
        dev INTEGER NOT NULL, ino INTEGER NOT NULL, born INTEGER NOT NULL,
        size INTEGER NOT NULL,
        filename TEXT NOT NULL, content_type TEXT NOT NULL, source TEXT NOT NULL,
        policy INTEGER NOT NULL,
        stored_at INTEGER NOT NULL,
        sha256 BLOB,
        unverified INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE holds (
        scope TEXT NOT NULL, id BLOB NOT NULL, made_at INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (scope, id)
     ) WITHOUT ROWID;
     CREATE TABLE scope_touch (scope TEXT PRIMARY KEY, touched_at INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE scope_expiry (scope TEXT PRIMARY KEY, never INTEGER NOT NULL, nanos INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE pending_deletes (
        dev INTEGER NOT NULL, ino INTEGER NOT NULL, born INTEGER NOT NULL, path BLOB NOT NULL,
        PRIMARY KEY (dev, ino, born, path)
     ) WITHOUT ROWID;",
];

/// SQLite stores signed 64-bit integers; ours are unsigned and round-trip
/// through the same bits.
fn i(v: u64) -> i64 {
    v as i64
}

fn u(v: i64) -> u64 {
    v as u64
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn policy_code(p: CleanupPolicy) -> i64 {
    match p {
        CleanupPolicy::DeleteOnCleanup => 0,
        CleanupPolicy::ForgetOnly => 1,
    }
}

/// Maps a SQLite failure while opening or loading to a typed error.
fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(NotADatabase | DatabaseCorrupt) => Error::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        Some(ReadOnly | CannotOpen | PermissionDenied | DiskFull) => Error::io(
            format!("opening index {}", path.display()),
            std::io::Error::other(e.to_string()),
        ),
        _ => Error::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    }
}

/// Maps a SQLite failure while writing.
pub fn write_error(e: rusqlite::Error) -> Error {
    let kind = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => std::io::ErrorKind::StorageFull,
        Some(rusqlite::ErrorCode::ReadOnly) => std::io::ErrorKind::ReadOnlyFilesystem,
        _ => std::io::ErrorKind::Other,
    };
    Error::io(
        "writing the index",
        std::io::Error::new(kind, e.to_string()),
    )
}

/// Opens (creating if needed) and migrates the index.
pub fn open(path: &Path) -> Result<Connection> {
    // Never through a symlink: a planted one would hand us someone else's
    // database.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    // WAL with `synchronous = FULL`: a commit is durable when it returns,
    // at the price of one fsync of the log. Exclusive locking keeps the
    // WAL index in memory (no -shm file); the data dir's lock file already
    // keeps other processes out.
    conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE;")
        .map_err(|e| open_error(path, e))?;
    // Before changing anything (the journal mode included): is it ours?
    check_identity(path, &conn)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA cache_size = -16384;",
    )
    .map_err(|e| open_error(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| open_error(path, e))?;
    migrate(path, &mut conn)?;
    Ok(conn)
}

/// Refuses an index written by a newer mediastore, and any database that
/// is not a mediastore index (one with tables but no version, or no tag).
fn check_identity(path: &Path, conn: &Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_error(path, e))?;
    if version == 0 {
        // A fresh index has no tables; anything else is not ours to take.
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| open_error(path, e))?;
        if tables > 0 {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: "not a mediastore index (it holds other tables)".into(),
            });
        }
        return Ok(());
    }
    if version > FORMAT_VERSION {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: format!(
                "index format {version} was written by a newer mediastore (this one reads up to {FORMAT_VERSION})"
            ),
        });
    }
    let app: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'application'",
            [],
            |r| r.get(0),
        )
        .ok();
    if app.as_deref() != Some("mediastore") {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: "not a mediastore index".into(),
        });
    }
    Ok(())
}

fn migrate(path: &Path, conn: &mut Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_error(path, e))?;
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(|e| open_error(path, e))?;
        tx.execute_batch(sql).map_err(|e| open_error(path, e))?;
        tx.pragma_update(None, "user_version", from as i64 + 1)
            .map_err(|e| open_error(path, e))?;
        tx.commit().map_err(|e| open_error(path, e))?;
    }
    Ok(())
}

/// Applies one journaled change inside the writer's transaction.
/// `seq` is the change's journal sequence number, which orders holds made
/// in the same clock tick.
pub fn apply(tx: &Transaction<'_>, op: &Op, seq: u64) -> rusqlite::Result<()> {
    match op {
        Op::Register {
            id,
            path,
            file,
            size,
            meta,
            policy,
            scope,
            at,
            sha256,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO refs VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                id.uuid().as_bytes(),
                path_bytes(path),
                i(file.dev),
                i(file.ino),
                i(file.born),
                i(*size),
                meta.filename,
                meta.content_type,
                meta.source,
                policy_code(*policy),
                i(at.0),
                sha256.as_ref().map(|d| &d[..]),
                // A put records its ref while its bytes are being synced;
                // until `Verified`, opening checks them against the digest.
                sha256.is_some(),
            ])?;
            retain(tx, *id, scope, at.0, seq)
        }
        Op::Retain { id, scope, at } => retain(tx, *id, scope, at.0, seq),
        Op::Touch { scope, at } => {
            tx.prepare_cached(
                "INSERT INTO scope_touch VALUES (?1, ?2)
                 ON CONFLICT (scope) DO UPDATE SET touched_at = max(touched_at, excluded.touched_at)",
            )?
            .execute(params![&**scope, i(at.0)])?;
            Ok(())
        }
        Op::SetExpiry { scope, expiry } => {
            let (never, nanos) = match expiry {
                Expiry::Default => {
                    tx.prepare_cached("DELETE FROM scope_expiry WHERE scope = ?1")?
                        .execute([&**scope])?;
                    return Ok(());
                }
                Expiry::Never => (1, 0),
                Expiry::After(d) => (0, i(d.as_nanos().min(u64::MAX as u128) as u64)),
            };
            tx.prepare_cached("INSERT OR REPLACE INTO scope_expiry VALUES (?1, ?2, ?3)")?
                .execute(params![&**scope, never, nanos])?;
            Ok(())
        }
        Op::Release {
            scope,
            removed,
            deletions,
        } => {
            tx.prepare_cached("DELETE FROM holds WHERE scope = ?1")?
                .execute([&**scope])?;
            tx.prepare_cached("DELETE FROM scope_touch WHERE scope = ?1")?
                .execute([&**scope])?;
            remove_refs(tx, removed)?;
            pend(tx, deletions)
        }
        Op::Drop {
            released,
            removed,
            deletions,
        } => {
            let mut scopes: Vec<&str> = Vec::new();
            for (id, scope) in released {
                tx.prepare_cached("DELETE FROM holds WHERE scope = ?1 AND id = ?2")?
                    .execute(params![&**scope, id.uuid().as_bytes()])?;
                if scopes.last() != Some(&&**scope) {
                    scopes.push(scope);
                }
            }
            scopes.sort_unstable();
            scopes.dedup();
            for scope in scopes {
                tx.prepare_cached(
                    "DELETE FROM scope_touch WHERE scope = ?1
                     AND NOT EXISTS (SELECT 1 FROM holds WHERE scope = ?1)",
                )?
                .execute([scope])?;
            }
            remove_refs(tx, removed)?;
            pend(tx, deletions)
        }
        Op::Verified { id } => {
            tx.prepare_cached("UPDATE refs SET unverified = 0 WHERE id = ?1")?
                .execute([id.uuid().as_bytes()])?;
            Ok(())
        }
        Op::Forget { id, scopes } => {
            for scope in scopes {
                tx.prepare_cached("DELETE FROM holds WHERE scope = ?1 AND id = ?2")?
                    .execute(params![&**scope, id.uuid().as_bytes()])?;
            }
            remove_refs(tx, &[*id])
        }
        Op::Deleted { file } => {
            tx.prepare_cached(
                "DELETE FROM pending_deletes WHERE dev = ?1 AND ino = ?2 AND born = ?3",
            )?
            .execute(params![i(file.dev), i(file.ino), i(file.born)])?;
            Ok(())
        }
    }
}

/// Removes refs the core says lost their last hold.
fn remove_refs(tx: &Transaction<'_>, removed: &[MediaRef]) -> rusqlite::Result<()> {
    let mut q = tx.prepare_cached("DELETE FROM refs WHERE id = ?1")?;
    for id in removed {
        q.execute([id.uuid().as_bytes()])?;
    }
    Ok(())
}

/// Records files whose deletion is due, until the engine reports them done.
fn pend(tx: &Transaction<'_>, deletions: &[(FileKey, Vec<Arc<Path>>)]) -> rusqlite::Result<()> {
    let mut q =
        tx.prepare_cached("INSERT OR IGNORE INTO pending_deletes VALUES (?1, ?2, ?3, ?4)")?;
    for (file, paths) in deletions {
        for p in paths {
            q.execute(params![
                i(file.dev),
                i(file.ino),
                i(file.born),
                path_bytes(p)
            ])?;
        }
    }
    Ok(())
}

fn retain(
    tx: &Transaction<'_>,
    id: MediaRef,
    scope: &str,
    at: u64,
    seq: u64,
) -> rusqlite::Result<()> {
    // A renewed hold moves behind the holds made in the same tick, as in
    // the core's queue.
    tx.prepare_cached(
        "INSERT INTO holds VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (scope, id) DO UPDATE SET made_at = max(made_at, excluded.made_at), seq = excluded.seq",
    )?
    .execute(params![scope, id.uuid().as_bytes(), i(at), i(seq)])?;
    Ok(())
}

/// A byte range in [`RefTable::bytes`].
#[derive(Clone, Copy)]
pub struct Span {
    start: u64,
    len: u32,
}

/// One ref row, its text kept in the table's byte arena.
pub struct RefRow {
    pub path: Span,
    pub filename: Span,
    pub content_type: Span,
    pub source: Span,
    pub file: FileKey,
    pub size: u64,
    pub policy: CleanupPolicy,
    pub stored_at: u64,
    /// The digest of a managed ref's bytes (its file's name).
    pub sha256: Option<[u8; 32]>,
    /// A managed ref whose put may not have finished syncing its bytes.
    pub unverified: bool,
}

/// Every ref of the index, sorted by id, in a few large buffers: opening a
/// big index allocates (and frees) a handful of blocks instead of millions
/// of small strings that would stay in the allocator's free lists.
#[derive(Default)]
pub struct RefTable {
    ids: Vec<u128>,
    pub rows: Vec<RefRow>,
    bytes: Vec<u8>,
}

impl RefTable {
    fn push_bytes(&mut self, b: &[u8]) -> Span {
        let start = self.bytes.len() as u64;
        self.bytes.extend_from_slice(b);
        Span {
            start,
            len: b.len() as u32,
        }
    }

    /// The bytes of a span.
    pub fn bytes(&self, span: Span) -> &[u8] {
        &self.bytes[span.start as usize..span.start as usize + span.len as usize]
    }

    /// The text of a span (the index only stores valid UTF-8 there).
    pub fn text(&self, span: Span) -> &str {
        std::str::from_utf8(self.bytes(span)).unwrap_or("")
    }

    /// A row's path.
    pub fn path(&self, row: &RefRow) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(self.bytes(row.path)))
    }

    /// The ref of row `i`.
    pub fn id(&self, i: usize) -> MediaRef {
        MediaRef::from_uuid(uuid::Uuid::from_u128(self.ids[i])).expect("checked at load")
    }

    /// How many refs.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Hashes a ref id by folding its halves: ids are random already.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// One hold: its journal sequence, when it was made, its ref (row) and scope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HoldRow {
    pub seq: u64,
    pub made_at: u64,
    pub row: u32,
    pub scope: u32,
}

/// Everything the index holds, read once at open.
#[derive(Default)]
pub struct Snapshot {
    pub expiry: Vec<(String, Expiry)>,
    pub refs: RefTable,
    /// Sorted by sequence: the order the holds were made or last renewed.
    pub holds: Vec<HoldRow>,
    pub scopes: Vec<Arc<str>>,
    pub touches: Vec<(String, u64)>,
    /// Files whose deletion was decided but not confirmed: key and paths.
    pub pending: Vec<(FileKey, Vec<PathBuf>)>,
    /// Holds naming a ref the index does not have (cannot be written by
    /// this version).
    pub dangling: u64,
    /// The highest journal sequence number recorded.
    pub max_seq: u64,
}

fn uuid_of(bytes: &[u8]) -> Option<u128> {
    let arr: [u8; 16] = bytes.try_into().ok()?;
    MediaRef::from_uuid(uuid::Uuid::from_bytes(arr))
        .ok()
        .map(|r| r.as_u128())
}

/// A hold as read, before its ref's row is known.
struct RawHold {
    id: u128,
    seq: u64,
    made_at: u64,
    scope: u32,
}

/// Reads the whole index on one connection.
pub fn load(path: &Path, conn: &Connection) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    read_refs(path, conn, &mut snap)?;
    let (scopes, holds) = read_holds(path, conn)?;
    attach_holds(&mut snap, scopes, holds);
    read_rest(path, conn, &mut snap)?;
    Ok(snap)
}

/// Reads the whole index, refs and holds on two threads at once: the two
/// largest tables take about as long each. `conn` (from [`open`], whose
/// exclusive lock keeps any other connection out) is closed first, which
/// checkpoints its log into the main file; the tables are then read
/// through two lock-free read-only connections. Returns the snapshot and
/// the writer's connection, opened again.
pub fn load_parallel(path: &Path, conn: Connection) -> Result<(Snapshot, Connection)> {
    conn.close().map_err(|(_, e)| open_error(path, e))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    // A log that survived the close (a failed checkpoint) holds changes
    // the read-only connections would not see.
    if std::fs::symlink_metadata(&wal).is_ok_and(|m| m.len() > 0) {
        let conn = open(path)?;
        let snap = load(path, &conn)?;
        return Ok((snap, conn));
    }
    let reader = || -> Result<Connection> {
        // `immutable`: no locks, no log, nothing written; true while we
        // hold the data dir's lock and no connection is open.
        let mut uri = std::ffi::OsString::from("file:");
        uri.push(uri_escape(path));
        uri.push("?immutable=1");
        Connection::open_with_flags(
            Path::new(&uri),
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(|e| open_error(path, e))
    };
    let (a, b) = (reader()?, reader()?);
    let mut snap = Snapshot::default();
    let holds = std::thread::scope(|s| {
        let holds = std::thread::Builder::new()
            .name("mediastore-load".into())
            .spawn_scoped(s, move || read_holds(path, &b))
            .map_err(|e| Error::io("starting an index reader", e))?;
        let refs = read_refs(path, &a, &mut snap).and_then(|()| read_rest(path, &a, &mut snap));
        let holds = holds.join().map_err(|_| {
            Error::io(
                "reading the index",
                std::io::Error::other("a reader panicked"),
            )
        })?;
        refs.and(holds)
    })?;
    attach_holds(&mut snap, holds.0, holds.1);
    drop(a);
    let conn = open(path)?;
    Ok((snap, conn))
}

/// Percent-escapes what a URI filename cannot hold literally.
fn uri_escape(path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b'%' | b'?' | b'#' => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
            _ => out.push(b),
        }
    }
    std::ffi::OsString::from_vec(out)
}

fn blob(v: rusqlite::types::ValueRef<'_>) -> Option<&[u8]> {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Blob(b) | ValueRef::Text(b) => Some(b),
        _ => None,
    }
}

fn corrupt(path: &Path, detail: &str) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Reads expiry overrides and refs.
fn read_refs(path: &Path, conn: &Connection, snap: &mut Snapshot) -> Result<()> {
    use rusqlite::types::ValueRef;
    let err = |e| open_error(path, e);
    let corrupt = |detail: &str| corrupt(path, detail);
    let mut q = conn
        .prepare("SELECT scope, never, nanos FROM scope_expiry")
        .map_err(err)?;
    let mut rows = q.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let scope: String = r.get(0).map_err(err)?;
        let never: i64 = r.get(1).map_err(err)?;
        let nanos: i64 = r.get(2).map_err(err)?;
        let expiry = if never != 0 {
            Expiry::Never
        } else {
            Expiry::After(Duration::from_nanos(u(nanos)))
        };
        snap.expiry.push((scope, expiry));
    }
    let count: i64 = conn
        .query_row("SELECT count(*) FROM refs", [], |r| r.get(0))
        .map_err(err)?;
    let refs = &mut snap.refs;
    refs.ids.reserve_exact(count as usize);
    refs.rows.reserve_exact(count as usize);
    let mut q = conn
        .prepare(
            "SELECT id, path, dev, ino, born, size, filename, content_type, source, policy, stored_at,
                    sha256, unverified
             FROM refs ORDER BY id",
        )
        .map_err(err)?;
    let mut rows = q.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let id = blob(r.get_ref(0).map_err(err)?)
            .and_then(uuid_of)
            .ok_or_else(|| corrupt("a ref id is not a version 4 UUID"))?;
        let mut span = |i: usize| -> Result<Span> {
            match r.get_ref(i).map_err(err)? {
                ValueRef::Blob(b) | ValueRef::Text(b) => Ok(refs.push_bytes(b)),
                _ => Err(corrupt("a text or blob column holds something else")),
            }
        };
        let (p, f, c, s) = (span(1)?, span(6)?, span(7)?, span(8)?);
        let policy: i64 = r.get(9).map_err(err)?;
        refs.ids.push(id);
        refs.rows.push(RefRow {
            path: p,
            filename: f,
            content_type: c,
            source: s,
            file: FileKey {
                dev: u(r.get(2).map_err(err)?),
                ino: u(r.get(3).map_err(err)?),
                born: u(r.get(4).map_err(err)?),
            },
            size: u(r.get(5).map_err(err)?),
            policy: if policy == 0 {
                CleanupPolicy::DeleteOnCleanup
            } else {
                CleanupPolicy::ForgetOnly
            },
            stored_at: u(r.get(10).map_err(err)?),
            sha256: match r.get_ref(11).map_err(err)? {
                ValueRef::Blob(b) => Some(
                    b.try_into()
                        .map_err(|_| corrupt("a digest is not 32 bytes"))?,
                ),
                _ => None,
            },
            unverified: r.get::<_, i64>(12).map_err(err)? != 0,
        });
    }
    Ok(())
}

/// Reads the holds, with the scope names they use.
fn read_holds(path: &Path, conn: &Connection) -> Result<(Vec<Arc<str>>, Vec<RawHold>)> {
    use rusqlite::types::ValueRef;
    let err = |e| open_error(path, e);
    let corrupt = |detail: &str| corrupt(path, detail);
    let count: i64 = conn
        .query_row("SELECT count(*) FROM holds", [], |r| r.get(0))
        .map_err(err)?;
    let mut holds = Vec::with_capacity(count as usize);
    let mut scopes: Vec<Arc<str>> = Vec::new();
    // In primary key order a scope's holds are adjacent: one name each.
    let mut q = conn
        .prepare("SELECT scope, id, made_at, seq FROM holds")
        .map_err(err)?;
    let mut rows = q.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let scope = match r.get_ref(0).map_err(err)? {
            ValueRef::Text(t) => t,
            _ => return Err(corrupt("a scope is not text")),
        };
        if scopes.last().is_none_or(|l| l.as_bytes() != scope) {
            let name = std::str::from_utf8(scope).map_err(|_| corrupt("a scope is not UTF-8"))?;
            scopes.push(name.into());
        }
        let id = blob(r.get_ref(1).map_err(err)?)
            .and_then(uuid_of)
            .ok_or_else(|| corrupt("a held ref id is not a version 4 UUID"))?;
        holds.push(RawHold {
            id,
            seq: u(r.get(3).map_err(err)?),
            made_at: u(r.get(2).map_err(err)?),
            scope: (scopes.len() - 1) as u32,
        });
    }
    Ok((scopes, holds))
}

/// Points each hold at its ref's row and sorts them by sequence.
fn attach_holds(snap: &mut Snapshot, scopes: Vec<Arc<str>>, holds: Vec<RawHold>) {
    snap.scopes = scopes;
    snap.holds.reserve_exact(holds.len());
    // Holds come in scope order, so their refs in random order: a hash
    // lookup per hold, not a binary search through a large array.
    let rows_by_id: HashMap<u128, u32, BuildHasherDefault<IdHasher>> = snap
        .refs
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    for h in holds {
        let Some(&row) = rows_by_id.get(&h.id) else {
            snap.dangling += 1;
            continue;
        };
        snap.max_seq = snap.max_seq.max(h.seq);
        snap.holds.push(HoldRow {
            seq: h.seq,
            made_at: h.made_at,
            row,
            scope: h.scope,
        });
    }
    snap.holds.sort_unstable();
}

/// Reads scope touches and pending deletions.
fn read_rest(path: &Path, conn: &Connection, snap: &mut Snapshot) -> Result<()> {
    let err = |e| open_error(path, e);
    let mut q = conn
        .prepare("SELECT scope, touched_at FROM scope_touch")
        .map_err(err)?;
    let mut rows = q.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        snap.touches
            .push((r.get(0).map_err(err)?, u(r.get(1).map_err(err)?)));
    }
    let mut q = conn
        .prepare("SELECT dev, ino, born, path FROM pending_deletes ORDER BY dev, ino, born")
        .map_err(err)?;
    let mut rows = q.query([]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let key = FileKey {
            dev: u(r.get(0).map_err(err)?),
            ino: u(r.get(1).map_err(err)?),
            born: u(r.get(2).map_err(err)?),
        };
        let path: Vec<u8> = r.get(3).map_err(err)?;
        let path = PathBuf::from(std::ffi::OsString::from_vec(path));
        match snap.pending.last_mut().filter(|(k, _)| *k == key) {
            Some((_, paths)) => paths.push(path),
            None => snap.pending.push((key, vec![path])),
        }
    }
    Ok(())
}
