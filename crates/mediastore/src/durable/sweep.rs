//! Walking the managed dir through directory descriptors.
//!
//! Every entry is examined and removed relative to a descriptor of its own
//! directory, opened without following symlinks. So a shard dir or the
//! ingest dir swapped for a symlink while a sweep runs can never make the
//! sweep look at, or delete, anything outside the managed dir.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mediastore_core::{Error, FileKey, Result};
use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

/// One entry of a directory, as the sweep sees it.
pub struct Entry {
    /// Its name in the directory.
    pub name: std::ffi::CString,
    /// What it is (never followed).
    pub kind: FileType,
    /// Its identity.
    pub key: FileKey,
    /// Its size in bytes.
    pub size: u64,
    /// How long ago it was last modified.
    pub age: Duration,
}

impl Entry {
    /// The name as a path component.
    pub fn name(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.name.as_bytes()))
    }
}

/// Opens a directory for the sweep: never through a symlink.
pub fn open_dir(at: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Opens the managed dir itself.
pub fn open_root(path: &Path) -> Result<OwnedFd> {
    open_dir(CWD, path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// The entries of the directory `dir` (`.` and `..` left out), each
/// stat'ed without following symlinks. Entries that vanish meanwhile are
/// skipped.
pub fn entries(dir: &OwnedFd, what: &str) -> Result<Vec<Entry>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    let mut listing =
        Dir::read_from(dir).map_err(|e| Error::io(format!("reading {what}"), e.into()))?;
    while let Some(entry) = listing.read() {
        let entry = entry.map_err(|e| Error::io(format!("reading {what}"), e.into()))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let st = match crate::fsops::statx_at(dir, name) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(Error::io(format!("checking an entry of {what}"), e.into())),
        };
        let modified = UNIX_EPOCH
            + Duration::new(
                st.stx_mtime.tv_sec.max(0) as u64,
                st.stx_mtime.tv_nsec.min(999_999_999),
            );
        out.push(Entry {
            name: name.to_owned(),
            kind: FileType::from_raw_mode(u32::from(st.stx_mode)),
            key: crate::fsops::statx_key(&st),
            size: st.stx_size,
            age: now.duration_since(modified).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Removes the entry `name` of `dir` (not a directory).
pub fn remove(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(io::Error::from)
}

/// Opens the regular file `name` of `dir` (or the path `name` with
/// [`CWD`]) for reading: never through a symlink, never blocking on a FIFO
/// planted in its place.
pub fn open_file(dir: impl AsFd, name: impl rustix::path::Arg) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}
