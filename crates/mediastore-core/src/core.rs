//! The state machine: refs, scopes, holds, per-file counts and deadlines.
//!
//! # Invariants
//!
//! 1. Every hold in a scope's queue names a live ref, and that ref lists the
//!    scope (the same `Arc`) once per hold. A hold popped by a release or a
//!    sweep is "in flight" until its holder entry is dropped from the ref; the
//!    ref stays alive until then, so a handle is never reused while a hold or
//!    an in-flight removal can still point at it.
//! 2. A file record's `count` equals the number of live refs with its key.
//!    Registration bumps the count *before* the ref exists, and removal drops
//!    it *after* the ref is gone, so the count is never below the truth.
//! 3. A file is handed out for deletion exactly when its count reaches zero
//!    while it is `Live` and unpinned. It then stays `Deleting` until the
//!    engine reports back; a registration of a `Deleting` file is refused.
//!    This is what closes the seed's race: there is no moment in which a file
//!    has zero refs, is about to be unlinked, and can still gain a ref.
//! 4. A scope record exists only while it has holds, and it is in the deadline
//!    index exactly when it has holds and a max age.
//!
//! # Locking
//!
//! State is sharded three ways: refs by ref id (so resolves of unrelated refs
//! never share a lock), scopes by name, files by identity. Locks nest only in
//! the order scope partition → ref shard → file shard (registration holds all
//! three so that a refused registration changes nothing).
//! Releases and sweeps pop holds under the partition lock, drop it, and then
//! visit ref shards in short bounded runs, so readers wait microseconds.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use slab::Slab;
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::types::{
    CleanupPolicy, Expiry, FileKey, MediaMeta, MediaRef, ScopeRule, Timestamp, duration_nanos,
    validate_scope,
};

const REF_SHARD_BITS: u32 = 7;
const REF_SHARDS: usize = 1 << REF_SHARD_BITS;
const SCOPE_PARTS: usize = 64;
const FILE_SHARDS: usize = 64;
/// Slots per ref shard are numbered in the bits above the shard number.
const MAX_SLOT: usize = (1 << (32 - REF_SHARD_BITS)) - 1;
/// Distinct path spellings remembered per file; more are resolved but not
/// interned (a caller spelling one file a thousand ways gets no dedup).
const MAX_SPELLINGS: usize = 16;
/// Ref-shard operations done under one lock acquisition during a release or
/// sweep; bounds how long a reader of that shard can wait.
const RUN: usize = 32;

/// A scope name, shared between the scope record and the refs it holds.
type ScopeName = Arc<str>;

/// Settings of the state machine.
#[derive(Clone, Debug, Default)]
pub struct CoreConfig {
    /// Max age of holds whose scope has no rule or override. `None` or zero:
    /// such holds never expire.
    pub default_max_age: Option<Duration>,
    /// Per-prefix expiry; the longest matching prefix wins.
    pub scope_rules: Vec<ScopeRule>,
    /// List every dropped hold in [`Dropped::released`], for engines that
    /// journal sweeps. Off by default: the list costs an allocation.
    pub record_drops: bool,
}

/// One registration to record.
#[derive(Clone, Copy, Debug)]
pub struct Registration<'a> {
    /// The new ref (the engine draws the randomness).
    pub id: MediaRef,
    /// [`Core::deletion_ticket`], read *before* the engine stat'ed the file.
    pub ticket: u64,
    /// Identity of the file, from the stat the engine did.
    pub file: FileKey,
    /// The path as the caller spelled it; resolves return this spelling.
    pub path: &'a Path,
    /// Size of the file at registration.
    pub size: u64,
    /// Metadata; its `policy` field is ignored in favour of `policy`.
    pub meta: &'a MediaMeta,
    /// The policy the engine decided on.
    pub policy: CleanupPolicy,
    /// The scope that holds the new ref.
    pub scope: &'a str,
}

/// What a resolve returns: the immutable record of one ref.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The ref.
    pub id: MediaRef,
    /// The path as it was registered.
    pub path: Arc<Path>,
    /// Metadata, with the applied policy in `policy`.
    pub meta: Arc<MediaMeta>,
    /// When the ref was registered.
    pub stored_at: Timestamp,
    /// The file's identity.
    pub file: FileKey,
}

/// A file whose last ref is gone and which may now be deleted. The engine
/// must report back with [`Core::finish_deletion`].
#[derive(Clone, Debug)]
pub struct Deletion {
    /// Identity the file had when registered; the engine must check it still
    /// matches before unlinking, so a replaced file is never removed.
    pub file: FileKey,
    /// Every spelling under which the file was registered.
    pub paths: Vec<Arc<Path>>,
    /// Size at the last registration.
    pub size: u64,
}

/// Outcome of removing holds (release or sweep).
#[derive(Debug, Default)]
pub struct Dropped {
    /// Holds removed.
    pub holds: u64,
    /// Refs that lost their last hold and are gone.
    pub refs_removed: u64,
    /// Scopes that disappeared.
    pub scopes_removed: u64,
    /// Files that may now be deleted.
    pub deletions: Vec<Deletion>,
    /// True when a sweep stopped at its budget and more holds are due.
    pub more: bool,
    /// Every dropped hold as (ref, scope), when [`CoreConfig::record_drops`]
    /// is set; empty otherwise.
    pub released: Vec<(MediaRef, Arc<str>)>,
    /// The refs that lost their last hold, when [`CoreConfig::record_drops`]
    /// is set; empty otherwise.
    pub removed: Vec<MediaRef>,
}

