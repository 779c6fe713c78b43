//! Redrive and listing of dead letters (SPEC §4, §5 `dead-letters list|redrive`).
//!
//! Redrive needs no configuration: each entry carries its destination's settings. Every entry
//! gets one more round of its retry policy with the *same* `Idempotency-Key`. Delivered
//! entries leave the store; the others stay with `attempts` added up and the new
//! `lastStatus`/`lastError`/`lastResponseBody`.
//!
//! Order (SPEC §4, as in delivery): entries of one destination whose profiles share an
//! identity — the same profile, or one renamed, merged or split — are re-sent one after
//! another in their original order (by entry id), so a redrive never lets a profile's later
//! export overtake an earlier one of its history; entries with nothing in common go
//! concurrently, within each destination's `maxInFlight`. The identities are read from each
//! payload's `identityMap` (the profile's name when it has none). Entries with equal settings
//! share one token cache.
//!
//! Run one redrive at a time per store (the CLI holds the store's lock; the service runs
//! them through [`Egress::redrive`](super::Egress::redrive)).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::error::SettingsError;
use super::service::{DestinationRuntime, ServiceOptions, deliver_round};
use super::transport::Transport;
use crate::storage::deadletter::DeadLetterFilter;
use crate::storage::{DeadLetter, DeadLetterStore, DestinationSettings};

/// A destination ready to re-send to, or why its stored settings do not validate.
type Prepared = Result<Arc<DestinationRuntime>, SettingsError>;

/// What a redrive did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Delivered and removed from the store.
    pub succeeded: usize,
    /// Failed again (still in the store).
    pub failed: usize,
}

/// Redrives the entries of `destination` (or all) with a fresh transport. Must run inside a
/// tokio runtime.
pub async fn redrive(store: Arc<DeadLetterStore>, destination: Option<&str>) -> RedriveReport {
    redrive_matching(store, &DeadLetterFilter::destination(destination)).await
}

/// Redrives the entries `filter` matches (`--destination`, `--entry`, `--profile`) with a
/// fresh transport. Must run inside a tokio runtime.
pub async fn redrive_matching(
    store: Arc<DeadLetterStore>,
    filter: &DeadLetterFilter,
) -> RedriveReport {
    let current = HashMap::new();
    redrive_with(
        &Transport::new(),
        store,
        filter,
        &ServiceOptions::default(),
        &current,
    )
    .await
}

/// `current`: destinations as they are configured now (the service), by id. An entry whose
/// destination is among them is re-sent with the current settings (a destination fixed since
/// the failure is used as fixed, and the redrive counts in its metrics); the others with the
/// settings stored with them.
pub(crate) async fn redrive_with(
    transport: &Transport,
    store: Arc<DeadLetterStore>,
    filter: &DeadLetterFilter,
    options: &ServiceOptions,
    current: &HashMap<String, Arc<DestinationRuntime>>,
) -> RedriveReport {
    let entries = {
        let store = store.clone();
        let filter = filter.clone();
        match tokio::task::spawn_blocking(move || store.list_matching(&filter)).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "listing dead letters failed");
                return RedriveReport::default();
            }
        }
    };
    let mut runtimes: Vec<(DestinationSettings, Prepared)> = Vec::new();
    let mut groups: Vec<(Prepared, Vec<DeadLetter>)> = Vec::new();
    for chain in chains(entries) {
        let Some(first) = chain.first() else { continue };
        if let Some(rt) = current.get(&first.destination.id) {
            groups.push((Ok(rt.clone()), chain));
            continue;
        }
        let rt = match runtimes.iter().find(|(s, _)| *s == first.destination) {
            Some((_, rt)) => rt.clone(),
            None => {
                let rt = DestinationRuntime::new(first.destination.clone(), options).map(Arc::new);
                runtimes.push((first.destination.clone(), rt.clone()));
                rt
            }
        };
        groups.push((rt, chain));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (rt, entries) in groups {
        let transport = transport.clone();
        let store = store.clone();
        tasks.spawn(async move {
            let mut report = RedriveReport::default();
            for entry in entries {
                if redrive_entry(&transport, &store, &rt, entry).await {
                    report.succeeded += 1;
                } else {
                    report.failed += 1;
                }
            }
            report
        });
    }
    let mut report = RedriveReport::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => {
                report.succeeded += r.succeeded;
                report.failed += r.failed;
            }
            Err(e) => {
                tracing::error!(error = %e, "a redrive task failed");
                report.failed += 1;
            }
        }
    }
    tracing::info!(
        succeeded = report.succeeded,
        failed = report.failed,
        "redrive finished"
    );
    report
}

/// One entry; `true` when delivered (and removed).
async fn redrive_entry(
    transport: &Transport,
    store: &Arc<DeadLetterStore>,
    rt: &Prepared,
    entry: DeadLetter,
) -> bool {
    let (delivered, attempts, last_status, last_error, last_body) = match rt {
        Ok(rt) => {
            let round = deliver_round(rt, transport, &entry.idempotency_key, &entry.payload).await;
            if round.delivered {
                // A configured destination's metrics count a re-driven export as delivered.
                rt.counters
                    .delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (
                round.delivered,
                entry.attempts.saturating_add(round.attempts),
                round.last_status,
                super::error::last_error_text(round.last_error.as_ref()),
                round.last_body,
            )
        }
        // Stored settings that no longer validate: no attempt was made.
        Err(reason) => (
            false,
            entry.attempts,
            None,
            format!("cannot re-send: {reason}"),
            None,
        ),
    };
    let id = entry.id;
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        if delivered {
            store.remove(id)
        } else {
            store.update(id, attempts, last_status, &last_error, last_body.as_deref())
        }
    })
    .await;
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(entry = id, error = %e, "could not record the redrive in the dead-letter store")
        }
        Err(e) => tracing::error!(entry = id, error = %e, "dead-letter store task failed"),
    }
    if delivered {
        tracing::info!(destination = %entry.destination.id, entry = id, profile = %entry.profile, idempotency_key = %entry.idempotency_key, "redriven export delivered");
    } else {
        tracing::warn!(destination = %entry.destination.id, entry = id, profile = %entry.profile, idempotency_key = %entry.idempotency_key, attempts, last_status = %crate::egress::service::status_field(last_status), "redriven export failed again");
    }
    delivered
}

