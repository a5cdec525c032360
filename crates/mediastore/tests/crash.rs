//! Crash consistency of the durable engine under real `kill -9`.
//!
//! The test binary re-executes itself as a child process (switched by the
//! `MEDIASTORE_CRASH_CHILD` environment variable at the start of the test
//! function). The child opens a data dir, runs random operations from a
//! seeded RNG on several concurrent tasks (so group commit batches changes
//! of different callers), and prints one line to stdout for every operation
//! that returned `Ok` — only after it returned. The parent kills the child
//! with SIGKILL at a random moment, reopens the same data dir in-process and
//! checks that everything the child was told is durable is there: every ref
//! acknowledged as held resolves, is still held by each scope that was
//! acknowledged as holding it, and opens to a file with the acknowledged
//! bytes; and that a ref whose every hold was acknowledged released stays
//! gone. State accumulates across cycles; before each cycle the parent
//! hands the child the refs it knows to be live, for `retain` and for
//! storing their files again. One cycle in ten is killed during startup and
//! recovery; the others run 5 to 80 ms after the store opened. At the end an
//! open with no orphan grace must leave no unreferenced file in the managed
//! dir, and releasing every scope must empty it, delete every owned file
//! and leave every external one. The run fails too if the child makes
//! (almost) no progress, since checking nothing proves nothing.
//!
//! Protocol lines start with `@@ <task>`; each operation is announced by a
//! `BEGIN` line before it starts (so the parent knows which operations were
//! in flight at the kill and may or may not have landed) and followed by
//! exactly one acknowledgement line (or a `NACK` line for an expected,
//! harmless refusal such as retaining a ref that was released meanwhile).
//! Operations on one scope are serialised in the child by a per-scope lock
//! held from `BEGIN` to the acknowledgement, so the order of the lines of one
//! scope is the order the engine applied them.
//!
//! Environment: `MEDIASTORE_CRASH_SEED` fixes the parent's seed,
//! `MEDIASTORE_CRASH_CYCLES` the number of cycles (default 100) and
//! `MEDIASTORE_CRASH_BUDGET_SECS` the wall-clock cap of the cycles (default
//! 60; whichever limit comes first ends them).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mediastore::{
    CleanupPolicy, DurableStore, Error, FileState, MediaMeta, MediaRef, MediaStore, PutLimits,
};

const TEST_NAME: &str = "crash_consistency_under_sigkill";
const ENV_CHILD: &str = "MEDIASTORE_CRASH_CHILD";
const ENV_SEED: &str = "MEDIASTORE_CRASH_SEED";
const ENV_CYCLE: &str = "MEDIASTORE_CRASH_CYCLE";
const ENV_CYCLES: &str = "MEDIASTORE_CRASH_CYCLES";
const ENV_BUDGET: &str = "MEDIASTORE_CRASH_BUDGET_SECS";

/// Scopes the child uses: `chat:0` .. `chat:7`.
const SCOPES: usize = 8;
/// Concurrent tasks in the child.
const TASKS: usize = 4;
/// Contents shared by puts of every cycle, to exercise deduplication.
const POOL: usize = 12;
/// Refs the child remembers for `retain` and re-`store`.
const KNOWN_MAX: usize = 400;
const DEFAULT_CYCLES: u32 = 100;
/// Wall-clock cap of the kill cycles, in seconds.
const DEFAULT_BUDGET_SECS: u64 = 60;

const OWNED: &str = "owned";
const EXTERNAL: &str = "external";
const KNOWN: &str = "known.txt";

#[test]
fn crash_consistency_under_sigkill() {
    if let Ok(data) = std::env::var(ENV_CHILD) {
        child::run(PathBuf::from(data));
    }
    parent::run();
}

fn scope_name(i: usize) -> String {
    format!("chat:{i}")
}

/// xorshift64*, seeded through splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn index(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// 1 B to 64 KiB, log-uniform (mostly small, sometimes large).
    fn bytes(&mut self) -> Vec<u8> {
        let bits = self.below(17);
        let len = 1 + self.below(1 << bits) as usize;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// SHA-256, lowercase hex: computed here so the check does not trust the
/// engine's own digest.
fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = Vec::with_capacity(data.len() + 72);
    msg.extend_from_slice(data);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    let mut w = [0u32; 64];
    for block in msg.chunks_exact(64) {
        for (wi, word) in w.iter_mut().zip(block.chunks_exact(4)) {
            *wi = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for (k, wi) in K.iter().zip(w.iter()) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(*k)
                .wrapping_add(*wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|v| format!("{v:08x}")).collect()
}

/// The shared contents: the same in every cycle, so puts deduplicate
/// against files of earlier cycles too.
fn pool_content(i: usize) -> Vec<u8> {
    Rng::new(0xdede_dede_u64 ^ ((i as u64) << 32)).bytes()
}

/// What kind of file a ref names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Written by `put` into the managed dir.
    Put,
    /// Registered with `store`, in the owned dir (`delete_on_cleanup`).
    Owned,
    /// Registered with `store`, outside every owned root (`forget_only`).
    External,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Put => "P",
            Kind::Owned => "O",
            Kind::External => "E",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "P" => Some(Kind::Put),
            "O" => Some(Kind::Owned),
            "E" => Some(Kind::External),
            _ => None,
        }
    }

    fn policy(self) -> CleanupPolicy {
        match self {
            Kind::Put | Kind::Owned => CleanupPolicy::DeleteOnCleanup,
            Kind::External => CleanupPolicy::ForgetOnly,
        }
    }
}