/// How the engine's deletion attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The file is gone (deleted now, or it already was).
    Deleted,
    /// It could not be removed; it is kept for a retry by a later sweep.
    Failed,
}

/// Lifecycle of a tracked file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileState {
    /// Has refs.
    Live,
    /// Last ref gone; the engine is deleting it.
    Deleting,
    /// A deletion failed; a sweep will retry.
    Failed,
}

/// Introspection of one file's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileStatus {
    /// Live refs to the file.
    pub refs: u32,
    /// True when a `forget_only` ref pinned it during this life.
    pub pinned: bool,
    /// Where it is in its lifecycle.
    pub state: FileState,
}

/// One hold on a ref, as [`Core::holds_of`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HoldInfo {
    /// The holding scope.
    pub scope: String,
    /// When the hold was made or last renewed (`retain`, `touch`).
    pub renewed_at: Timestamp,
    /// When it expires; `None` when the scope's holds never do.
    pub expires_at: Option<Timestamp>,
}

/// Counters for tests, tools and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CoreStats {
    /// Live refs.
    pub refs: u64,
    /// Scopes with at least one hold.
    pub scopes: u64,
    /// Holds (a ref retained by two scopes counts twice).
    pub holds: u64,
    /// Files with live refs.
    pub files: u64,
    /// Files waiting for deletion or a retry.
    pub pending_deletions: u64,
}

#[repr(align(128))]
struct Padded<T>(T);

/// A live ref: its immutable description, shared with resolvers, and the
/// scopes holding it. Resolvers clone the one `Arc`, whose counter no other
/// ref shares, so threads resolving different refs never contend on it.
struct RefRec {
    entry: Arc<Resolved>,
    holders: SmallVec<[ScopeName; 1]>,
}

#[derive(Default)]
struct RefShard {
    slab: Slab<RefRec>,
    index: HashTable<u32>,
    /// Interned metadata: a gateway registers the same few
    /// (filename, type, source) triples over and over.
    metas: HashTable<Arc<MediaMeta>>,
    hasher: DefaultHashBuilder,
}

/// Packed to 12 bytes: a million holds is the bulk of a scope's memory.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Hold {
    handle: u32,
    made_at: u64,
}

struct ScopeRec {
    name: ScopeName,
    /// Hash of `name` under `Core::hasher`; the table rehashes with it.
    hash: u64,
    /// Oldest first; four inline, the usual size of a chat message scope.
    holds: SmallVec<[Hold; 4]>,
    /// Every hold made before this instant counts as made at it (`touch`).
    touched_at: u64,
    /// `None`: the holds never expire.
    max_age: Option<u64>,
    /// The deadline under which the scope sits in the deadline index.
    indexed: Option<u64>,
    /// Unique within the partition; breaks ties in the deadline index.
    seq: u64,
}

/// Scope records keyed by name, looked up with a hash computed once per
/// operation (the same hash picks the partition).
#[derive(Default)]
struct ScopeTable(HashTable<ScopeRec>);

impl ScopeTable {
    fn get(&self, hash: u64, name: &str) -> Option<&ScopeRec> {
        self.0.find(hash, |r| &*r.name == name)
    }

    fn get_mut(&mut self, hash: u64, name: &str) -> Option<&mut ScopeRec> {
        self.0.find_mut(hash, |r| &*r.name == name)
    }

    fn remove(&mut self, hash: u64, name: &str) -> Option<ScopeRec> {
        let entry = self.0.find_entry(hash, |r| &*r.name == name).ok()?;
        Some(entry.remove().0)
    }

