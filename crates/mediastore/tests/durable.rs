//! The durable engine beyond the shared conformance suite: recovery on
//! open, the data dir lock, managed ingest, quotas, orphans, torn writes
//! and damaged indexes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use mediastore::conformance::{block_on, epoch};
use mediastore::{
    CleanupPolicy, DurableStore, DurableStoreBuilder, Error, ManualClock, MediaMeta, MediaStore,
    PutLimits, Quotas,
};

struct Dirs {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    owned: PathBuf,
    outside: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let owned = tmp.path().join("owned");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&owned).unwrap();
    fs::create_dir_all(&outside).unwrap();
    Dirs {
        _tmp: tmp,
        data,
        owned,
        outside,
    }
}

fn builder(d: &Dirs, clock: &ManualClock) -> DurableStoreBuilder {
    DurableStore::builder(&d.data)
        .owned_root(&d.owned)
        .clock(clock.clone())
}

/// Puts `bytes` into `scope` with no per-call limit.
async fn put(store: &DurableStore, bytes: &[u8], scope: &str) -> mediastore::PutReport {
    store
        .put(bytes, &meta("x.bin"), scope, &PutLimits::default())
        .await
        .expect("put")
}

/// Polls `fut` once, as a caller that gives up would; true when it had to
/// wait (and is now abandoned).
fn gave_up<F: std::future::Future>(fut: F) -> bool {
    use std::task::{Context, Waker};
    let mut fut = std::pin::pin!(fut);
    fut.as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
}

fn meta(name: &str) -> MediaMeta {
    MediaMeta::new(name, "image/jpeg", "test")
}

/// Files under the managed dir, `.incoming`'s included.
fn managed_files(store_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(store_dir).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for f in fs::read_dir(&shard).unwrap() {
                out.push(f.unwrap().path());
            }
        } else {
            out.push(shard);
        }
    }
    out.sort();
    out
}

#[test]
fn reopen_restores_refs_holds_and_deadlines() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let max_age = Duration::from_secs(60);
    let (a, b, c) = {
        let store = builder(&d, &clock).max_age(max_age).open().unwrap();
        block_on(async {
            let p = d.owned.join("a.jpg");
            fs::write(&p, b"a").unwrap();
            let a = store.store(&p, &meta("a.jpg"), "msg:1").await.unwrap();
            let put = store
                .put(
                    &b"bytes of b"[..],
                    &meta("b.jpg"),
                    "msg:1",
                    &PutLimits::default(),
                )
                .await
                .unwrap();
            let b = put.media_ref;
            clock.advance(Duration::from_secs(30));
            store.retain(b, "session:1").await.unwrap();
            let q = d.outside.join("c.jpg");
            fs::write(&q, b"c").unwrap();
            let c = store.store(&q, &meta("c.jpg"), "session:1").await.unwrap();
            clock.advance(Duration::from_secs(20));
            store.touch("session:1").await.unwrap();
            (a, b, c)
        })
    };
    let store = builder(&d, &clock).max_age(max_age).open().unwrap();
    let report = store.open_report().clone();
    assert_eq!(report.refs, 3);
    assert_eq!(report.holds, 4);
    assert_eq!(
        store.managed_bytes(),
        b"bytes of b".len() as u64,
        "counted at open"
    );
    assert!(report.vanished.is_empty());
    block_on(async {
        assert_eq!(
            store.scopes_of(b).await.unwrap(),
            vec!["msg:1", "session:1"]
        );
        assert_eq!(store.refs_in("msg:1").await.unwrap(), vec![a, b]);
        let rb = store.resolve_with_meta(b).await.unwrap();
        assert_eq!(rb.meta.filename, "b.jpg");
        assert_eq!(rb.meta.policy, Some(CleanupPolicy::DeleteOnCleanup));
        let rc = store.resolve_with_meta(c).await.unwrap();
        assert_eq!(rc.meta.policy, Some(CleanupPolicy::ForgetOnly));
        // msg:1's holds are 50 s old, session:1 was touched at 50 s.
        clock.advance(Duration::from_secs(11));
        let swept = store.clean_expired().await.unwrap();
        assert_eq!(swept.holds_expired, 2, "both msg:1 holds expire");
        assert_eq!(swept.refs_expired, 1, "a had no other holder");
        assert!(!d.owned.join("a.jpg").exists(), "a was owned: deleted");
        assert!(store.resolve(b).await.is_ok(), "b lives on in session:1");
        clock.advance(Duration::from_secs(50));
        let swept = store.clean_expired().await.unwrap();
        assert_eq!(swept.refs_expired, 2);
        assert!(d.outside.join("c.jpg").exists(), "c was forget_only");
        assert_eq!(managed_files(store.managed_dir()), Vec::<PathBuf>::new());
    });
    drop(store);
    let store = builder(&d, &clock).max_age(max_age).open().unwrap();
    assert_eq!(store.open_report().refs, 0, "expiry was durable");
}