/// The child: runs the workload until it is killed.
mod child {
    use super::*;

    /// A ref the child may retain or whose file it may store again.
    #[derive(Clone)]
    struct Known {
        media_ref: MediaRef,
        sha: String,
        kind: Kind,
        path: Option<PathBuf>,
    }

    struct Shared {
        store: DurableStore,
        known: Mutex<Vec<Known>>,
        locks: Vec<tokio::sync::Mutex<()>>,
        pool: Vec<(Vec<u8>, String)>,
        root: PathBuf,
        cycle: u64,
    }

    /// Writes one protocol line in one `write` (a pipe write under
    /// `PIPE_BUF` is atomic) and flushes it.
    fn emit(line: &str) {
        let text = format!("@@ {line}\n");
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).expect("child: stdout");
        out.flush().expect("child: stdout");
    }

    fn read_known(path: &Path) -> Vec<Known> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|line| {
                let mut it = line.splitn(4, ' ');
                let media_ref = it.next()?.parse().ok()?;
                let sha = it.next()?.to_string();
                let kind = Kind::parse(it.next()?)?;
                let path = it.next().filter(|p| *p != "-").map(PathBuf::from);
                Some(Known {
                    media_ref,
                    sha,
                    kind,
                    path,
                })
            })
            .collect()
    }

    pub fn run(data: PathBuf) -> ! {
        // A failed assertion anywhere (a task included) ends the process
        // with a status the parent reports, instead of a task dying quietly.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            std::process::exit(101);
        }));
        let seed: u64 = std::env::var(ENV_SEED)
            .expect("child: seed")
            .parse()
            .expect("child: seed");
        let cycle: u64 = std::env::var(ENV_CYCLE)
            .expect("child: cycle")
            .parse()
            .expect("child: cycle");
        let root = data.parent().expect("child: data dir parent").to_path_buf();
        let store = DurableStore::builder(&data)
            .owned_root(root.join(OWNED))
            .orphan_grace(Duration::from_secs(3600))
            .open()
            .unwrap_or_else(|e| panic!("child: open {}: {e}", data.display()));
        let report = store.open_report();
        emit(&format!(
            "- READY refs={} vanished={} temp_files_removed={} deletions_completed={}",
            report.refs,
            report.vanished.len(),
            report.temp_files_removed,
            report.deletions_completed
        ));
        let pool = (0..POOL)
            .map(|i| {
                let bytes = pool_content(i);
                let sha = sha256_hex(&bytes);
                (bytes, sha)
            })
            .collect();
        let shared = Arc::new(Shared {
            store,
            known: Mutex::new(read_known(&root.join(KNOWN))),
            locks: (0..SCOPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            pool,
            root,
            cycle,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(TASKS)
            .build()
            .expect("child: runtime");
        rt.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let seed = seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    tokio::spawn(worker(shared.clone(), t, seed))
                })
                .collect();
            for t in tasks {
                t.await.expect("child: worker");
            }
        });
        eprintln!("child: workers returned");
        std::process::exit(102);
    }

    fn remember(sh: &Shared, rng: &mut Rng, k: Known) {
        let mut known = sh.known.lock().unwrap();
        if known.len() >= KNOWN_MAX {
            let i = rng.index(known.len());
            known.swap_remove(i);
        }
        known.push(k);
    }

    fn pick_known(sh: &Shared, rng: &mut Rng, with_path: bool) -> Option<Known> {
        let known = sh.known.lock().unwrap();
        let candidates: Vec<&Known> = known
            .iter()
            .filter(|k| !with_path || k.path.is_some())
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[rng.index(candidates.len())].clone())
    }

    async fn worker(sh: Arc<Shared>, task: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let store = &sh.store;
        let mut n = 0u64;
        loop {
            n += 1;
            let si = rng.index(SCOPES);
            let scope = scope_name(si);
            match rng.below(100) {
                // put: fresh bytes, or content shared across tasks and cycles
                0..30 => {
                    let (bytes, sha) = if rng.below(3) == 0 {
                        sh.pool[rng.index(POOL)].clone()
                    } else {
                        let b = rng.bytes();
                        let s = sha256_hex(&b);
                        (b, s)
                    };
                    let meta = MediaMeta::new("blob.bin", "application/octet-stream", "crash");
                    let _g = sh.locks[si].lock().await;
                    emit(&format!("{task} BEGIN PUT {scope}"));
                    let rep = store
                        .put(&bytes[..], &meta, &scope, &PutLimits::default())
                        .await
                        .unwrap_or_else(|e| panic!("child: put: {e}"));
                    assert_eq!(rep.sha256, sha, "child: put digest");
                    assert_eq!(rep.size, bytes.len() as u64, "child: put size");
                    emit(&format!(
                        "{task} PUT {} {scope} {sha} {} {}",
                        rep.media_ref,
                        rep.size,
                        u8::from(rep.deduplicated)
                    ));
                    drop(_g);
                    remember(
                        &sh,
                        &mut rng,
                        Known {
                            media_ref: rep.media_ref,
                            sha,
                            kind: Kind::Put,
                            path: None,
                        },
                    );
                }
                // store: a new file, owned or external
                30..48 => {
                    let kind = if rng.below(3) == 0 {
                        Kind::External
                    } else {
                        Kind::Owned
                    };
                    let dir = sh.root.join(match kind {
                        Kind::External => EXTERNAL,
                        _ => OWNED,
                    });
                    let path = dir.join(format!("c{}-t{task}-{n}.bin", sh.cycle));
                    let bytes = rng.bytes();
                    let sha = sha256_hex(&bytes);
                    std::fs::write(&path, &bytes).expect("child: writing a file to store");
                    let meta = MediaMeta::new("file.bin", "application/octet-stream", "crash")
                        .with_policy(kind.policy());
                    let _g = sh.locks[si].lock().await;
                    emit(&format!("{task} BEGIN STORE {scope}"));
                    let r = store
                        .store(&path, &meta, &scope)
                        .await
                        .unwrap_or_else(|e| panic!("child: store {}: {e}", path.display()));
                    emit(&format!(
                        "{task} STORE {r} {scope} {sha} {} {}",
                        kind.code(),
                        path.display()
                    ));
                    drop(_g);
                    remember(
                        &sh,
                        &mut rng,
                        Known {
                            media_ref: r,
                            sha,
                            kind,
                            path: Some(path),
                        },
                    );
                }
                // store again: another ref to a file stored before (it may
                // have been deleted meanwhile: then it is refused)
                48..56 => {
                    let Some(k) = pick_known(&sh, &mut rng, true) else {
                        continue;
                    };
                    let path = k.path.clone().expect("picked with a path");
                    let meta = MediaMeta::new("again.bin", "application/octet-stream", "crash")
                        .with_policy(k.kind.policy());
                    let _g = sh.locks[si].lock().await;
                    emit(&format!("{task} BEGIN STORE {scope}"));
                    match store.store(&path, &meta, &scope).await {
                        Ok(r) => {
                            emit(&format!(
                                "{task} STORE {r} {scope} {} {} {}",
                                k.sha,
                                k.kind.code(),
                                path.display()
                            ));
                            drop(_g);
                            remember(&sh, &mut rng, Known { media_ref: r, ..k });
                        }
                        Err(e) if e.is_not_found() || matches!(e, Error::Conflict(_)) => {
                            emit(&format!("{task} NACK STORE"));
                        }
                        Err(e) => panic!("child: store again {}: {e}", path.display()),
                    }
                }
                // retain a known ref into a scope
                56..79 => {
                    let Some(k) = pick_known(&sh, &mut rng, false) else {
                        continue;
                    };
                    let _g = sh.locks[si].lock().await;
                    emit(&format!("{task} BEGIN RETAIN {scope} {}", k.media_ref));
                    match store.retain(k.media_ref, &scope).await {
                        Ok(()) => emit(&format!("{task} RETAIN {} {scope}", k.media_ref)),
                        Err(Error::UnknownRef(_)) => emit(&format!("{task} NACK RETAIN")),
                        Err(e) => panic!("child: retain {}: {e}", k.media_ref),
                    }
                }
                // release a whole scope
                79..86 => {
                    let _g = sh.locks[si].lock().await;
                    emit(&format!("{task} BEGIN RELEASE {scope}"));
                    let rep = store
                        .release_all(&scope)
                        .await
                        .unwrap_or_else(|e| panic!("child: release_all {scope}: {e}"));
                    assert!(
                        rep.failures.is_empty(),
                        "child: release failures {:?}",
                        rep.failures
                    );
                    emit(&format!(
                        "{task} RELEASE {scope} {} {}",
                        rep.refs_released, rep.files_deleted
                    ));
                }
                86..93 => {
                    emit(&format!("{task} BEGIN TOUCH {scope}"));
                    let held = store
                        .touch(&scope)
                        .await
                        .unwrap_or_else(|e| panic!("child: touch {scope}: {e}"));
                    emit(&format!("{task} TOUCH {scope} {held}"));
                }
                _ => {
                    emit(&format!("{task} BEGIN CLEAN -"));
                    let rep = store
                        .clean_expired()
                        .await
                        .unwrap_or_else(|e| panic!("child: clean_expired: {e}"));
                    assert!(rep.failures.is_empty(), "child: sweep failures");
                    assert_eq!(rep.refs_expired, 0, "child: nothing can expire");
                    assert_eq!(rep.holds_expired, 0, "child: nothing can expire");
                    emit(&format!(
                        "{task} CLEAN {} {}",
                        rep.files_deleted, rep.retried
                    ));
                }
            }
        }
    }
}