    fn get_or_insert_with(
        &mut self,
        hash: u64,
        name: &str,
        make: impl FnOnce() -> ScopeRec,
    ) -> &mut ScopeRec {
        self.0
            .entry(hash, |r| &*r.name == name, |r| r.hash)
            .or_insert_with(make)
            .into_mut()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &ScopeRec> {
        self.0.iter()
    }
}

#[derive(Default)]
struct ScopePart {
    map: ScopeTable,
    /// (deadline, scope sequence number) → scope. Integer keys: many scopes
    /// share a deadline, and comparing names on every tie was most of a
    /// sweep's cost.
    deadlines: BTreeMap<(u64, u64), ScopeName>,
    /// Hands out `ScopeRec::seq`.
    next_seq: u64,
    overrides: HashMap<Box<str>, Expiry>,
}

struct FileRec {
    count: u32,
    pinned: bool,
    state: FileState,
    spellings: SmallVec<[Arc<Path>; 1]>,
    size: u64,
}

#[derive(Default)]
struct FileShard {
    map: HashMap<FileKey, FileRec>,
    failed: Vec<FileKey>,
    /// Deletion sequence number of the last file of this shard unlinked.
    last_delete: u64,
}

/// The sans-IO state machine. It reads no clock and touches no file: times
/// come in as arguments and files to delete go out as [`Deletion`]s.
///
/// All methods take `&self`; the state is sharded internally so that many
/// threads can register, resolve and release at once.
pub struct Core {
    default_max_age: Option<u64>,
    record_drops: bool,
    /// Sorted longest prefix first.
    rules: Vec<ScopeRule>,
    refs: Box<[Padded<RwLock<RefShard>>]>,
    scopes: Box<[Padded<Mutex<ScopePart>>]>,
    files: Box<[Padded<Mutex<FileShard>>]>,
    hasher: DefaultHashBuilder,
    /// Counts finished deletions; see [`Core::deletion_ticket`].
    delete_seq: AtomicU64,
}

fn ref_hash(id: MediaRef) -> u64 {
    let v = id.as_u128();
    // The low half is random except for the two variant bits; folding in the
    // high half and multiplying spreads entropy to the bits hashbrown uses.
    ((v as u64) ^ ((v >> 64) as u64).rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn ref_shard(id: MediaRef) -> usize {
    // The lowest bits of the high half are random in a v4 UUID.
    ((id.as_u128() >> 64) as usize) & (REF_SHARDS - 1)
}

fn handle_parts(handle: u32) -> (usize, usize) {
    (
        (handle as usize) & (REF_SHARDS - 1),
        (handle >> REF_SHARD_BITS) as usize,
    )
}

fn nonzero(d: Duration) -> Option<u64> {
    (!d.is_zero()).then(|| duration_nanos(d))
}

impl ScopeRec {
    /// When `hold` expires: made or renewed, plus the scope's max age.
    fn hold_deadline(&self, hold: &Hold) -> Option<u64> {
        let made_at = hold.made_at;
        Some(made_at.max(self.touched_at).saturating_add(self.max_age?))
    }

    /// The oldest hold's deadline: the scope's key in the deadline index.
    fn deadline(&self) -> Option<u64> {
        self.hold_deadline(self.holds.first()?)
    }

    fn insert_sorted(&mut self, hold: Hold) {
        // Clocks move forward, so this is almost always a push at the back;
        // a hold dated in the past (tests, clock steps) slides into place.
        let mut at = self.holds.len();
        while at > 0 && self.holds[at - 1].made_at > hold.made_at {
            at -= 1;
        }
        self.holds.insert(at, hold);
    }
}

thread_local! {
    /// The metadata this thread registered last (see `intern_meta`).
    static LAST_META: std::cell::RefCell<Option<Arc<MediaMeta>>> =
        const { std::cell::RefCell::new(None) };
}

/// True when `interned` is `meta` registered with `policy`.
fn meta_matches(interned: &MediaMeta, meta: &MediaMeta, policy: CleanupPolicy) -> bool {
    interned.policy == Some(policy)
        && interned.filename == meta.filename
        && interned.content_type == meta.content_type
        && interned.source == meta.source
}

/// Takes a read lock, spinning briefly before blocking. Writers hold a ref
/// shard for at most a run of [`RUN`] operations (microseconds), less than a
/// park and wake-up costs, and a parked reader's idle virtual CPU may be
/// descheduled by the host.
fn read_spinning<T>(lock: &RwLock<T>) -> parking_lot::RwLockReadGuard<'_, T> {
    for _ in 0..2048 {
        if let Some(guard) = lock.try_read() {
            return guard;
        }
        std::hint::spin_loop();
    }
    lock.read()
}

/// Drops `n` refs from a file's count; hands the file out for deletion when
/// that was the last of them and nothing pinned it.
fn uncount_dead_refs(shard: &mut FileShard, key: FileKey, n: u32) -> Option<Deletion> {
    let rec = shard.map.get_mut(&key).expect("live ref's file is counted");
    rec.count -= n;
    if rec.count > 0 {
        return None;
    }
    if rec.pinned {
        shard.map.remove(&key);
        return None;
    }
    rec.state = FileState::Deleting;
    Some(Deletion {
        file: key,
        paths: rec.spellings.to_vec(),
        size: rec.size,
    })
}

/// Puts a scope at the right place in its partition's deadline index.
fn reindex(deadlines: &mut BTreeMap<(u64, u64), ScopeName>, rec: &mut ScopeRec) {
    let want = rec.deadline();
    if want == rec.indexed {
        return;
    }
    if let Some(old) = rec.indexed.take() {
        deadlines.remove(&(old, rec.seq));
    }
    if let Some(new) = want {
        deadlines.insert((new, rec.seq), rec.name.clone());
        rec.indexed = Some(new);
    }
}

impl ScopePart {
    fn remove_scope(&mut self, hash: u64, name: &str) -> Option<ScopeRec> {
        let rec = self.map.remove(hash, name)?;
        if let Some(old) = rec.indexed {
            self.deadlines.remove(&(old, rec.seq));
        }
        Some(rec)
    }
}

impl RefShard {
    fn find(&self, id: MediaRef) -> Option<usize> {
        self.index
            .find(ref_hash(id), |&slot| {
                self.slab[slot as usize].entry.id == id
            })
            .map(|&slot| slot as usize)
    }

    fn intern_meta(&mut self, meta: &MediaMeta, policy: CleanupPolicy) -> Arc<MediaMeta> {
        // The thread's last metadata first: consecutive registrations from
        // one thread usually repeat it, and its lines are then hot, whereas
        // each shard's own copy would be cold.
        let hit = LAST_META.with(|last| {
            last.borrow()
                .as_ref()
                .filter(|m| meta_matches(m, meta, policy))
                .cloned()
        });
        if let Some(hit) = hit {
            return hit;
        }
        let found = self.intern_meta_slow(meta, policy);
        LAST_META.with(|last| *last.borrow_mut() = Some(found.clone()));
        found
    }

    #[cold]
    #[inline(never)]
    fn intern_meta_slow(&mut self, meta: &MediaMeta, policy: CleanupPolicy) -> Arc<MediaMeta> {
        let hash = self.hasher.hash_one((
            &meta.filename,
            &meta.content_type,
            &meta.source,
            Some(policy),
        ));
        if let Some(found) = self.metas.find(hash, |m| meta_matches(m, meta, policy)) {
            return found.clone();
        }
        // Drop entries nobody else holds before the table grows, so a
        // stream of unique filenames cannot accumulate here.
        if self.metas.len() == self.metas.capacity() && self.metas.len() >= 64 {
            self.metas.retain(|m| Arc::strong_count(m) > 1);
        }
        let mut owned = meta.clone();
        owned.policy = Some(policy);
        let arc = Arc::new(owned);
        let hasher = &self.hasher;
        self.metas.insert_unique(hash, arc.clone(), |m| {
            hasher.hash_one((&m.filename, &m.content_type, &m.source, m.policy))
        });
        arc
    }

    /// Removes one holder entry; returns the ref's record when it was the
    /// last, for the caller to drop after unlocking (freeing can be slow).
    fn drop_holder(&mut self, slot: usize, scope: &ScopeName) -> Option<Arc<Resolved>> {
        let rec = &mut self.slab[slot];
        if let Some(i) = rec.holders.iter().position(|h| Arc::ptr_eq(h, scope)) {
            rec.holders.swap_remove(i);
        } else {
            debug_assert!(false, "hold without a holder entry");
        }
        if !rec.holders.is_empty() {
            return None;
        }
        let id = rec.entry.id;
        let found = self
            .index
            .find_entry(ref_hash(id), |&s| s as usize == slot)
            .expect("live ref is indexed");
        found.remove();
        Some(self.slab.remove(slot).entry)
    }
}

impl Core {
    /// A state machine with the given settings.
    pub fn new(config: CoreConfig) -> Self {
        let mut rules = config.scope_rules;
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self {
            default_max_age: config.default_max_age.and_then(nonzero),
            record_drops: config.record_drops,
            rules,
            refs: (0..REF_SHARDS)
                .map(|_| Padded(Default::default()))
                .collect(),
            scopes: (0..SCOPE_PARTS)
                .map(|_| Padded(Default::default()))
                .collect(),
            files: (0..FILE_SHARDS)
                .map(|_| Padded(Default::default()))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            delete_seq: AtomicU64::new(0),
        }
    }

    /// Makes room for `refs` more refs and `scopes` more scopes, spread
    /// evenly over the shards, so that a bulk load (an engine restoring
    /// its index at open) does not rehash its tables as they grow.
    pub fn reserve(&self, refs: usize, scopes: usize) {
        let per_shard = refs.div_ceil(REF_SHARDS);
        for shard in self.refs.iter() {
            let mut shard = shard.0.write();
            let RefShard { slab, index, .. } = &mut *shard;
            slab.reserve(per_shard);
            index.reserve(per_shard, |&slot| ref_hash(slab[slot as usize].entry.id));
        }
        let per_part = scopes.div_ceil(SCOPE_PARTS);
        for part in self.scopes.iter() {
            part.0.lock().map.0.reserve(per_part, |r| r.hash);
        }
    }

    /// A ticket to read before stat'ing a file that is about to be
    /// registered. A file can be stat'ed, then lose its last ref, be unlinked
    /// and be forgotten, all before the registration reaches the core; the
    /// ticket lets [`Core::register`] see that a deletion finished in between
    /// and answer [`Error::Conflict`], so the engine stats again.
    pub fn deletion_ticket(&self) -> u64 {
        self.delete_seq.load(Ordering::Acquire)
    }

    /// True when some hold can expire: a default max age, or any rule or
    /// override that sets one.
    pub fn expiry_configured(&self) -> bool {
        self.default_max_age.is_some()
            || self
                .rules
                .iter()
                .any(|r| matches!(r.expiry, Expiry::After(d) if !d.is_zero()))
            || self.scopes.iter().any(|p| {
                p.0.lock()
                    .overrides
                    .values()
                    .any(|e| matches!(e, Expiry::After(d) if !d.is_zero()))
            })
    }

    /// The scope's partition and its hash. The partition comes from bits
    /// the tables do not use for bucket selection, so a partition's table is
    /// not left with one bucket pattern.
    fn part(&self, scope: &str) -> (&Mutex<ScopePart>, u64) {
        let hash = self.hasher.hash_one(scope);
        (&self.scopes[((hash >> 32) as usize) % SCOPE_PARTS].0, hash)
    }

    fn file_shard_index(&self, key: &FileKey) -> usize {
        (self.hasher.hash_one(key) as usize) % FILE_SHARDS
    }

    fn file_shard(&self, key: &FileKey) -> &Mutex<FileShard> {
        &self.files[self.file_shard_index(key)].0
    }

    #[inline(never)]
    fn expiry_for(&self, overrides: &HashMap<Box<str>, Expiry>, scope: &str) -> Option<u64> {
        let mut expiry = overrides.get(scope).copied().unwrap_or_default();
        if expiry == Expiry::Default {
            expiry = self
                .rules
                .iter()
                .find(|r| scope.starts_with(r.prefix.as_str()))
                .map_or(Expiry::Default, |r| r.expiry);
        }
        match expiry {
            Expiry::Default => self.default_max_age,
            Expiry::Never => None,
            Expiry::After(d) => nonzero(d),
        }
    }

    /// The scope's record, created if needed, with the partition's deadline
    /// index (borrowed apart so the caller can reindex the record).
    fn scope_rec<'p>(
        &self,
        part: &'p mut ScopePart,
        hash: u64,
        scope: &str,
    ) -> (&'p mut ScopeRec, &'p mut BTreeMap<(u64, u64), ScopeName>) {
        let ScopePart {
            map,
            deadlines,
            overrides,
            next_seq,
        } = part;
        let rec = map.get_or_insert_with(hash, scope, || {
            *next_seq += 1;
            ScopeRec {
                name: Arc::from(scope),
                hash,
                holds: SmallVec::new(),
                touched_at: 0,
                max_age: self.expiry_for(overrides, scope),
                indexed: None,
                seq: *next_seq,
            }
        });
        (rec, deadlines)
    }

    /// Records a new ref to a file under a scope.
    ///
    /// Fails with a not-found [`Error::File`] when the file is being deleted:
    /// the engine stat'ed it just before its last ref went, and by the time
    /// the caller could use the ref it would be gone.
    pub fn register(&self, now: Timestamp, reg: Registration<'_>) -> Result<()> {
        validate_scope(reg.scope)?;
        let shard_no = ref_shard(reg.id);
        let (part, hash) = self.part(reg.scope);
        let mut part = part.lock();
        let (rec, deadlines) = self.scope_rec(&mut part, hash, reg.scope);
        let name = rec.name.clone();
        let inserted = {
            let mut shard = self.refs[shard_no].0.write();
            // Every check that can refuse runs before the file is counted,
            // so a refusal leaves the file's record exactly as it was.
            let counted = if shard.find(reg.id).is_some() {
                Err(Error::InvalidRef {
                    input: reg.id.to_string(),
                    reason: "ref already registered",
                })
            } else if shard.slab.vacant_key() > MAX_SLOT {
                Err(Error::Full("too many refs in one shard"))
            } else {
                self.count_file(&reg)
            };
            counted.map(|path| {
                let meta = shard.intern_meta(reg.meta, reg.policy);
                let slot = shard.slab.insert(RefRec {
                    entry: Arc::new(Resolved {
                        id: reg.id,
                        path,
                        meta,
                        stored_at: now,
                        file: reg.file,
                    }),
                    holders: SmallVec::from_buf([name]),
                });
                let hash = ref_hash(reg.id);
                let RefShard { slab, index, .. } = &mut *shard;
                index.insert_unique(hash, slot as u32, |&s| ref_hash(slab[s as usize].entry.id));
                ((slot as u32) << REF_SHARD_BITS) | shard_no as u32
            })
        };
        match inserted {
            Ok(handle) => {
                rec.insert_sorted(Hold {
                    handle,
                    made_at: now.0,
                });
                reindex(deadlines, rec);
                Ok(())
            }
            Err(e) => {
                if rec.holds.is_empty() {
                    part.remove_scope(hash, reg.scope);
                }
                Err(e)
            }
        }
    }

    /// Bumps the file's count (creating its record) and interns the spelling.
    fn count_file(&self, reg: &Registration<'_>) -> Result<Arc<Path>> {
        let mut shard = self.file_shard(&reg.file).lock();
        let FileShard {
            map,
            failed,
            last_delete,
        } = &mut *shard;
        if *last_delete > reg.ticket {
            return Err(Error::Conflict(
                "a file was deleted while this one was being registered",
            ));
        }
        let rec = map.entry(reg.file).or_insert_with(|| FileRec {
            count: 0,
            pinned: false,
            state: FileState::Live,
            spellings: SmallVec::new(),
            size: 0,
        });
        match rec.state {
            FileState::Deleting => {
                return Err(Error::file(
                    reg.path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "file is being deleted (its last ref was just released)",
                    ),
                ));
            }
            FileState::Failed => {
                // The file survived a failed delete and is wanted again: it
                // starts a new life and leaves the retry list.
                rec.state = FileState::Live;
                rec.count = 0;
                let key = reg.file;
                failed.retain(|k| *k != key);
            }
            FileState::Live => {}
        }
        if rec.count == 0 {
            rec.pinned = false;
        }
        rec.count += 1;
        rec.pinned |= reg.policy == CleanupPolicy::ForgetOnly;
        rec.size = reg.size;
        // Byte equality: `Path`'s own equality ignores `.` components, and a
        // ref must resolve to exactly the spelling it was registered with.
        if let Some(p) = rec
            .spellings
            .iter()
            .find(|p| p.as_os_str() == reg.path.as_os_str())
        {
            return Ok(p.clone());
        }
        let p: Arc<Path> = Arc::from(reg.path);
        if rec.spellings.len() < MAX_SPELLINGS {
            rec.spellings.push(p.clone());
        }
        Ok(p)
    }

