//! `mediastore-bench`: the workloads of DESIGN.md §6, one JSON object per
//! line, each figure printed beside its floor or baseline from the same run.
//!
//! ```text
//! mediastore-bench [all|turns|delete|memory|sweep] [--engine memory|seed] [--quick]
//! ```
//!
//! `all` runs every workload in a child process of its own, so that one
//! workload's heap does not distort the next one's memory or timing.
//! `--engine seed` runs the workloads on a faithful port of the Go seed
//! (`mediastore::conformance::seed_port`); runs of the memory engine also
//! time that port in the same run, as a baseline.

mod bound;
mod durable;

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, UNIX_EPOCH};

use mediastore::conformance::seed_port::SeedStore;
use mediastore::{
    CleanupPolicy, ManualClock, MediaMeta, MediaRef, MediaStore, MemoryStore, SystemClock,
};
use serde_json::json;

const WORKLOADS: [&str; 4] = ["turns", "delete", "memory", "sweep"];
const DURABLE_WORKLOADS: [&str; 3] = ["turns", "put", "recovery"];
/// The Go seed's memory per live ref (DESIGN.md §6).
const SEED_BYTES_PER_REF: f64 = 977.0;

/// Which store a run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Memory,
    /// The port of the Go seed, defects included.
    Seed,
    /// The durable embedded engine.
    Durable,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Seed => "seed",
            Engine::Durable => "durable",
        }
    }

    fn workloads(self) -> &'static [&'static str] {
        match self {
            Engine::Durable => &DURABLE_WORKLOADS,
            _ => &WORKLOADS,
        }
    }
}

struct Args {
    workload: String,
    engine: Engine,
    /// Divides every count by 100: a smoke run for CI, not a measurement.
    quick: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workload: "all".into(),
        engine: Engine::Memory,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--engine" => {
                args.engine = match it.next().as_deref() {
                    Some("memory") => Engine::Memory,
                    Some("seed") => Engine::Seed,
                    Some("durable") => Engine::Durable,
                    other => {
                        return Err(format!(
                            "unknown engine {other:?}; this build has: memory, seed, durable"
                        ));
                    }
                }
            }
            "--quick" => args.quick = true,
            "-h" | "--help" => {
                return Err(
                    "usage: mediastore-bench [all|turns|delete|memory|sweep|put|recovery] [--engine memory|seed|durable] [--quick]\n(put and recovery are durable-engine workloads; delete, memory and sweep are not)"
                        .into(),
                );
            }
            w if w == "all" || WORKLOADS.contains(&w) || DURABLE_WORKLOADS.contains(&w) => {
                args.workload = w.into()
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.workload == "all" {
        let exe = std::env::current_exe().expect("own path");
        for w in args.engine.workloads() {
            let mut cmd = Command::new(&exe);
            cmd.arg(w).arg("--engine").arg(args.engine.name());
            if args.quick {
                cmd.arg("--quick");
            }
            let status = cmd.status().expect("run child");
            if !status.success() {
                eprintln!("workload {w} failed: {status}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    if !args.engine.workloads().contains(&args.workload.as_str()) {
        eprintln!(
            "workload {} does not run on engine {}",
            args.workload,
            args.engine.name()
        );
        return ExitCode::from(2);
    }
    let scale = if args.quick { 100 } else { 1 };
    let e = args.engine;
    let seed = || SeedStore::new(None, SystemClock);
    match (args.workload.as_str(), e) {
        ("turns", Engine::Memory) => turns(e, scale, &memory_store(None), Some(&seed())),
        ("turns", Engine::Seed) => turns(e, scale, &seed(), None::<&SeedStore>),
        ("delete", Engine::Memory) => {
            let dir = tempfile::tempdir().expect("tempdir");
            let ours = memory_store(Some(dir.path()));
            delete(e, scale, dir.path(), &ours, Some(&seed()));
        }
        ("delete", Engine::Seed) => {
            let dir = tempfile::tempdir().expect("tempdir");
            delete(e, scale, dir.path(), &seed(), None::<&SeedStore>);
        }
        ("memory", Engine::Memory) => memory(e, scale, &memory_store(None)),
        ("memory", Engine::Seed) => memory(e, scale, &seed()),
        ("sweep", _) => sweep(e, scale),
        ("turns", Engine::Durable) => durable::turns(args.quick),
        ("put", Engine::Durable) => durable::put(args.quick),
        ("recovery", Engine::Durable) => durable::recovery(args.quick),
        _ => unreachable!("validated"),
    }
    ExitCode::SUCCESS
}

/// Polls a future that never waits: every memory-engine call is ready on
/// the first poll, so a runtime would only add its own overhead to the
/// figures.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory engine future was not ready"),
    }
}

fn memory_store(owned_root: Option<&Path>) -> MemoryStore {
    let mut b = MemoryStore::builder();
    if let Some(root) = owned_root {
        b = b.owned_root(root);
    }
    b.build().expect("store")
}

fn pool(dir: &Path, n: usize, bytes: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("pool-{i}.jpg"));
            fs::write(&p, vec![b'x'; bytes]).expect("write pool file");
            p
        })
        .collect()
}

