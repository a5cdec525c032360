//! Prometheus text exposition: request counts and latencies by route and
//! status, the store's gauges, and sweep results.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use mediastore::{DurableStore, SweepReport};
use parking_lot::Mutex;

/// Latency bucket bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
struct Sweeps {
    runs: u64,
    failed: u64,
    refs_expired: u64,
    holds_expired: u64,
    files_deleted: u64,
    bytes_freed: u64,
    delete_failures: u64,
}

/// One route's series, by method and status.
type RouteSeries = BTreeMap<(&'static str, u16), Series>;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    /// Route, then (method, status): a request of a known route looks its
    /// series up by `&str`, allocating nothing.
    requests: Mutex<BTreeMap<String, RouteSeries>>,
    sweeps: Mutex<Sweeps>,
}

impl Metrics {
    /// Counts one request.
    pub fn request(&self, route: &str, method: &'static str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let mut map = self.requests.lock();
        let per_route = match map.get_mut(route) {
            Some(m) => m,
            None => map.entry(route.to_string()).or_default(),
        };
        let s = per_route.entry((method, status)).or_default();
        s.count += 1;
        s.sum += secs;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                s.buckets[i] += 1;
            }
        }
    }

    /// Counts one sweep (by the cleaner or `POST /v1/gc`).
    pub fn sweep(&self, report: Option<&SweepReport>) {
        let mut s = self.sweeps.lock();
        s.runs += 1;
        match report {
            Some(r) => {
                s.refs_expired += r.refs_expired;
                s.holds_expired += r.holds_expired;
                s.files_deleted += r.files_deleted;
                s.bytes_freed += r.bytes_freed;
                s.delete_failures += r.failures.len() as u64;
            }
            None => s.failed += 1,
        }
    }

    /// The exposition text.
    pub fn render(&self, store: &DurableStore) -> String {
        let mut out = String::with_capacity(4096);
        let stats = store.core().stats();
        let journal = store.journal_stats();
        let gauges: [(&str, &str, u64); 7] = [
            ("mediastore_refs", "Live refs.", stats.refs),
            (
                "mediastore_scopes",
                "Scopes with at least one hold.",
                stats.scopes,
            ),
            ("mediastore_holds", "Holds on refs.", stats.holds),
            ("mediastore_files", "Files with refs.", stats.files),
            (
                "mediastore_pending_deletions",
                "Files waiting for deletion or a retry.",
                stats.pending_deletions,
            ),
            (
                "mediastore_managed_bytes",
                "Bytes of managed files.",
                store.managed_bytes(),
            ),
            (
                "mediastore_index_commits_total",
                "Index transactions committed.",
                journal.commits,
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        {
            let s = self.sweeps.lock();
            let sweeps: [(&str, &str, u64); 7] = [
                ("mediastore_sweeps_total", "Sweeps run.", s.runs),
                (
                    "mediastore_sweeps_failed_total",
                    "Sweeps that failed.",
                    s.failed,
                ),
                (
                    "mediastore_sweep_refs_expired_total",
                    "Refs removed by sweeps.",
                    s.refs_expired,
                ),
                (
                    "mediastore_sweep_holds_expired_total",
                    "Holds expired by sweeps.",
                    s.holds_expired,
                ),
                (
                    "mediastore_sweep_files_deleted_total",
                    "Files deleted by sweeps.",
                    s.files_deleted,
                ),
                (
                    "mediastore_sweep_bytes_freed_total",
                    "Bytes freed by sweeps.",
                    s.bytes_freed,
                ),
                (
                    "mediastore_sweep_delete_failures_total",
                    "Deletions that failed in sweeps (retried later).",
                    s.delete_failures,
                ),
            ];
            for (name, help, value) in sweeps {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            }
        }
        let map = self.requests.lock();
        let _ = writeln!(
            out,
            "# HELP mediastore_http_requests_total Requests answered, by route, method and status.\n# TYPE mediastore_http_requests_total counter"
        );
        let series = || {
            map.iter().flat_map(|(route, m)| {
                m.iter()
                    .map(move |((method, status), s)| (route, method, status, s))
            })
        };
        for (route, method, status, s) in series() {
            let _ = writeln!(
                out,
                "mediastore_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP mediastore_http_request_duration_seconds Time to answer (headers sent; a download's body may stream on).\n# TYPE mediastore_http_request_duration_seconds histogram"
        );
        for (route, method, status, s) in series() {
            let labels = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "mediastore_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "mediastore_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\nmediastore_http_request_duration_seconds_sum{{{labels}}} {}\nmediastore_http_request_duration_seconds_count{{{labels}}} {}",
                s.count, s.sum, s.count
            );
        }
        out
    }
}