    /// Looks a ref up.
    pub fn resolve(&self, id: MediaRef) -> Result<Arc<Resolved>> {
        let shard = read_spinning(&self.refs[ref_shard(id)].0);
        let Some(slot) = shard.find(id) else {
            return Err(Error::UnknownRef(id));
        };
        Ok(shard.slab[slot].entry.clone())
    }

    /// Adds `scope` as a holder of the ref, or renews its hold if it already
    /// is one.
    pub fn retain(&self, now: Timestamp, id: MediaRef, scope: &str) -> Result<()> {
        validate_scope(scope)?;
        let shard_no = ref_shard(id);
        let (part, hash) = self.part(scope);
        let mut part = part.lock();
        let (rec, deadlines) = self.scope_rec(&mut part, hash, scope);
        let mut shard = self.refs[shard_no].0.write();
        let Some(slot) = shard.find(id) else {
            drop(shard);
            if rec.holds.is_empty() {
                part.remove_scope(hash, scope);
            }
            return Err(Error::UnknownRef(id));
        };
        let handle = ((slot as u32) << REF_SHARD_BITS) | shard_no as u32;
        let ref_rec = &mut shard.slab[slot];
        let listed = ref_rec.holders.iter().any(|h| Arc::ptr_eq(h, &rec.name));
        // The holder list may name this scope for a hold a sweep has already
        // popped (in flight); only the queue says whether a hold exists.
        let queued = if listed {
            rec.holds.iter().position(|h| h.handle == handle)
        } else {
            None
        };
        // Renewing never shortens a hold, as with `touch`.
        let made_at = match queued {
            Some(i) => rec.holds.remove(i).made_at.max(now.0),
            None => {
                ref_rec.holders.push(rec.name.clone());
                now.0
            }
        };
        drop(shard);
        rec.insert_sorted(Hold { handle, made_at });
        reindex(deadlines, rec);
        Ok(())
    }

