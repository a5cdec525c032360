//! Local-file adapter: the stats, ownership checks and unlinks the core asks
//! for. Everything that touches the filesystem on behalf of an engine is here.

use std::fs::{self, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, OwnedFd};

use mediastore_core::{CleanupPolicy, Deletion, Error, FileKey, Result};
use parking_lot::RwLock;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

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

/// `statx` of the entry `name` of `dir` itself (a symlink is not followed),
/// with what [`statx_key`] needs.
pub fn statx_at(
    dir: impl AsFd,
    name: impl rustix::path::Arg,
) -> rustix::io::Result<rustix::fs::Statx> {
    rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )
}

/// The identity of a file from a `statx` that asked for its birth time, as
/// [`file_key`] computes it from std's metadata.
pub fn statx_key(st: &rustix::fs::Statx) -> FileKey {
    let born = if st.stx_mask & StatxFlags::BTIME.bits() != 0 && st.stx_btime.tv_sec >= 0 {
        (st.stx_btime.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(st.stx_btime.tv_nsec))
    } else {
        0
    };
    FileKey {
        dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        born,
    }
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
    /// An `O_PATH` descriptor of each root, the anchor of every deletion.
    fds: Vec<OwnedFd>,
    /// Caller's absolute parent directory → is it under a root.
    dirs: RwLock<std::collections::HashMap<PathBuf, bool>>,
}

const DIR_CACHE_MAX: usize = 4096;

impl OwnedRoots {
    /// Canonicalises each root; a root that does not exist is a config error.
    pub fn new(roots: &[PathBuf]) -> Result<Self> {
        let mut canon = Vec::with_capacity(roots.len());
        let mut fds = Vec::with_capacity(roots.len());
        for r in roots {
            let c = fs::canonicalize(r)
                .map_err(|e| Error::InvalidConfig(format!("owned root {}: {e}", r.display())))?;
            if !c.is_dir() {
                return Err(Error::InvalidConfig(format!(
                    "owned root {} is not a directory",
                    r.display()
                )));
            }
            let fd = rustix::fs::open(
                &c,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::InvalidConfig(format!("owned root {}: {e}", r.display())))?;
            fds.push(fd);
            canon.push(c);
        }
        Ok(Self {
            fds,
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
    /// Removed, or already gone, or replaced by another file (left alone).
    Done {
        /// 1 when this call unlinked the file (under one or more names),
        /// 0 when there was nothing to unlink.
        files: u64,
        /// Bytes the unlinked file held.
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

/// What one attempt on one spelling found.
enum Unlink {
    /// Unlinked; the file's size.
    Removed(u64),
    /// Nothing to do here: gone already, or the name now holds another file.
    NotThere,
    /// Could not be done; the reason, and whether a retry may help.
    Failed(PathBuf, String, bool),
}

impl OwnedRoots {
    /// Unlinks `spelling` through the descriptor of the owned root it lies
    /// under: the parent is resolved by `openat2(RESOLVE_BENEATH)`, which the
    /// kernel refuses to let escape the root (a directory swapped for a
    /// symlink after registration included), and the name is checked and
    /// unlinked relative to that directory, so nothing can be swapped under
    /// the checked path either. Three one-component lookups instead of
    /// canonicalising the whole path. `None`: this spelling needs the
    /// canonicalising path (relative, outside the roots' canonical
    /// spelling, a symlink itself, or a kernel without `openat2`).
    fn unlink_beneath(&self, spelling: &Path, want: FileKey) -> Option<Unlink> {
        let (fd, rel) = self
            .roots
            .iter()
            .zip(&self.fds)
            .find_map(|(root, fd)| Some((fd, spelling.strip_prefix(root).ok()?)))?;
        let name = rel.file_name()?;
        let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
        let fail = |e: rustix::io::Errno, retry| {
            Unlink::Failed(
                spelling.to_path_buf(),
                io::Error::from(e).to_string(),
                retry,
            )
        };
        let opened;
        let dir = match parent {
            None => fd.as_fd(),
            Some(parent) => {
                match rustix::fs::openat2(
                    fd,
                    parent,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
                ) {
                    Ok(d) => {
                        opened = d;
                        opened.as_fd()
                    }
                    // EXDEV: the walk met an absolute symlink or would leave
                    // the root. Either may still end inside a root; the
                    // canonicalising path decides (and refuses an escape).
                    Err(Errno::NOSYS | Errno::XDEV) => return None,
                    Err(Errno::NOENT | Errno::NOTDIR) => return Some(Unlink::NotThere),
                    Err(e) => return Some(fail(e, true)),
                }
            }
        };
        let st = match statx_at(dir, name) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Some(Unlink::NotThere),
            Err(Errno::NOSYS) => return None,
            Err(e) => return Some(fail(e, true)),
        };
        if u32::from(st.stx_mode) & 0o170000 == 0o120000 {
            return None;
        }
        let key = statx_key(&st);
        if key != want {
            tracing::info!(path = %spelling.display(), "file was replaced since registration; left in place");
            return Some(Unlink::NotThere);
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => Some(Unlink::Removed(st.stx_size)),
            Err(Errno::NOENT) => Some(Unlink::NotThere),
            Err(e) => Some(fail(e, true)),
        }
    }

    /// The canonicalising path: resolve the whole spelling, check it lies
    /// under a root and is still the same file, unlink it.
    fn unlink_canonical(&self, spelling: &Path, want: FileKey, seen: &mut Vec<PathBuf>) -> Unlink {
        let canon = match fs::canonicalize(spelling) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Unlink::NotThere,
            Err(e) => return Unlink::Failed(spelling.to_path_buf(), e.to_string(), true),
        };
        if seen.contains(&canon) {
            return Unlink::NotThere;
        }
        if !self.contains_canonical(&canon) {
            return Unlink::Failed(
                canon,
                "resolves outside every owned root; not deleted".into(),
                false,
            );
        }
        let meta = match fs::symlink_metadata(&canon) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Unlink::NotThere,
            Err(e) => return Unlink::Failed(canon, e.to_string(), true),
        };
        if file_key(&meta) != want {
            tracing::info!(path = %canon.display(), "file was replaced since registration; left in place");
            return Unlink::NotThere;
        }
        let result = match fs::remove_file(&canon) {
            Ok(()) => Unlink::Removed(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Unlink::NotThere,
            Err(e) => Unlink::Failed(canon.clone(), e.to_string(), true),
        };
        seen.push(canon);
        result
    }
}

/// Deletes a file the core handed out: every registered spelling is
/// unlinked if it lies under an owned root and still names the same file
/// (device, inode, birth time); a spelling that now names another file
/// (replaced behind the store's back) is left alone, and so is a symlink
/// spelling (it is not the file; its target is one of the other spellings,
/// or is resolved through it).
pub fn delete_file(d: &Deletion, roots: &OwnedRoots) -> Deleted {
    let mut files = 0;
    let mut bytes = 0;
    let mut seen: Vec<PathBuf> = Vec::new();
    for spelling in &d.paths {
        let outcome = match roots.unlink_beneath(spelling, d.file) {
            Some(o) => o,
            None => roots.unlink_canonical(spelling, d.file, &mut seen),
        };
        match outcome {
            Unlink::Removed(size) => {
                files = 1;
                bytes = size;
            }
            Unlink::NotThere => {}
            Unlink::Failed(path, error, retry) => return Deleted::Failed { path, error, retry },
        }
    }
    Deleted::Done { files, bytes }
}