fn emit(v: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{v}").and_then(|()| out.flush()) {
        // A reader that went away (`| head`) is not an error worth a panic.
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("writing results: {e}");
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

fn threads_per_core() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `per_thread(thread_index, first_turn, turns)` on `threads` threads
/// and returns how long it took.
fn run_threads(
    threads: usize,
    first: usize,
    total: usize,
    per_thread: &(dyn Fn(usize, usize, usize) + Sync),
) -> Duration {
    let per = total / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || per_thread(t, first, per));
        }
    });
    start.elapsed()
}

/// Chunks per measurement. The host's speed drifts by ±15% within seconds
/// on these shared machines, so every job of a comparison (a workload and
/// its floor, one thread and several) runs one chunk in turn, round after
/// round, and all of them see the same drift.
const ROUNDS: usize = 10;

/// One thing to time: a thread count and the work each thread does.
type Job<'a> = (usize, &'a (dyn Fn(usize, usize, usize) + Sync));

/// Runs `total` turns of each job, interleaved chunk by chunk; returns each
/// job's rate in turns per second.
fn interleaved(total: usize, jobs: &[Job<'_>]) -> Vec<f64> {
    let chunk = total / ROUNDS;
    let mut took = vec![Duration::ZERO; jobs.len()];
    for round in 0..ROUNDS {
        for (j, (threads, work)) in jobs.iter().enumerate() {
            took[j] += run_threads(*threads, round * chunk, chunk, *work);
        }
    }
    jobs.iter()
        .zip(took)
        .map(|((threads, _), t)| (chunk / threads * threads * ROUNDS) as f64 / t.as_secs_f64())
        .collect()
}

fn turns<S: MediaStore, B: MediaStore>(engine: Engine, scale: usize, store: &S, seed: Option<&B>) {
    const TURNS: usize = 200_000;
    let total = TURNS / scale;
    let dir = tempfile::tempdir().expect("tempdir");
    let files = pool(dir.path(), 1024, 1);
    let meta =
        MediaMeta::new("a.jpg", "image/jpeg", "telegram").with_policy(CleanupPolicy::ForgetOnly);
    let pick = |t: usize, i: usize, k: usize| &files[(t * 512 + i * 4 + k) % files.len()];
    let floor = |t: usize, first: usize, n: usize| {
        for i in first..first + n {
            for k in 0..4 {
                std::hint::black_box(fs::symlink_metadata(pick(t, i, k)).expect("stat"));
            }
        }
    };
    let work = |t: usize, first: usize, n: usize| turn_loop(store, &meta, t, first, n, &pick);
    let base = |t: usize, first: usize, n: usize| {
        if let Some(seed) = seed {
            turn_loop(seed, &meta, t, first, n, &pick);
        }
    };
    // Warm up the allocator, the caches and the store's tables.
    run_threads(1, 0, total / 10, &|_, first, n| {
        turn_loop(store, &meta, 100, first, n, &pick)
    });
    // Only ever run on one thread; the mutex just satisfies `Sync`.
    let table = std::sync::Mutex::new(bound::Bound::default());
    let bound = |t: usize, first: usize, n: usize| {
        let mut table = table.lock().expect("bound table");
        table.turns(first, n, |i, k| pick(t, i, k));
    };
    let many = threads_per_core();
    let mut jobs: Vec<Job<'_>> = vec![
        (1, &floor),
        (1, &work),
        (many, &floor),
        (many, &work),
        (1, &bound),
    ];
    if seed.is_some() {
        jobs.extend([
            (1, &base as &(dyn Fn(usize, usize, usize) + Sync)),
            (many, &base),
        ]);
    }
    let rates = interleaved(total, &jobs);
    for (i, threads) in [1, many].into_iter().enumerate() {
        let (floor, rate) = (rates[2 * i], rates[2 * i + 1]);
        let mut line = json!({
            "bench": "turns", "engine": engine.name(), "threads": threads, "turns": total,
            "turns_per_s": rate.round(), "floor_turns_per_s": floor.round(),
            "ratio_to_floor": ratio(rate, floor),
        });
        if threads > 1 {
            line["ratio_to_1_thread"] = json!(ratio(rate, rates[1]));
        } else {
            line["bound_turns_per_s"] = json!(rates[4].round());
            line["bound_ratio_to_floor"] = json!(ratio(rates[4], floor));
        }
        if seed.is_some() {
            let seed_rate = rates[5 + i];
            line["seed_port_turns_per_s"] = json!(seed_rate.round());
            line["ratio_to_seed_port"] = json!(ratio(rate, seed_rate));
        }
        emit(line);
    }
}

