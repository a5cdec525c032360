//! A faithful port of the seed's `FileMediaStore` (the Go original) behind
//! our API, *including its defects*: one lock over maps keyed by path
//! string, sweeps that scan every ref under the exclusive lock, and a
//! release that unlocks before it unlinks (the deletion race of DESIGN.md
//! §3.1).
//!
//! It exists to be measured and tested against, never used: the race test
//! shows the conformance harness catches its race, and the benchmarks time
//! it in the same run as our engines. Operations the seed lacks (`retain`,
//! `touch`, per-scope expiry) are inert or refused.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    CleanupPolicy, Clock, Error, Expiry, FileKey, FileState, FileStatus, MediaMeta, MediaRef,
    MediaStore, ReleaseReport, Resolved, Result, Stats, SweepReport, Timestamp,
};
use parking_lot::RwLock;

/// `pathRefState` of the seed.
#[derive(Clone, Copy, Default)]
struct PathRefState {
    ref_count: u32,
    delete_eligible: bool,
}

/// The maps of the seed's `FileMediaStore`, guarded by one lock. A ref's
/// `mediaEntry` (path, meta, storedAt) is kept as the `Resolved` that
/// `resolve_with_meta` hands out.
#[derive(Default)]
struct Maps {
    refs: HashMap<MediaRef, Arc<Resolved>>,
    scope_to_refs: HashMap<String, HashSet<MediaRef>>,
    ref_to_scope: HashMap<MediaRef, String>,
    ref_to_path: HashMap<MediaRef, OsString>,
    path_states: HashMap<OsString, PathRefState>,
}

impl Maps {
    /// `releaseRefLocked`: forgets the ref and returns its path when that
    /// was the path's last ref and the path may be deleted.
    fn release_ref_locked(
        &mut self,
        r: MediaRef,
        fallback_path: Option<OsString>,
    ) -> Option<OsString> {
        let mut path = fallback_path;
        if let Some(stored) = self.ref_to_path.remove(&r) {
            path = Some(stored);
        }
        self.refs.remove(&r);
        self.ref_to_scope.remove(&r);
        let path = path?;
        let state = self.path_states.get_mut(&path)?;
        if state.ref_count <= 1 {
            let eligible = state.delete_eligible;
            self.path_states.remove(&path);
            return eligible.then_some(path);
        }
        state.ref_count -= 1;
        None
    }
}

/// The seed's algorithm behind our API.
pub struct SeedStore {
    maps: RwLock<Maps>,
    max_age: Option<Duration>,
    clock: Arc<dyn Clock>,
}

impl SeedStore {
    /// A store that expires refs older than `max_age` on `clean_expired`
    /// (none when `None` or zero), reading time from `clock`.
    pub fn new(max_age: Option<Duration>, clock: impl Clock) -> Self {
        Self {
            maps: RwLock::new(Maps::default()),
            max_age,
            clock: Arc::new(clock),
        }
    }

    /// The seed's `Store`.
    fn store_sync(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        let st = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
        let r = MediaRef::from_random_bytes(uuid::Uuid::new_v4().into_bytes());
        // normalizeCleanupPolicy: an empty policy means delete_on_cleanup.
        let policy = meta.policy.unwrap_or(CleanupPolicy::DeleteOnCleanup);
        let meta = meta.clone().with_policy(policy);
        let key = OsString::from(path.as_os_str());

        let mut m = self.maps.write();
        let entry = Resolved {
            id: r,
            path: Arc::from(path),
            meta: Arc::new(meta),
            stored_at: self.clock.timestamp(),
            // Not used by the seed; filled from the stat it already made.
            file: FileKey {
                dev: st.dev(),
                ino: st.ino(),
                born: 0,
            },
        };
        m.refs.insert(r, Arc::new(entry));
        m.scope_to_refs
            .entry(scope.to_owned())
            .or_default()
            .insert(r);
        m.ref_to_scope.insert(r, scope.to_owned());
        m.ref_to_path.insert(r, key.clone());
        let state = m.path_states.entry(key).or_default();
        if state.ref_count == 0 {
            state.delete_eligible = policy == CleanupPolicy::DeleteOnCleanup;
        } else if policy == CleanupPolicy::ForgetOnly {
            state.delete_eligible = false;
        }
        state.ref_count += 1;
        Ok(r)
    }

    /// The seed's `Resolve` / `ResolveWithMeta`.
    fn resolve_sync(&self, r: MediaRef) -> Result<Arc<Resolved>> {
        self.maps
            .read()
            .refs
            .get(&r)
            .cloned()
            .ok_or(Error::UnknownRef(r))
    }

