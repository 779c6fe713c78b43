//! `streamdest run` under `kill -9` (SPEC §7): events posted over HTTP while exports are
//! delivered to a real endpoint, the process killed at random points, restarted on the same
//! data directory, and at the end run until the endpoint is quiet. Then, per profile (every
//! event creates one new profile that qualifies, so it makes exactly one export):
//!
//! - lost: an acknowledged (202) event whose export never arrived — must be 0;
//! - unexpected: an export for an event that was never posted, or whose request was refused
//!   or never reached the service — must be 0;
//! - duplicated: a profile received more than once — only with the same `Idempotency-Key`, and
//!   only when each earlier receipt came shortly before a kill (acknowledgements are
//!   group-committed, so an export delivered just before a crash may go out again);
//! - torn: a request without a response at the kill (it may or may not have been applied)
//!   whose events arrived only in part — must be 0 (one request is one log record).
//!
//! The seed is printed; `STREAMDEST_CRASH_SEED=N` repeats a run's choices.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use support::service::Service;
use support::{Recorded, Reply, TestServer};

/// Rounds that end in `kill -9`; a final run follows.
const ROUNDS: usize = 4;
/// How long the final run may take to deliver everything.
const FINAL_WAIT: Duration = Duration::from_secs(120);
/// The endpoint counts as quiet after this long without a request.
const QUIET: Duration = Duration::from_secs(2);
/// An export received at most this long before a kill may be received again: its
/// acknowledgement may not have been `fsync`ed (group commit every 200 ms).
const RESEND_WINDOW: Duration = Duration::from_millis(1500);
const CLIENTS: usize = 2;

/// What became of one `POST /v1/events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// 202: the events are durable.
    Acked,
    /// Sent, no status came back (the kill): applied or not.
    InFlight,
    /// A status other than 202: not applied.
    Refused(u16),
    /// No connection: the service was gone.
    NotSent,
}

#[derive(Clone, Debug)]
struct Posted {
    round: usize,
    ids: Vec<String>,
    outcome: Outcome,
}

fn person(id: &str) -> Value {
    json!({"type": "fragment", "dataset": "crm", "id": id,
           "identityMap": {"email": [{"id": format!("{id}@x")}]},
           "attributes": {"person": {"name": {"firstName": "John"}}}})
}

/// Posts `events` as a JSON array on a fresh connection.
fn post(addr: SocketAddr, events: &[Value]) -> Outcome {
    let body = Value::from(events.to_vec()).to_string();
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return Outcome::NotSent;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return Outcome::InFlight;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    match text.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
        Some(202) => Outcome::Acked,
        Some(status) => Outcome::Refused(status),
        None => Outcome::InFlight,
    }
}

/// Posts batches of new profiles to `addr` until `stop`.
fn client(
    addr: SocketAddr,
    round: usize,
    seed: u64,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Posted>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Acquire) {
        let n = rng.random_range(5..40);
        let ids: Vec<String> = (0..n)
            .map(|_| format!("e{}", next_id.fetch_add(1, Ordering::SeqCst)))
            .collect();
        let events: Vec<Value> = ids.iter().map(|id| person(id)).collect();
        let outcome = post(addr, &events);
        log.lock().unwrap().push(Posted {
            round,
            ids,
            outcome,
        });
        if outcome == Outcome::NotSent {
            std::thread::sleep(Duration::from_millis(20));
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        }
    }
}

