//! The durable engine on a full disk and on a read-only file system.
//!
//! Each scenario runs in a child process inside new user and mount
//! namespaces (`unshare -rm`), where it may mount a small tmpfs of its own
//! without privileges: a real file system that really fills up and really
//! turns read-only, not a mock.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mediastore::conformance::block_on;
use mediastore::{DurableStore, Error, MediaMeta, MediaRef, MediaStore, PutLimits};

const CHILD: &str = "MEDIASTORE_HOSTILE_FS_CHILD";

/// Runs `test` (this file's test of that name) again in a child process in
/// its own namespaces, with a fresh tmpfs mounted at a temp dir of
/// `size`. Returns when the child passed.
fn in_namespace(test: &str, size: &str) {
    let exe = std::env::current_exe().expect("own path");
    let mnt = tempfile::tempdir().expect("tempdir");
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{dir}' && exec '{exe}' --exact {test} --nocapture --test-threads=1",
        dir = mnt.path().display(),
        exe = exe.display(),
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env(CHILD, mnt.path())
        .output()
        .expect("run unshare (util-linux); these tests need user namespaces");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {test} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "child {test} did not run its test:\n{stdout}\n{stderr}"
    );
}

/// The tmpfs when running as the child, else `None`.
fn child_mount() -> Option<PathBuf> {
    std::env::var_os(CHILD).map(PathBuf::from)
}

fn meta() -> MediaMeta {
    MediaMeta::new("x.bin", "application/octet-stream", "test")
}

fn fill(path: &Path) -> u64 {
    // Fill the file system to the last block.
    use std::io::Write;
    let mut f = fs::File::create(path).expect("filler");
    let chunk = vec![1u8; 64 << 10];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    let mut small = vec![1u8; 512];
    while !small.is_empty() {
        match f.write(&small) {
            Ok(k) if k > 0 => n += k as u64,
            _ => small.truncate(small.len() / 2),
        }
    }
    n
}

/// Runs `op(0)`, `op(1)`, ... until one fails; returns what the others
/// gave and the failure.
async fn until_refused<T, F, Fut>(mut op: F) -> (Vec<T>, Error)
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = mediastore::Result<T>>,
{
    let mut done = Vec::new();
    for i in 0.. {
        match op(i).await {
            Ok(v) => done.push(v),
            Err(e) => return (done, e),
        }
    }
    unreachable!("a full disk refuses a change long before u32::MAX")
}

fn assert_storage_full(err: &Error) {
    assert!(
        matches!(err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
        "expected a storage-full error, got {err:?}"
    );
}

fn check_all(store: &DurableStore, acked: &[(MediaRef, Vec<u8>)]) {
    block_on(async {
        for (r, body) in acked {
            let path = store.resolve(*r).await.expect("acknowledged ref resolves");
            assert_eq!(&fs::read(&*path).expect("its file"), body, "{r}");
        }
    });
}

#[test]
fn a_full_disk_fails_changes_cleanly_and_loses_nothing_acknowledged() {
    let Some(mnt) = child_mount() else {
        return in_namespace(
            "a_full_disk_fails_changes_cleanly_and_loses_nothing_acknowledged",
            "4m",
        );
    };
    let data = mnt.join("data");
    let external = mnt.join("external.bin");
    fs::write(&external, b"registered, not managed").unwrap();
    let store = DurableStore::builder(&data).open().expect("open on tmpfs");
    let mut acked = Vec::new();
    block_on(async {
        for i in 0..8u8 {
            let body = vec![i; 10_000];
            let put = store
                .put(&body[..], &meta(), "s", &PutLimits::default())
                .await
                .expect("put with room");
            acked.push((put.media_ref, body));
        }
    });
    // An upload bigger than the space left fails and leaves nothing.
    let before: Vec<_> = walk(&data);
    let big = vec![9u8; 8 << 20];
    let err = block_on(store.put(&big[..], &meta(), "s", &PutLimits::default()))
        .expect_err("an upload bigger than the disk fails");
    assert_storage_full(&err);
    assert_eq!(walk(&data), before, "a failed put leaves no file behind");
    check_all(&store, &acked);

    // Fill the disk to the last byte: changes now fail with a clear error.
    let filler = mnt.join("filler");
    fill(&filler);
    let (put, err) = block_on(until_refused(|i| {
        let store = &store;
        async move {
            let body = i.to_le_bytes().repeat(300);
            let put = store
                .put(&body[..], &meta(), "t", &PutLimits::default())
                .await?;
            Ok((put.media_ref, body))
        }
    }));
    acked.extend(put);
    assert_storage_full(&err);
    // Registrations need no managed bytes, only index space: they go on
    // until the index cannot grow, then fail, and the store refuses
    // further changes rather than acknowledge what it could not save.
    let (stored, err) = block_on(until_refused(|i| {
        let scope = format!("a-long-scope-name-to-fill-index-pages-faster:{i}");
        let (store, external) = (&store, &external);
        async move { store.store(external, &meta(), &scope).await }
    }));
    assert_storage_full(&err);
    assert!(
        block_on(store.store(&external, &meta(), "after")).is_err(),
        "the store refuses changes after a failed commit"
    );
    drop(store);
    // Space comes back; everything acknowledged is there.
    fs::remove_file(&filler).unwrap();
    let store = DurableStore::builder(&data).open().expect("reopen");
    check_all(&store, &acked);
    block_on(async {
        for r in &stored {
            assert_eq!(&*store.resolve(*r).await.unwrap(), external.as_path());
        }
    });
    assert_eq!(
        store.open_report().refs as usize,
        acked.len() + stored.len()
    );
    block_on(store.put(&b"room again"[..], &meta(), "s", &PutLimits::default()))
        .expect("usable again");
}

#[test]
fn a_read_only_file_system_is_a_clear_error_and_changes_nothing() {
    let Some(mnt) = child_mount() else {
        return in_namespace(
            "a_read_only_file_system_is_a_clear_error_and_changes_nothing",
            "4m",
        );
    };
    let data = mnt.join("data");
    let mut acked = Vec::new();
    {
        let store = DurableStore::builder(&data).open().expect("open on tmpfs");
        block_on(async {
            for i in 0..4u8 {
                let body = vec![i; 1000];
                let put = store
                    .put(&body[..], &meta(), "s", &PutLimits::default())
                    .await
                    .unwrap();
                acked.push((put.media_ref, body));
            }
        });
    }
    let before = walk(&data);
    let remount = |opts: &str| {
        let ok = Command::new("mount")
            .args(["-o", opts, "remount"])
            .arg(&mnt)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "remount {opts}");
    };
    remount("remount,ro");
    match DurableStore::builder(&data).open() {
        Err(Error::Io { source, .. }) => assert_eq!(
            source.kind(),
            std::io::ErrorKind::ReadOnlyFilesystem,
            "{source}"
        ),
        Err(e) => panic!("expected a read-only error, got {e}"),
        Ok(_) => panic!("opened a store on a read-only file system"),
    }
    remount("remount,rw");
    assert_eq!(walk(&data), before, "nothing changed");
    let store = DurableStore::builder(&data).open().expect("reopen");
    assert_eq!(store.open_report().refs, 4);
    check_all(&store, &acked);
}

/// Every file under `dir` with its size, sorted.
fn walk(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with("index.sqlite") {
                // The index's own files may be rewritten by SQLite's
                // recovery on open; what matters is what they contain.
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort();
    out
}