/// The parent: kills, reopens, checks.
mod parent {
    use super::*;

    /// What the parent knows of one ref from acknowledged lines.
    struct RefModel {
        sha: String,
        kind: Kind,
        path: Option<PathBuf>,
        /// Scopes whose last acknowledged event for this ref is a hold.
        holds: BTreeSet<String>,
        /// Scopes that may hold it or not: a retain into the scope or a
        /// release of the scope was in flight at a kill, and no
        /// acknowledged release of the scope came since.
        maybe: BTreeSet<String>,
    }

    /// An operation begun and not acknowledged.
    #[derive(Debug)]
    struct Inflight {
        op: String,
        scope: String,
        media_ref: Option<MediaRef>,
    }

    #[derive(Default)]
    struct Model {
        refs: HashMap<MediaRef, RefModel>,
        /// Scope → refs it holds or may hold (their `holds` or `maybe`
        /// name it), so a release does not visit every ref ever made.
        by_scope: HashMap<String, HashSet<MediaRef>>,
        /// Paths of files acknowledged as stored, with their digest.
        stored_paths: HashMap<PathBuf, (String, Kind)>,
    }

    impl Model {
        /// Records a ref acknowledged as new, held by `scope`.
        fn add(
            &mut self,
            ctx: &Ctx,
            r: MediaRef,
            sha: String,
            kind: Kind,
            path: Option<PathBuf>,
            scope: &str,
        ) {
            let fresh = RefModel {
                sha,
                kind,
                path,
                holds: BTreeSet::from([scope.to_string()]),
                maybe: BTreeSet::new(),
            };
            if self.refs.insert(r, fresh).is_some() {
                ctx.fail(format!("ref {r} handed out twice"));
            }
            self.by_scope
                .entry(scope.to_string())
                .or_default()
                .insert(r);
        }
    }

