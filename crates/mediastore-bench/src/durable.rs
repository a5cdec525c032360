//! Workloads of the durable engine (`--engine durable`): turns with 1 and
//! 16 clients beside the disk's raw fsync rate, `put` beside a raw
//! write + fsync of the same bytes, and recovery of a data dir of 1M refs.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mediastore::{CleanupPolicy, DurableStore, MediaMeta, MediaRef, MediaStore, PutLimits, Quotas};
use serde_json::json;

use crate::{emit, ratio, rss_bytes};

/// Bench data lives on the disk under the current directory, not in a
/// tmpfs, or fsyncs would cost nothing.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(".mediastore-bench-")
        .tempdir_in(std::env::current_dir().expect("cwd"))
        .expect("scratch dir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Raw fsyncs per second of the disk under `dir`: append a byte, fdatasync,
/// for about `for_time`.
fn fsync_rate(dir: &Path, for_time: Duration) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = File::create(&path).expect("probe file");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_time {
        f.write_all(b"x").expect("write");
        f.sync_data().expect("fdatasync");
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = fs::remove_file(path);
    rate
}

fn open(data: &Path, owned: &Path) -> DurableStore {
    DurableStore::builder(data)
        .owned_root(owned)
        .quotas(Quotas {
            max_object_bytes: None,
            ..Quotas::default()
        })
        .open()
        .expect("open durable store")
}

fn pool(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("f{i}.jpg"));
            fs::write(&p, b"x").expect("pool file");
            p
        })
        .collect()
}

/// One client's turns: 4 stores, 16 resolves, 1 release (5 durable changes).
async fn client(store: Arc<DurableStore>, files: Arc<Vec<PathBuf>>, c: usize, turns: usize) {
    let meta =
        MediaMeta::new("a.jpg", "image/jpeg", "telegram").with_policy(CleanupPolicy::ForgetOnly);
    for i in 0..turns {
        let scope = format!("chat:{c}:msg:{i}");
        let mut refs = [MediaRef::from_random_bytes([0; 16]); 4];
        for (k, r) in refs.iter_mut().enumerate() {
            let f = &files[(c * 512 + i * 4 + k) % files.len()];
            *r = store.store(f, &meta, &scope).await.expect("store");
        }
        for j in 0..16 {
            std::hint::black_box(store.resolve_with_meta(refs[j % 4]).await.expect("resolve"));
        }
        store.release_all(&scope).await.expect("release");
    }
}

/// `turns` with 1 and 16 concurrent clients.
pub fn turns(quick: bool) {
    let dir = scratch();
    let owned = dir.path().join("owned");
    fs::create_dir_all(&owned).expect("mkdir");
    let files = Arc::new(pool(&owned, 1024));
    let store = Arc::new(open(&dir.path().join("data"), &owned));
    let rt = runtime();
    let probe = if quick { 200 } else { 2000 };
    for clients in [1usize, 16] {
        let fsyncs = fsync_rate(dir.path(), Duration::from_millis(probe));
        let per_client = if quick { 20 } else { 2000 / clients.min(4) };
        let before = store.journal_stats();
        let start = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..clients)
                .map(|c| tokio::spawn(client(store.clone(), files.clone(), c, per_client)))
                .collect();
            for t in tasks {
                t.await.expect("client");
            }
        });
        let took = start.elapsed().as_secs_f64();
        let after = store.journal_stats();
        let turns = (clients * per_client) as f64;
        let rate = turns / took;
        let commits = (after.commits - before.commits) as f64;
        emit(json!({
            "bench": "turns", "engine": "durable", "clients": clients,
            "turns": clients * per_client,
            "turns_per_s": rate.round(),
            "fsyncs_per_s": fsyncs.round(),
            "turns_per_fsync": ratio(rate, fsyncs),
            "commits_per_turn": ratio(commits, turns),
            "changes_per_commit": ratio((after.changes - before.changes) as f64, commits),
            "apply_us_per_commit": ratio((after.apply_nanos - before.apply_nanos) as f64 / 1e3, commits),
            "commit_us_per_commit": ratio((after.commit_nanos - before.commit_nanos) as f64 / 1e3, commits),
            "raw_fsync_us": ratio(1e6, fsyncs),
        }));
    }
}