/// `n` turns of thread `t`, numbered from `first` (scopes stay unique).
fn turn_loop<'a, S: MediaStore>(
    store: &S,
    meta: &MediaMeta,
    t: usize,
    first: usize,
    n: usize,
    pick: &impl Fn(usize, usize, usize) -> &'a PathBuf,
) {
    let mut scope = String::new();
    for i in first..first + n {
        use std::fmt::Write;
        scope.clear();
        write!(scope, "chat:{t}:msg:{i}").expect("format");
        let refs: [MediaRef; 4] = std::array::from_fn(|k| {
            ready(store.store(pick(t, i, k), meta, &scope)).expect("store")
        });
        for j in 0..16 {
            std::hint::black_box(ready(store.resolve_with_meta(refs[j % 4])).expect("resolve"));
        }
        ready(store.release_all(&scope)).expect("release");
    }
}

fn delete<S: MediaStore, B: MediaStore>(
    engine: Engine,
    scale: usize,
    dir: &Path,
    store: &S,
    seed: Option<&B>,
) {
    const TURNS: usize = 20_000;
    let total = TURNS / scale;
    let data = vec![b'x'; 4096];
    let meta = MediaMeta::new("a.jpg", "image/jpeg", "telegram")
        .with_policy(CleanupPolicy::DeleteOnCleanup);
    let names: Vec<PathBuf> = (0..4).map(|k| dir.join(format!("d{k}.jpg"))).collect();
    let floor = |_: usize, first: usize, n: usize| {
        for _ in first..first + n {
            for p in &names {
                fs::write(p, &data).expect("write");
            }
            for p in &names {
                std::hint::black_box(fs::symlink_metadata(p).expect("stat"));
                fs::remove_file(p).expect("unlink");
            }
        }
    };
    let turns_on = |store: &dyn Fn(&Path, &str), release: &dyn Fn(&str), first: usize, n: usize| {
        let mut scope = String::new();
        for i in first..first + n {
            for p in &names {
                fs::write(p, &data).expect("write");
            }
            use std::fmt::Write;
            scope.clear();
            write!(scope, "chat:0:msg:{i}").expect("format");
            for p in &names {
                store(p, &scope);
            }
            release(&scope);
            debug_assert!(names.iter().all(|p| !p.exists()));
        }
    };
    let work = |_: usize, first: usize, n: usize| {
        turns_on(
            &|p, scope| {
                ready(store.store(p, &meta, scope)).expect("store");
            },
            &|scope| {
                let report = ready(store.release_all(scope)).expect("release");
                assert_eq!(report.files_deleted, 4, "{report:?}");
            },
            first,
            n,
        )
    };
    let base = |_: usize, first: usize, n: usize| {
        if let Some(seed) = seed {
            turns_on(
                &|p, scope| {
                    ready(seed.store(p, &meta, scope)).expect("store");
                },
                &|scope| {
                    ready(seed.release_all(scope)).expect("release");
                },
                first,
                n,
            )
        }
    };
    run_threads(1, 0, total / 10, &work);
    let mut jobs: Vec<Job<'_>> = vec![(1, &floor), (1, &work)];
    if seed.is_some() {
        jobs.push((1, &base));
    }
    let rates = interleaved(total, &jobs);
    let mut line = json!({
        "bench": "delete", "engine": engine.name(), "threads": 1, "turns": total,
        "turns_per_s": rates[1].round(), "floor_turns_per_s": rates[0].round(),
        "ratio_to_floor": ratio(rates[1], rates[0]),
    });
    if seed.is_some() {
        line["seed_port_turns_per_s"] = json!(rates[2].round());
        line["ratio_to_seed_port"] = json!(ratio(rates[1], rates[2]));
    }
    emit(line);
}