/// The `dead-letters list` objects (SPEC §5), oldest first.
pub fn list_json(store: &DeadLetterStore, destination: Option<&str>) -> Vec<serde_json::Value> {
    store
        .list(destination)
        .iter()
        .map(DeadLetter::list_json)
        .collect()
}

/// The `dead-letters list` output: one JSON object per line (without the newline).
pub fn list_json_lines(store: &DeadLetterStore, destination: Option<&str>) -> Vec<String> {
    list_json(store, destination)
        .iter()
        .map(|v| v.to_string())
        .collect()
}

/// The `dead-letters summary` object: `total`, then per destination (`destinations`, by id)
/// and over all (`byStatus`) the counts per `lastStatus` (`"none"` when no response was
/// received), keys in ascending order.
pub fn summary_json(store: &DeadLetterStore) -> serde_json::Value {
    fn status_key(status: Option<u16>) -> String {
        status.map_or_else(|| "none".to_string(), |s| s.to_string())
    }
    let entries = store.list(None);
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut destinations: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for e in &entries {
        let key = status_key(e.last_status);
        *by_status.entry(key.clone()).or_default() += 1;
        let d = destinations.entry(e.destination.id.clone()).or_default();
        d.0 += 1;
        *d.1.entry(key).or_default() += 1;
    }
    let destinations: serde_json::Map<String, serde_json::Value> = destinations
        .into_iter()
        .map(|(id, (total, by_status))| {
            (
                id,
                serde_json::json!({"total": total, "byStatus": by_status}),
            )
        })
        .collect();
    serde_json::json!({
        "total": entries.len(),
        "destinations": destinations,
        "byStatus": by_status,
    })
}

/// The identities an entry's profile had when it was exported: `namespace:id` from its
/// payload's `identityMap`, or its profile name.
fn identities(entry: &DeadLetter) -> Vec<String> {
    let payload: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(map) = payload.get("identityMap").and_then(|m| m.as_object()) {
        for (namespace, list) in map {
            for id in list.as_array().into_iter().flatten() {
                if let Some(id) = id.get("id").and_then(|v| v.as_str()) {
                    out.push(format!("{namespace}:{id}"));
                }
            }
        }
    }
    if out.is_empty() {
        out.push(entry.profile.clone());
    }
    out
}

/// Splits `entries` into chains to re-send one after another: per destination, the entries
/// connected by shared identities (union-find), each chain in entry-id order.
fn chains(mut entries: Vec<DeadLetter>) -> Vec<Vec<DeadLetter>> {
    entries.sort_by_key(|e| e.id);
    let mut parent: Vec<usize> = (0..entries.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        for identity in identities(entry) {
            match seen.entry((entry.destination.id.clone(), identity)) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    let (a, b) = (root(&mut parent, *o.get()), root(&mut parent, i));
                    parent[a.max(b)] = a.min(b);
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
    }
    let mut by_root: BTreeMap<usize, Vec<DeadLetter>> = BTreeMap::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let r = root(&mut parent, i);
        by_root.entry(r).or_default().push(entry);
    }
    by_root.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Destination, parse_json};

    fn entry(id: u64, destination: &str, profile: &str, identities: &[(&str, &str)]) -> DeadLetter {
        let d: Destination = parse_json(&format!(
            r#"{{"id":"{destination}","name":"{destination}","endpoint":"http://127.0.0.1:9/x","audiences":[{{"id":"a"}}]}}"#
        ))
        .expect("a destination");
        let mut map: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
        for (ns, v) in identities {
            map.entry(ns)
                .or_default()
                .push(serde_json::json!({ "id": v }));
        }
        DeadLetter {
            id,
            destination: crate::egress::destination_settings(&d).expect("settings"),
            profile: profile.into(),
            epoch: id,
            idempotency_key: format!("k{id}"),
            payload: serde_json::to_vec(&serde_json::json!({ "identityMap": map }))
                .expect("json")
                .into(),
            attempts: 1,
            last_status: None,
            last_error: String::new(),
            last_response_body: None,
            stored_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn chains_follow_shared_identities_per_destination_in_entry_order() {
        let entries = vec![
            // A merge: email:a's profile, then the profile named ecid:1 that holds email:a.
            entry(5, "d", "ecid:1", &[("ecid", "1"), ("email", "a")]),
            entry(2, "d", "email:a", &[("email", "a")]),
            // Joined to them only through entry 7's identities (transitively).
            entry(9, "d", "email:z", &[("email", "z")]),
            entry(7, "d", "ecid:1", &[("ecid", "1"), ("email", "z")]),
            // Unrelated, and the same identities at another destination: their own chains.
            entry(3, "d", "email:b", &[("email", "b")]),
            entry(4, "e", "email:a", &[("email", "a")]),
        ];
        let mut ids: Vec<Vec<u64>> = chains(entries)
            .iter()
            .map(|c| c.iter().map(|e| e.id).collect())
            .collect();
        ids.sort();
        assert_eq!(ids, vec![vec![2, 5, 7, 9], vec![3], vec![4]]);
    }
}