/// `put` of 1,000 files of 64 KiB and of one 256 MiB file, beside the same
/// bytes written to new files with one fsync each. The two alternate in
/// rounds (the disk's speed drifts), and each side's total time is summed.
pub fn put(quick: bool) {
    let dir = scratch();
    let owned = dir.path().join("owned");
    fs::create_dir_all(&owned).expect("mkdir");
    let rt = runtime();
    // (files, bytes each, rounds)
    let shapes: [(usize, usize, usize); 2] = if quick {
        [(10, 64 << 10, 2), (1, 4 << 20, 1)]
    } else {
        [(1000, 64 << 10, 10), (1, 256 << 20, 3)]
    };
    for (n, size, rounds) in shapes {
        // Distinct bodies, so nothing deduplicates.
        let body = |i: usize| {
            let mut b = vec![0u8; size];
            for (j, chunk) in b.chunks_mut(8).enumerate() {
                let v = ((i as u64) << 40) ^ j as u64;
                chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
            }
            b
        };
        let per_round = n.div_ceil(rounds).max(1);
        let data = dir.path().join(format!("data-{n}"));
        let store = open(&data, &owned);
        let meta = MediaMeta::new("blob.bin", "application/octet-stream", "bench");
        let raw_dir = dir.path().join("raw");
        fs::create_dir_all(&raw_dir).expect("mkdir");
        let (mut floor, mut ours, mut done) = (0.0, 0.0, 0);
        for round in 0..rounds.max(n / per_round) {
            let first = round * per_round;
            if first >= n.max(rounds) {
                break;
            }
            // Bodies differ between the sides and from round to round.
            let raw_bodies: Vec<Vec<u8>> = (0..per_round).map(|k| body(2 * (first + k))).collect();
            let put_bodies: Vec<Vec<u8>> =
                (0..per_round).map(|k| body(2 * (first + k) + 1)).collect();
            let raw_side = || {
                let start = Instant::now();
                for (k, b) in raw_bodies.iter().enumerate() {
                    let mut f =
                        File::create(raw_dir.join((first + k).to_string())).expect("raw file");
                    f.write_all(b).expect("write");
                    f.sync_all().expect("fsync");
                }
                start.elapsed().as_secs_f64()
            };
            let put_side = || {
                let start = Instant::now();
                rt.block_on(async {
                    for (k, b) in put_bodies.iter().enumerate() {
                        let scope = format!("s:{}", first + k);
                        store
                            .put(&b[..], &meta, &scope, &PutLimits::default())
                            .await
                            .expect("put");
                    }
                });
                start.elapsed().as_secs_f64()
            };
            // Each side goes first in every other round: whatever one
            // leaves behind for the disk (writeback, journal) the other
            // pays as often.
            if round % 2 == 0 {
                floor += raw_side();
                ours += put_side();
            } else {
                ours += put_side();
                floor += raw_side();
            }
            done += per_round;
        }
        let mb = (done * size) as f64 / (1 << 20) as f64;
        emit(json!({
            "bench": "put", "engine": "durable", "files": done, "file_bytes": size,
            "mb_per_s": (mb / ours * 10.0).round() / 10.0,
            "floor_mb_per_s": (mb / floor * 10.0).round() / 10.0,
            "ratio_to_floor": ratio(floor, ours),
        }));
    }
}

/// Opening a data dir of 1M refs (1024 pool files, 10 refs per scope):
/// time, and resident bytes per ref after open. A child process fills the
/// data dir, so this process's memory holds only what opening costs.
pub fn recovery(quick: bool) {
    let refs = if quick { 10_000 } else { 1_000_000 };
    if let Some(dir) = std::env::var_os("MEDIASTORE_BENCH_FILL") {
        return fill(Path::new(&dir), refs);
    }
    let dir = scratch();
    let exe = std::env::current_exe().expect("own path");
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["recovery", "--engine", "durable"])
        .env("MEDIASTORE_BENCH_FILL", dir.path());
    if quick {
        cmd.arg("--quick");
    }
    let fill_start = Instant::now();
    assert!(cmd.status().expect("filler").success(), "filler failed");
    let fill_s = fill_start.elapsed().as_secs_f64();
    // The in-memory engine's footprint for the same refs, measured now in
    // a fresh process (this one's allocator must not have served a fill).
    let memory_engine = {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["memory", "--engine", "memory"]);
        if quick {
            cmd.arg("--quick");
        }
        let out = cmd.output().expect("memory engine run");
        assert!(out.status.success(), "memory engine run failed");
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("memory figures");
        line["bytes_per_ref"].as_f64().expect("bytes_per_ref")
    };
    // What is measured is opening, not the tail of the fill's writeback.
    let _ = std::process::Command::new("sync").status();
    let before = rss_bytes();
    let start = Instant::now();
    let store = open(&dir.path().join("data"), &dir.path().join("owned"));
    let seconds = start.elapsed().as_secs_f64();
    let after = rss_bytes();
    assert_eq!(store.open_report().refs, refs as u64);
    let per_ref = (after.saturating_sub(before)) as f64 / refs as f64;
    emit(json!({
        "bench": "recovery", "engine": "durable", "refs": refs,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "bytes_per_ref": per_ref.round(),
        "memory_engine_bytes_per_ref": memory_engine.round(),
        "ratio_to_memory_engine": ratio(per_ref, memory_engine),
        "fill_seconds": (fill_s * 10.0).round() / 10.0,
    }));
}

fn fill(dir: &Path, refs: usize) {
    let owned = dir.join("owned");
    fs::create_dir_all(&owned).expect("mkdir");
    let files = Arc::new(pool(&owned, 1024));
    let store = Arc::new(open(&dir.join("data"), &owned));
    runtime().block_on(async {
        let tasks: Vec<_> = (0..256)
            .map(|t| {
                let (store, files) = (store.clone(), files.clone());
                tokio::spawn(async move {
                    let meta = MediaMeta::new("a.jpg", "image/jpeg", "telegram")
                        .with_policy(CleanupPolicy::ForgetOnly);
                    for i in (t..refs).step_by(256) {
                        let f = &files[i % files.len()];
                        let scope = format!("scope:{}", i / 10);
                        store.store(f, &meta, &scope).await.expect("store");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("filler");
        }
    });
}