    /// Renews every hold of the scope as of `now`. Returns how many holds it
    /// has (0 for an unknown scope).
    pub fn touch(&self, now: Timestamp, scope: &str) -> Result<usize> {
        validate_scope(scope)?;
        let (part, hash) = self.part(scope);
        let mut part = part.lock();
        let part = &mut *part;
        let Some(rec) = part.map.get_mut(hash, scope) else {
            return Ok(0);
        };
        rec.touched_at = rec.touched_at.max(now.0);
        reindex(&mut part.deadlines, rec);
        Ok(rec.holds.len())
    }

    /// Sets how long the holds of `scope` live; [`Expiry::Default`] removes
    /// the override. Applies to existing holds at once and to the scope's
    /// future holds, also after it empties and comes back.
    pub fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<()> {
        validate_scope(scope)?;
        let (part, hash) = self.part(scope);
        let mut part = part.lock();
        let part = &mut *part;
        if expiry == Expiry::Default {
            part.overrides.remove(scope);
        } else {
            part.overrides.insert(scope.into(), expiry);
        }
        let max_age = self.expiry_for(&part.overrides, scope);
        if let Some(rec) = part.map.get_mut(hash, scope) {
            rec.max_age = max_age;
            reindex(&mut part.deadlines, rec);
        }
        Ok(())
    }