#[test]
fn a_second_open_of_the_same_data_dir_is_refused() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let first = builder(&d, &clock).open().unwrap();
    match builder(&d, &clock).open() {
        Err(Error::InUse { path, holder }) => {
            assert_eq!(path, fs::canonicalize(&d.data).unwrap());
            assert!(holder.contains(&std::process::id().to_string()), "{holder}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("second open succeeded"),
    }
    drop(first);
    builder(&d, &clock).open().expect("free again once closed");
}

#[test]
fn identical_puts_share_one_file_until_the_last_ref_goes() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let store = builder(&d, &clock).open().unwrap();
    block_on(async {
        let one = put(&store, &b"same"[..], "s1").await;
        let two = put(&store, &b"same"[..], "s2").await;
        assert!(!one.deduplicated && two.deduplicated);
        assert_eq!(one.sha256, two.sha256);
        let p1 = store.resolve(one.media_ref).await.unwrap();
        let p2 = store.resolve(two.media_ref).await.unwrap();
        assert_eq!(p1, p2);
        assert!(p1.starts_with(store.managed_dir()));
        assert_eq!(
            p1.file_name().unwrap().to_str().unwrap(),
            one.sha256,
            "managed files are named by digest"
        );
        assert_eq!(store.managed_bytes(), 4);
        let r = store.release_all("s1").await.unwrap();
        assert_eq!(r.files_deleted, 0);
        assert!(p1.exists());
        let r = store.release_all("s2").await.unwrap();
        assert_eq!((r.files_deleted, r.bytes_freed), (1, 4));
        assert!(!p1.exists());
        assert_eq!(store.managed_bytes(), 0);
        // Stored again after deletion: a fresh file.
        let three = put(&store, &b"same"[..], "s3").await;
        assert!(!three.deduplicated);
        assert_eq!(
            fs::read(&*store.resolve(three.media_ref).await.unwrap()).unwrap(),
            b"same"
        );
    });
}

