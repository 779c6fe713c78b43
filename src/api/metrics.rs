//! `GET /metrics`: a [`MetricsSnapshot`] taken at scrape time, encoded by the `prometheus-client`
//! crate (a [`Collector`] of const metrics over the snapshot; no hand-formatted exposition).
//!
//! Metrics (each `streamdest_…`; per destination with the label `destination`):
//!
//! | name | type | |
//! | --- | --- | --- |
//! | `streamdest_events_accepted_total` | counter | events acknowledged by `POST /v1/events` |
//! | `streamdest_epochs_total` | counter | dataflow epochs closed |
//! | `streamdest_wal_bytes` | gauge | bytes in the write-ahead log |
//! | `streamdest_wal_position` | gauge | the log's next position: records durable so far, counted from the log's first |
//! | `streamdest_snapshot_writing` | gauge | 1 while a snapshot is being written, else 0 |
//! | `streamdest_exports_total{destination}` | counter | exports submitted to the egress |
//! | `streamdest_deliveries_total{destination}` | counter | exports delivered |
//! | `streamdest_retries_total{destination}` | counter | attempts beyond the first |
//! | `streamdest_dead_letters_total{destination}` | counter | exports dead-lettered |
//! | `streamdest_dead_letters_not_stored_total{destination}` | counter | failed and not stored |
//! | `streamdest_backlog_exports{destination}` | gauge | submitted, not yet finished |
//! | `streamdest_delivery_latency_seconds{destination}` | histogram | submit to outcome |
//!
//! The body is the Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), or OpenMetrics
//! text when the scraper's `Accept` asks for `application/openmetrics-text`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::egress::stats::DestinationStats;

