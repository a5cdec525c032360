//! mediastore: the media lifecycle store for AI-agent gateways.
//!
//! A gateway registers each downloaded or generated file under an opaque ref
//! (`media://<uuid>`) held by one or more scopes (a message, a session). The
//! store resolves refs back to files, and deletes a file when nothing holds
//! it any more — never earlier: not while another ref to the same file
//! exists (under any spelling of its path), not while a `forget_only` ref pins
//! it, and not because a release raced with a new registration.
//!
//! - [`MediaStore`] is the async API every engine implements.
//! - [`MemoryStore`] is the in-memory engine.
#![cfg_attr(
    feature = "durable",
    doc = "- [`DurableStore`] (feature `durable`, default) keeps its state in a data dir and survives crashes; it adds managed ingest (`put`)."
)]
//! - [`Cleaner`] sweeps expired holds in the background.
//! - [`conformance`] (feature `conformance`) holds the scenarios every engine
//!   passes.
//!
//! ```
//! use std::time::Duration;
//! use mediastore::{CleanupPolicy, MediaMeta, MediaStore, MemoryStore};
//!
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let downloads = tempfile::tempdir()?;
//! let photo = downloads.path().join("photo.jpg");
//! std::fs::write(&photo, b"\xff\xd8\xff")?;
//!
//! let store = MemoryStore::builder()
//!     .owned_root(downloads.path())
//!     .max_age(Duration::from_secs(30 * 60))
//!     .build()?;
//! let meta = MediaMeta::new("photo.jpg", "image/jpeg", "telegram");
//! let r = store.store(&photo, &meta, "telegram:42:1001").await?;
//!
//! // The session keeps the photo after the message scope is released.
//! store.retain(r, "session:42").await?;
//! store.release_all("telegram:42:1001").await?;
//! assert!(photo.exists());
//! assert_eq!(store.resolve_with_meta(r).await?.meta.policy, Some(CleanupPolicy::DeleteOnCleanup));
//!
//! let report = store.release_all("session:42").await?;
//! assert_eq!(report.files_deleted, 1);
//! assert!(!photo.exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Files are identified by device, inode and birth time (statx) and deleted
// through `openat2(RESOLVE_BENEATH)`: both are Linux interfaces.
#[cfg(not(target_os = "linux"))]
compile_error!("mediastore needs Linux (statx, openat2)");

mod api;
mod cleaner;
mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "durable")]
mod durable;
mod fsops;
mod local;
mod memory;

pub use api::{DeleteFailure, MediaStore, ReleaseReport, Stats, SweepReport};
pub use cleaner::{Cleaner, CleanerConfig};
pub use clock::{Clock, ManualClock, SystemClock};
#[cfg(feature = "durable")]
pub use durable::{
    DEFAULT_DATA_DIR, DurableStore, DurableStoreBuilder, FORMAT_VERSION, JournalStats, OpenReport,
    OrphanReport, PutLimits, PutReport, Quotas, decide_content_type, sanitize_filename,
};
pub use mediastore_core::{
    CleanupPolicy, DeleteOutcome, Error, Expiry, FileKey, FileState, FileStatus, HoldInfo,
    MediaMeta, MediaRef, Resolved, Result, ScopeRule, Timestamp, validate_scope,
};
pub use memory::{MemoryStore, MemoryStoreBuilder};