#[test]
fn put_digest_is_sha256() {
    let d = dirs();
    let store = builder(&d, &ManualClock::new(epoch())).open().unwrap();
    let put = block_on(put(&store, &b"abc"[..], "s"));
    assert_eq!(
        put.sha256,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let resolved = block_on(store.resolve_with_meta(put.media_ref)).unwrap();
    assert_eq!(
        store.digest(&resolved).as_deref(),
        Some(put.sha256.as_str())
    );
}

#[test]
fn oversize_streams_and_quotas_write_nothing() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let quotas = Quotas {
        max_object_bytes: Some(100),
        max_scope_bytes: Some(150),
        max_total_bytes: Some(250),
    };
    let store = builder(&d, &clock).quotas(quotas).open().unwrap();
    let before = managed_files(store.managed_dir());
    block_on(async {
        let lim = PutLimits::default();
        let big = [7u8; 101];
        match store.put(&big[..], &meta("big"), "s", &lim).await {
            Err(Error::TooLarge { limit: 100 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let tight = PutLimits {
            max_bytes: Some(10),
        };
        assert!(matches!(
            store.put(&[1u8; 11][..], &meta("x"), "s", &tight).await,
            Err(Error::TooLarge { limit: 10 })
        ));
        assert_eq!(
            managed_files(store.managed_dir()),
            before,
            "nothing left behind"
        );
        put(&store, &[1u8; 100][..], "s").await;
        match store.put(&[2u8; 60][..], &meta("b"), "s", &lim).await {
            Err(Error::QuotaExceeded {
                quota: "scope",
                limit: 150,
                used: 100,
                ..
            }) => {}
            other => panic!("expected the scope quota, got {other:?}"),
        }
        put(&store, &[3u8; 100][..], "t").await;
        match store.put(&[4u8; 60][..], &meta("d"), "u", &lim).await {
            Err(Error::QuotaExceeded {
                quota: "total",
                limit: 250,
                used: 200,
                ..
            }) => {}
            other => panic!("expected the total quota, got {other:?}"),
        }
        assert_eq!(store.stats().await.unwrap().refs, 2);
        assert_eq!(store.managed_bytes(), 200);
    });
    // Exactly the two accepted objects, and an empty .incoming.
    let files = managed_files(store.managed_dir());
    assert_eq!(files.len(), 2, "{files:?}");
}

#[test]
fn filenames_are_metadata_only_and_sanitised() {
    let d = dirs();
    let store = builder(&d, &ManualClock::new(epoch())).open().unwrap();
    let long = "n".repeat(5000);
    let cases: [(&str, &str); 4] = [
        ("../../etc/passwd", "passwd"),
        ("/abs/evil.png", "evil.png"),
        ("a\0b.txt", "ab.txt"),
        (&long, &long[..255]),
    ];
    block_on(async {
        for (i, (raw, want)) in cases.iter().enumerate() {
            let body = format!("body {i}");
            let put = store
                .put(body.as_bytes(), &meta(raw), "s", &PutLimits::default())
                .await
                .unwrap();
            assert_eq!(put.filename, *want);
            let r = store.resolve_with_meta(put.media_ref).await.unwrap();
            assert_eq!(r.meta.filename, *want);
            assert!(r.path.starts_with(store.managed_dir()), "{:?}", r.path);
        }
    });
    assert!(!d.data.join("etc").exists());
}

#[test]
fn content_type_is_sniffed_with_fallbacks() {
    let d = dirs();
    let store = builder(&d, &ManualClock::new(epoch())).open().unwrap();
    let docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
    let cases: [(&[u8], &str, &str, &str); 4] = [
        (
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
            "image/jpeg",
            "a.jpg",
            "image/png",
        ),
        (b"PK\x03\x04\x14\0\0\0\x08\0rest", docx, "r.docx", docx),
        (b"just text", "", "notes.md", "text/markdown"),
        (b"\x00\x01\x02", "", "blob", "application/octet-stream"),
    ];
    block_on(async {
        for (bytes, declared, name, want) in cases {
            let m = MediaMeta::new(name, declared, "t");
            let put = store
                .put(bytes, &m, "s", &PutLimits::default())
                .await
                .unwrap();
            assert_eq!(put.content_type, want, "{name}");
        }
    });
}

#[test]
fn vanished_files_are_reported_on_open() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let p = d.outside.join("gone.jpg");
    fs::write(&p, b"x").unwrap();
    let r = {
        let store = builder(&d, &clock).open().unwrap();
        block_on(store.store(&p, &meta("gone.jpg"), "s")).unwrap()
    };
    fs::remove_file(&p).unwrap();
    let store = builder(&d, &clock).open().unwrap();
    assert_eq!(store.open_report().vanished, vec![(r, p.clone())]);
    block_on(async {
        assert_eq!(&*store.resolve(r).await.unwrap(), p.as_path());
        assert!(matches!(
            store.open(r).await,
            Err(Error::FileVanished { .. })
        ));
        store.release_all("s").await.unwrap();
    });
}

#[test]
fn torn_temp_files_orphans_and_planted_symlinks_are_cleaned_on_open() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let (kept, managed) = {
        let store = builder(&d, &clock).open().unwrap();
        let put = block_on(put(&store, &b"keep me"[..], "s"));
        (
            block_on(store.resolve(put.media_ref)).unwrap(),
            store.managed_dir().to_path_buf(),
        )
    };
    // A half-written upload, an unreferenced file, a file whose bytes do
    // not match its name (placed but not synced before a crash) and two
    // symlinks to a file outside (one as a shard dir, one inside a shard
    // dir).
    fs::write(managed.join(".incoming/0123abcd"), b"half").unwrap();
    let body = b"nobody names me";
    let sha: String = sha2::Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fs::create_dir_all(managed.join(&sha[..2])).unwrap();
    let orphan = managed.join(&sha[..2]).join(&sha);
    fs::write(&orphan, body).unwrap();
    fs::create_dir_all(managed.join("ab")).unwrap();
    let torn = managed.join("ab").join("ab".repeat(32));
    fs::write(&torn, b"\0\0\0 half of something").unwrap();
    let victim = d.outside.join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, managed.join("ab/evil")).unwrap();
    fs::remove_dir(managed.join("cd")).unwrap();
    std::os::unix::fs::symlink(&d.outside, managed.join("cd")).unwrap();

    // Young orphans survive the default grace...
    let store = builder(&d, &clock).open().unwrap();
    let report = store.open_report().clone();
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(report.orphans.kept_young, 1);
    assert_eq!(report.orphans.strays_removed, 2);
    assert_eq!(report.orphans.torn_removed, 1);
    assert!(orphan.exists());
    assert!(!torn.exists(), "torn files go whatever their age");
    drop(store);
    // ...and go with zero grace.
    let store = builder(&d, &clock)
        .orphan_grace(Duration::ZERO)
        .open()
        .unwrap();
    assert_eq!(store.open_report().orphans.files_removed, 1);
    assert!(!orphan.exists());
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"precious",
        "symlink targets untouched"
    );
    assert!(d.outside.exists());
    assert_eq!(fs::read(&*kept).unwrap(), b"keep me");
}

