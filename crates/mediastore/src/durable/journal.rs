//! Group commit: callers queue changes and wait; one writer thread commits
//! whatever has queued up in a single transaction, so one fsync covers every
//! change that arrived while the previous one was running.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mediastore_core::{Error, Result};
use parking_lot::{Condvar, Mutex};
use rusqlite::Connection;
use tokio::sync::watch;

use super::index;
use crate::local::{Journal, Op};

/// Where the writer stands, published to waiters.
#[derive(Clone, Debug, Default)]
struct Committed {
    /// Every change up to this sequence number is durable.
    seq: u64,
    /// Set when a commit failed; the journal takes no more changes.
    failed: Option<Failure>,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// Sequence number of the last queued change.
    last: u64,
    /// Changes in `ops` whose callers wait for them (not deletion notes).
    awaited: usize,
    /// When the writer sleeps: how many awaited changes should wake it.
    wake_at: Option<usize>,
    /// Commit what is queued now, notes included.
    flush: bool,
    /// The writer waits for a first change (and wants to hear of notes too,
    /// to commit them after [`NOTE_DELAY`]).
    idle: bool,
    closing: bool,
    failed: Option<Failure>,
}

impl Queue {
    /// Why no change can be queued now, if it cannot.
    fn refusal(&self) -> Option<Error> {
        if let Some(f) = &self.failed {
            return Some(failed_error(f));
        }
        self.closing
            .then(|| Error::io("journal", std::io::Error::other("the store is closing")))
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    committed: watch::Sender<Committed>,
}

/// Counters of the writer, for benches and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Transactions committed (each one fsync of the log).
    pub commits: u64,
    /// Changes committed.
    pub changes: u64,
    /// Time from a transaction's first change to its `COMMIT`, in
    /// nanoseconds: applying changes, and waiting for the rest of a cohort
    /// of callers (see the writer's linger).
    pub apply_nanos: u64,
    /// Time spent in `COMMIT` (writing and syncing the log), in nanoseconds.
    pub commit_nanos: u64,
}

/// The SQLite journal with its writer thread.
pub struct SqliteJournal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<Connection>>>,
    stats: Arc<Mutex<JournalStats>>,
    path: PathBuf,
}

impl SqliteJournal {
    /// Starts the writer on an open, migrated index.
    /// `base_seq` is the highest sequence number already in the index;
    /// numbering continues from there so it keeps ordering across restarts.
    pub fn start(conn: Connection, path: PathBuf, base_seq: u64) -> Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                last: base_seq,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            committed: watch::Sender::new(Committed {
                seq: base_seq,
                failed: None,
            }),
        });
        let stats = Arc::new(Mutex::new(JournalStats::default()));
        let writer = {
            let (shared, stats) = (shared.clone(), stats.clone());
            std::thread::Builder::new()
                .name("mediastore-journal".into())
                .spawn(move || write_loop(conn, &shared, &stats))
                .map_err(|e| Error::io("starting the journal writer", e))?
        };
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
            stats,
            path,
        })
    }

    /// Waits until change `seq` is durable. Sequence 0 means "nothing to
    /// wait for" (real numbers start at 1).
    pub async fn wait(&self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Ok(());
        }
        let mut rx = self.shared.committed.subscribe();
        let state = rx
            .wait_for(|c| c.seq >= seq || c.failed.is_some())
            .await
            .map_err(|_| {
                Error::io(
                    "waiting for the journal",
                    std::io::Error::other("journal writer is gone"),
                )
            })?
            .clone();
        if state.seq >= seq {
            return Ok(());
        }
        Err(match &state.failed {
            Some(f) => failed_error(f),
            None => Error::io("journal", std::io::Error::other("unknown failure")),
        })
    }

    /// Waits until every change queued so far is durable.
    pub async fn wait_all(&self) -> Result<()> {
        let last = self.shared.queue.lock().last;
        self.wait(last).await
    }

    /// Waits, blocking the thread, until everything queued is durable.
    pub fn flush_blocking(&self) -> Result<()> {
        let last = {
            let mut q = self.shared.queue.lock();
            q.flush = true;
            q.last
        };
        self.shared.wake.notify_one();
        let mut rx = self.shared.committed.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            if state.seq >= last {
                return Ok(());
            }
            if let Some(f) = state.failed {
                return Err(failed_error(&f));
            }
            // Changes are rare at close; a short sleep keeps this simple
            // and usable outside any runtime.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Commits what is queued, stops the writer and closes the index.
    pub fn close(&self) -> Result<()> {
        {
            let mut q = self.shared.queue.lock();
            q.closing = true;
        }
        self.shared.wake.notify_all();
        let writer = self.writer.lock().take();
        if let Some(w) = writer {
            let conn = w.join().map_err(|_| {
                Error::io(
                    "closing the journal",
                    std::io::Error::other("writer panicked"),
                )
            })?;
            conn.close().map_err(|(_, e)| {
                Error::io(
                    format!("closing {}", self.path.display()),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        }
        match self.shared.committed.borrow().failed.clone() {
            Some(f) => Err(failed_error(&f)),
            None => Ok(()),
        }
    }

    /// Commits and changes so far.
    pub fn stats(&self) -> JournalStats {
        *self.stats.lock()
    }
}

/// Why the writer stopped: the I/O error kind (e.g. storage full) and the
/// message.
type Failure = (std::io::ErrorKind, Arc<str>);

fn failed_error((kind, why): &Failure) -> Error {
    Error::io(
        "the index could not be written; changes since the last commit were not saved and the store refuses further changes until reopened",
        std::io::Error::new(*kind, why.to_string()),
    )
}

impl Journal for SqliteJournal {
    fn check(&self) -> Result<()> {
        self.shared.queue.lock().refusal().map_or(Ok(()), Err)
    }

    fn push(&self, op: Op) -> Result<u64> {
        let mut q = self.shared.queue.lock();
        if let Some(refused) = q.refusal() {
            return Err(refused);
        }
        // Notes (a deletion done, bytes verified) wait for the next commit
        // instead of causing one; nothing waits on them, and a note lost in
        // a crash is redone on the next open.
        if !matches!(
            op,
            Op::Deleted { .. } | Op::Verified { .. } | Op::Forget { .. }
        ) {
            q.awaited += 1;
        }
        q.ops.push(op);
        q.last += 1;
        let seq = q.last;
        // Wake the writer only when it waits for this many changes: a
        // lingering writer woken by every push would cost a context switch
        // per change.
        let wake = q.wake_at == Some(q.awaited) || (q.idle && q.ops.len() == 1);
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(seq)
    }
}

impl Drop for SqliteJournal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the journal");
        }
    }
}

