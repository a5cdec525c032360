//! The sans-IO heart of mediastore.
//!
//! This crate holds the vocabulary ([`MediaRef`], [`CleanupPolicy`],
//! [`MediaMeta`], [`Error`]) and [`Core`], the state machine of refs, scopes,
//! holds, per-file counts and deadlines. It performs no I/O and reads no
//! clock: the engine passes `now` in, stats files itself, and receives the
//! files that may be deleted as [`Deletion`]s to act on and report back.
//!
//! Most users want the `mediastore` crate, which wraps this core in async
//! engines; this crate is for engine authors and for property tests.
//!
//! ```
//! use std::path::Path;
//! use mediastore_core::*;
//!
//! let core = Core::new(CoreConfig::default());
//! let id = MediaRef::from_random_bytes([42; 16]);
//! let meta = MediaMeta::new("cat.jpg", "image/jpeg", "telegram");
//! core.register(Timestamp(1), Registration {
//!     id,
//!     ticket: core.deletion_ticket(),
//!     file: FileKey { dev: 1, ino: 7, born: 0 },
//!     path: Path::new("/downloads/cat.jpg"),
//!     size: 1024,
//!     meta: &meta,
//!     policy: CleanupPolicy::DeleteOnCleanup,
//!     scope: "telegram:1:2",
//! })?;
//! assert_eq!(&*core.resolve(id)?.path, Path::new("/downloads/cat.jpg"));
//!
//! // Releasing the scope drops the last ref: the core hands the file out for
//! // deletion, and the engine reports how that went.
//! let dropped = core.release_all("telegram:1:2")?;
//! assert_eq!(dropped.refs_removed, 1);
//! assert_eq!(dropped.deletions.len(), 1);
//! core.finish_deletion(dropped.deletions[0].file, DeleteOutcome::Deleted);
//! assert!(matches!(core.resolve(id), Err(Error::UnknownRef(_))));
//! # Ok::<(), Error>(())
//! ```

mod core;
mod error;
mod types;

pub use crate::core::{
    Core, CoreConfig, CoreStats, DeleteOutcome, Deletion, Dropped, FileState, FileStatus, HoldInfo,
    Registration, Resolved,
};
pub use crate::error::{Error, Result};
pub use crate::types::{
    CleanupPolicy, Expiry, FileKey, MAX_SCOPE_LEN, MediaMeta, MediaRef, REF_PREFIX, ScopeRule,
    Timestamp, validate_scope,
};