#[test]
fn deletions_due_at_a_crash_are_completed_on_open() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let p = d.owned.join("due.jpg");
    fs::write(&p, b"due").unwrap();
    let live = d.owned.join("live.jpg");
    fs::write(&live, b"live").unwrap();
    {
        let store = builder(&d, &clock).open().unwrap();
        block_on(store.store(&live, &meta("live"), "keep")).unwrap();
    }
    // What the journal holds between committing a release and unlinking
    // its file: a pending deletion row.
    let key = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        let born = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        (m.dev() as i64, m.ino() as i64, born as i64)
    };
    {
        let conn = rusqlite::Connection::open(d.data.join("index.sqlite")).unwrap();
        for path in [&p, &live] {
            let (dev, ino, born) = key(path);
            conn.execute(
                "INSERT INTO pending_deletes VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![dev, ino, born, path.to_str().unwrap().as_bytes()],
            )
            .unwrap();
        }
    }
    let store = builder(&d, &clock).open().unwrap();
    assert_eq!(store.open_report().deletions_completed, 1);
    assert!(!p.exists(), "the due deletion was completed");
    assert!(live.exists(), "a file registered again is not deleted");
    drop(store);
    let conn = rusqlite::Connection::open(d.data.join("index.sqlite")).unwrap();
    let left: i64 = conn
        .query_row("SELECT count(*) FROM pending_deletes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "pending rows are cleared once handled");
}

