//! The engine's metrics per database and role (`kvembed.stats` in SQL):
//! requests, texts, tokens, errors by SQLSTATE, time queued and time in
//! forward passes (median and 99th percentile), and how full the batches
//! were. Kept in memory from the engine's start or the last reset.

use kvembed_proto::{Caller, StatsRow};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Buckets per doubling of the histograms: each bucket is 2^(1/8) = 9 %
/// wide, so a quantile is known within 5 % (its bucket's middle).
const PER_OCTAVE: f64 = 8.0;
/// Up to 2^40 µs (12 days) in the last bucket.
const BUCKETS: usize = 40 * PER_OCTAVE as usize;
/// Rows kept at most; callers beyond are counted in one row with an empty
/// database and the role `(other)`.
const MAX_ROWS: usize = 10_000;

/// A log-scale histogram of durations.
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            n: 0,
        }
    }
}

impl Histogram {
    pub(crate) fn add(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        // Bucket 0: under 1 µs; bucket k: [2^((k-1)/8), 2^(k/8)) µs.
        let k = if us < 1.0 {
            0
        } else {
            ((us.log2() * PER_OCTAVE) as usize + 1).min(BUCKETS - 1)
        };
        self.counts[k] += 1;
        self.n += 1;
    }

    /// The `q` quantile in milliseconds (the geometric middle of its
    /// bucket); 0 when empty.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (k, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if k == 0 {
                    0.0005
                } else {
                    2f64.powf((k as f64 - 0.5) / PER_OCTAVE) / 1000.0
                };
            }
        }
        unreachable!("rank <= n")
    }
}

/// How one embedding request went through the engine.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Timing {
    /// From being queued to its reply, less the time in forward passes.
    pub(crate) queue_wait: Duration,
    /// In forward passes (all its slices).
    pub(crate) inference: Duration,
    /// Mean fill of the batches it ran in (tokens over the budget).
    pub(crate) fill: f64,
}

#[derive(Default)]
struct Row {
    requests: u64,
    texts: u64,
    tokens: u64,
    errors: BTreeMap<String, u64>,
    queue: Histogram,
    inference: Histogram,
    fill_sum: f64,
    fill_n: u64,
}

pub(crate) struct Stats {
    since: SystemTime,
    rows: HashMap<Caller, Row>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            since: SystemTime::now(),
            rows: HashMap::new(),
        }
    }
}

impl Stats {
    fn row(&mut self, caller: &Caller) -> &mut Row {
        if !self.rows.contains_key(caller) && self.rows.len() >= MAX_ROWS {
            let other = Caller {
                database: String::new(),
                role: "(other)".into(),
            };
            return self.rows.entry(other).or_default();
        }
        self.rows.entry(caller.clone()).or_default()
    }

    /// An embedding request answered with its vectors.
    pub(crate) fn embedded(&mut self, caller: &Caller, texts: usize, tokens: usize, t: Timing) {
        let row = self.row(caller);
        row.requests += 1;
        row.texts += texts as u64;
        row.tokens += tokens as u64;
        row.queue.add(t.queue_wait);
        row.inference.add(t.inference);
        row.fill_sum += t.fill;
        row.fill_n += 1;
    }

    /// Any other request answered without an error.
    pub(crate) fn served(&mut self, caller: &Caller) {
        self.row(caller).requests += 1;
    }

    /// A request refused or failed, by the SQLSTATE the client raises.
    pub(crate) fn failed(&mut self, caller: &Caller, sqlstate: &str) {
        let row = self.row(caller);
        row.requests += 1;
        *row.errors.entry(sqlstate.to_string()).or_default() += 1;
    }

    /// The rows (by database, then role) and since when they count;
    /// `reset` starts afresh afterwards.
    pub(crate) fn snapshot(&mut self, reset: bool) -> (f64, Vec<StatsRow>) {
        let since = self
            .since
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut rows: Vec<StatsRow> = self
            .rows
            .iter()
            .map(|(c, r)| StatsRow {
                database: c.database.clone(),
                role: c.role.clone(),
                requests: r.requests,
                texts: r.texts,
                tokens: r.tokens,
                errors: r.errors.clone(),
                queue_wait_p50_ms: r.queue.quantile_ms(0.5),
                queue_wait_p99_ms: r.queue.quantile_ms(0.99),
                inference_p50_ms: r.inference.quantile_ms(0.5),
                inference_p99_ms: r.inference.quantile_ms(0.99),
                batch_fill: if r.fill_n > 0 {
                    r.fill_sum / r.fill_n as f64
                } else {
                    0.0
                },
            })
            .collect();
        rows.sort_by(|a, b| (&a.database, &a.role).cmp(&(&b.database, &b.role)));
        if reset {
            *self = Stats::default();
        }
        (since, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(db: &str, role: &str) -> Caller {
        Caller {
            database: db.into(),
            role: role.into(),
        }
    }

    #[test]
    fn quantiles_are_within_their_bucket() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), 0.0);
        // 1..=100 ms: the median is 50 ms, the 99th percentile 99 ms.
        for ms in 1..=100 {
            h.add(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5);
        let p99 = h.quantile_ms(0.99);
        assert!((p50 / 50.0 - 1.0).abs() < 0.05, "p50 {p50}");
        assert!((p99 / 99.0 - 1.0).abs() < 0.05, "p99 {p99}");
        let mut tiny = Histogram::default();
        tiny.add(Duration::from_nanos(10));
        assert!(tiny.quantile_ms(0.5) < 0.001);
    }

    #[test]
    fn rows_per_caller_count_requests_errors_and_reset() {
        let mut s = Stats::default();
        let t = Timing {
            queue_wait: Duration::from_millis(2),
            inference: Duration::from_millis(20),
            fill: 0.5,
        };
        s.embedded(&caller("db", "alice"), 3, 30, t);
        s.embedded(&caller("db", "alice"), 1, 10, Timing { fill: 1.0, ..t });
        s.failed(&caller("db", "alice"), "54000");
        s.served(&caller("db", "bob"));
        s.failed(&caller("other", "bob"), "57014");
        let (_, rows) = s.snapshot(false);
        assert_eq!(rows.len(), 3);
        let alice = &rows[0];
        assert_eq!(
            (
                alice.role.as_str(),
                alice.requests,
                alice.texts,
                alice.tokens
            ),
            ("alice", 3, 4, 40)
        );
        assert_eq!(alice.errors.get("54000"), Some(&1));
        assert!((alice.batch_fill - 0.75).abs() < 1e-9);
        assert!((alice.inference_p50_ms / 20.0 - 1.0).abs() < 0.05);
        assert_eq!((rows[1].role.as_str(), rows[1].requests), ("bob", 1));
        assert_eq!(rows[2].errors.get("57014"), Some(&1));
        let (_, again) = s.snapshot(true);
        assert_eq!(again.len(), 3);
        assert!(s.snapshot(false).1.is_empty(), "reset empties the rows");
    }

    #[test]
    fn rows_are_bounded() {
        let mut s = Stats::default();
        for i in 0..MAX_ROWS + 5 {
            s.served(&caller("db", &format!("role{i}")));
        }
        let (_, rows) = s.snapshot(false);
        assert_eq!(rows.len(), MAX_ROWS + 1);
        let other = rows.iter().find(|r| r.role == "(other)").unwrap();
        assert_eq!(other.requests, 5);
    }
}
