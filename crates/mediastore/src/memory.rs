//! The in-memory engine: the core plus local files, no persistence.

use std::path::{Path, PathBuf};

use mediastore_core::{Core, Expiry, MediaMeta, MediaRef, Result};

use crate::api::{MediaStore, ReleaseReport, SweepReport};
use crate::local::{Local, Settings};

/// Builds a [`MemoryStore`].
pub struct MemoryStoreBuilder {
    settings: Settings,
}

impl MemoryStoreBuilder {
    crate::local::settings_setters!();

    /// Builds the store. Fails when an owned root does not exist.
    pub fn build(self) -> Result<MemoryStore> {
        Ok(MemoryStore {
            local: self.settings.into_local(&[], false)?,
        })
    }
}

/// The in-memory engine.
///
/// Refs live only as long as the process; files are never copied. The file
/// system calls it makes (`stat` on store, `unlink` on the last release) run
/// inline on the calling task: they take microseconds on local disks, much
/// less than a hop to a blocking thread pool.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use mediastore::{MediaMeta, MediaStore, MemoryStore};
/// let dir = std::env::temp_dir();
/// let path = dir.join(format!("mediastore-doc-{}.txt", std::process::id()));
/// std::fs::write(&path, b"hi")?;
/// let store = MemoryStore::builder().owned_root(&dir).build()?;
/// let r = store.store(&path, &MediaMeta::new("hi.txt", "text/plain", "doc"), "chat:1").await?;
/// assert_eq!(&*store.resolve(r).await?, path.as_path());
/// let report = store.release_all("chat:1").await?;
/// assert_eq!(report.files_deleted, 1);
/// assert!(!path.exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct MemoryStore {
    local: Local,
}

impl MemoryStore {
    /// A builder with no owned roots, no expiry and the system clock.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            settings: Settings::default(),
        }
    }

    /// The state machine, for introspection and invariant checks in tests.
    pub fn core(&self) -> &Core {
        &self.local.core
    }

    /// The owned roots, canonicalised.
    pub fn owned_roots(&self) -> &[PathBuf] {
        self.local.roots.roots()
    }
}

impl MediaStore for MemoryStore {
    crate::local::local_lookups!();
    async fn store(&self, path: &Path, meta: &MediaMeta, scope: &str) -> Result<MediaRef> {
        Ok(self.local.store(path, meta, scope, None)?.value)
    }

    async fn retain(&self, media_ref: MediaRef, scope: &str) -> Result<()> {
        self.local.retain(media_ref, scope).map(|_| ())
    }

    async fn release_all(&self, scope: &str) -> Result<ReleaseReport> {
        let dropped = self.local.release(scope)?.value;
        Ok(self.local.finish_release(dropped))
    }

    async fn touch(&self, scope: &str) -> Result<usize> {
        Ok(self.local.touch(scope)?.value)
    }

    async fn set_scope_expiry(&self, scope: &str, expiry: Expiry) -> Result<()> {
        self.local.set_scope_expiry(scope, expiry).map(|_| ())
    }

    async fn clean_expired(&self) -> Result<SweepReport> {
        self.local
            .sweep(|batch| std::future::ready(Ok(batch.value)))
            .await
    }
}