    #[derive(Default)]
    struct Summary {
        cycles: u32,
        acked: HashMap<&'static str, u64>,
        nacked: u64,
        refs_checked: u64,
        gone_checked: u64,
        killed_in: HashMap<String, u64>,
        killed_before_ready: u64,
        killed_idle: u64,
        temp_files_removed: u64,
        deletions_completed: u64,
        dedup_puts: u64,
        torn_lines: u64,
    }

    /// Failure context: enough to rerun with the same seed.
    struct Ctx {
        seed: u64,
        cycle: u32,
    }

    impl Ctx {
        fn fail(&self, what: impl std::fmt::Display) -> ! {
            panic!(
                "crash harness (seed {}, cycle {}; rerun with {ENV_SEED}={}): {what}",
                self.seed, self.cycle, self.seed
            )
        }
    }

    /// Kills the child if the parent panics while it runs.
    struct Guard(Option<Child>);

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn live_refs(model: &Model) -> impl Iterator<Item = (&MediaRef, &RefModel)> {
        model.refs.iter().filter(|(_, m)| !m.holds.is_empty())
    }

    fn write_known(path: &Path, model: &Model) {
        let mut text = String::new();
        for (r, m) in live_refs(model) {
            let p = m
                .path
                .as_ref()
                .map_or_else(|| "-".to_string(), |p| p.display().to_string());
            text.push_str(&format!("{r} {} {} {p}\n", m.sha, m.kind.code()));
        }
        std::fs::write(path, text).expect("writing the known refs");
    }

    fn malformed(ctx: &Ctx, line: &str) -> ! {
        ctx.fail(format!("malformed line {line:?}"))
    }