/// How long notes may wait for a change to commit with before they are
/// committed on their own.
const NOTE_DELAY: Duration = Duration::from_millis(200);

/// Publishes a failure if the writer unwinds, so no caller waits forever
/// for a commit that will not come.
struct WriterGone<'a>(&'a Shared);

impl Drop for WriterGone<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let why: Failure = (
                std::io::ErrorKind::Other,
                "the journal writer panicked".into(),
            );
            self.0.queue.lock().failed = Some(why.clone());
            self.0.committed.send_modify(|c| c.failed = Some(why));
        }
    }
}

fn write_loop(mut conn: Connection, shared: &Shared, stats: &Mutex<JournalStats>) -> Connection {
    let _gone = WriterGone(shared);
    let mut batch = Vec::new();
    // How long the last `COMMIT` took (the log sync, mostly) and how many
    // awaited changes it carried.
    let mut last_commit = (Duration::ZERO, 0usize);
    loop {
        {
            let mut q = shared.queue.lock();
            q.wake_at = Some(1);
            q.idle = true;
            while q.awaited == 0 && !q.closing && !q.flush {
                if q.ops.is_empty() {
                    shared.wake.wait(&mut q);
                } else if shared.wake.wait_for(&mut q, NOTE_DELAY).timed_out() {
                    break;
                }
            }
            q.idle = false;
            if q.ops.is_empty() {
                if q.closing {
                    return conn;
                }
                q.flush = false;
                continue;
            }
            q.wake_at = None;
            q.flush = false;
        }
        // With several writers, the callers woken by the last commit queue
        // their next change microseconds later; committing at once would
        // split them into two cohorts that alternate, halving the changes
        // per fsync. So the transaction stays open until as many callers
        // as the last commit served are back (never longer than the last
        // commit took), and changes are applied as they arrive, while the
        // others are still on their way.
        let started = Instant::now();
        let limit = started + last_commit.0;
        let target = if last_commit.1 > 1 { last_commit.1 } else { 0 };
        let (mut awaited, mut changes, mut last) = (0usize, 0u64, 0u64);
        let mut applied = started;
        let result = (|| {
            let tx = conn.transaction()?;
            loop {
                {
                    let mut q = shared.queue.lock();
                    awaited += std::mem::take(&mut q.awaited);
                    std::mem::swap(&mut batch, &mut q.ops);
                    last = q.last;
                }
                let first = last + 1 - batch.len() as u64;
                for (n, op) in batch.iter().enumerate() {
                    index::apply(&tx, op, first + n as u64)?;
                }
                changes += batch.len() as u64;
                batch.clear();
                if awaited >= target || Instant::now() >= limit {
                    break;
                }
                let mut q = shared.queue.lock();
                // Wake for half of those still missing: the first half is
                // applied while the second is on its way, for a handful of
                // wake-ups per commit rather than one per change.
                let wanted = (target - awaited).div_ceil(2);
                q.wake_at = Some(wanted);
                while !q.closing && !q.flush && q.awaited < wanted {
                    if shared.wake.wait_until(&mut q, limit).timed_out() {
                        break;
                    }
                }
                q.wake_at = None;
                if q.ops.is_empty() {
                    break;
                }
            }
            applied = Instant::now();
            tx.commit()
        })();
        last_commit = (applied.elapsed(), awaited);
        batch.clear();
        match result {
            Ok(()) => {
                {
                    let mut s = stats.lock();
                    s.commits += 1;
                    s.changes += changes;
                    s.apply_nanos += (applied - started).as_nanos() as u64;
                    s.commit_nanos += applied.elapsed().as_nanos() as u64;
                }
                shared.committed.send_modify(|c| c.seq = last);
            }
            Err(e) => {
                let err = index::write_error(e);
                let kind = match &err {
                    Error::Io { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                let why: Failure = (kind, err.to_string().into());
                tracing::error!(error = %why.1, "index commit failed; the store refuses further changes");
                shared.queue.lock().failed = Some(why.clone());
                shared.committed.send_modify(|c| c.failed = Some(why));
                // Keep draining so no waiter hangs; nothing more is written.
                let mut q = shared.queue.lock();
                q.ops.clear();
                if q.closing {
                    return conn;
                }
                drop(q);
                loop {
                    let mut q = shared.queue.lock();
                    if q.closing {
                        return conn;
                    }
                    shared.wake.wait(&mut q);
                }
            }
        }
    }
}