#[test]
fn damaged_or_foreign_indexes_are_refused_without_touching_files() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let kept = {
        let store = builder(&d, &clock).open().unwrap();
        let put = block_on(put(&store, &b"kept"[..], "s"));
        block_on(store.resolve(put.media_ref)).unwrap()
    };
    let index = d.data.join("index.sqlite");
    let good = fs::read(&index).unwrap();
    // A newer format.
    {
        let conn = rusqlite::Connection::open(&index).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    match builder(&d, &clock).orphan_grace(Duration::ZERO).open() {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("newer"), "{detail}"),
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    // Garbage.
    fs::write(&index, vec![0x5a; 8192]).unwrap();
    let _ = fs::remove_file(d.data.join("index.sqlite-wal"));
    match builder(&d, &clock).orphan_grace(Duration::ZERO).open() {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    assert_eq!(fs::read(&*kept).unwrap(), b"kept", "no orphan sweep ran");
    // Restoring the file restores the store.
    fs::write(&index, good).unwrap();
    let store = builder(&d, &clock).open().unwrap();
    assert_eq!(store.open_report().refs, 1);
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_clear_error() {
    let d = dirs();
    let file = d.outside.join("not-a-dir");
    fs::write(&file, b"").unwrap();
    match DurableStore::builder(file.join("data")).open() {
        Err(Error::Io { context, .. }) => assert!(context.contains("data dir"), "{context}"),
        other => panic!("expected Io, got {:?}", other.err()),
    }
}

#[test]
fn puts_that_crashed_before_their_bytes_were_durable_are_dropped_on_open() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let (torn, intact, torn_path) = {
        let store = builder(&d, &clock).open().unwrap();
        block_on(async {
            let a = put(&store, &b"torn"[..], "s").await;
            let b = put(&store, &b"intact"[..], "s").await;
            let path = store.resolve(a.media_ref).await.unwrap().to_path_buf();
            (a.media_ref, b.media_ref, path)
        })
    };
    // What a crash between committing a put's ref and syncing its bytes
    // can leave: refs still marked unverified, one file with other bytes.
    {
        let conn = rusqlite::Connection::open(d.data.join("index.sqlite")).unwrap();
        let n = conn.execute("UPDATE refs SET unverified = 1", []).unwrap();
        assert_eq!(n, 2);
    }
    fs::write(&torn_path, b"\0\0\0\0").unwrap();
    let store = builder(&d, &clock).open().unwrap();
    let report = store.open_report().clone();
    assert_eq!(report.unfinished_puts, 1);
    assert_eq!(report.refs, 1);
    assert!(report.vanished.is_empty());
    block_on(async {
        assert!(matches!(
            store.resolve(torn).await,
            Err(Error::UnknownRef(_))
        ));
        assert_eq!(store.refs_in("s").await.unwrap(), vec![intact]);
    });
    drop(store);
    // The removal and the verification were recorded.
    let conn = rusqlite::Connection::open(d.data.join("index.sqlite")).unwrap();
    let rows: (i64, i64, i64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM refs), (SELECT count(*) FROM holds),
                    (SELECT count(*) FROM refs WHERE unverified != 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(rows, (1, 1, 0));
}

#[test]
fn large_uploads_hash_and_store_exactly_their_bytes() {
    let d = dirs();
    let store = builder(&d, &ManualClock::new(epoch())).open().unwrap();
    // Past the size where hashing moves to its own thread, and past a
    // background writeback, in uneven reads.
    let body: Vec<u8> = (0..(20u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let reader = tokio::io::BufReader::with_capacity(100_003, &body[..]);
    let put = block_on(store.put(reader, &meta("big.bin"), "s", &PutLimits::default())).unwrap();
    assert_eq!(put.sha256, want);
    assert_eq!(put.size, body.len() as u64);
    let path = block_on(store.resolve(put.media_ref)).unwrap();
    assert!(fs::read(&*path).unwrap() == body, "stored bytes differ");
}

#[test]
fn reopening_keeps_every_scope_in_order_even_for_holds_made_in_one_tick() {
    let d = dirs();
    // The clock never moves: every hold ties, only the order it was made
    // in tells them apart. Refs are retained across scopes, so restoring
    // threads wait on each other.
    let clock = ManualClock::new(epoch());
    let scopes: Vec<String> = (0..7)
        .map(|i| format!("a:{i}"))
        .chain((0..5).map(|i| format!("b:{i}")))
        .collect();
    let before = {
        let store = builder(&d, &clock).open().unwrap();
        block_on(async {
            let mut refs = Vec::new();
            for i in 0..300usize {
                let p = d.owned.join(format!("{i}.jpg"));
                fs::write(&p, i.to_le_bytes()).unwrap();
                let r = store.store(&p, &meta("x"), &scopes[i % 7]).await.unwrap();
                refs.push(r);
                // Retain an earlier ref into a b-scope (renewing if held).
                let back = refs[(i * 31) % refs.len()];
                store.retain(back, &scopes[7 + i % 5]).await.unwrap();
            }
            let mut listing = Vec::new();
            for s in &scopes {
                listing.push(store.refs_in(s).await.unwrap());
            }
            listing
        })
    };
    let store = builder(&d, &clock).open().unwrap();
    let after = block_on(async {
        let mut listing = Vec::new();
        for s in &scopes {
            listing.push(store.refs_in(s).await.unwrap());
        }
        listing
    });
    assert_eq!(after, before);
    store.core().check_invariants().unwrap();
}

#[test]
fn planted_symlinks_and_foreign_databases_in_the_data_dir_are_refused() {
    let clock = ManualClock::new(epoch());
    // A LOCK symlink must not let open truncate or write its target.
    let d = dirs();
    fs::create_dir_all(&d.data).unwrap();
    let victim = d.outside.join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, d.data.join("LOCK")).unwrap();
    assert!(matches!(builder(&d, &clock).open(), Err(Error::Io { .. })));
    assert_eq!(fs::read(&victim).unwrap(), b"precious");

    // An index symlinked to another application's database.
    let d = dirs();
    fs::create_dir_all(&d.data).unwrap();
    let foreign = d.outside.join("app.db");
    {
        let conn = rusqlite::Connection::open(&foreign).unwrap();
        conn.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER);")
            .unwrap();
    }
    let before = fs::read(&foreign).unwrap();
    std::os::unix::fs::symlink(&foreign, d.data.join("index.sqlite")).unwrap();
    assert!(
        builder(&d, &clock).open().is_err(),
        "opened through a symlink"
    );
    // The same database copied in place: refused as not ours, untouched.
    fs::remove_file(d.data.join("index.sqlite")).unwrap();
    fs::copy(&foreign, d.data.join("index.sqlite")).unwrap();
    match builder(&d, &clock).open() {
        Err(Error::Corrupt { detail, .. }) => {
            assert!(detail.contains("not a mediastore"), "{detail}")
        }
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    assert_eq!(fs::read(d.data.join("index.sqlite")).unwrap(), before);
    assert_eq!(fs::read(&foreign).unwrap(), before);
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_data_dir_copied_elsewhere_keeps_its_managed_refs() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let put = {
        let store = builder(&d, &clock).open().unwrap();
        block_on(put(&store, &b"moved bytes"[..], "s"))
    };
    // A backup restored to another path: new inodes, new location.
    let moved = d.outside.join("restored-data");
    copy_tree(&d.data, &moved);
    fs::remove_dir_all(&d.data).unwrap();
    let store = DurableStore::builder(&moved)
        .clock(clock.clone())
        .orphan_grace(Duration::ZERO)
        .open()
        .unwrap();
    let report = store.open_report().clone();
    assert_eq!(report.refs, 1);
    assert!(report.vanished.is_empty(), "{:?}", report.vanished);
    assert_eq!(
        report.orphans.files_removed, 0,
        "the managed file is no orphan"
    );
    let path = block_on(store.resolve(put.media_ref)).unwrap();
    assert!(path.starts_with(store.managed_dir()), "{path:?}");
    assert_eq!(fs::read(&*path).unwrap(), b"moved bytes");
    let (_, resolved) = block_on(store.open(put.media_ref)).unwrap();
    assert_eq!(
        store.digest(&resolved).as_deref(),
        Some(put.sha256.as_str())
    );
    let r = block_on(store.release_all("s")).unwrap();
    assert_eq!(r.files_deleted, 1);
    assert!(!path.exists());
}

#[test]
fn a_cancelled_release_neither_wedges_its_files_nor_loses_their_deletion() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let store = builder(&d, &clock).open().unwrap();
    let a = d.owned.join("a.jpg");
    let b = d.owned.join("b.jpg");
    fs::write(&a, b"a").unwrap();
    fs::write(&b, b"b").unwrap();
    block_on(async {
        store.store(&a, &meta("a"), "s").await.unwrap();
        store.store(&b, &meta("b"), "t").await.unwrap();
        // Both releases are given up while they wait for their commit.
        for scope in ["s", "t"] {
            assert!(
                gave_up(store.release_all(scope)),
                "the release had to wait for its commit"
            );
        }
        // a is registered again: usable, not "being deleted".
        store.store(&a, &meta("a"), "again").await.unwrap();
        // b's deletion is retried by the next sweep, once durable.
        let swept = store.clean_expired().await.unwrap();
        assert_eq!(swept.retried, 1);
        assert_eq!(swept.files_deleted, 1);
    });
    assert!(a.exists());
    assert!(!b.exists());
    store.core().check_invariants().unwrap();
}

#[test]
fn a_cancelled_put_gives_its_quota_reservation_back() {
    let d = dirs();
    let quotas = Quotas {
        max_object_bytes: None,
        max_scope_bytes: Some(100),
        max_total_bytes: None,
    };
    let store = builder(&d, &ManualClock::new(epoch()))
        .quotas(quotas)
        .open()
        .unwrap();
    // On a current-thread runtime the put's fsync runs on the blocking
    // pool, so its first poll returns while that sync is in flight.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (body, lim) = ([1u8; 60], PutLimits::default());
        assert!(
            gave_up(store.put(&body[..], &meta("x"), "s", &lim)),
            "the put had to wait for its commit"
        );
        store.release_all("s").await.unwrap();
        store
            .put(&[2u8; 50][..], &meta("y"), "s", &PutLimits::default())
            .await
            .expect("the cancelled put's 60 bytes are no longer reserved");
    });
}

