//! The report's types: the figures of the load and of every phase, as printed and as written
//! by `--json`.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Percentiles {
            count: h.len(),
            mean: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Where the time of a measured event goes, stage by stage (milliseconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// Scheduled time → its epoch pushed into the dataflow (per event).
    pub ingest_wait: Percentiles,
    /// Epoch pushed → completed at the export stream (per epoch).
    pub dataflow_per_epoch: Percentiles,
    /// Epoch completed → export accepted by the egress (per export).
    pub queue_before_egress: Percentiles,
    /// Submitted → delivered, HTTP round trip included (per export; the egress's histogram).
    pub egress: Percentiles,
}

/// One measured phase at one offered rate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseReport {
    pub rate_offered: f64,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Events scheduled in the measured window.
    pub events_scheduled: u64,
    /// Of those, pushed into the dataflow.
    pub events_pushed: u64,
    /// Epochs of the whole phase (warm-up included) and their mean size.
    pub epochs: u64,
    pub events_per_epoch: f64,
    /// Events whose epoch completed in the dataflow during the measured window, per second.
    pub achieved_events_per_s: f64,
    /// Exports for measured events received by the endpoint.
    pub exports: u64,
    /// Requests received by the endpoint during the measured window, per second.
    pub achieved_exports_per_s: f64,
    /// Scheduled time of each event → receipt of its export at the endpoint.
    pub latency_ms: Percentiles,
    pub breakdown_ms: Breakdown,
    /// Events scheduled more than two epoch lengths ago but not yet pushed, when the schedule
    /// ended.
    pub backlog_events: u64,
    /// The largest such backlog during the phase.
    pub max_backlog_events: u64,
    /// The phase was cut short because the feeder lagged too far (`--max-lag`, or in a
    /// `--max` trial `max(1 s, 4 × --p99-ms)`).
    pub aborted: bool,
    /// Scheduled events never pushed (only when aborted).
    pub events_dropped: u64,
    /// Process CPU seconds (user + system) from the start of the window until drained.
    pub cpu_s: f64,
    /// `cpu_s` per wall-clock second: cores busy on average.
    pub cpu_cores: f64,
    /// CPU seconds spent generating the synthetic JSON (the load generator, not streamdest).
    pub generator_cpu_s: f64,
    /// Receipts of warm-up exports, and of requests whose key gave no sequence number.
    pub receipts_warmup: u64,
    pub receipts_unmatched: u64,
    /// p99 under the bound, no backlog, and at least 90 % of the offered rate achieved.
    pub passed: bool,
}

/// The initial load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub profiles: u64,
    pub events: u64,
    pub epochs: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    /// Exports the load produced; discarded, not sent.
    pub exports_discarded: u64,
    pub rss_mib_after: f64,
}

/// The `--max` search.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MaxReport {
    pub p99_bound_ms: f64,
    /// The highest offered rate that passed (0 when none did).
    pub best_rate: f64,
    /// That trial's achieved exports/s.
    pub best_exports_per_s: f64,
    pub trials: Vec<PhaseReport>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EgressTotals {
    pub exports: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub retried: u64,
    pub pending: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Resources {
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    pub peak_rss_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Params {
    pub profiles: u64,
    pub audiences: usize,
    pub relevant: f64,
    pub workers: usize,
    pub batch_ms: f64,
    pub max_in_flight: usize,
    pub window: u64,
    pub load_batch: usize,
    pub seed: u64,
}

/// The whole report, as written by `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub command: String,
    pub date: String,
    pub machine: Machine,
    pub params: Params,
    pub load: LoadReport,
    pub runs: Vec<PhaseReport>,
    pub max: Option<MaxReport>,
    pub egress: EgressTotals,
    /// Requests the endpoint received (retries included).
    pub receiver_requests: u64,
    pub resources: Resources,
}

/// Rounds a figure to two decimals for the report.
pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::engine::new_histogram;

    #[test]
    fn percentiles_are_ordered() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 3).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!(p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
        assert_eq!(p.count, 10_000);
    }
}
