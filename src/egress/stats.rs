//! Egress statistics: counters and submit-to-outcome latency, in total and per destination.
//! Nothing here can hold a secret (ids, counts and durations only).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::service::{DestinationRuntime, new_histogram};

/// One destination's counters.
#[derive(Clone, Debug)]
pub struct DestinationStats {
    pub exports: u64,
    pub delivered: u64,
    /// Attempts beyond the first of each export.
    pub retried: u64,
    /// The retries by the cause of the failed attempt before them.
    pub retried_by_cause: BTreeMap<&'static str, u64>,
    /// Failed and stored in the dead-letter store (or failed with no store configured).
    pub dead_lettered: u64,
    /// Failed and could NOT be stored in the dead-letter store: kept in memory.
    pub not_stored: u64,
    /// Submitted, not yet finished.
    pub pending: u64,
    /// HTTP requests sent to the endpoint.
    pub requests: u64,
    /// Requests sent to the token endpoint.
    pub token_requests: u64,
    /// Microseconds from submit to delivered or dead-lettered.
    pub latency: Histogram<u64>,
}

/// The egress's counters.
#[derive(Clone, Debug)]
pub struct EgressStats {
    pub exports: u64,
    pub delivered: u64,
    /// Attempts beyond the first of each export.
    pub retried: u64,
    /// Failed and stored in the dead-letter store (or failed with no store configured).
    pub dead_lettered: u64,
    /// Failed and could NOT be stored in the dead-letter store: kept in memory
    /// ([`super::Egress::unstored`]).
    pub not_stored: u64,
    pub pending: u64,
    /// Microseconds from submit to delivered or dead-lettered.
    pub latency: Histogram<u64>,
    pub destinations: BTreeMap<String, DestinationStats>,
    /// Since the egress was created.
    pub uptime: Duration,
}

impl DestinationStats {
    fn of(rt: &DestinationRuntime) -> Self {
        let c = &rt.counters;
        DestinationStats {
            exports: c.exports.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            retried_by_cause: c
                .retry_causes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            not_stored: c.not_stored.load(Ordering::Relaxed),
            pending: c.pending.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            token_requests: rt.authorizer.token_requests(),
            latency: c.latency.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// The counters and latency percentiles (µs) as JSON, for the metrics API.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "exports": self.exports,
            "delivered": self.delivered,
            "retried": self.retried,
            "retriedByCause": self.retried_by_cause,
            "deadLettered": self.dead_lettered,
            "notStored": self.not_stored,
            "pending": self.pending,
            "requests": self.requests,
            "tokenRequests": self.token_requests,
            "latencyMicros": latency_json(&self.latency),
        })
    }
}

impl EgressStats {
    pub(crate) fn collect<'a>(
        runtimes: impl Iterator<Item = &'a DestinationRuntime>,
        uptime: Duration,
    ) -> Self {
        let mut stats = EgressStats {
            exports: 0,
            delivered: 0,
            retried: 0,
            dead_lettered: 0,
            not_stored: 0,
            pending: 0,
            latency: new_histogram(),
            destinations: BTreeMap::new(),
            uptime,
        };
        for rt in runtimes {
            let d = DestinationStats::of(rt);
            stats.exports += d.exports;
            stats.delivered += d.delivered;
            stats.retried += d.retried;
            stats.dead_lettered += d.dead_lettered;
            stats.not_stored += d.not_stored;
            stats.pending += d.pending;
            // Same bounds on both sides: adding cannot fail; if it did, only the total lacks it.
            let _ = stats.latency.add(&d.latency);
            stats.destinations.insert(rt.id().to_string(), d);
        }
        stats
    }

    /// Totals, latency percentiles (µs) and per-destination counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let destinations: serde_json::Map<String, serde_json::Value> = self
            .destinations
            .iter()
            .map(|(id, d)| (id.clone(), d.to_json()))
            .collect();
        serde_json::json!({
            "exports": self.exports,
            "delivered": self.delivered,
            "retried": self.retried,
            "deadLettered": self.dead_lettered,
            "notStored": self.not_stored,
            "pending": self.pending,
            "latencyMicros": latency_json(&self.latency),
            "destinations": destinations,
        })
    }
}

fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::json!({"count": 0});
    }
    serde_json::json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}