/// The upper bounds (seconds) of the latency histogram's buckets, as
/// [`LatencyHistogram::from_micros`] makes them. Delivery latency includes retries and their
/// back-off, hence the long tail.
pub const LATENCY_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The counters and gauges of the service at one instant, from [`super::Backend::metrics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Events acknowledged by `POST /v1/events` since start.
    pub events_accepted: u64,
    /// Dataflow epochs closed since start.
    pub epochs: u64,
    /// Bytes in the write-ahead log.
    pub wal_bytes: u64,
    /// The write-ahead log's next position (one past the last durable record).
    pub wal_position: u64,
    /// Whether a snapshot is being written.
    pub snapshot_writing: bool,
    /// Per destination id.
    pub destinations: BTreeMap<String, DestinationMetrics>,
}

/// One destination's counters (as [`DestinationStats`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationMetrics {
    pub exports: u64,
    pub delivered: u64,
    /// Attempts beyond the first of each export.
    pub retried: u64,
    /// Failed and stored in the dead-letter store.
    pub dead_lettered: u64,
    /// Failed and not stored (kept in memory).
    pub not_stored: u64,
    /// Submitted, not yet finished (the backlog).
    pub pending: u64,
    /// Submit to delivered or dead-lettered.
    pub latency: LatencyHistogram,
}

/// A classic histogram in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// (upper bound in seconds, cumulative count of observations ≤ it), bounds increasing;
    /// `+Inf` is implied by `count`.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of the observations, seconds.
    pub sum_s: f64,
    /// The number of observations.
    pub count: u64,
}

impl LatencyHistogram {
    /// From an HDR histogram of microseconds (the egress's), into [`LATENCY_BUCKETS_S`].
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        let mut per_bucket = vec![0u64; LATENCY_BUCKETS_S.len()];
        let mut sum_us = 0f64;
        for v in h.iter_recorded() {
            let micros = v.value_iterated_to();
            let n = v.count_since_last_iteration();
            sum_us += micros as f64 * n as f64;
            let seconds = micros as f64 / 1e6;
            if let Some(i) = LATENCY_BUCKETS_S.iter().position(|b| seconds <= *b) {
                per_bucket[i] += n;
            }
        }
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS_S
            .iter()
            .zip(per_bucket)
            .map(|(b, n)| {
                cumulative += n;
                (*b, cumulative)
            })
            .collect();
        LatencyHistogram {
            buckets,
            sum_s: sum_us / 1e6,
            count: h.len(),
        }
    }
}

impl DestinationMetrics {
    pub fn from_stats(s: &DestinationStats) -> Self {
        DestinationMetrics {
            exports: s.exports,
            delivered: s.delivered,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
            not_stored: s.not_stored,
            pending: s.pending,
            latency: LatencyHistogram::from_micros(&s.latency),
        }
    }
}

/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition of `snapshot`: (content type, body). OpenMetrics when `openmetrics`.
pub fn encode(
    snapshot: MetricsSnapshot,
    openmetrics: bool,
) -> Result<(&'static str, String), std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok((OPENMETRICS_CONTENT_TYPE, out))
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok((PROMETHEUS_CONTENT_TYPE, out))
    }
}

#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

type Label<'a> = [(&'static str, &'a str); 1];

impl SnapshotCollector {
    fn per_destination(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        value: impl Fn(&DestinationMetrics) -> u64,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
        for (id, d) in &self.0.destinations {
            let labels: Label = [("destination", id.as_str())];
            let encoder = family.encode_family(&labels)?;
            match metric_type {
                MetricType::Gauge => ConstGauge::new(value(d)).encode(encoder)?,
                _ => ConstCounter::new(value(d)).encode(encoder)?,
            }
        }
        Ok(())
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let metric = ConstCounter::new(v);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let metric = ConstGauge::new(v);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "streamdest_events_accepted",
            "Events acknowledged by POST /v1/events.",
            s.events_accepted,
        )?;
        counter(
            &mut encoder,
            "streamdest_epochs",
            "Dataflow epochs closed.",
            s.epochs,
        )?;
        gauge(
            &mut encoder,
            "streamdest_wal_bytes",
            "Bytes in the write-ahead log.",
            s.wal_bytes,
        )?;
        gauge(
            &mut encoder,
            "streamdest_wal_position",
            "The write-ahead log's next position (one past the last durable record).",
            s.wal_position,
        )?;
        gauge(
            &mut encoder,
            "streamdest_snapshot_writing",
            "1 while a snapshot is being written, else 0.",
            u64::from(s.snapshot_writing),
        )?;
        use MetricType::{Counter, Gauge};
        self.per_destination(
            &mut encoder,
            "streamdest_exports",
            "Exports submitted to the destination.",
            Counter,
            |d| d.exports,
        )?;
        self.per_destination(
            &mut encoder,
            "streamdest_deliveries",
            "Exports delivered (acknowledged by the endpoint).",
            Counter,
            |d| d.delivered,
        )?;
        self.per_destination(
            &mut encoder,
            "streamdest_retries",
            "Delivery attempts beyond the first of each export.",
            Counter,
            |d| d.retried,
        )?;
        self.per_destination(
            &mut encoder,
            "streamdest_dead_letters",
            "Exports that failed and were stored as dead letters.",
            Counter,
            |d| d.dead_lettered,
        )?;
        self.per_destination(
            &mut encoder,
            "streamdest_dead_letters_not_stored",
            "Exports that failed and could not be stored as dead letters.",
            Counter,
            |d| d.not_stored,
        )?;
        self.per_destination(
            &mut encoder,
            "streamdest_backlog_exports",
            "Exports submitted and not yet delivered or dead-lettered.",
            Gauge,
            |d| d.pending,
        )?;
        let unit = Unit::Seconds;
        let mut family = encoder.encode_descriptor(
            "streamdest_delivery_latency",
            "Time from submit to delivered or dead-lettered.",
            Some(&unit),
            MetricType::Histogram,
        )?;
        for (id, d) in &s.destinations {
            let labels: Label = [("destination", id.as_str())];
            let mut encoder = family.encode_family(&labels)?;
            // The encoder wants per-bucket counts; it accumulates them itself.
            let mut previous = 0;
            let buckets: Vec<(f64, u64)> = d
                .latency
                .buckets
                .iter()
                .map(|&(bound, cumulative)| {
                    let n = cumulative.saturating_sub(previous);
                    previous = previous.max(cumulative);
                    (bound, n)
                })
                .collect();
            encoder.encode_histogram::<NoLabelSet>(
                d.latency.sum_s,
                d.latency.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> MetricsSnapshot {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        h.record(2_000).unwrap(); // 2 ms
        h.record(40_000).unwrap(); // 40 ms
        h.record(3_000_000).unwrap(); // 3 s
        let mut destinations = BTreeMap::new();
        destinations.insert(
            "dest-a".to_string(),
            DestinationMetrics {
                exports: 10,
                delivered: 7,
                retried: 4,
                dead_lettered: 2,
                not_stored: 0,
                pending: 1,
                latency: LatencyHistogram::from_micros(&h),
            },
        );
        MetricsSnapshot {
            events_accepted: 42,
            epochs: 5,
            wal_bytes: 1024,
            wal_position: 17,
            snapshot_writing: true,
            destinations,
        }
    }

    #[test]
    fn latency_buckets_from_micros() {
        let s = sample();
        let l = &s.destinations["dest-a"].latency;
        assert_eq!(l.count, 3);
        let at = |b: f64| l.buckets.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!(at(0.001), 0);
        assert_eq!(at(0.005), 1);
        assert_eq!(at(0.05), 2);
        assert_eq!(at(2.5), 2);
        assert_eq!(at(5.0), 3);
        assert!((l.sum_s - 3.042).abs() < 0.01, "{}", l.sum_s);
    }

    #[test]
    fn prometheus_text() {
        let (ct, text) = encode(sample(), false).unwrap();
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        for line in [
            "# TYPE streamdest_events_accepted_total counter",
            "streamdest_events_accepted_total 42",
            "# TYPE streamdest_epochs_total counter",
            "# TYPE streamdest_wal_bytes gauge",
            "streamdest_wal_bytes 1024",
            "# TYPE streamdest_wal_position gauge",
            "streamdest_snapshot_writing 1",
            "# TYPE streamdest_exports_total counter",
            "streamdest_exports_total{destination=\"dest-a\"} 10",
            "streamdest_deliveries_total{destination=\"dest-a\"} 7",
            "streamdest_retries_total{destination=\"dest-a\"} 4",
            "streamdest_dead_letters_total{destination=\"dest-a\"} 2",
            "# TYPE streamdest_backlog_exports gauge",
            "streamdest_backlog_exports{destination=\"dest-a\"} 1",
            "# TYPE streamdest_delivery_latency_seconds histogram",
            "streamdest_delivery_latency_seconds_bucket{destination=\"dest-a\",le=\"0.005\"} 1",
            "streamdest_delivery_latency_seconds_bucket{destination=\"dest-a\",le=\"5\"} 3",
            "streamdest_delivery_latency_seconds_bucket{destination=\"dest-a\",le=\"+Inf\"} 3",
            "streamdest_delivery_latency_seconds_count{destination=\"dest-a\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn openmetrics_text() {
        let (ct, text) = encode(sample(), true).unwrap();
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(text.contains("# TYPE streamdest_events_accepted counter"));
        assert!(text.contains("streamdest_events_accepted_total 42"));
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