fn rss_bytes() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// `refs` live refs over the 1024-file pool, 10 per scope. `before(i)` runs
/// before the i-th store (the sweep workload dates refs with it).
fn fill<S: MediaStore>(
    store: &S,
    files: &[PathBuf],
    refs: usize,
    mut before: impl FnMut(usize),
) -> Vec<MediaRef> {
    let meta =
        MediaMeta::new("a.jpg", "image/jpeg", "telegram").with_policy(CleanupPolicy::ForgetOnly);
    let mut out = Vec::with_capacity(refs);
    let mut scope = String::new();
    for i in 0..refs {
        if i % 10 == 0 {
            use std::fmt::Write;
            scope.clear();
            write!(scope, "chat:{}:msg:{}", i % 97, i / 10).expect("format");
        }
        before(i);
        out.push(ready(store.store(&files[i % files.len()], &meta, &scope)).expect("store"));
    }
    out
}

fn memory<S: MediaStore>(engine: Engine, scale: usize, store: &S) {
    let refs = 1_000_000 / scale;
    let dir = tempfile::tempdir().expect("tempdir");
    let files = pool(dir.path(), 1024, 1);
    let before = rss_bytes();
    let ids = fill(store, &files, refs, |_| {});
    // The bench's own list of refs is not part of the store's footprint.
    let ids_bytes = (ids.capacity() * std::mem::size_of::<MediaRef>()) as u64;
    let after = rss_bytes();
    let per_ref = (after.saturating_sub(before).saturating_sub(ids_bytes)) as f64 / refs as f64;
    emit(json!({
        "bench": "memory", "engine": engine.name(), "refs": refs,
        "bytes_per_ref": per_ref.round(), "go_seed_bytes_per_ref": SEED_BYTES_PER_REF,
        "ratio_to_go_seed": ratio(per_ref, SEED_BYTES_PER_REF),
    }));
}

/// What one sweep under a concurrent reader measured.
struct Swept {
    expired: u64,
    sweep_ms: f64,
    /// Reader latencies (ns), sorted: while the other thread only spins, and
    /// during the sweep.
    baseline: Vec<u64>,
    busy: Vec<u64>,
}

fn pct(lat: &[u64], p: f64) -> f64 {
    let us = lat
        .get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
        .map_or(0.0, |&ns| ns as f64 / 1000.0);
    (us * 100.0).round() / 100.0
}

