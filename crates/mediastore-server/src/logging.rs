//! Logging to stderr without making request threads wait.
//!
//! Writing a line per request straight to stderr costs each request a
//! system call under stderr's lock, which the worker threads contend for;
//! handing lines to a writer thread through a channel costs a wake-up per
//! line instead. Here a request appends its line to a shared buffer (a
//! memcpy under a lock held for nothing else), and one thread writes the
//! buffer out in one call, 20 ms after its first line or sooner when it
//! fills. (On this 2-vCPU host the throughput difference between these was
//! within the run-to-run noise; what the buffer guarantees is the absence
//! of per-request syscalls and wake-ups.) Past a bound, appenders wait for
//! the writer: no line is ever dropped.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// How long the writer lets lines gather once the first one arrives.
const EVERY: Duration = Duration::from_millis(20);
/// Queued bytes that wake the writer early.
const WAKE_AT: usize = 256 << 10;
/// Queued bytes past which appenders wait.
const MAX: usize = 8 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Bytes ever queued, and ever written.
    queued: u64,
    written: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer early (a full buffer, a flush).
    wake: Condvar,
    /// Wakes appenders waiting for room, and flushers.
    room: Condvar,
}

/// The writer handed to the fmt layer: one per event; its line is queued
/// whole when it is dropped.
pub struct LineWriter {
    line: Vec<u8>,
    shared: Arc<Shared>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let mut st = self.shared.state.lock();
        while st.buf.len() >= MAX {
            self.shared.room.wait(&mut st);
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(&self.line);
        st.queued += self.line.len() as u64;
        // The first line wakes an idle writer, which then lets more gather
        // for a while; a full buffer cuts that short.
        if was_empty || st.buf.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
    }
}

/// Queues lines for the writer thread.
#[derive(Clone)]
pub struct Sink(Arc<Shared>);

impl<'a> MakeWriter<'a> for Sink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            line: Vec::with_capacity(256),
            shared: self.0.clone(),
        }
    }
}

/// Waits, when dropped, until the lines queued so far are written (at most
/// a second).
pub struct Flush(Arc<Shared>);

impl Drop for Flush {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut st = self.0.state.lock();
        let target = st.queued;
        while st.written < target {
            self.0.wake.notify_one();
            if self.0.room.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
    }
}

/// A sink writing to `out` from its own thread, and the guard that
/// flushes it.
pub fn sink(out: impl Write + Send + 'static) -> io::Result<(Sink, Flush)> {
    let shared = Arc::new(Shared::default());
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("mediastore-log".into())
        .spawn(move || write_loop(&writer, out))?;
    Ok((Sink(shared.clone()), Flush(shared)))
}

fn write_loop(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let queued = {
            let mut st = shared.state.lock();
            while st.buf.is_empty() {
                shared.wake.wait(&mut st);
            }
            if st.buf.len() < WAKE_AT {
                shared.wake.wait_for(&mut st, EVERY);
            }
            std::mem::swap(&mut st.buf, &mut spare);
            st.queued
        };
        if !spare.is_empty() {
            // A failing stderr has nowhere to report to; the lines go.
            let _ = out.write_all(&spare);
            let _ = out.flush();
            spare.clear();
        }
        let mut st = shared.state.lock();
        st.written = queued;
        drop(st);
        shared.room.notify_all();
    }
}

/// Installs the global subscriber: `level` as a target filter
/// (`"info,mediastore=debug"`), lines to stderr through a [`Sink`].
/// Keep the returned guard until exit.
pub fn init(level: &str) -> Option<Flush> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = level.parse().unwrap_or_else(|e| {
        eprintln!("mediastore: log.level {level:?} is not understood ({e}); using info");
        Targets::new().with_default(tracing::Level::INFO)
    });
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let (sink, flush) = match sink(io::stderr()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mediastore: cannot start the log writer ({e}); logging to stderr directly");
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(io::stderr)
                        .with_ansi(ansi),
                )
                .with(filter)
                .init();
            return None;
        }
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(sink)
                .with_ansi(ansi),
        )
        .with(filter)
        .init();
    Some(flush)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_before_flush_returns() {
        let out = Shared::default();
        let (sink, flush) = sink(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        let mut w = sink.make_writer();
                        write!(w, "thread {t} line {i} ").unwrap();
                        writeln!(w, "end").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flush);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("thread ") && l.ends_with(" end"))
        );
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .map(|l| l.split(' ').nth(3).unwrap().parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..5000).collect::<Vec<_>>(),
                "thread {t}'s lines in order"
            );
        }
    }
}