fn config(endpoint: &str) -> Value {
    json!({
        "mergePolicies": [{"id": "p", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
        "audiences": [{"id": "johns", "mergePolicy": "p", "rule": "person.name.firstName = \"John\""}],
        "destinations": [{"id": "d1", "name": "d1", "endpoint": format!("{endpoint}/d1"),
            "audiences": [{"id": "johns"}], "attributes": ["person.name.firstName"],
            "delivery": {"maxRetries": 5, "timeoutMs": 10000}}]
    })
}

fn profile_of(r: &Recorded) -> String {
    r.json()["identityMap"]["email"][0]["id"]
        .as_str()
        .and_then(|s| s.strip_suffix("@x"))
        .unwrap_or("<no email>")
        .to_string()
}

fn seed() -> u64 {
    std::env::var("STREAMDEST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        })
}

/// Each run of the service: when it started and when it was killed (`None`: the final run).
struct RunSpan {
    started: Instant,
    killed: Option<Instant>,
}

#[test]
fn kill_9_at_random_points_loses_nothing_and_resends_only_unacknowledged_exports() {
    crash_rounds(&[]);
}

/// The same with a snapshot every few requests: kills also land while one is written, and
/// restarts load a snapshot and replay only the log behind it. (It found two snapshot writes
/// racing on one temporary file; they are now written one at a time.)
#[test]
fn kill_9_with_frequent_snapshots() {
    crash_rounds(&["--snapshot-every", "40", "--log-segment-bytes", "65536"]);
}

fn crash_rounds(extra: &[&str]) {
    let seed = seed();
    eprintln!(
        "service_crash: seed {seed} (STREAMDEST_CRASH_SEED={seed} repeats it), options {extra:?}"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // 200, mostly at once, some after a while (so that deliveries are in flight at a kill).
    let endpoint = runtime.block_on(TestServer::start(move |r| {
        let h = (r.seq as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let ms = match h % 100 {
            0..=4 => 150 + h % 200,
            _ => h % 10,
        };
        Reply::Delay(Duration::from_millis(ms), Box::new(Reply::ok()))
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cfg: PathBuf = dir.path().join("config.json");
    std::fs::write(&cfg, config(&endpoint.url("")).to_string()).expect("write config");

    let posted: Arc<Mutex<Vec<Posted>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let mut spans: Vec<RunSpan> = Vec::new();
    let mut stderrs: Vec<String> = Vec::new();

    for round in 0..ROUNDS {
        let started = Instant::now();
        let svc = Service::start(&cfg, &data, extra);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (addr, next_id, stop, posted) =
                    (svc.addr, next_id.clone(), stop.clone(), posted.clone());
                let client_seed = rng.random::<u64>() ^ c as u64;
                std::thread::spawn(move || client(addr, round, client_seed, next_id, stop, posted))
            })
            .collect();
        let run_for = Duration::from_millis(rng.random_range(400..2500));
        std::thread::sleep(run_for);
        let stderr = svc.stderr();
        let killed = svc.kill9();
        stop.store(true, Ordering::Release);
        for c in clients {
            c.join().expect("client thread");
        }
        let acked: usize = posted
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.round == round && p.outcome == Outcome::Acked)
            .map(|p| p.ids.len())
            .sum();
        eprintln!(
            "service_crash: round {round}: killed after {run_for:?}; {acked} events acknowledged, {} exports received so far; {}",
            endpoint.count(),
            stderr
                .lines()
                .find(|l| l.contains("listening on"))
                .unwrap_or_default()
        );
        stderrs.push(stderr);
        spans.push(RunSpan {
            started,
            killed: Some(killed),
        });
    }

    // The final run: one more batch, then until everything acknowledged arrived and the
    // endpoint is quiet.
    let started = Instant::now();
    let svc = Service::start(&cfg, &data, extra);
    spans.push(RunSpan {
        started,
        killed: None,
    });
    let ids: Vec<String> = (0..10)
        .map(|_| format!("e{}", next_id.fetch_add(1, Ordering::SeqCst)))
        .collect();
    let outcome = post(
        svc.addr,
        &ids.iter().map(|id| person(id)).collect::<Vec<_>>(),
    );
    assert_eq!(outcome, Outcome::Acked, "a post after the last restart");
    posted.lock().unwrap().push(Posted {
        round: ROUNDS,
        ids,
        outcome,
    });
    let posted = posted.lock().unwrap().clone();
    let acked: HashSet<&str> = posted
        .iter()
        .filter(|p| p.outcome == Outcome::Acked)
        .flat_map(|p| p.ids.iter().map(String::as_str))
        .collect();
    let deadline = Instant::now() + FINAL_WAIT;
    let mut last_count = usize::MAX;
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let got = endpoint.requests();
        if got.len() != last_count {
            last_count = got.len();
            last_change = Instant::now();
        }
        let received: HashSet<String> = got.iter().map(profile_of).collect();
        let all_in = acked.iter().all(|id| received.contains(*id));
        if all_in && last_change.elapsed() >= QUIET {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "service_crash: not every acknowledged export arrived within {FINAL_WAIT:?}; checking what did"
            );
            break;
        }
    }
    stderrs.push(svc.stderr());
    drop(svc);
    let snapshot = data.join("snapshot.bin").exists();

    // Per profile: each receipt, in order, with its key and the run it arrived in.
    let requests = endpoint.requests();
    let mut receipts: BTreeMap<String, Vec<(Instant, String)>> = BTreeMap::new();
    for r in &requests {
        receipts
            .entry(profile_of(r))
            .or_default()
            .push((r.at, r.header("idempotency-key").unwrap_or_default()));
    }
    let outcome_of: HashMap<&str, (usize, Outcome)> = posted
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.ids.iter().map(move |id| (id.as_str(), (i, p.outcome))))
        .collect();
    // The next kill after `at`: the kill of the run it arrived in (None: the final run).
    let kill_after = |at: Instant| -> Option<Instant> {
        let run = spans
            .iter()
            .rposition(|s| s.started <= at)
            .unwrap_or_default();
        spans[run].killed
    };

    let mut lost = Vec::new();
    for id in &acked {
        if !receipts.contains_key(*id) {
            lost.push(id.to_string());
        }
    }
    lost.sort();
    let mut unexpected = Vec::new();
    let mut duplicated = 0usize;
    // The longest time from a receipt that was sent again to the kill after it.
    let mut widest = Duration::ZERO;
    let mut bad_duplicates = Vec::new();
    let mut in_flight_applied = 0usize;
    let mut keys: HashMap<&str, &str> = HashMap::new();
    let mut shared_keys = Vec::new();
    for (profile, got) in &receipts {
        match outcome_of.get(profile.as_str()) {
            Some((_, Outcome::Acked)) => {}
            Some((_, Outcome::InFlight)) => in_flight_applied += 1,
            other => unexpected.push(format!("{profile} ({other:?})")),
        }
        for (_, key) in got {
            if let Some(previous) = keys.insert(key, profile)
                && previous != profile
            {
                shared_keys.push(format!("{key}: {previous} and {profile}"));
            }
        }
        if got.len() > 1 {
            duplicated += 1;
            let same_key = got.iter().all(|(_, k)| *k == got[0].1 && !k.is_empty());
            for (at, _) in &got[..got.len() - 1] {
                if let Some(kill) = kill_after(*at) {
                    widest = widest.max(kill.saturating_duration_since(*at));
                }
            }
            let before_kills = got[..got.len() - 1].iter().all(|(at, _)| {
                kill_after(*at)
                    .is_some_and(|kill| kill.saturating_duration_since(*at) < RESEND_WINDOW)
            });
            if !same_key || !before_kills {
                let detail: Vec<String> = got
                    .iter()
                    .map(|(at, key)| {
                        let to_kill = kill_after(*at)
                            .map(|k| {
                                format!("{:?} before a kill", k.saturating_duration_since(*at))
                            })
                            .unwrap_or_else(|| "in the final run".into());
                        format!("key {key}, {to_kill}")
                    })
                    .collect();
                bad_duplicates.push(format!("{profile}: {detail:?}"));
            }
        }
    }
    // A request is one log record: applied whole or not at all.
    let mut torn = Vec::new();
    for p in posted.iter().filter(|p| p.outcome == Outcome::InFlight) {
        let arrived = p.ids.iter().filter(|id| receipts.contains_key(*id)).count();
        if arrived != 0 && arrived != p.ids.len() {
            torn.push(format!(
                "round {}: {arrived} of {} ({}..)",
                p.round,
                p.ids.len(),
                p.ids[0]
            ));
        }
    }
    let in_flight: usize = posted
        .iter()
        .filter(|p| p.outcome == Outcome::InFlight)
        .map(|p| p.ids.len())
        .sum();
    let refused: Vec<u16> = posted
        .iter()
        .filter_map(|p| match p.outcome {
            Outcome::Refused(s) => Some(s),
            _ => None,
        })
        .collect();
    let summary = format!(
        "seed {seed}, options {extra:?}: {} events acknowledged, {in_flight} in requests in flight at a kill \
         ({in_flight_applied} of them applied), {} requests refused {refused:?}; \
         {} exports received for {} profiles; lost {}, unexpected {}, duplicated {duplicated} \
         (not allowed: {}; receipts sent again came at most {widest:?} before a kill), keys shared by two profiles {}, torn requests {}; snapshot.bin {}",
        acked.len(),
        refused.len(),
        requests.len(),
        receipts.len(),
        lost.len(),
        unexpected.len(),
        bad_duplicates.len(),
        shared_keys.len(),
        torn.len(),
        if snapshot { "present" } else { "absent" },
    );
    eprintln!("service_crash: {summary}");
    let logs = || {
        stderrs
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- run {i} stderr\n{s}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let first = |v: &[String]| v.iter().take(20).cloned().collect::<Vec<_>>();
    assert!(
        lost.is_empty(),
        "lost {} acknowledged events (first: {:?}); {summary}\n{}",
        lost.len(),
        first(&lost),
        logs()
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected exports (first: {:?}); {summary}",
        unexpected.len(),
        first(&unexpected)
    );
    assert!(
        bad_duplicates.is_empty(),
        "{} duplicates not explained by a kill (first: {:?}); {summary}",
        bad_duplicates.len(),
        first(&bad_duplicates)
    );
    assert!(
        shared_keys.is_empty(),
        "Idempotency-Keys shared by different profiles: {:?}; {summary}",
        first(&shared_keys)
    );
    assert!(
        torn.is_empty(),
        "requests applied in part: {torn:?}; {summary}"
    );
    assert!(
        refused.is_empty(),
        "requests refused while the service ran: {refused:?}; {summary}"
    );
    assert!(
        acked.len() >= 50,
        "too few events were acknowledged to test anything; {summary}"
    );
    drop(runtime);
}
