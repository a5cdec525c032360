//! The one error type of mediastore. Every engine maps its private failures
//! into these variants so callers can branch on the cause, not on strings.

use std::io;
use std::path::PathBuf;

use crate::types::MediaRef;

/// Everything that can go wrong in mediastore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Text that is not a canonical `media://<uuid v4>` ref.
    #[error("invalid media ref {input:?}: {reason}")]
    InvalidRef {
        /// What the caller sent (truncated).
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A cleanup policy string other than `delete_on_cleanup` / `forget_only`.
    #[error("unknown cleanup policy {input:?} (expected delete_on_cleanup or forget_only)")]
    InvalidPolicy {
        /// What the caller sent (truncated).
        input: String,
    },
    /// A scope name that is empty, too long or holds control characters.
    #[error("invalid scope {scope:?}: {reason}")]
    InvalidScope {
        /// The scope (truncated, escaped).
        scope: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The ref is not (or no longer) registered.
    #[error("media store: unknown ref: {0}")]
    UnknownRef(MediaRef),
    /// The ref is registered but its file is gone or was replaced behind the
    /// store's back.
    #[error("media store: file of {media_ref} vanished: {path}")]
    FileVanished {
        /// The ref.
        media_ref: MediaRef,
        /// Where the file was.
        path: PathBuf,
    },
    /// A file could not be used: it does not exist, is not readable, is not a
    /// regular file, or is being deleted. Carries the OS reason.
    #[error("media store: {path}: {source}")]
    File {
        /// The path as the caller spelled it.
        path: PathBuf,
        /// The OS reason.
        #[source]
        source: io::Error,
    },
    /// `delete_on_cleanup` was asked for a file outside the owned roots and
    /// the managed dir: the store refuses to ever delete such a file.
    #[error(
        "media store: {path} is outside every owned root; it can only be registered forget_only"
    )]
    NotOwned {
        /// The path as the caller spelled it.
        path: PathBuf,
    },
    /// A configuration value was refused.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// State changed under a concurrent operation; engines retry these
    /// internally and callers see them only if retries run out.
    #[error("media store: conflict, please retry: {0}")]
    Conflict(&'static str),
    /// The store cannot take more refs (a per-shard slot counter would overflow).
    #[error("media store is full: {0}")]
    Full(&'static str),
    /// Another process (or another store in this one) has the data dir open.
    #[error("media store: data dir {path} is already in use{holder}")]
    InUse {
        /// The data dir.
        path: PathBuf,
        /// Who holds it, as recorded in the lock file (e.g. " by pid 42").
        holder: String,
    },
    /// The on-disk index cannot be read: damaged, not a mediastore index,
    /// or written by a newer version.
    #[error("media store: index {path} is unusable: {detail}")]
    Corrupt {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A stream was bigger than the size allowed for one object.
    #[error("media store: object exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Storing the object would exceed a quota; nothing was written.
    #[error(
        "media store: {quota} quota of {limit} bytes exceeded ({used} in use, {wanted} more wanted)"
    )]
    QuotaExceeded {
        /// Which quota: `scope` or `total`.
        quota: &'static str,
        /// Its limit, in bytes.
        limit: u64,
        /// Bytes in use before this object.
        used: u64,
        /// Bytes this object needs.
        wanted: u64,
    },
    /// An I/O failure of the store itself (not of a caller's file).
    #[error("media store I/O: {context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The OS reason.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// True when the error means "no such file" (a missing path, or a file
    /// that was being deleted when the store was asked to register it).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::File { source, .. } => source.kind() == io::ErrorKind::NotFound,
            Self::FileVanished { .. } => true,
            _ => false,
        }
    }

    /// Builds an [`Error::Io`] of the store itself.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds a [`Error::File`].
    pub fn file(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::File {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used across the crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;