    /// Drops every hold of the scope. Unknown scopes are a no-op.
    pub fn release_all(&self, scope: &str) -> Result<Dropped> {
        validate_scope(scope)?;
        let (part, hash) = self.part(scope);
        let Some(rec) = part.lock().remove_scope(hash, scope) else {
            return Ok(Dropped::default());
        };
        let mut items: SmallVec<[(u32, u32); 16]> =
            rec.holds.iter().map(|h| (h.handle, 0)).collect();
        let mut out = Dropped {
            scopes_removed: 1,
            ..Dropped::default()
        };
        self.drop_holds(&mut items, &[rec.name], &mut out);
        Ok(out)
    }

    /// Drops up to `budget` holds whose deadline is before `now` (strictly:
    /// a hold exactly max-age old survives). Call again while `more` is set;
    /// each call holds a lock only for a bounded amount of work.
    pub fn expire(&self, now: Timestamp, budget: usize) -> Dropped {
        let budget = budget.max(1);
        let mut out = Dropped::default();
        let mut items: Vec<(u32, u32)> = Vec::new();
        let mut names: Vec<ScopeName> = Vec::new();
        for part in self.scopes.iter() {
            let mut part = part.0.lock();
            let part = &mut *part;
            while items.len() < budget {
                let Some((&(deadline, _), name)) = part.deadlines.first_key_value() else {
                    break;
                };
                if deadline >= now.0 {
                    break;
                }
                let name = name.clone();
                let hash = self.hasher.hash_one(&*name);
                let rec = part.map.get_mut(hash, &name).expect("indexed scope exists");
                let name_index = names.len() as u32;
                names.push(name.clone());
                let due = rec
                    .holds
                    .iter()
                    .take(budget - items.len())
                    .take_while(|h| rec.hold_deadline(h).is_some_and(|d| d < now.0))
                    .count();
                items.extend(rec.holds.drain(..due).map(|h| (h.handle, name_index)));
                if rec.holds.is_empty() {
                    part.remove_scope(hash, &name);
                    out.scopes_removed += 1;
                } else {
                    reindex(&mut part.deadlines, rec);
                }
            }
            if items.len() >= budget {
                out.more = true;
                break;
            }
        }
        self.drop_holds(&mut items, &names, &mut out);
        out
    }

