//! Request statistics of a share: per-message-type counts and total time, Rlerror count, and
//! latency histograms (power-of-two nanosecond buckets) overall and per type. Whether they are
//! collected is fixed when the server is created ([`super::Config::stats`]); off, a request
//! pays one branch.

use crate::wire;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const HIST_BUCKETS: usize = 40;
/// Per-message-type counters and latency histograms (power-of-two nanosecond buckets),
/// overall and per type.
pub(super) struct Stats {
    enabled: bool,
    count: Box<[AtomicU64]>,
    nanos: Box<[AtomicU64]>,
    errors: AtomicU64,
    hist: Box<[AtomicU64]>,
    /// `type_hist[ty * HIST_BUCKETS + b]`.
    type_hist: Box<[AtomicU64]>,
}

/// A snapshot of the request statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// (message name, requests, total nanoseconds) for every type seen.
    pub by_type: Vec<(&'static str, u64, u64)>,
    /// Requests answered with Rlerror.
    pub errors: u64,
    /// `histogram[i]` counts requests whose latency in nanoseconds is `i` bits long, i.e. in
    /// `[2^(i-1), 2^i)`.
    pub histogram: Vec<u64>,
    /// The same histogram per message type, for the types in `by_type`.
    pub type_histograms: Vec<(&'static str, Vec<u64>)>,
}

/// An upper bound of the `q` quantile (0..=1) of a latency histogram, in nanoseconds: the
/// upper edge of the bucket holding it. None for an empty histogram.
pub fn histogram_quantile(histogram: &[u64], q: f64) -> Option<u64> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (bits, n) in histogram.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(1u64 << bits.min(63));
        }
    }
    None
}

impl Stats {
    /// Counters for a share; `enabled` says whether requests are timed and counted at all.
    pub(super) fn new(enabled: bool) -> Stats {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        Stats {
            enabled,
            count: zeros(256),
            nanos: zeros(256),
            errors: AtomicU64::new(0),
            hist: zeros(HIST_BUCKETS),
            type_hist: zeros(256 * HIST_BUCKETS),
        }
    }

    /// The start time of a request, when statistics are on.
    pub(super) fn start(&self) -> Option<Instant> {
        self.enabled.then(Instant::now)
    }

    /// Counts a request of type `ty` that started at `t0` (from [`Stats::start`]).
    pub(super) fn finish(&self, t0: Option<Instant>, ty: u8, failed: bool) {
        let Some(t0) = t0 else { return };
        let ns = t0.elapsed().as_nanos() as u64;
        let ty = ty as usize;
        self.count[ty].fetch_add(1, Ordering::Relaxed);
        self.nanos[ty].fetch_add(ns, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let b = (64 - ns.leading_zeros() as usize).min(HIST_BUCKETS - 1);
        self.hist[b].fetch_add(1, Ordering::Relaxed);
        self.type_hist[ty * HIST_BUCKETS + b].fetch_add(1, Ordering::Relaxed);
    }

    /// What has been counted so far.
    pub(super) fn snapshot(&self) -> StatsSnapshot {
        let seen = || (0..256usize).filter(|&t| self.count[t].load(Ordering::Relaxed) > 0);
        let by_type = seen()
            .map(|t| {
                (
                    wire::type_name(t as u8),
                    self.count[t].load(Ordering::Relaxed),
                    self.nanos[t].load(Ordering::Relaxed),
                )
            })
            .collect();
        let type_histograms = seen()
            .map(|t| {
                let buckets = &self.type_hist[t * HIST_BUCKETS..(t + 1) * HIST_BUCKETS];
                (
                    wire::type_name(t as u8),
                    buckets.iter().map(|h| h.load(Ordering::Relaxed)).collect(),
                )
            })
            .collect();
        StatsSnapshot {
            by_type,
            errors: self.errors.load(Ordering::Relaxed),
            histogram: self
                .hist
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .collect(),
            type_histograms,
        }
    }
}

impl std::fmt::Display for StatsSnapshot {
    /// One line per message type: requests, mean, and p50/p95/p99 upper bounds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "request", "count", "mean ns", "p50 <=", "p95 <=", "p99 <="
        )?;
        for (name, n, ns) in &self.by_type {
            let hist = self
                .type_histograms
                .iter()
                .find(|(t, _)| t == name)
                .map(|(_, h)| h.as_slice())
                .unwrap_or(&[]);
            let q = |q| histogram_quantile(hist, q).map_or("-".to_string(), |v| v.to_string());
            writeln!(
                f,
                "{name:>12} {n:>10} {:>10} {:>10} {:>10} {:>10}",
                ns / (*n).max(1),
                q(0.5),
                q(0.95),
                q(0.99)
            )?;
        }
        writeln!(f, "{:>12} {:>10}", "errors", self.errors)
    }
}