#[test]
fn a_closed_store_refuses_changes_without_making_them() {
    let d = dirs();
    let clock = ManualClock::new(epoch());
    let store = builder(&d, &clock)
        .max_age(Duration::from_secs(1))
        .open()
        .unwrap();
    let p = d.owned.join("a.jpg");
    fs::write(&p, b"a").unwrap();
    let r = block_on(store.store(&p, &meta("a"), "s")).unwrap();
    store.close().unwrap();
    clock.advance(Duration::from_secs(5));
    block_on(async {
        assert!(
            store.clean_expired().await.is_err(),
            "a sweep needs the journal"
        );
        assert!(store.retain(r, "t").await.is_err());
        assert!(store.release_all("s").await.is_err());
        // Refused before the core changed: the ref and its hold are intact.
        assert_eq!(store.scopes_of(r).await.unwrap(), vec!["s"]);
    });
    assert!(p.exists());
}

/// The index is read through URI filenames at open: a data dir whose name
/// holds URI syntax (`?`, `#`, `%`) must still come back whole.
#[test]
fn a_data_dir_named_with_uri_syntax_reopens_whole() {
    let d = dirs();
    let data = d._tmp.path().join("we?ird#dir%41 x");
    let clock = ManualClock::new(epoch());
    let open = || {
        DurableStore::builder(&data)
            .owned_root(&d.owned)
            .clock(clock.clone())
            .open()
            .expect("open")
    };
    let store = open();
    let report = block_on(put(&store, b"uri bytes", "chat:1"));
    let kept = d.owned.join("kept.txt");
    fs::write(&kept, b"kept").unwrap();
    let stored = block_on(store.store(&kept, &meta("kept.txt"), "chat:2")).unwrap();
    block_on(store.retain(stored, "session:1")).unwrap();
    drop(store);

    let store = open();
    assert_eq!(store.open_report().refs, 2);
    let (mut file, _) = block_on(store.open(report.media_ref)).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
    assert_eq!(bytes, b"uri bytes");
    assert_eq!(
        block_on(store.scopes_of(stored)).unwrap(),
        vec!["chat:2".to_string(), "session:1".to_string()]
    );
    // Nothing of the index was left behind by the readers.
    let leftovers: Vec<_> = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with("-shm"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