    /// The earliest deadline of any hold, for a cleaner that sleeps until due.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.scopes
            .iter()
            .filter_map(|p| p.0.lock().deadlines.first_key_value().map(|(k, _)| k.0))
            .min()
            .map(Timestamp)
    }

    /// Removes popped holds from their refs, then uncounts dead refs' files.
    /// `items` are (ref handle, index into `names` of the scope that held it).
    fn drop_holds(&self, items: &mut [(u32, u32)], names: &[ScopeName], out: &mut Dropped) {
        items.sort_unstable_by_key(|(h, _)| handle_parts(*h).0);
        let mut dead: SmallVec<[FileKey; 16]> = SmallVec::new();
        let mut freed: SmallVec<[Arc<Resolved>; RUN]> = SmallVec::new();
        for chunk in items.chunk_by(|a, b| handle_parts(a.0).0 == handle_parts(b.0).0) {
            let shard_no = handle_parts(chunk[0].0).0;
            for run in chunk.chunks(RUN) {
                let mut shard = self.refs[shard_no].0.write();
                for &(handle, scope) in run {
                    out.holds += 1;
                    let scope = &names[scope as usize];
                    let slot = handle_parts(handle).1;
                    if self.record_drops {
                        out.released
                            .push((shard.slab[slot].entry.id, scope.clone()));
                    }
                    if let Some(entry) = shard.drop_holder(slot, scope) {
                        if self.record_drops {
                            out.removed.push(entry.id);
                        }
                        dead.push(entry.file);
                        freed.push(entry);
                    }
                }
                drop(shard);
                freed.clear();
            }
        }
        out.refs_removed += dead.len() as u64;
        // Group dead refs by file shard and by file, so a sweep of many refs
        // to few files takes each shard's lock once per run.
        let mut dead: SmallVec<[(usize, FileKey); 16]> = dead
            .into_iter()
            .map(|k| (self.file_shard_index(&k), k))
            .collect();
        dead.sort_unstable();
        for shard_run in dead.chunk_by(|a, b| a.0 == b.0) {
            for run in shard_run.chunks(RUN) {
                let mut shard = self.files[run[0].0].0.lock();
                for same in run.chunk_by(|a, b| a.1 == b.1) {
                    let key = same[0].1;
                    if let Some(d) = uncount_dead_refs(&mut shard, key, same.len() as u32) {
                        out.deletions.push(d);
                    }
                }
            }
        }
    }

    /// Reports how the engine's deletion of a file ended.
    pub fn finish_deletion(&self, file: FileKey, outcome: DeleteOutcome) {
        let mut shard = self.file_shard(&file).lock();
        let Some(rec) = shard.map.get_mut(&file) else {
            return;
        };
        if rec.state != FileState::Deleting {
            return;
        }
        match outcome {
            DeleteOutcome::Deleted => {
                shard.map.remove(&file);
                shard.last_delete = self.delete_seq.fetch_add(1, Ordering::AcqRel) + 1;
            }
            DeleteOutcome::Failed => {
                rec.state = FileState::Failed;
                shard.failed.push(file);
            }
        }
    }

    /// Hands out every file whose deletion failed, for another attempt.
    pub fn retry_deletions(&self) -> Vec<Deletion> {
        let mut out = Vec::new();
        for shard in self.files.iter() {
            let mut shard = shard.0.lock();
            let FileShard { map, failed, .. } = &mut *shard;
            for key in failed.drain(..) {
                if let Some(rec) = map.get_mut(&key).filter(|r| r.state == FileState::Failed) {
                    rec.state = FileState::Deleting;
                    out.push(Deletion {
                        file: key,
                        paths: rec.spellings.to_vec(),
                        size: rec.size,
                    });
                }
            }
        }
        out
    }

    /// The scopes holding a ref, sorted.
    pub fn scopes_of(&self, id: MediaRef) -> Result<Vec<String>> {
        let shard = self.refs[ref_shard(id)].0.read();
        let Some(slot) = shard.find(id) else {
            return Err(Error::UnknownRef(id));
        };
        let mut out: Vec<String> = shard.slab[slot]
            .holders
            .iter()
            .map(|s| s.to_string())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The holds on a ref, by scope name (sorted): when each was made or
    /// last renewed, and when it expires (`None`: never).
    pub fn holds_of(&self, id: MediaRef) -> Result<Vec<HoldInfo>> {
        let shard_no = ref_shard(id);
        // Names first, under the ref's shard lock alone: scope partitions
        // are locked before ref shards, never after.
        let (slot, names) = {
            let shard = self.refs[shard_no].0.read();
            let Some(slot) = shard.find(id) else {
                return Err(Error::UnknownRef(id));
            };
            let names: Vec<ScopeName> = shard.slab[slot].holders.to_vec();
            (slot, names)
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let (part, hash) = self.part(&name);
            let part = part.lock();
            let Some(rec) = part.map.get(hash, &name) else {
                continue;
            };
            let hold = rec.holds.iter().find(|h| {
                handle_parts(h.handle) == (shard_no, slot)
                    && self.refs[shard_no]
                        .0
                        .read()
                        .slab
                        .get(slot)
                        .map(|r| r.entry.id)
                        == Some(id)
            });
            if let Some(h) = hold {
                let made_at = h.made_at;
                out.push(HoldInfo {
                    scope: name.to_string(),
                    renewed_at: Timestamp(made_at.max(rec.touched_at)),
                    expires_at: rec.hold_deadline(h).map(Timestamp),
                });
            }
        }
        out.sort_by(|a, b| a.scope.cmp(&b.scope));
        out.dedup_by(|a, b| a.scope == b.scope);
        Ok(out)
    }

    /// How long holds of `scope` live, as configured now (`None`: they
    /// never expire).
    pub fn max_age_of(&self, scope: &str) -> Result<Option<Duration>> {
        validate_scope(scope)?;
        let (part, hash) = self.part(scope);
        let part = part.lock();
        let nanos = match part.map.get(hash, scope) {
            Some(rec) => rec.max_age,
            None => self.expiry_for(&part.overrides, scope),
        };
        Ok(nanos.map(Duration::from_nanos))
    }

    /// Every scope with at least one hold, and how many it has, sorted by
    /// name.
    pub fn scope_list(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for part in self.scopes.iter() {
            let part = part.0.lock();
            out.extend(
                part.map
                    .values()
                    .map(|r| (r.name.to_string(), r.holds.len())),
            );
        }
        out.sort();
        out
    }

    /// The refs a scope holds, oldest hold first. Unknown scope: empty.
    pub fn refs_in(&self, scope: &str) -> Result<Vec<MediaRef>> {
        validate_scope(scope)?;
        let (part, hash) = self.part(scope);
        let part = part.lock();
        let Some(rec) = part.map.get(hash, scope) else {
            return Ok(Vec::new());
        };
        Ok(rec
            .holds
            .iter()
            .map(|h| {
                let (shard, slot) = handle_parts(h.handle);
                self.refs[shard].0.read().slab[slot].entry.id
            })
            .collect())
    }

    /// The record of one file, if the core tracks it.
    pub fn file_status(&self, file: FileKey) -> Option<FileStatus> {
        let shard = self.file_shard(&file).lock();
        shard.map.get(&file).map(|r| FileStatus {
            refs: r.count,
            pinned: r.pinned,
            state: r.state,
        })
    }

    /// The size of a tracked file, as of its last registration.
    pub fn file_size(&self, file: FileKey) -> Option<u64> {
        self.file_shard(&file).lock().map.get(&file).map(|r| r.size)
    }

    /// Counters. Each shard is read under its own lock, so under concurrent
    /// writes the totals are a close approximation, not a snapshot.
    pub fn stats(&self) -> CoreStats {
        let mut s = CoreStats::default();
        for p in self.scopes.iter() {
            let p = p.0.lock();
            s.scopes += p.map.len() as u64;
            s.holds += p.map.values().map(|r| r.holds.len() as u64).sum::<u64>();
        }
        for r in self.refs.iter() {
            s.refs += r.0.read().slab.len() as u64;
        }
        for f in self.files.iter() {
            let f = f.0.lock();
            for rec in f.map.values() {
                if rec.state == FileState::Live {
                    s.files += 1;
                } else {
                    s.pending_deletions += 1;
                }
            }
        }
        s
    }

    /// Cross-checks every invariant in the module docs. Meant for tests: it
    /// takes all locks and must run while no other call is in progress.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let parts: Vec<_> = self.scopes.iter().map(|p| p.0.lock()).collect();
        let shards: Vec<_> = self.refs.iter().map(|r| r.0.read()).collect();
        let files: Vec<_> = self.files.iter().map(|f| f.0.lock()).collect();
        let mut holds_per_ref: std::collections::HashMap<(usize, usize), Vec<ScopeName>> =
            Default::default();
        for part in &parts {
            let mut indexed = 0;
            for rec in part.map.values() {
                let name = &rec.name;
                if rec.holds.is_empty() {
                    return Err(format!("empty scope {name:?} kept"));
                }
                if rec.deadline() != rec.indexed {
                    return Err(format!("scope {name:?} indexed at the wrong deadline"));
                }
                if let Some(d) = rec.indexed {
                    indexed += 1;
                    if part.deadlines.get(&(d, rec.seq)) != Some(&rec.name) {
                        return Err(format!("scope {name:?} missing from the index"));
                    }
                }
                if !rec
                    .holds
                    .iter()
                    .zip(rec.holds.iter().skip(1))
                    .all(|(a, b)| a.made_at <= b.made_at)
                {
                    return Err(format!("holds of {name:?} out of order"));
                }
                for h in &rec.holds {
                    let (shard, slot) = handle_parts(h.handle);
                    if !shards[shard].slab.contains(slot) {
                        return Err(format!("scope {name:?} holds a dead ref"));
                    }
                    holds_per_ref
                        .entry((shard, slot))
                        .or_default()
                        .push(rec.name.clone());
                }
            }
            if indexed != part.deadlines.len() {
                return Err("deadline index has stale entries".into());
            }
        }
        let mut refs_per_file: std::collections::HashMap<FileKey, u32> = Default::default();
        for (shard_no, shard) in shards.iter().enumerate() {
            if shard.index.len() != shard.slab.len() {
                return Err("ref index and slab disagree".into());
            }
            for (slot, rec) in shard.slab.iter() {
                if shard.find(rec.entry.id) != Some(slot) {
                    return Err(format!("{} not findable", rec.entry.id));
                }
                let mut want: Vec<*const u8> = holds_per_ref
                    .remove(&(shard_no, slot))
                    .unwrap_or_default()
                    .iter()
                    .map(|s| Arc::as_ptr(s) as *const u8)
                    .collect();
                let mut have: Vec<*const u8> = rec
                    .holders
                    .iter()
                    .map(|s| Arc::as_ptr(s) as *const u8)
                    .collect();
                want.sort();
                have.sort();
                if want != have || have.is_empty() {
                    return Err(format!(
                        "{} holders disagree with scope holds",
                        rec.entry.id
                    ));
                }
                *refs_per_file.entry(rec.entry.file).or_default() += 1;
            }
        }
        for f in &files {
            for (key, rec) in &f.map {
                let refs = refs_per_file.remove(key).unwrap_or(0);
                match rec.state {
                    FileState::Live if rec.count != refs || refs == 0 => {
                        return Err(format!("{key:?} counted {} but has {refs} refs", rec.count));
                    }
                    FileState::Deleting | FileState::Failed if refs != 0 || rec.count != 0 => {
                        return Err(format!("{key:?} is being deleted with {refs} refs"));
                    }
                    _ => {}
                }
            }
        }
        if let Some(key) = refs_per_file.keys().next() {
            return Err(format!("{key:?} has refs but no record"));
        }
        Ok(())
    }
}