    /// Applies one cycle's protocol lines in order; returns the operations
    /// in flight at the kill (task → (op, scope)).
    fn apply(
        ctx: &Ctx,
        model: &mut Model,
        sum: &mut Summary,
        lines: &[String],
    ) -> HashMap<String, Inflight> {
        let mut inflight: HashMap<String, Inflight> = HashMap::new();
        for line in lines {
            let Some(rest) = line.strip_prefix("@@ ") else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            if f.len() < 2 {
                malformed(ctx, line);
            }
            let task = f[0].to_string();
            let parse_ref = |s: &str| -> MediaRef {
                s.parse()
                    .unwrap_or_else(|e| ctx.fail(format!("bad ref in {line:?}: {e}")))
            };
            let ack =
                |inflight: &mut HashMap<String, Inflight>, op: &str| match inflight.remove(&task) {
                    Some(i) if i.op == op => {}
                    other => ctx.fail(format!(
                        "acknowledgement {line:?} does not match the operation begun: {other:?}"
                    )),
                };
            match f[1] {
                "READY" => {
                    let vanished = f
                        .iter()
                        .find_map(|x| x.strip_prefix("vanished="))
                        .unwrap_or("0");
                    if vanished != "0" {
                        ctx.fail(format!(
                            "the child's open found refs to vanished files: {line:?}"
                        ));
                    }
                }
                "BEGIN" => {
                    // BEGIN <op> <scope> [<ref>]
                    if f.len() != 4 && f.len() != 5 {
                        malformed(ctx, line);
                    }
                    let begun = Inflight {
                        op: f[2].into(),
                        scope: f[3].into(),
                        media_ref: f.get(4).map(|r| parse_ref(r)),
                    };
                    if let Some(prev) = inflight.insert(task.clone(), begun) {
                        ctx.fail(format!("{line:?} begun while {prev:?} was in flight"));
                    }
                }
                "NACK" => {
                    ack(&mut inflight, f.get(2).copied().unwrap_or(""));
                    sum.nacked += 1;
                }
                "PUT" => {
                    // PUT <ref> <scope> <sha> <size> <dedup>
                    if f.len() != 7 {
                        malformed(ctx, line);
                    }
                    ack(&mut inflight, "PUT");
                    let r = parse_ref(f[2]);
                    model.add(ctx, r, f[4].to_string(), Kind::Put, None, f[3]);
                    *sum.acked.entry("put").or_default() += 1;
                    sum.dedup_puts += u64::from(f[6] == "1");
                }
                "STORE" => {
                    // STORE <ref> <scope> <sha> <kind> <path...>
                    if f.len() < 7 {
                        malformed(ctx, line);
                    }
                    ack(&mut inflight, "STORE");
                    let r = parse_ref(f[2]);
                    let kind = Kind::parse(f[5]).unwrap_or_else(|| malformed(ctx, line));
                    let path = PathBuf::from(f[6..].join(" "));
                    let sha = f[4].to_string();
                    if let Some((s, k)) =
                        model.stored_paths.insert(path.clone(), (sha.clone(), kind))
                    {
                        if s != sha || k != kind {
                            ctx.fail(format!("{} stored with two contents", path.display()));
                        }
                    }
                    model.add(ctx, r, sha, kind, Some(path), f[3]);
                    *sum.acked.entry("store").or_default() += 1;
                }
                "RETAIN" => {
                    if f.len() != 4 {
                        malformed(ctx, line);
                    }
                    ack(&mut inflight, "RETAIN");
                    let r = parse_ref(f[2]);
                    let Some(m) = model.refs.get_mut(&r) else {
                        ctx.fail(format!(
                            "{line:?}: the child retained a ref never acknowledged"
                        ));
                    };
                    m.maybe.remove(f[3]);
                    m.holds.insert(f[3].to_string());
                    model
                        .by_scope
                        .entry(f[3].to_string())
                        .or_default()
                        .insert(r);
                    *sum.acked.entry("retain").or_default() += 1;
                }
                "RELEASE" => {
                    if f.len() != 5 {
                        malformed(ctx, line);
                    }
                    ack(&mut inflight, "RELEASE");
                    for r in model.by_scope.remove(f[2]).unwrap_or_default() {
                        let m = model.refs.get_mut(&r).expect("indexed ref");
                        m.holds.remove(f[2]);
                        m.maybe.remove(f[2]);
                    }
                    *sum.acked.entry("release").or_default() += 1;
                }
                "TOUCH" => {
                    ack(&mut inflight, "TOUCH");
                    *sum.acked.entry("touch").or_default() += 1;
                }
                "CLEAN" => {
                    ack(&mut inflight, "CLEAN");
                    *sum.acked.entry("clean_expired").or_default() += 1;
                }
                _ => malformed(ctx, line),
            }
        }
        // An operation in flight at the kill may or may not have landed.
        // A release: the scope's holds are unknown now, so nothing is
        // claimed about them. A retain: the ref may be held by the scope.
        for i in inflight.values() {
            match (i.op.as_str(), i.media_ref) {
                ("RELEASE", _) => {
                    for r in model.by_scope.get(&i.scope).into_iter().flatten() {
                        let m = model.refs.get_mut(r).expect("indexed ref");
                        if m.holds.remove(i.scope.as_str()) {
                            m.maybe.insert(i.scope.clone());
                        }
                    }
                }
                ("RETAIN", Some(r)) => {
                    let Some(m) = model.refs.get_mut(&r) else {
                        ctx.fail(format!("retain of {r} begun, never acknowledged as made"));
                    };
                    if !m.holds.contains(&i.scope) {
                        m.maybe.insert(i.scope.clone());
                    }
                    model.by_scope.entry(i.scope.clone()).or_default().insert(r);
                }
                _ => {}
            }
        }
        inflight
    }