/// Fills a store with `refs` refs, half of them older than the max age,
/// then sweeps once while another thread resolves random live refs.
fn sweep_once<S: MediaStore>(refs: usize, make: impl FnOnce(ManualClock, Duration) -> S) -> Swept {
    let max_age = Duration::from_secs(600);
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = pool(dir.path(), 1024, 1);
    let clock = ManualClock::new(t0);
    let store = Arc::new(make(clock.clone(), max_age));
    // Within each scope of 10, the first 5 refs are old and the last 5 fresh.
    let ids = fill(&*store, &files, refs, |i| {
        clock.set(if i % 10 < 5 { t0 } else { t0 + max_age });
    });
    clock.set(t0 + max_age + Duration::from_secs(1));
    let live: Vec<MediaRef> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 >= 5)
        .map(|(_, r)| *r)
        .collect();
    drop(ids);
    // Phases of the reader: 0 warm up, 1 record while this thread burns CPU
    // without touching the store (the baseline: what the host does to a
    // reader when both CPUs are busy), 2 record during the sweep, 3 stop.
    let phase = Arc::new(AtomicU8::new(0));
    let reader = {
        let (store, phase) = (store.clone(), phase.clone());
        std::thread::spawn(move || {
            // Touched up front: a page fault inside the timed loop would be
            // charged to the sweep.
            let cap = 1 << 22;
            let mut lat = [vec![0u64; cap], vec![0u64; cap]];
            let mut n = [0usize; 2];
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            loop {
                let p = phase.load(Ordering::Acquire);
                if p == 3 {
                    break;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let r = live[(x % live.len() as u64) as usize];
                let start = Instant::now();
                std::hint::black_box(ready(store.resolve_with_meta(r)).expect("live ref"));
                let took = start.elapsed().as_nanos() as u64;
                if p == 1 || p == 2 {
                    let i = p as usize - 1;
                    if n[i] < cap {
                        lat[i][n[i]] = took;
                        n[i] += 1;
                    }
                }
            }
            let [mut baseline, mut busy] = lat;
            baseline.truncate(n[0]);
            busy.truncate(n[1]);
            baseline.sort_unstable();
            busy.sort_unstable();
            (baseline, busy)
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    phase.store(1, Ordering::Release);
    let spin = Instant::now();
    while spin.elapsed() < Duration::from_millis(300) {
        std::hint::spin_loop();
    }
    phase.store(2, Ordering::Release);
    let start = Instant::now();
    let report = ready(store.clean_expired()).expect("sweep");
    let sweep_ms = start.elapsed().as_secs_f64() * 1000.0;
    phase.store(3, Ordering::Release);
    let (baseline, busy) = reader.join().expect("reader");
    Swept {
        expired: report.refs_expired,
        sweep_ms,
        baseline,
        busy,
    }
}

fn sweep(engine: Engine, scale: usize) {
    let refs = 1_000_000 / scale;
    let seed = |clock: ManualClock, max_age| SeedStore::new(Some(max_age), clock);
    let ours = match engine {
        Engine::Memory => sweep_once(refs, |clock, max_age| {
            MemoryStore::builder()
                .max_age(max_age)
                .clock(clock)
                .build()
                .expect("store")
        }),
        Engine::Seed | Engine::Durable => sweep_once(refs, seed),
    };
    let ms = |m: f64| (m * 10.0).round() / 10.0;
    let mut line = json!({
        "bench": "sweep", "engine": engine.name(), "refs": refs, "expired": ours.expired,
        "sweep_ms": ms(ours.sweep_ms),
        "reader_samples": ours.busy.len(),
        "reader_p50_us": pct(&ours.busy, 0.50),
        "reader_p99_us": pct(&ours.busy, 0.99),
        "reader_max_us": pct(&ours.busy, 1.0),
        "baseline_reader_p99_us": pct(&ours.baseline, 0.99),
        "baseline_reader_max_us": pct(&ours.baseline, 1.0),
    });
    if engine == Engine::Memory {
        let base = sweep_once(refs, seed);
        assert_eq!(base.expired, ours.expired, "same workload on both engines");
        line["seed_port_sweep_ms"] = json!(ms(base.sweep_ms));
        line["speedup_vs_seed_port"] = json!(ratio(base.sweep_ms, ours.sweep_ms));
        line["seed_port_reader_max_us"] = json!(pct(&base.busy, 1.0));
    }
    emit(line);
}