    /// The seed's `ReleaseAll`: phase 1 under the lock, phase 2 (unlink)
    /// after it is released — the gap §3.1 is about.
    fn release_sync(&self, scope: &str) -> ReleaseReport {
        let mut paths = Vec::new();
        let mut m = self.maps.write();
        let Some(refs) = m.scope_to_refs.get(scope).cloned() else {
            return ReleaseReport::default();
        };
        for &r in &refs {
            let fallback = m.refs.get(&r).map(|e| e.path.as_os_str().to_owned());
            if let Some(p) = m.release_ref_locked(r, fallback) {
                paths.push(p);
            }
        }
        m.scope_to_refs.remove(scope);
        drop(m);

        let mut report = ReleaseReport {
            refs_released: refs.len() as u64,
            refs_removed: refs.len() as u64,
            ..ReleaseReport::default()
        };
        for p in paths {
            // The seed logs other errors and ignores not-found.
            if std::fs::remove_file(&p).is_ok() {
                report.files_deleted += 1;
            }
        }
        report
    }

    /// The seed's `CleanExpired`, same two phases.
    fn clean_expired_sync(&self) -> SweepReport {
        let Some(max_age) = self.max_age.filter(|a| !a.is_zero()) else {
            return SweepReport::default();
        };
        let mut m = self.maps.write();
        let cutoff = Timestamp::from_system(self.clock.now() - max_age);
        let expired: Vec<(MediaRef, OsString)> = m
            .refs
            .iter()
            .filter(|(_, e)| e.stored_at < cutoff)
            .map(|(r, e)| (*r, e.path.as_os_str().to_owned()))
            .collect();
        let mut report = SweepReport::default();
        let mut paths = Vec::new();
        for (r, path) in expired {
            if let Some(scope) = m.ref_to_scope.get(&r).cloned() {
                if let Some(scope_refs) = m.scope_to_refs.get_mut(&scope) {
                    scope_refs.remove(&r);
                    if scope_refs.is_empty() {
                        m.scope_to_refs.remove(&scope);
                        report.scopes_removed += 1;
                    }
                }
            }
            if let Some(p) = m.release_ref_locked(r, Some(path)) {
                paths.push(p);
            }
            report.refs_expired += 1;
            report.holds_expired += 1;
        }
        drop(m);
        for p in paths {
            if std::fs::remove_file(&p).is_ok() {
                report.files_deleted += 1;
            }
        }
        report
    }
}

impl MediaStore for SeedStore {
    async fn store(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        self.store_sync(path, meta, scope)
    }

    async fn resolve(&self, media_ref: MediaRef) -> Result<Arc<Path>> {
        Ok(self.resolve_sync(media_ref)?.path.clone())
    }

    async fn resolve_with_meta(&self, media_ref: MediaRef) -> Result<Arc<Resolved>> {
        self.resolve_sync(media_ref)
    }

    async fn open(&self, media_ref: MediaRef) -> Result<(File, Arc<Resolved>)> {
        let resolved = self.resolve_sync(media_ref)?;
        let file = File::open(&resolved.path).map_err(|e| Error::file(&*resolved.path, e))?;
        Ok((file, resolved))
    }

    async fn retain(&self, _media_ref: MediaRef, _scope: &str) -> Result<()> {
        Err(Error::InvalidConfig("the seed has no retain".into()))
    }

    async fn release_all(&self, scope: &str) -> Result<ReleaseReport> {
        Ok(self.release_sync(scope))
    }

    async fn touch(&self, _scope: &str) -> Result<usize> {
        Ok(0)
    }

    async fn set_scope_expiry(&self, _scope: &str, _expiry: Expiry) -> Result<()> {
        Ok(())
    }

    async fn clean_expired(&self) -> Result<SweepReport> {
        Ok(self.clean_expired_sync())
    }

    async fn scopes_of(&self, media_ref: MediaRef) -> Result<Vec<String>> {
        let m = self.maps.read();
        let scope = m
            .ref_to_scope
            .get(&media_ref)
            .ok_or(Error::UnknownRef(media_ref))?;
        Ok(vec![scope.clone()])
    }

    async fn refs_in(&self, scope: &str) -> Result<Vec<MediaRef>> {
        let m = self.maps.read();
        let mut refs: Vec<&Arc<Resolved>> = m
            .scope_to_refs
            .get(scope)
            .into_iter()
            .flatten()
            .filter_map(|r| m.refs.get(r))
            .collect();
        refs.sort_by_key(|e| e.stored_at);
        Ok(refs.into_iter().map(|e| e.id).collect())
    }

    async fn file_status(&self, path: &Path) -> Result<Option<FileStatus>> {
        let m = self.maps.read();
        Ok(m.path_states.get(path.as_os_str()).map(|s| FileStatus {
            refs: s.ref_count,
            pinned: !s.delete_eligible,
            state: FileState::Live,
        }))
    }

    async fn stats(&self) -> Result<Stats> {
        let m = self.maps.read();
        Ok(Stats {
            refs: m.refs.len() as u64,
            scopes: m.scope_to_refs.len() as u64,
            holds: m.refs.len() as u64,
            files: m.path_states.len() as u64,
            pending_deletions: 0,
        })
    }

    fn expiry_configured(&self) -> bool {
        self.max_age.is_some_and(|a| !a.is_zero())
    }
}
