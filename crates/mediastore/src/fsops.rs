//! Local-file adapter: the stats, ownership checks and unlinks the core asks
//! for. Everything that touches the filesystem on behalf of an engine is here.

use std::fs::{self, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use mediastore_core::{CleanupPolicy, Deletion, Error, FileKey, Result};
use parking_lot::RwLock;

/// Identity of a file from its metadata.
#[cfg(unix)]
pub fn file_key(meta: &Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    // std fills birth time from the same statx call where the kernel and
    // filesystem support it, so this costs no extra syscall.
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
        born,
    }
}

/// What `store` learns about a file with (usually) one syscall.
pub struct Statted {
    /// Its identity.
    pub key: FileKey,
    /// Its size.
    pub size: u64,
    /// True when the caller's path is a symlink (ownership must then be
    /// judged on the target, not the link's directory).
    pub via_symlink: bool,
}

/// Stats a caller's path for registration: it must exist and be a regular
/// file (after following symlinks).
pub fn stat_for_store(path: &Path) -> Result<Statted> {
    let lmeta = fs::symlink_metadata(path).map_err(|e| Error::file(path, e))?;
    let (meta, via_symlink) = if lmeta.file_type().is_symlink() {
        (fs::metadata(path).map_err(|e| Error::file(path, e))?, true)
    } else {
        (lmeta, false)
    };
    if !meta.is_file() {
        return Err(Error::file(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    Ok(Statted {
        key: file_key(&meta),
        size: meta.len(),
        via_symlink,
    })
}

/// The directories under which the store may delete files.
///
/// Checked twice: at registration (to refuse `delete_on_cleanup` outside them
/// with a typed error) through a cache of canonical parent directories, and
/// again at deletion on the freshly canonicalised path, which is the check
/// that guarantees nothing outside is ever removed even if a directory was
/// swapped for a symlink after registration.
pub struct OwnedRoots {
    roots: Vec<PathBuf>,
    /// Caller's absolute parent directory → is it under a root.
    dirs: RwLock<std::collections::HashMap<PathBuf, bool>>,
}

const DIR_CACHE_MAX: usize = 4096;

impl OwnedRoots {
    /// Canonicalises each root; a root that does not exist is a config error.
    pub fn new(roots: &[PathBuf]) -> Result<Self> {
        let mut canon = Vec::with_capacity(roots.len());
        for r in roots {
            let c = fs::canonicalize(r)
                .map_err(|e| Error::InvalidConfig(format!("owned root {}: {e}", r.display())))?;
            if !c.is_dir() {
                return Err(Error::InvalidConfig(format!(
                    "owned root {} is not a directory",
                    r.display()
                )));
            }
            canon.push(c);
        }
        Ok(Self {
            roots: canon,
            dirs: RwLock::new(Default::default()),
        })
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn contains_canonical(&self, canon: &Path) -> bool {
        self.roots.iter().any(|r| canon.starts_with(r))
    }

    /// Is the file at `path` (already statted) under an owned root?
    pub fn owns(&self, path: &Path, st: &Statted) -> Result<bool> {
        if self.roots.is_empty() {
            return Ok(false);
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let cacheable = !st.via_symlink && parent.is_some_and(|p| p.is_absolute());
        if cacheable {
            let parent = parent.expect("checked");
            if let Some(&owned) = self.dirs.read().get(parent) {
                return Ok(owned);
            }
            let owned = match fs::canonicalize(parent) {
                Ok(c) => self.contains_canonical(&c),
                Err(e) => return Err(Error::file(path, e)),
            };
            let mut dirs = self.dirs.write();
            if dirs.len() >= DIR_CACHE_MAX {
                dirs.clear();
            }
            dirs.insert(parent.to_path_buf(), owned);
            return Ok(owned);
        }
        let canon = fs::canonicalize(path).map_err(|e| Error::file(path, e))?;
        Ok(self.contains_canonical(&canon))
    }

    /// Decides the policy of a registration: by location when the caller
    /// left it open, refused when it asks to delete a file it does not own.
    pub fn decide(
        &self,
        path: &Path,
        st: &Statted,
        asked: Option<CleanupPolicy>,
    ) -> Result<CleanupPolicy> {
        match asked {
            Some(CleanupPolicy::ForgetOnly) => Ok(CleanupPolicy::ForgetOnly),
            Some(CleanupPolicy::DeleteOnCleanup) => {
                if self.owns(path, st)? {
                    Ok(CleanupPolicy::DeleteOnCleanup)
                } else {
                    Err(Error::NotOwned {
                        path: path.to_path_buf(),
                    })
                }
            }
            None => Ok(if self.owns(path, st)? {
                CleanupPolicy::DeleteOnCleanup
            } else {
                CleanupPolicy::ForgetOnly
            }),
        }
    }
}

/// How one deletion went.
pub enum Deleted {
    /// Removed (or already gone); bytes freed.
    Done {
        /// Names unlinked.
        files: u64,
        /// Bytes of the file.
        bytes: u64,
    },
    /// Could not be removed.
    Failed {
        /// The path tried.
        path: PathBuf,
        /// Why.
        error: String,
        /// Whether a retry might help.
        retry: bool,
    },
}

/// Deletes a file the core handed out: every registered spelling is
/// canonicalised, checked to lie under an owned root, checked to still be
/// the same file (device + inode), and only then unlinked. A spelling that
/// now names another file (replaced behind the store's back) is left alone.
pub fn delete_file(d: &Deletion, roots: &OwnedRoots) -> Deleted {
    let mut files = 0;
    let mut bytes = 0;
    let mut seen: Vec<PathBuf> = Vec::with_capacity(1);
    for spelling in &d.paths {
        let canon = match fs::canonicalize(spelling) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Deleted::Failed {
                    path: spelling.to_path_buf(),
                    error: e.to_string(),
                    retry: true,
                };
            }
        };
        if seen.contains(&canon) {
            continue;
        }
        if !roots.contains_canonical(&canon) {
            return Deleted::Failed {
                path: canon,
                error: "resolves outside every owned root; not deleted".into(),
                retry: false,
            };
        }
        let meta = match fs::symlink_metadata(&canon) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Deleted::Failed {
                    path: canon,
                    error: e.to_string(),
                    retry: true,
                };
            }
        };
        if file_key(&meta) != d.file {
            tracing::info!(path = %canon.display(), "file was replaced since registration; left in place");
            continue;
        }
        match fs::remove_file(&canon) {
            Ok(()) => {
                files += 1;
                bytes = meta.len();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Deleted::Failed {
                    path: canon,
                    error: e.to_string(),
                    retry: true,
                };
            }
        }
        seen.push(canon);
    }
    Deleted::Done {
        files: files.min(1),
        bytes,
    }
}
