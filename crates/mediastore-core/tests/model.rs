//! Property tests of [`Core`] against a plain reference model (BTreeMaps and
//! Vecs), plus a multithreaded stress test of the deletion race.
//!
//! The model keeps, per ref, its file, path, policy and registration time;
//! per scope, its holds in order `(ref, made_at)` and its last touch; per
//! file, where it is in its life (live with a count and a "pinned by a
//! forget_only ref during this life" flag, being deleted, failed). After every
//! operation the core is compared with the model through its public API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mediastore_core::{
    CleanupPolicy, Core, CoreConfig, CoreStats, DeleteOutcome, Deletion, Dropped, Error, Expiry,
    FileKey, FileState, FileStatus, HoldInfo, MediaMeta, MediaRef, Registration, ScopeRule,
    Timestamp,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

type TestResult<T = ()> = Result<T, TestCaseError>;

const SCOPES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
const FILES: u64 = 6;
/// Max ages used everywhere, in nanoseconds.
const AGES: [u64; 3] = [10, 25, 100];
/// Rule prefixes: nested ("s" ⊂ "s1"), disjoint ("s1", "s2") and unmatched.
const PREFIXES: [&str; 4] = ["s", "s1", "s2", "x"];
const T0: u64 = 1_000_000;

/// File number `i` of the test. The last one reuses the inode number of the
/// one before it with another birth time: the same inode re-created behind
/// the store's back, a different file.
fn key(i: u64) -> FileKey {
    if i == FILES - 1 {
        FileKey {
            dev: 1,
            ino: FILES - 2,
            born: 7,
        }
    } else {
        FileKey {
            dev: 1,
            ino: i,
            born: 0,
        }
    }
}

fn key_index(k: FileKey) -> usize {
    if k.born == 7 {
        FILES as usize - 1
    } else {
        k.ino as usize
    }
}

/// Several spellings of file `i`: counts are per key, not per path. The two
/// files sharing an inode number share their spellings too.
fn spelling(i: u64, which: u8) -> PathBuf {
    let ino = key(i).ino;
    PathBuf::from(match which % 4 {
        0 => format!("/f/{ino}"),
        1 => format!("/g/../f/{ino}"),
        2 => format!("/h/{ino}.jpg"),
        _ => format!("/f/./{ino}"),
    })
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn ref_from(n: u64) -> MediaRef {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&splitmix(n).to_le_bytes());
    bytes[8..].copy_from_slice(&splitmix(n ^ 0x5555_AAAA_5555_AAAA).to_le_bytes());
    MediaRef::from_random_bytes(bytes)
}

fn policy(forget: bool) -> CleanupPolicy {
    if forget {
        CleanupPolicy::ForgetOnly
    } else {
        CleanupPolicy::DeleteOnCleanup
    }
}