    /// Digest of an open file, cached by identity, size and times (the
    /// engine never rewrites a file in place; a replaced or modified file
    /// gets a new entry).
    fn digest_of(
        ctx: &Ctx,
        cache: &mut HashMap<(u64, u64, u64, i64, i64, i64), String>,
        mut file: std::fs::File,
        what: &str,
    ) -> String {
        let meta = file
            .metadata()
            .unwrap_or_else(|e| ctx.fail(format!("{what}: stat: {e}")));
        let key = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime_nsec(),
        );
        if let Some(d) = cache.get(&key) {
            return d.clone();
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)
            .unwrap_or_else(|e| ctx.fail(format!("{what}: read: {e}")));
        let d = sha256_hex(&bytes);
        cache.insert(key, d.clone());
        d
    }

    fn no_incoming(ctx: &Ctx, store: &DurableStore) {
        let incoming = store.managed_dir().join(".incoming");
        let left: Vec<_> = std::fs::read_dir(&incoming)
            .unwrap_or_else(|e| ctx.fail(format!("reading {}: {e}", incoming.display())))
            .map(|e| e.map(|e| e.path()))
            .collect();
        if !left.is_empty() {
            ctx.fail(format!("ingest temp files left after open: {left:?}"));
        }
    }

    /// Every acknowledged-live ref resolves, keeps its acknowledged holders,
    /// and opens to the acknowledged bytes; every ref surely released stays
    /// gone. Returns how many refs of each kind were checked.
    fn verify(
        ctx: &Ctx,
        rt: &tokio::runtime::Runtime,
        store: &DurableStore,
        model: &Model,
        cache: &mut HashMap<(u64, u64, u64, i64, i64, i64), String>,
        gone_seen: &mut HashSet<MediaRef>,
        every_gone: bool,
    ) -> (u64, u64) {
        let report = store.open_report();
        if !report.vanished.is_empty() {
            ctx.fail(format!(
                "open found refs whose file is gone: {:?}",
                report.vanished
            ));
        }
        if let Err(e) = store.core().check_invariants() {
            ctx.fail(format!("core invariants after reopen: {e}"));
        }
        no_incoming(ctx, store);
        let mut checked = 0;
        for (r, m) in live_refs(model) {
            let scopes = rt
                .block_on(store.scopes_of(*r))
                .unwrap_or_else(|e| ctx.fail(format!("acknowledged ref {r} ({m:?}) lost: {e}")));
            for s in &m.holds {
                if !scopes.contains(s) {
                    ctx.fail(format!(
                        "acknowledged hold of {s} on {r} lost (holders now {scopes:?}; {m:?})"
                    ));
                }
            }
            let (file, resolved) = rt
                .block_on(MediaStore::open(store, *r))
                .unwrap_or_else(|e| {
                    ctx.fail(format!("acknowledged ref {r} ({m:?}) does not open: {e}"))
                });
            if resolved.meta.policy != Some(m.kind.policy()) {
                ctx.fail(format!("{r}: policy {:?}, {m:?}", resolved.meta.policy));
            }
            match &m.path {
                Some(p) => {
                    if &*resolved.path != p.as_path() {
                        ctx.fail(format!(
                            "{r} resolves to {}, {m:?}",
                            resolved.path.display()
                        ));
                    }
                }
                None => {
                    let expected = store.managed_dir().join(&m.sha[..2]).join(&m.sha);
                    if *resolved.path != *expected {
                        ctx.fail(format!(
                            "{r} resolves to {}, {m:?}",
                            resolved.path.display()
                        ));
                    }
                }
            }
            let got = digest_of(ctx, cache, file, &format!("{r}"));
            if got != m.sha {
                ctx.fail(format!("{r}: bytes have digest {got}, acknowledged {m:?}"));
            }
            checked += 1;
        }
        // A ref no scope can hold any more (every hold it was acknowledged
        // or possibly given was acknowledged released) must stay gone: an
        // acknowledged release is durable too. Once seen gone after a
        // reopen, a ref is checked again only when `every_gone`.
        let mut gone = 0;
        for (r, m) in model.refs.iter() {
            if !m.holds.is_empty() || !m.maybe.is_empty() || (!every_gone && gone_seen.contains(r))
            {
                continue;
            }
            match rt.block_on(store.resolve(*r)) {
                Err(Error::UnknownRef(_)) => {
                    gone += 1;
                    gone_seen.insert(*r);
                }
                Ok(p) => ctx.fail(format!(
                    "ref {r} came back after its release was acknowledged: resolves to {} \
                     (holders {:?}; {m:?})",
                    p.display(),
                    rt.block_on(store.scopes_of(*r))
                )),
                Err(e) => ctx.fail(format!("resolving released ref {r}: {e}")),
            }
        }
        (checked, gone)
    }

    impl std::fmt::Debug for RefModel {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{:?} sha {} path {:?} held by {:?}, maybe by {:?}",
                self.kind, self.sha, self.path, self.holds, self.maybe
            )
        }
    }

    /// Every file in the managed dir, `.incoming` excepted.
    fn managed_files(ctx: &Ctx, store: &DurableStore) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let read = |d: &Path| {
            std::fs::read_dir(d).unwrap_or_else(|e| ctx.fail(format!("{}: {e}", d.display())))
        };
        for shard in read(store.managed_dir()) {
            let shard = shard.expect("managed dir entry");
            if shard.file_name() == ".incoming" {
                continue;
            }
            let kind = shard.file_type().expect("file type");
            if !kind.is_dir() {
                ctx.fail(format!(
                    "stray {} in the managed dir",
                    shard.path().display()
                ));
            }
            for entry in read(&shard.path()) {
                let entry = entry.expect("managed dir entry");
                let t = entry.file_type().expect("file type");
                if !t.is_file() {
                    ctx.fail(format!(
                        "stray {} in the managed dir",
                        entry.path().display()
                    ));
                }
                out.push(entry.path());
            }
        }
        out
    }

    fn open_store(ctx: &Ctx, data: &Path, owned: &Path, grace: Duration) -> DurableStore {
        DurableStore::builder(data)
            .owned_root(owned)
            .orphan_grace(grace)
            .open()
            .unwrap_or_else(|e| ctx.fail(format!("reopening after the kill: {e}")))
    }

    fn check_sha256() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(
            sha256_hex(&long),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    pub fn run() {
        check_sha256();
        let seed: u64 = match std::env::var(ENV_SEED) {
            Ok(s) => s.parse().expect("MEDIASTORE_CRASH_SEED must be a number"),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64,
        };
        let cycles: u32 = std::env::var(ENV_CYCLES)
            .ok()
            .map(|s| s.parse().expect("MEDIASTORE_CRASH_CYCLES must be a number"))
            .unwrap_or(DEFAULT_CYCLES);
        let budget = Duration::from_secs(
            std::env::var(ENV_BUDGET)
                .ok()
                .map(|s| {
                    s.parse()
                        .expect("MEDIASTORE_CRASH_BUDGET_SECS must be a number")
                })
                .unwrap_or(DEFAULT_BUDGET_SECS),
        );
        eprintln!("crash harness: seed {seed} ({ENV_SEED}={seed} to rerun), {cycles} cycles");
        let started = Instant::now();
        let mut rng = Rng::new(seed);
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let data = root.join("data");
        let owned = root.join(OWNED);
        std::fs::create_dir_all(&owned).expect("owned dir");
        std::fs::create_dir_all(root.join(EXTERNAL)).expect("external dir");
        let exe = std::env::current_exe().expect("current_exe");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut model = Model::default();
        let mut sum = Summary::default();
        let mut cache = HashMap::new();
        let mut gone_seen = HashSet::new();
        let mut ctx = Ctx { seed, cycle: 0 };

        for cycle in 0..cycles {
            if started.elapsed() > budget {
                eprintln!("crash harness: wall-clock budget reached after {cycle} cycles");
                break;
            }
            ctx.cycle = cycle;
            write_known(&root.join(KNOWN), &model);
            let child_seed = rng.next();
            let child = Command::new(&exe)
                .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(ENV_CHILD, &data)
                .env(ENV_SEED, child_seed.to_string())
                .env(ENV_CYCLE, cycle.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| ctx.fail(format!("spawning the child: {e}")));
            let mut guard = Guard(Some(child));
            let child = guard.0.as_mut().expect("child");
            let stdout = child.stdout.take().expect("stdout");
            let mut stderr = child.stderr.take().expect("stderr");
            let (tx, rx) = mpsc::channel::<String>();
            let out_thread = std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut torn = 0u64;
                loop {
                    let mut line = String::new();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line.ends_with('\n') => {
                            line.pop();
                            // libtest's "test <name> ... " has no newline
                            // before the test's own output: cut it off.
                            let Some(at) = line.find("@@ ") else {
                                continue;
                            };
                            if tx.send(line.split_off(at)).is_err() {
                                break;
                            }
                        }
                        // Cut by the kill: not an acknowledgement.
                        Ok(_) => torn += u64::from(line.contains("@@ ")),
                    }
                }
                torn
            });
            let err_thread = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });

            let mut lines = Vec::new();
            let early = rng.below(10) == 0;
            if early {
                // Kill during startup or recovery, ready or not.
                std::thread::sleep(Duration::from_millis(rng.below(15)));
            } else {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(l) => {
                            let ready = l.starts_with("@@ - READY");
                            lines.push(l);
                            if ready {
                                break;
                            }
                        }
                        Err(_) => {
                            let _ = child.kill();
                            let status = child.wait();
                            let err = err_thread.join().unwrap_or_default();
                            ctx.fail(format!(
                                "the child never got ready (status {status:?}); stderr:\n{err}"
                            ));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5 + rng.below(76)));
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = err_thread.join().unwrap_or_default();
                ctx.fail(format!(
                    "the child exited by itself ({status}); stderr:\n{err}"
                ));
            }
            child.kill().expect("kill -9");
            let status = child.wait().expect("waiting for the child");
            guard.0 = None;
            let err = err_thread.join().unwrap_or_default();
            if status.signal() != Some(9) {
                ctx.fail(format!(
                    "the child ended with {status}, not by SIGKILL; stderr:\n{err}"
                ));
            }
            sum.torn_lines += out_thread.join().expect("stdout reader");
            lines.extend(rx.iter());
            let ready = lines.iter().any(|l| l.starts_with("@@ - READY"));
            let inflight = apply(&ctx, &mut model, &mut sum, &lines);
            if !ready {
                sum.killed_before_ready += 1;
            } else if inflight.is_empty() {
                sum.killed_idle += 1;
            }
            for i in inflight.values() {
                *sum.killed_in.entry(i.op.clone()).or_default() += 1;
            }

            // The child is dead: its lock must be free and its acknowledged
            // changes must all be there.
            let store = open_store(&ctx, &data, &owned, Duration::from_secs(3600));
            sum.temp_files_removed += store.open_report().temp_files_removed;
            sum.deletions_completed += store.open_report().deletions_completed;
            let (live, gone) = verify(&ctx, &rt, &store, &model, &mut cache, &mut gone_seen, false);
            sum.refs_checked += live;
            sum.gone_checked += gone;
            drop(store);
            sum.cycles += 1;
        }

        // Final: no orphan grace. Every managed file must belong to a live
        // ref, and the ingest dir must be empty.
        ctx.cycle = sum.cycles;
        let store = open_store(&ctx, &data, &owned, Duration::ZERO);
        if store.open_report().orphans.kept_young != 0 {
            ctx.fail("orphans kept young with a zero grace");
        }
        let orphans_removed = store.open_report().orphans.files_removed;
        let (live, gone) = verify(&ctx, &rt, &store, &model, &mut cache, &mut gone_seen, true);
        sum.refs_checked += live;
        sum.gone_checked += gone;
        let mut live_paths: HashSet<PathBuf> = HashSet::new();
        let mut engine_refs = 0u64;
        for s in 0..SCOPES {
            for r in rt
                .block_on(store.refs_in(&scope_name(s)))
                .unwrap_or_else(|e| ctx.fail(format!("refs_in: {e}")))
            {
                let path = rt
                    .block_on(store.resolve(r))
                    .unwrap_or_else(|e| ctx.fail(format!("{r} listed but not resolvable: {e}")));
                live_paths.insert(path.to_path_buf());
                engine_refs += 1;
            }
        }
        let managed = managed_files(&ctx, &store);
        for path in &managed {
            if !live_paths.contains(path) {
                ctx.fail(format!(
                    "managed file {} is referenced by no live ref",
                    path.display()
                ));
            }
            let meta = std::fs::metadata(path).expect("managed file");
            let key = mediastore::FileKey {
                dev: meta.dev(),
                ino: meta.ino(),
                born: meta
                    .created()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as u64),
            };
            match store.core().file_status(key) {
                Some(st) if st.state == FileState::Live && st.refs > 0 => {}
                other => ctx.fail(format!("managed file {}: status {other:?}", path.display())),
            }
            let f = std::fs::File::open(path).expect("managed file");
            let d = digest_of(&ctx, &mut cache, f, &path.display().to_string());
            if path.file_name().and_then(|n| n.to_str()) != Some(d.as_str()) {
                ctx.fail(format!("managed file {} holds bytes {d}", path.display()));
            }
        }
        no_incoming(&ctx, &store);
        let managed_count = managed.len();

        // Releasing everything empties the managed dir and deletes every
        // owned file; external files are never touched.
        for s in 0..SCOPES {
            let rep = rt
                .block_on(store.release_all(&scope_name(s)))
                .unwrap_or_else(|e| ctx.fail(format!("final release: {e}")));
            if !rep.failures.is_empty() {
                ctx.fail(format!("final release failures: {:?}", rep.failures));
            }
        }
        drop(store);
        let store = open_store(&ctx, &data, &owned, Duration::ZERO);
        let stats = rt.block_on(store.stats()).expect("stats");
        if stats.refs != 0 || stats.files != 0 || stats.pending_deletions != 0 {
            ctx.fail(format!("after releasing every scope: {stats:?}"));
        }
        let left = managed_files(&ctx, &store);
        if !left.is_empty() {
            ctx.fail(format!(
                "managed files left after releasing everything: {left:?}"
            ));
        }
        for (path, (sha, kind)) in &model.stored_paths {
            match kind {
                Kind::External => {
                    let f = std::fs::File::open(path).unwrap_or_else(|e| {
                        ctx.fail(format!("external file {} gone: {e}", path.display()))
                    });
                    if digest_of(&ctx, &mut cache, f, "external") != *sha {
                        ctx.fail(format!("external file {} changed", path.display()));
                    }
                }
                _ => {
                    if path.exists() {
                        ctx.fail(format!(
                            "owned file {} survived the release of every scope",
                            path.display()
                        ));
                    }
                }
            }
        }
        drop(store);

        let acked: u64 = sum.acked.values().sum();
        let mut by_op: Vec<_> = sum.acked.iter().collect();
        by_op.sort();
        let mut killed: Vec<_> = sum.killed_in.iter().collect();
        killed.sort();
        eprintln!(
            "crash harness: seed {seed}: {} cycles in {:.1?}; {acked} acknowledged ops {by_op:?} \
             ({} dedup puts, {} refused); {} live-ref checks, {} released-ref checks; kills during put: {}, in flight at \
             the kill: {killed:?}, before ready: {}, idle: {}; torn lines: {}; temp files \
             removed on open: {}; deletions completed on open: {}; final: {engine_refs} refs, \
             {managed_count} managed files, {orphans_removed} orphans removed",
            sum.cycles,
            started.elapsed(),
            sum.dedup_puts,
            sum.nacked,
            sum.refs_checked,
            sum.gone_checked,
            sum.killed_in.get("PUT").copied().unwrap_or(0),
            sum.killed_before_ready,
            sum.killed_idle,
            sum.torn_lines,
            sum.temp_files_removed,
            sum.deletions_completed,
        );
        // Liveness: a check of nothing passes trivially. Changes that wait
        // for the journal must be acknowledged at a healthy rate (a healthy
        // engine acknowledges dozens per cycle; a hang acknowledges none).
        assert!(sum.cycles > 0, "no cycle ran");
        let ready_cycles = u64::from(sum.cycles) - sum.killed_before_ready;
        let journaled: u64 = ["put", "store", "retain"]
            .iter()
            .map(|op| sum.acked.get(op).copied().unwrap_or(0))
            .sum();
        for op in ["put", "store", "retain", "release"] {
            if sum.acked.get(op).copied().unwrap_or(0) == 0 {
                ctx.fail(format!(
                    "no {op} was ever acknowledged in {ready_cycles} cycles: the child made no \
                     progress (acknowledged: {by_op:?}; in flight at the kills: {killed:?})"
                ));
            }
        }
        if journaled < ready_cycles / 4 {
            ctx.fail(format!(
                "only {journaled} journaled changes acknowledged in {ready_cycles} cycles: \
                 the child barely made progress"
            ));
        }
    }
}