fn nonzero(d: Duration) -> Option<u64> {
    (!d.is_zero()).then(|| u64::try_from(d.as_nanos()).unwrap())
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MRef {
    file: FileKey,
    path: PathBuf,
    policy: CleanupPolicy,
    stored_at: u64,
}

#[derive(Clone, Debug, Default)]
struct MScope {
    /// Oldest hold first (time only moves forward, so pushing keeps order).
    holds: Vec<(MediaRef, u64)>,
    touched: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MFile {
    Live { count: u32, pinned: bool },
    Deleting,
    Failed,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Expect {
    holds: u64,
    refs_removed: u64,
    scopes_removed: u64,
    deletions: BTreeSet<FileKey>,
}

#[derive(Debug)]
struct Model {
    now: u64,
    default_max_age: Option<u64>,
    rules: Vec<(String, Expiry)>,
    overrides: BTreeMap<String, Expiry>,
    refs: BTreeMap<MediaRef, MRef>,
    scopes: BTreeMap<String, MScope>,
    files: BTreeMap<FileKey, MFile>,
    /// Size given by the last successful registration of the file.
    sizes: BTreeMap<FileKey, u64>,
    /// Spellings registered since the file's record was created (a failed
    /// deletion keeps the record, so they carry over into a revived life).
    /// Spellings compared as bytes: `Path` equality ignores `.` components,
    /// and each spelling must be kept exactly.
    spellings: BTreeMap<FileKey, BTreeSet<std::ffi::OsString>>,
    /// Every ref ever offered to `register` (registered or refused), in order.
    all_refs: Vec<MediaRef>,
    /// Files whose deletion was reported done, in order: the core's
    /// deletion ticket is the length of this log.
    deleted_log: Vec<FileKey>,
    next_id: u64,
}

impl Model {
    fn new(default_max_age: Option<u64>, rules: Vec<(String, Expiry)>) -> Self {
        Self {
            now: T0,
            default_max_age,
            rules,
            overrides: BTreeMap::new(),
            refs: BTreeMap::new(),
            scopes: BTreeMap::new(),
            files: BTreeMap::new(),
            sizes: BTreeMap::new(),
            spellings: BTreeMap::new(),
            all_refs: Vec::new(),
            deleted_log: Vec::new(),
            next_id: 0,
        }
    }

    fn fresh_id(&mut self) -> MediaRef {
        self.next_id += 1;
        ref_from(self.next_id)
    }

    /// Override, else longest matching rule, else the default; zero = never.
    fn max_age(&self, scope: &str) -> Option<u64> {
        let mut expiry = self
            .overrides
            .get(scope)
            .copied()
            .unwrap_or(Expiry::Default);
        if expiry == Expiry::Default {
            expiry = self
                .rules
                .iter()
                .filter(|(p, _)| scope.starts_with(p.as_str()))
                .max_by_key(|(p, _)| p.len())
                .map_or(Expiry::Default, |(_, e)| *e);
        }
        match expiry {
            Expiry::Default => self.default_max_age.filter(|&d| d > 0),
            Expiry::Never => None,
            Expiry::After(d) => nonzero(d),
        }
    }

    fn deadline(&self, scope: &str, made_at: u64) -> Option<u64> {
        let rec = self.scopes.get(scope)?;
        let age = self.max_age(scope)?;
        Some(made_at.max(rec.touched).saturating_add(age))
    }

    fn next_deadline(&self) -> Option<u64> {
        self.scopes
            .iter()
            .flat_map(|(name, s)| s.holds.iter().filter_map(|h| self.deadline(name, h.1)))
            .min()
    }

    fn holders(&self, id: MediaRef) -> Vec<String> {
        self.scopes
            .iter()
            .filter(|(_, s)| s.holds.iter().any(|h| h.0 == id))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn stats(&self) -> CoreStats {
        CoreStats {
            refs: self.refs.len() as u64,
            scopes: self.scopes.len() as u64,
            holds: self.scopes.values().map(|s| s.holds.len() as u64).sum(),
            files: self
                .files
                .values()
                .filter(|f| matches!(f, MFile::Live { .. }))
                .count() as u64,
            pending_deletions: self
                .files
                .values()
                .filter(|f| !matches!(f, MFile::Live { .. }))
                .count() as u64,
        }
    }

    fn file_status(&self, key: FileKey) -> Option<FileStatus> {
        self.files.get(&key).map(|f| match *f {
            MFile::Live { count, pinned } => FileStatus {
                refs: count,
                pinned,
                state: FileState::Live,
            },
            MFile::Deleting => FileStatus {
                refs: 0,
                pinned: false,
                state: FileState::Deleting,
            },
            MFile::Failed => FileStatus {
                refs: 0,
                pinned: false,
                state: FileState::Failed,
            },
        })
    }

    fn pending(&self, state: MFile) -> Vec<FileKey> {
        self.files
            .iter()
            .filter(|(_, f)| **f == state)
            .map(|(k, _)| *k)
            .collect()
    }

    /// `Err(())`: the file is being deleted and the registration is refused.
    fn register(
        &mut self,
        id: MediaRef,
        file: FileKey,
        path: &Path,
        policy: CleanupPolicy,
        scope: &str,
        size: u64,
    ) -> Result<(), ()> {
        let state = self.files.get(&file).copied();
        let (count, pinned) = match state {
            Some(MFile::Deleting) => return Err(()),
            // A file whose deletion failed starts a new life.
            Some(MFile::Failed) | None => (0, false),
            Some(MFile::Live { count, pinned }) => (count, pinned),
        };
        self.files.insert(
            file,
            MFile::Live {
                count: count + 1,
                pinned: pinned || policy == CleanupPolicy::ForgetOnly,
            },
        );
        self.sizes.insert(file, size);
        self.spellings
            .entry(file)
            .or_default()
            .insert(path.as_os_str().to_owned());
        self.refs.insert(
            id,
            MRef {
                file,
                path: path.to_path_buf(),
                policy,
                stored_at: self.now,
            },
        );
        self.scopes
            .entry(scope.to_owned())
            .or_default()
            .holds
            .push((id, self.now));
        Ok(())
    }

    /// `Err(())`: unknown ref.
    fn retain(&mut self, id: MediaRef, scope: &str) -> Result<(), ()> {
        if !self.refs.contains_key(&id) {
            return Err(());
        }
        let now = self.now;
        let rec = self.scopes.entry(scope.to_owned()).or_default();
        rec.holds.retain(|h| h.0 != id);
        rec.holds.push((id, now));
        Ok(())
    }

    fn touch(&mut self, scope: &str) -> usize {
        let now = self.now;
        match self.scopes.get_mut(scope) {
            Some(rec) => {
                rec.touched = rec.touched.max(now);
                rec.holds.len()
            }
            None => 0,
        }
    }

    fn set_expiry(&mut self, scope: &str, expiry: Expiry) {
        if expiry == Expiry::Default {
            self.overrides.remove(scope);
        } else {
            self.overrides.insert(scope.to_owned(), expiry);
        }
    }

    fn release_all(&mut self, scope: &str) -> Expect {
        let mut out = Expect::default();
        if let Some(rec) = self.scopes.remove(scope) {
            out.scopes_removed = 1;
            let ids = rec.holds.iter().map(|h| h.0).collect();
            self.drop_holds(ids, &mut out);
        }
        out
    }

    fn expire(&mut self) -> Expect {
        let mut out = Expect::default();
        let now = self.now;
        let mut ids = Vec::new();
        let names: Vec<String> = self.scopes.keys().cloned().collect();
        for name in names {
            let expired: Vec<MediaRef> = self.scopes[&name]
                .holds
                .iter()
                .filter(|h| self.deadline(&name, h.1).is_some_and(|d| d < now))
                .map(|h| h.0)
                .collect();
            let rec = self.scopes.get_mut(&name).unwrap();
            rec.holds.retain(|h| !expired.contains(&h.0));
            if rec.holds.is_empty() {
                self.scopes.remove(&name);
                out.scopes_removed += 1;
            }
            ids.extend(expired);
        }
        self.drop_holds(ids, &mut out);
        out
    }

    /// The holds are already gone from their scopes; drop refs left without
    /// any, and uncount their files.
    fn drop_holds(&mut self, ids: Vec<MediaRef>, out: &mut Expect) {
        out.holds += ids.len() as u64;
        let ids: BTreeSet<MediaRef> = ids.into_iter().collect();
        for id in ids {
            if !self.holders(id).is_empty() {
                continue;
            }
            let r = self.refs.remove(&id).expect("held ref is live");
            out.refs_removed += 1;
            let Some(MFile::Live { count, pinned }) = self.files.get(&r.file).copied() else {
                panic!("model: live ref of a file that is not live");
            };
            if count > 1 {
                self.files.insert(
                    r.file,
                    MFile::Live {
                        count: count - 1,
                        pinned,
                    },
                );
            } else if pinned {
                self.files.remove(&r.file);
                self.spellings.remove(&r.file);
            } else {
                self.files.insert(r.file, MFile::Deleting);
                out.deletions.insert(r.file);
            }
        }
    }

    fn finish(&mut self, file: FileKey, outcome: DeleteOutcome) {
        if self.files.get(&file) != Some(&MFile::Deleting) {
            return;
        }
        match outcome {
            DeleteOutcome::Deleted => {
                self.files.remove(&file);
                self.spellings.remove(&file);
                self.deleted_log.push(file);
            }
            DeleteOutcome::Failed => {
                self.files.insert(file, MFile::Failed);
            }
        }
    }

    fn retry(&mut self) -> BTreeSet<FileKey> {
        let failed = self.pending(MFile::Failed);
        for k in &failed {
            self.files.insert(*k, MFile::Deleting);
        }
        failed.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------
// Comparing the core with the model
// ---------------------------------------------------------------------------

fn now(m: &Model) -> Timestamp {
    Timestamp(m.now)
}

struct Attempt<'a> {
    id: MediaRef,
    file: u64,
    path: &'a Path,
    forget: bool,
    scope: &'a str,
    size: u64,
}

fn do_register(
    core: &Core,
    m: &Model,
    ticket: u64,
    a: &Attempt<'_>,
) -> mediastore_core::Result<()> {
    let Attempt {
        id,
        file,
        path,
        forget,
        scope,
        size,
    } = *a;
    let meta = MediaMeta::new(format!("{file}.bin"), "application/octet-stream", "test");
    core.register(
        now(m),
        Registration {
            id,
            ticket,
            file: key(file),
            path,
            size,
            meta: &meta,
            policy: policy(forget),
            scope,
        },
    )
}

/// Checks the deletions a call handed out against what the model expects
/// (the model has already been advanced past the call).
fn check_deletions(m: &Model, got: &[Deletion], want: &BTreeSet<FileKey>) -> TestResult {
    let keys: Vec<FileKey> = got.iter().map(|d| d.file).collect();
    let set: BTreeSet<FileKey> = keys.iter().copied().collect();
    prop_assert_eq!(set.len(), keys.len(), "a file handed out twice: {:?}", keys);
    prop_assert_eq!(&set, want, "files handed out for deletion");
    for d in got {
        prop_assert_eq!(
            m.files.get(&d.file),
            Some(&MFile::Deleting),
            "{:?} handed out",
            d.file
        );
        let paths: BTreeSet<std::ffi::OsString> =
            d.paths.iter().map(|p| p.as_os_str().to_owned()).collect();
        prop_assert_eq!(paths.len(), d.paths.len(), "duplicate paths in {:?}", d);
        prop_assert_eq!(
            Some(&paths),
            m.spellings.get(&d.file),
            "paths of {:?}",
            d.file
        );
        prop_assert_eq!(Some(&d.size), m.sizes.get(&d.file), "size of {:?}", d.file);
    }
    Ok(())
}

fn check_dropped(m: &Model, got: &Dropped, want: &Expect) -> TestResult {
    prop_assert_eq!(got.holds, want.holds, "Dropped.holds");
    // `record_drops` is on: one (ref, scope) entry per dropped hold, no twice.
    prop_assert_eq!(got.released.len() as u64, got.holds, "Dropped.released");
    let distinct: std::collections::HashSet<_> = got.released.iter().collect();
    prop_assert_eq!(distinct.len(), got.released.len(), "a hold released twice");
    prop_assert_eq!(
        got.removed.len() as u64,
        got.refs_removed,
        "Dropped.removed"
    );
    for id in &got.removed {
        prop_assert!(
            got.released.iter().any(|(r, _)| r == id),
            "a removed ref lost a hold in the same call"
        );
    }
    prop_assert_eq!(got.refs_removed, want.refs_removed, "Dropped.refs_removed");
    prop_assert_eq!(
        got.scopes_removed,
        want.scopes_removed,
        "Dropped.scopes_removed"
    );
    check_deletions(m, &got.deletions, &want.deletions)
}

fn check_all(core: &Core, m: &Model) -> TestResult {
    core.check_invariants().map_err(TestCaseError::fail)?;
    // Every ref ever made, plus a few that never were.
    let never = (0..3).map(|i| ref_from(u64::MAX - i));
    for id in m.all_refs.iter().copied().chain(never) {
        match m.refs.get(&id) {
            Some(want) => {
                let got = core
                    .resolve(id)
                    .map_err(|e| TestCaseError::fail(format!("resolve {id}: {e}")))?;
                prop_assert_eq!(got.id, id);
                prop_assert_eq!(
                    got.path.as_os_str(),
                    want.path.as_os_str(),
                    "exact spelling of {}",
                    id
                );
                prop_assert_eq!(got.meta.policy, Some(want.policy), "policy of {}", id);
                prop_assert_eq!(got.stored_at, Timestamp(want.stored_at));
                prop_assert_eq!(got.file, want.file);
                let scopes = core
                    .scopes_of(id)
                    .map_err(|e| TestCaseError::fail(format!("scopes_of {id}: {e}")))?;
                prop_assert_eq!(scopes, m.holders(id), "scopes_of {}", id);
                let holds = core
                    .holds_of(id)
                    .map_err(|e| TestCaseError::fail(format!("holds_of {id}: {e}")))?;
                let want: Vec<HoldInfo> = m
                    .scopes
                    .iter()
                    .filter_map(|(name, s)| {
                        let h = s.holds.iter().find(|h| h.0 == id)?;
                        Some(HoldInfo {
                            scope: name.clone(),
                            renewed_at: Timestamp(h.1.max(s.touched)),
                            expires_at: m.deadline(name, h.1).map(Timestamp),
                        })
                    })
                    .collect();
                prop_assert_eq!(holds, want, "holds_of {}", id);
            }
            None => {
                prop_assert!(
                    matches!(core.resolve(id), Err(Error::UnknownRef(r)) if r == id),
                    "{} resolves but the model dropped it",
                    id
                );
                prop_assert!(matches!(core.scopes_of(id), Err(Error::UnknownRef(_))));
                prop_assert!(matches!(core.holds_of(id), Err(Error::UnknownRef(_))));
            }
        }
    }
    for scope in SCOPES {
        let want: Vec<MediaRef> = m
            .scopes
            .get(scope)
            .map(|s| s.holds.iter().map(|h| h.0).collect())
            .unwrap_or_default();
        // Time never goes back here and a renewed hold moves to the back, so
        // the order is exact even for holds made at the same instant.
        prop_assert_eq!(core.refs_in(scope).unwrap(), want, "refs_in({})", scope);
        prop_assert_eq!(
            core.max_age_of(scope).unwrap(),
            m.max_age(scope).map(Duration::from_nanos),
            "max_age_of({})",
            scope
        );
    }
    prop_assert_eq!(
        core.scope_list(),
        m.scopes
            .iter()
            .map(|(name, s)| (name.clone(), s.holds.len()))
            .collect::<Vec<_>>(),
        "scope_list"
    );
    prop_assert_eq!(core.stats(), m.stats(), "stats");
    prop_assert_eq!(
        core.deletion_ticket(),
        m.deleted_log.len() as u64,
        "deletion ticket"
    );
    for ino in 0..FILES {
        prop_assert_eq!(
            core.file_status(key(ino)),
            m.file_status(key(ino)),
            "file_status of ino {}",
            ino
        );
    }
    prop_assert_eq!(
        core.next_deadline(),
        m.next_deadline().map(Timestamp),
        "next_deadline"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Register {
        file: u64,
        spelling: u8,
        forget: bool,
        scope: usize,
        size: u64,
    },
    /// Registers with a deletion ticket read `back` deletions ago (clamped).
    RegisterStale {
        back: usize,
        file: u64,
        spelling: u8,
        forget: bool,
        scope: usize,
    },
    /// Registers a file that is being deleted, if there is one.
    RegisterPending {
        pick: usize,
        spelling: u8,
        forget: bool,
        scope: usize,
    },
    /// Retains a ref ever made (live or gone), or one never made.
    Retain {
        pick: usize,
        scope: usize,
    },
    Release(usize),
    Touch(usize),
    Advance(u64),
    Expire {
        budget: usize,
    },
    SetExpiry(usize, Expiry),
    /// Finishes one pending deletion.
    Finish {
        pick: usize,
        failed: bool,
    },
    Retry,
    /// `finish_deletion` of a file that is not being deleted: a no-op.
    SpuriousFinish {
        ino: u64,
        failed: bool,
    },
    /// `reserve`: a capacity hint, which must change nothing observable
    /// (the live entries are rehashed into the grown tables).
    Reserve {
        refs: usize,
        scopes: usize,
    },
}

fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![
        Just(Expiry::Default),
        Just(Expiry::Never),
        Just(Expiry::After(Duration::ZERO)),
        prop::sample::select(AGES.to_vec()).prop_map(|a| Expiry::After(Duration::from_nanos(a))),
    ]
}

fn advance() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1..30u64,
        (prop::sample::select(AGES.to_vec()), 0..3u64).prop_map(|(a, d)| a + d - 1),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let scope = 0..SCOPES.len();
    prop_oneof![
        8 => (0..FILES, any::<u8>(), prop::bool::weighted(0.2), scope.clone(), 0..1000u64)
            .prop_map(|(file, spelling, forget, scope, size)| Op::Register {
                file,
                spelling,
                forget,
                scope,
                size
            }),
        1 => (0..64usize, any::<u8>(), any::<bool>(), scope.clone()).prop_map(
            |(pick, spelling, forget, scope)| Op::RegisterPending {
                pick,
                spelling,
                forget,
                scope
            }
        ),
        1 => (1..4usize, 0..FILES, any::<u8>(), any::<bool>(), scope.clone()).prop_map(
            |(back, file, spelling, forget, scope)| Op::RegisterStale {
                back,
                file,
                spelling,
                forget,
                scope
            }
        ),
        5 => (0..64usize, scope.clone()).prop_map(|(pick, scope)| Op::Retain { pick, scope }),
        2 => scope.clone().prop_map(Op::Release),
        2 => scope.clone().prop_map(Op::Touch),
        6 => advance().prop_map(Op::Advance),
        4 => (1..6usize).prop_map(|budget| Op::Expire { budget }),
        1 => (scope, expiry()).prop_map(|(s, e)| Op::SetExpiry(s, e)),
        3 => (0..64usize, prop::bool::weighted(0.3))
            .prop_map(|(pick, failed)| Op::Finish { pick, failed }),
        1 => Just(Op::Retry),
        1 => (0..FILES, any::<bool>()).prop_map(|(ino, failed)| Op::SpuriousFinish { ino, failed }),
        1 => (0..5000usize, 0..500usize).prop_map(|(refs, scopes)| Op::Reserve { refs, scopes }),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    default_max_age: Option<u64>,
    rules: Vec<(String, Expiry)>,
    /// `set_scope_expiry` calls before anything else.
    overrides: Vec<(usize, Expiry)>,
}

fn setup() -> impl Strategy<Value = Setup> {
    let default = prop_oneof![
        Just(None),
        Just(Some(0u64)),
        prop::sample::select(AGES.to_vec()).prop_map(Some),
    ];
    let rules = prop::collection::vec(prop::option::weighted(0.25, expiry()), PREFIXES.len());
    let overrides = prop::collection::vec((0..SCOPES.len(), expiry()), 0..3);
    (default, rules, overrides).prop_map(|(default_max_age, rules, overrides)| Setup {
        default_max_age,
        rules: rules
            .into_iter()
            .zip(PREFIXES)
            .filter_map(|(e, p)| e.map(|e| (p.to_owned(), e)))
            .collect(),
        overrides,
    })
}

fn apply(core: &Core, m: &mut Model, op: &Op) -> TestResult {
    match op {
        Op::Register {
            file,
            spelling,
            forget,
            scope,
            size,
        } => register_op(core, m, *file, *spelling, *forget, *scope, *size, 0)?,
        Op::RegisterPending {
            pick,
            spelling,
            forget,
            scope,
        } => {
            let pending = m.pending(MFile::Deleting);
            if !pending.is_empty() {
                let file = key_index(pending[pick % pending.len()]) as u64;
                prop_assert_eq!(m.files.get(&key(file)), Some(&MFile::Deleting));
                register_op(core, m, file, *spelling, *forget, *scope, 7, 0)?;
            }
        }
        Op::RegisterStale {
            back,
            file,
            spelling,
            forget,
            scope,
        } => register_op(core, m, *file, *spelling, *forget, *scope, 3, *back)?,
        Op::Retain { pick, scope } => {
            let n = m.all_refs.len();
            // 0: a ref never made; i: the i-th most recent ref made.
            let i = pick % (n + 1);
            let id = if i == 0 {
                m.fresh_id()
            } else {
                m.all_refs[n - i]
            };
            let scope = SCOPES[*scope];
            let got = core.retain(now(m), id, scope);
            match m.retain(id, scope) {
                Ok(()) => {
                    if let Err(e) = got {
                        return Err(TestCaseError::fail(format!("retain {id} {scope}: {e}")));
                    }
                }
                Err(()) => prop_assert!(
                    matches!(got, Err(Error::UnknownRef(r)) if r == id),
                    "retain of an unknown ref: {:?}",
                    got
                ),
            }
        }
        Op::Release(scope) => {
            let got = core.release_all(SCOPES[*scope]).unwrap();
            let want = m.release_all(SCOPES[*scope]);
            prop_assert!(!got.more);
            prop_assert!(got.released.iter().all(|(_, s)| &**s == SCOPES[*scope]));
            check_dropped(m, &got, &want)?;
        }
        Op::Touch(scope) => {
            let got = core.touch(now(m), SCOPES[*scope]).unwrap();
            prop_assert_eq!(got, m.touch(SCOPES[*scope]), "touch count");
        }
        Op::Advance(by) => m.now += by,
        Op::Reserve { refs, scopes } => {
            core.reserve(*refs, *scopes);
            core.check_invariants().map_err(TestCaseError::fail)?;
        }
        Op::Expire { budget } => {
            let mut total = Dropped::default();
            for round in 0.. {
                prop_assert!(round < 10_000, "expire never finishes");
                let d = core.expire(now(m), *budget);
                prop_assert!(d.holds as usize <= *budget, "budget exceeded");
                core.check_invariants().map_err(TestCaseError::fail)?;
                total.holds += d.holds;
                total.refs_removed += d.refs_removed;
                total.scopes_removed += d.scopes_removed;
                total.deletions.extend(d.deletions);
                total.released.extend(d.released);
                total.removed.extend(d.removed);
                if !d.more {
                    break;
                }
            }
            let want = m.expire();
            check_dropped(m, &total, &want)?;
        }
        Op::SetExpiry(scope, expiry) => {
            core.set_scope_expiry(SCOPES[*scope], *expiry).unwrap();
            m.set_expiry(SCOPES[*scope], *expiry);
        }
        Op::Finish { pick, failed } => {
            let pending = m.pending(MFile::Deleting);
            if pending.is_empty() {
                return Ok(());
            }
            let file = pending[pick % pending.len()];
            let outcome = if *failed {
                DeleteOutcome::Failed
            } else {
                DeleteOutcome::Deleted
            };
            core.finish_deletion(file, outcome);
            m.finish(file, outcome);
        }
        Op::Retry => {
            let got = core.retry_deletions();
            let want = m.retry();
            check_deletions(m, &got, &want)?;
        }
        Op::SpuriousFinish { ino, failed } => {
            if m.files.get(&key(*ino)) == Some(&MFile::Deleting) {
                return Ok(());
            }
            let outcome = if *failed {
                DeleteOutcome::Failed
            } else {
                DeleteOutcome::Deleted
            };
            core.finish_deletion(key(*ino), outcome);
        }
    }
    Ok(())
}

/// One registration, with a deletion ticket read `back` finished deletions
/// ago (0: current).
#[allow(clippy::too_many_arguments)]
fn register_op(
    core: &Core,
    m: &mut Model,
    file: u64,
    sp: u8,
    forget: bool,
    scope: usize,
    size: u64,
    back: usize,
) -> TestResult {
    let id = m.fresh_id();
    m.all_refs.push(id);
    let path = spelling(file, sp);
    let scope = SCOPES[scope];
    let len = m.deleted_log.len();
    let ticket = len - back % (len + 1);
    let deleted_since = &m.deleted_log[ticket..];
    // The engine stat'ed a file that has been deleted since: the core must
    // notice. A deletion of another file in the same shard may also cause a
    // (harmless, retried) conflict; which files share a shard is not known.
    let must_conflict = deleted_since.contains(&key(file));
    let may_conflict = !deleted_since.is_empty();
    let before = core.stats();
    let attempt = Attempt {
        id,
        file,
        path: &path,
        forget,
        scope,
        size,
    };
    let got = do_register(core, m, ticket as u64, &attempt);
    let conflict = matches!(got, Err(Error::Conflict(_)));
    if must_conflict {
        prop_assert!(conflict, "stale ticket accepted: {:?}", got);
    }
    if conflict {
        prop_assert!(may_conflict, "conflict without a deletion since the ticket");
        prop_assert_eq!(core.stats(), before, "a refused registration changed stats");
        return Ok(());
    }
    match m.register(id, key(file), &path, policy(forget), scope, size) {
        Ok(()) => {
            if let Err(e) = got {
                return Err(TestCaseError::fail(format!("register: {e:?}")));
            }
        }
        Err(()) => {
            check_refused(got)?;
            prop_assert_eq!(core.stats(), before, "a refused registration changed stats");
        }
    }
    Ok(())
}

fn check_refused(got: mediastore_core::Result<()>) -> TestResult {
    match got {
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!(
            "registering a file being deleted: wrong error {e:?}"
        ))),
        Ok(()) => Err(TestCaseError::fail(
            "registered a file that is being deleted",
        )),
    }
}

fn run(setup: &Setup, ops: &[Op]) -> TestResult {
    let core = Core::new(CoreConfig {
        record_drops: true,
        default_max_age: setup.default_max_age.map(Duration::from_nanos),
        scope_rules: setup
            .rules
            .iter()
            .map(|(prefix, expiry)| ScopeRule {
                prefix: prefix.clone(),
                expiry: *expiry,
            })
            .collect(),
    });
    let mut m = Model::new(setup.default_max_age, setup.rules.clone());
    for (scope, expiry) in &setup.overrides {
        core.set_scope_expiry(SCOPES[*scope], *expiry).unwrap();
        m.set_expiry(SCOPES[*scope], *expiry);
    }
    check_all(&core, &m)?;
    for (step, op) in ops.iter().enumerate() {
        apply(&core, &mut m, op)
            .and_then(|()| check_all(&core, &m))
            .map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
    }

    // Tear down: release every scope and finish every deletion handed out;
    // only deletions that failed and were not retried may remain.
    for scope in SCOPES {
        let got = core.release_all(scope).unwrap();
        let want = m.release_all(scope);
        check_dropped(&m, &got, &want)?;
    }
    for file in m.pending(MFile::Deleting) {
        core.finish_deletion(file, DeleteOutcome::Deleted);
        m.finish(file, DeleteOutcome::Deleted);
    }
    check_all(&core, &m)?;
    let failed = m.pending(MFile::Failed).len() as u64;
    prop_assert_eq!(
        core.stats(),
        CoreStats {
            pending_deletions: failed,
            ..CoreStats::default()
        },
        "leak after releasing everything"
    );
    let retried = core.retry_deletions();
    let want = m.retry();
    check_deletions(&m, &retried, &want)?;
    for d in &retried {
        core.finish_deletion(d.file, DeleteOutcome::Deleted);
    }
    prop_assert_eq!(core.stats(), CoreStats::default(), "leak at the end");
    for ino in 0..FILES {
        prop_assert_eq!(core.file_status(key(ino)), None);
    }
    prop_assert_eq!(core.next_deadline(), None);
    core.check_invariants().map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn core_matches_model(setup in setup(), ops in prop::collection::vec(op(), 1..150)) {
        run(&setup, &ops)?;
    }
}

// ---------------------------------------------------------------------------
// Hand-picked sequences (documentation of the contract, and regressions)
// ---------------------------------------------------------------------------

fn reg(ino: u64, forget: bool, scope: usize) -> Op {
    Op::Register {
        file: ino,
        spelling: 0,
        forget,
        scope,
        size: 1,
    }
}

fn plain(default_max_age: Option<u64>) -> Setup {
    Setup {
        default_max_age,
        rules: Vec::new(),
        overrides: Vec::new(),
    }
}

#[test]
fn exactly_max_age_survives_and_one_more_nano_expires() {
    let ops = [
        reg(0, false, 0),
        Op::Advance(25),
        Op::Expire { budget: 5 },
        Op::Advance(1),
        Op::Expire { budget: 5 },
    ];
    run(&plain(Some(25)), &ops).unwrap();
}

#[test]
fn forget_only_pins_for_the_whole_life_then_unpins() {
    let ops = [
        reg(1, true, 0),
        reg(1, false, 1),
        Op::Release(0),
        Op::Release(1), // pinned: no deletion
        reg(1, false, 2),
        Op::Release(2), // new life, unpinned: deleted
        Op::Finish {
            pick: 0,
            failed: true,
        },
        reg(1, false, 3), // revives the failed file
        Op::Retry,        // nothing to retry any more
        Op::Release(3),
        Op::RegisterPending {
            pick: 0,
            spelling: 1,
            forget: false,
            scope: 4,
        },
    ];
    run(&plain(None), &ops).unwrap();
}

#[test]
fn touch_and_retain_renew_holds() {
    let ops = [
        reg(2, false, 0),
        reg(3, false, 0),
        Op::Advance(20),
        Op::Touch(0),
        Op::Retain { pick: 2, scope: 1 },
        Op::Advance(20),
        Op::Expire { budget: 1 },
        Op::Retain { pick: 1, scope: 0 },
        Op::Advance(10),
        Op::Expire { budget: 1 },
        Op::Advance(1),
        Op::Expire { budget: 1 },
    ];
    run(&plain(Some(25)), &ops).unwrap();
}

fn register_plain(
    core: &Core,
    id: MediaRef,
    file: u64,
    forget: bool,
    scope: &str,
) -> Result<(), Error> {
    let meta = MediaMeta::new("a.jpg", "image/jpeg", "test");
    core.register(
        Timestamp(T0),
        Registration {
            id,
            ticket: core.deletion_ticket(),
            file: key(file),
            path: &spelling(file, 0),
            size: 1,
            meta: &meta,
            policy: policy(forget),
            scope,
        },
    )
}

// Regression: a registration refused after the file was counted (duplicate
// ref id, full shard) used to leave the file pinned or drop its failed
// deletion from the retry list. Refusals now happen before counting.

#[test]
fn refused_registration_does_not_pin_the_file() {
    let core = Core::new(CoreConfig::default());
    let a = ref_from(1);
    register_plain(&core, a, 0, false, "s0").unwrap();
    let dup = register_plain(&core, a, 0, true, "s1");
    assert!(matches!(dup, Err(Error::InvalidRef { .. })), "{dup:?}");
    assert_eq!(core.stats().scopes, 1);
    assert_eq!(
        core.file_status(key(0)),
        Some(FileStatus {
            refs: 1,
            pinned: false, // core: true
            state: FileState::Live,
        })
    );
    // The only ref ever registered was delete_on_cleanup: the file must go.
    let dropped = core.release_all("s0").unwrap();
    assert_eq!(dropped.deletions.len(), 1, "file leaked");
}

#[test]
fn refused_registration_keeps_a_failed_deletion() {
    let core = Core::new(CoreConfig::default());
    register_plain(&core, ref_from(1), 0, false, "s0").unwrap();
    let dropped = core.release_all("s0").unwrap();
    core.finish_deletion(dropped.deletions[0].file, DeleteOutcome::Failed);
    let live = ref_from(2);
    register_plain(&core, live, 1, false, "s1").unwrap();
    // Same id again, for the file whose deletion failed: refused...
    let dup = register_plain(&core, live, 0, false, "s2");
    assert!(matches!(dup, Err(Error::InvalidRef { .. })), "{dup:?}");
    // ...so the failed deletion must still be there to retry.
    assert_eq!(core.stats().pending_deletions, 1); // core: 0
    assert_eq!(core.retry_deletions().len(), 1, "failed deletion forgotten");
}

// ---------------------------------------------------------------------------
// Multithreaded stress: no file is handed out while a ref to it can exist
// ---------------------------------------------------------------------------

const STRESS_THREADS: usize = 4;
const STRESS_OPS: usize = 4_000;
const STRESS_ROUNDS: u64 = 16;
const STRESS_KEYS: usize = 10;
const STRESS_SCOPES: [&str; 6] = ["t:0", "t:1", "t:2", "t:3", "session:a", "session:b"];

struct Shared {
    core: Core,
    clock: AtomicU64,
    /// Per key: odd while a deletion handed out by the core is being worked
    /// on (set after the handout, made even again before `finish_deletion`).
    phase: Vec<AtomicU64>,
    /// Per key: a deletion is outstanding.
    handed: Vec<AtomicBool>,
    /// Per key: refs registered to it (most recent last).
    known: Vec<Mutex<Vec<MediaRef>>>,
    /// Recently registered refs, for retains.
    recent: Mutex<Vec<MediaRef>>,
    violations: Mutex<Vec<String>>,
    deletions: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// Plays the engine: checks the file really has no refs, "deletes" it,
    /// reports back.
    fn handle(&self, d: Deletion, fail: bool) {
        let k = key_index(d.file);
        self.deletions.fetch_add(1, Ordering::Relaxed);
        if self.handed[k].swap(true, Ordering::SeqCst) {
            self.violation(format!("{:?} handed out while already pending", d.file));
        }
        self.phase[k].fetch_add(1, Ordering::SeqCst);
        for _ in 0..3 {
            let status = self.core.file_status(d.file);
            if !matches!(
                status,
                Some(FileStatus {
                    refs: 0,
                    state: FileState::Deleting,
                    ..
                })
            ) {
                self.violation(format!("{:?} handed out but status {status:?}", d.file));
            }
            let known = self.known[k].lock().unwrap();
            for id in known.iter().rev().take(64) {
                if self.core.resolve(*id).is_ok() {
                    self.violation(format!("{id} resolves while {:?} is deleted", d.file));
                }
            }
            drop(known);
            std::thread::yield_now();
        }
        self.phase[k].fetch_add(1, Ordering::SeqCst);
        self.handed[k].store(false, Ordering::SeqCst);
        let outcome = if fail {
            DeleteOutcome::Failed
        } else {
            DeleteOutcome::Deleted
        };
        self.core.finish_deletion(d.file, outcome);
    }
}

fn stress_thread(sh: &Shared, round: u64, t: usize) {
    let mut rng = splitmix((round << 8) + t as u64 + 1);
    let mut next = move || {
        rng = splitmix(rng);
        rng
    };
    let meta = MediaMeta::new("x.jpg", "image/jpeg", "stress");
    for i in 0..STRESS_OPS {
        let now = Timestamp(sh.clock.fetch_add(next() % 4, Ordering::Relaxed));
        let r = next();
        let scope = STRESS_SCOPES[(r >> 8) as usize % STRESS_SCOPES.len()];
        let k = (r >> 16) as usize % STRESS_KEYS;
        let fail = (r >> 24) % 8 == 0;
        match r % 100 {
            0..=29 => {
                let id = ref_from(((t as u64) << 40) | i as u64);
                let path = spelling(k as u64, (r >> 32) as u8);
                let before = sh.phase[k].load(Ordering::SeqCst);
                let got = sh.core.register(
                    now,
                    Registration {
                        id,
                        ticket: sh.core.deletion_ticket(),
                        file: key(k as u64),
                        path: &path,
                        size: 1,
                        meta: &meta,
                        policy: policy((r >> 40) % 20 == 0),
                        scope,
                    },
                );
                let after = sh.phase[k].load(Ordering::SeqCst);
                match got {
                    Ok(()) => {
                        if before == after && before % 2 == 1 {
                            sh.violation(format!(
                                "{id} registered to {k} while its deletion was outstanding"
                            ));
                        }
                        sh.known[k].lock().unwrap().push(id);
                        let mut recent = sh.recent.lock().unwrap();
                        if recent.len() >= 256 {
                            let at = (r >> 48) as usize % recent.len();
                            recent[at] = id;
                        } else {
                            recent.push(id);
                        }
                    }
                    Err(e) if e.is_not_found() || matches!(e, Error::Conflict(_)) => {
                        sh.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => sh.violation(format!("register failed: {e}")),
                }
            }
            30..=44 => {
                let id = {
                    let recent = sh.recent.lock().unwrap();
                    if recent.is_empty() {
                        continue;
                    }
                    recent[(r >> 48) as usize % recent.len()]
                };
                match sh.core.retain(now, id, scope) {
                    Ok(()) | Err(Error::UnknownRef(_)) => {}
                    Err(e) => sh.violation(format!("retain failed: {e}")),
                }
            }
            45..=64 => {
                for d in sh.core.release_all(scope).unwrap().deletions {
                    sh.handle(d, fail);
                }
            }
            65..=69 => {
                sh.core.touch(now, scope).unwrap();
            }
            70..=87 => loop {
                let d = sh.core.expire(now, 1 + (r >> 48) as usize % 16);
                for del in d.deletions {
                    sh.handle(del, fail);
                }
                if !d.more {
                    break;
                }
            },
            88..=91 => {
                let expiry = match (r >> 48) % 3 {
                    0 => Expiry::Default,
                    1 => Expiry::Never,
                    _ => Expiry::After(Duration::from_nanos(50 + (r >> 52) % 200)),
                };
                sh.core.set_scope_expiry(scope, expiry).unwrap();
            }
            92..=94 => {
                for d in sh.core.retry_deletions() {
                    sh.handle(d, false);
                }
            }
            _ => {
                let _ = sh.core.refs_in(scope).unwrap();
                let _ = sh.core.stats();
            }
        }
    }
}

/// One round on a fresh core; returns (deletions handed out, registrations
/// refused).
fn stress_round(round: u64) -> (u64, u64) {
    let sh = Arc::new(Shared {
        core: Core::new(CoreConfig {
            record_drops: false,
            default_max_age: Some(Duration::from_nanos(120)),
            scope_rules: vec![ScopeRule {
                prefix: "session:".into(),
                expiry: Expiry::After(Duration::from_nanos(400)),
            }],
        }),
        clock: AtomicU64::new(T0),
        phase: (0..STRESS_KEYS).map(|_| AtomicU64::new(0)).collect(),
        handed: (0..STRESS_KEYS).map(|_| AtomicBool::new(false)).collect(),
        known: (0..STRESS_KEYS).map(|_| Mutex::new(Vec::new())).collect(),
        recent: Mutex::new(Vec::new()),
        violations: Mutex::new(Vec::new()),
        deletions: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let threads: Vec<_> = (0..STRESS_THREADS)
        .map(|t| {
            let sh = sh.clone();
            std::thread::spawn(move || stress_thread(&sh, round, t))
        })
        .collect();
    let joined: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    // Report what the checks saw before any panic of a worker.
    let violations = sh.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    for result in joined {
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
    sh.core.check_invariants().unwrap();

    for scope in STRESS_SCOPES {
        for d in sh.core.release_all(scope).unwrap().deletions {
            sh.handle(d, false);
        }
    }
    loop {
        let retried = sh.core.retry_deletions();
        if retried.is_empty() {
            break;
        }
        for d in retried {
            sh.handle(d, false);
        }
    }
    sh.core.check_invariants().unwrap();
    assert_eq!(sh.core.stats(), CoreStats::default());
    assert_eq!(sh.core.next_deadline(), None);
    for k in 0..STRESS_KEYS {
        assert_eq!(sh.core.file_status(key(k as u64)), None);
        for id in sh.known[k].lock().unwrap().iter() {
            assert!(matches!(sh.core.resolve(*id), Err(Error::UnknownRef(_))));
        }
    }
    let violations = sh.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    (
        sh.deletions.load(Ordering::Relaxed),
        sh.refused.load(Ordering::Relaxed),
    )
}

#[test]
fn concurrent_stress_never_deletes_a_referenced_file() {
    let (mut deletions, mut refused) = (0, 0);
    for round in 0..STRESS_ROUNDS {
        let (d, r) = stress_round(round);
        deletions += d;
        refused += r;
    }
    eprintln!("stress: {deletions} deletions handed out, {refused} registrations refused");
    // The test is only meaningful if the race was actually exercised.
    assert!(deletions > 50 * STRESS_ROUNDS, "too few deletions");
}
