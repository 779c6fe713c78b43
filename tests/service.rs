//! `streamdest run`, driven as users drive it: the real binary on loopback, its HTTP API, a
//! real endpoint, real signals and `kill -9`, real files in the data directory.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::service::{Service, WAIT};
use support::{Recorded, Reply, TestServer};

fn config(endpoint: &str) -> Value {
    json!({
        "mergePolicies": [{"id": "p", "attributeMerge": "timestampOrdered", "identityStitching": "privateGraph"}],
        "audiences": [
            {"id": "johns", "mergePolicy": "p", "rule": "person.name.firstName = \"John\""},
            {"id": "vip", "mergePolicy": "p", "source": "upload"}
        ],
        "destinations": [{"id": "d1", "name": "d1", "endpoint": format!("{endpoint}/d1"),
            "audiences": [{"id": "johns"}], "attributes": ["person.name.firstName"],
            "delivery": {"maxRetries": 0, "timeoutMs": 2000}}]
    })
}

fn write_config(dir: &Path, config: &Value) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    path
}

fn person(id: &str, first: &str) -> Value {
    json!({"type": "fragment", "dataset": "crm", "id": id,
           "identityMap": {"email": [{"id": format!("{id}@x")}]},
           "attributes": {"person": {"name": {"firstName": first}}}})
}

/// Waits until `server` has received `n` requests (or panics, naming what it got).
fn wait_for(server: &TestServer, n: usize) -> Vec<Recorded> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = server.requests();
        if got.len() >= n {
            return got;
        }
        if Instant::now() > deadline {
            panic!(
                "{} requests after {WAIT:?}, expected {n}: {:?}",
                got.len(),
                got.iter()
                    .map(|r| (r.target.clone(), r.body_str()))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `done` holds (or panics after `WAIT`, saying `what` it waited for).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "not after {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `acks.log` in `data` records the export with Idempotency-Key `key` as finished.
fn acked(data: &Path, key: Option<&str>) -> bool {
    let log = std::fs::read_to_string(data.join("acks.log")).unwrap_or_default();
    key.is_some_and(|key| log.lines().any(|line| line == key))
}

/// No more than `n` requests arrive within `quiet`.
fn settles_at(server: &TestServer, n: usize, quiet: Duration) -> Vec<Recorded> {
    std::thread::sleep(quiet);
    let got = server.requests();
    assert_eq!(
        got.len(),
        n,
        "{:?}",
        got.iter()
            .map(|r| (r.target.clone(), r.body_str()))
            .collect::<Vec<_>>()
    );
    got
}

fn email_of(r: &Recorded) -> String {
    r.json()["identityMap"]["email"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_control_changes_and_backfill() {
    let endpoint = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &config(&endpoint.url("")));
    let svc = Service::start(&cfg, &dir.path().join("data"), &[]);

    assert_eq!(svc.request("GET", "/healthz", &[], "").0, 200);
    // Events before any destination maps Jane's audience: only John goes out.
    assert_eq!(
        svc.post_events(&[person("john", "John"), person("jane", "Jane")]),
        202
    );
    let got = wait_for(&endpoint, 1);
    assert_eq!(got[0].target, "/d1");
    assert_eq!(email_of(&got[0]), "john@x");
    assert!(got[0].header("idempotency-key").is_some());

    // A bad event at index 3 of 5: 400 naming it, and none of the five applied.
    let mut batch: Vec<Value> = (0..5).map(|i| person(&format!("b{i}"), "John")).collect();
    batch[3] = json!({"type": "fragment", "dataset": "crm"});
    let (status, body) = svc.json("POST", "/v1/events", &Value::from(batch));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["index"], 3, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("id")),
        "{body}"
    );

    // An upload to a rule audience, and to an unknown one, are refused.
    let (status, _) = svc.json(
        "POST",
        "/v1/events",
        &json!({"type": "uploadMembers", "audience": "nope", "add": [{"namespace": "email", "id": "x"}]}),
    );
    assert_eq!(status, 400);

    // A new audience: Jane qualifies at once, but no destination maps it: nothing is sent.
    let (status, body) = svc.json(
        "PUT",
        "/v1/audiences/janes",
        &json!({"mergePolicy": "p", "rule": "person.name.firstName = \"Jane\""}),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], "janes");
    let (status, _) = svc.json(
        "PUT",
        "/v1/audiences/janes",
        &json!({"mergePolicy": "p", "rule": "person.name.firstName = \"Jane\""}),
    );
    assert_eq!(status, 200, "replacing");

    // A new destination mapping both: every realized profile is backfilled to it, once.
    let d2 = json!({"name": "d2", "endpoint": endpoint.url("/d2"),
        "audiences": [{"id": "johns"}, {"id": "janes"}], "attributes": ["person.name.firstName"],
        "auth": {"type": "bearer", "token": "s3cr3t-token"}});
    let (status, body) = svc.json("PUT", "/v1/destinations/d2", &d2);
    assert_eq!(status, 201, "{body}");
    assert!(
        !body.to_string().contains("s3cr3t-token"),
        "the secret is redacted: {body}"
    );
    let got = wait_for(&endpoint, 3);
    let mut backfilled: Vec<String> = got[1..]
        .iter()
        .inspect(|r| assert_eq!(r.target, "/d2"))
        .map(email_of)
        .collect();
    backfilled.sort();
    assert_eq!(backfilled, ["jane@x", "john@x"]);
    let jane = got[1..]
        .iter()
        .find(|r| email_of(r) == "jane@x")
        .expect("jane");
    assert_eq!(
        jane.json()["segmentMembership"]["ups"]["janes"]["status"],
        "realized"
    );
    assert_eq!(
        jane.header("authorization").as_deref(),
        Some("Bearer s3cr3t-token")
    );

    // GET shows the object, redacted; unknown ids are 404; referenced objects 409.
    let (status, body) = svc.json("GET", "/v1/destinations/d2", &Value::Null);
    assert_eq!(status, 200);
    assert_eq!(body["audiences"].as_array().map(Vec::len), Some(2));
    assert!(!body.to_string().contains("s3cr3t-token"));
    assert_eq!(svc.json("GET", "/v1/audiences/nope", &Value::Null).0, 404);
    let (status, body) = svc.json("DELETE", "/v1/audiences/janes", &Value::Null);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].is_string());
    assert_eq!(
        svc.json("DELETE", "/v1/merge-policies/p", &Value::Null).0,
        409
    );
    assert_eq!(
        svc.json("DELETE", "/v1/destinations/nope", &Value::Null).0,
        404
    );
    // An invalid object: 400 naming the field, nothing changed.
    let (status, body) = svc.json(
        "PUT",
        "/v1/destinations/d2",
        &json!({"name": "d2", "endpoint": endpoint.url("/d2"), "audiences": [{"id": "johns"}], "atributes": []}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("atributes")),
        "{body}"
    );
    assert_eq!(
        svc.json("GET", "/v1/destinations/d2", &Value::Null).1["audiences"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Removing an audience from a mapping, or changing attributes, sends nothing.
    let (status, _) = svc.json(
        "PUT",
        "/v1/destinations/d2",
        &json!({"name": "d2", "endpoint": endpoint.url("/d2"), "audiences": [{"id": "johns"}],
                "attributes": ["person.name.firstName", "person.name.lastName"],
                "auth": {"type": "bearer", "token": "s3cr3t-token"}}),
    );
    assert_eq!(status, 200);
    let (status, _) = svc.json("DELETE", "/v1/audiences/janes", &Value::Null);
    assert_eq!(status, 204);

    // CSV members to the upload audience, then a destination mapping it: backfilled.
    let (status, body) = svc.request(
        "POST",
        "/v1/audiences/vip/members",
        &[("Content-Type", "text/csv")],
        "namespace,id\nemail,jane@x\n",
    );
    assert_eq!(status, 202, "{body}");
    let (status, _) = svc.request(
        "POST",
        "/v1/audiences/vip/members",
        &[("Content-Type", "text/csv")],
        "email,jane@x\n",
    );
    assert_eq!(status, 400, "the header line is required");
    assert!(
        svc.request(
            "POST",
            "/v1/audiences/johns/members",
            &[("Content-Type", "text/csv")],
            "namespace,id\nemail,a\n"
        )
        .0 >= 400
    );
    settles_at(&endpoint, 3, Duration::from_millis(300));
    let (status, _) = svc.json(
        "PUT",
        "/v1/destinations/d3",
        &json!({"name": "d3", "endpoint": endpoint.url("/d3"), "audiences": [{"id": "vip"}]}),
    );
    assert_eq!(status, 201);
    let got = wait_for(&endpoint, 4);
    assert_eq!(got[3].target, "/d3");
    assert_eq!(email_of(&got[3]), "jane@x");
    settles_at(&endpoint, 4, Duration::from_millis(300));

    // Metrics: JSON per destination, Prometheus text for all.
    let (status, body) = svc.json("GET", "/v1/destinations/d2/metrics", &Value::Null);
    assert_eq!(status, 200);
    assert_eq!(body["delivered"], 2, "{body}");
    let (status, text) = svc.request("GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(text.contains("streamdest_events_accepted_total"), "{text}");
    assert!(
        text.contains("streamdest_deliveries_total{destination=\"d2\"} 2"),
        "{text}"
    );
    assert_eq!(svc.sigterm(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_take_effect_after_the_events_acknowledged_before_them() {
    let endpoint = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&endpoint.url(""));
    cfg["destinations"] = json!([]);
    let cfg = write_config(dir.path(), &cfg);
    let svc = Service::start(&cfg, &dir.path().join("data"), &[]);
    // Events, then at once a destination: the backfill sees every event acknowledged
    // before the change.
    let events: Vec<Value> = (0..50).map(|i| person(&format!("p{i}"), "John")).collect();
    assert_eq!(svc.post_events(&events), 202);
    let (status, _) = svc.json(
        "PUT",
        "/v1/destinations/d",
        &json!({"name": "d", "endpoint": endpoint.url("/d"), "audiences": [{"id": "johns"}]}),
    );
    assert_eq!(status, 201);
    wait_for(&endpoint, 50);
    settles_at(&endpoint, 50, Duration::from_millis(300));
    // A change that moves every profile out: each exits, once, with the change's time.
    let (status, _) = svc.json(
        "PUT",
        "/v1/audiences/johns",
        &json!({"mergePolicy": "p", "rule": "person.name.firstName = \"Johnny\""}),
    );
    assert_eq!(status, 200);
    let got = wait_for(&endpoint, 100);
    for r in &got[50..] {
        assert_eq!(
            r.json()["segmentMembership"]["ups"]["johns"]["status"],
            "exited"
        );
    }
    settles_at(&endpoint, 100, Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_and_body_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &config("http://127.0.0.1:9"));
    let svc = Service::start(
        &cfg,
        &dir.path().join("data"),
        &["--api-token", "t0ken", "--max-body", "2000"],
    );
    let event = person("a", "Ann").to_string();
    let json_type = ("Content-Type", "application/json");
    assert_eq!(
        svc.request("POST", "/v1/events", &[json_type], &event).0,
        401
    );
    let wrong = ("Authorization", "Bearer nope");
    assert_eq!(
        svc.request("POST", "/v1/events", &[json_type, wrong], &event)
            .0,
        401
    );
    let right = ("Authorization", "Bearer t0ken");
    assert_eq!(
        svc.request("POST", "/v1/events", &[json_type, right], &event)
            .0,
        202
    );
    assert_eq!(svc.request("GET", "/healthz", &[], "").0, 200);
    let big = format!("[{}]", vec![event.as_str(); 40].join(","));
    let (status, body) = svc.request("POST", "/v1/events", &[json_type, right], &big);
    assert_eq!(status, 413, "{body}");
    assert_eq!(svc.request("GET", "/v1/audiences/vip", &[right], "").0, 200);
    assert!(!svc.stderr().contains("t0ken"), "the token is never logged");
}

/// Starts with an endpoint whose second export hangs; `kill -9`; a restart sends the hung
/// export again with the same key, and not the delivered one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_sends_what_was_not_acknowledged_with_the_same_key() {
    let hang = Arc::new(AtomicBool::new(false));
    let endpoint = hanging_endpoint(hang.clone(), |_| true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cfg = config(&endpoint.url(""));
    cfg["destinations"][0]["delivery"]["timeoutMs"] = json!(60_000);
    let cfg = write_config(dir.path(), &cfg);
    let svc = Service::start(&cfg, &data, &[]);
    assert_eq!(svc.post_events(&[person("a", "John")]), 202);
    let first = wait_for(&endpoint, 1);
    let key = first[0].header("idempotency-key");
    eventually("the first export's acknowledgement recorded", || {
        acked(&data, key.as_deref())
    });
    hang.store(true, Ordering::SeqCst);
    assert_eq!(svc.post_events(&[person("b", "John")]), 202);
    let hung = wait_for(&endpoint, 2);
    svc.kill9();

    hang.store(false, Ordering::SeqCst);
    let svc = Service::start(&cfg, &data, &[]);
    let got = wait_for(&endpoint, 3);
    settles_at(&endpoint, 3, Duration::from_millis(500));
    assert_eq!(email_of(&got[2]), "b@x");
    assert_eq!(
        got[2].header("idempotency-key"),
        hung[1].header("idempotency-key")
    );
    assert_ne!(
        got[2].header("idempotency-key"),
        first[0].header("idempotency-key")
    );

    // SIGTERM: exit 0; a restart sends nothing more, and the state continues.
    assert_eq!(svc.sigterm(), Some(0));
    let svc = Service::start(&cfg, &data, &[]);
    settles_at(&endpoint, 3, Duration::from_millis(500));
    assert_eq!(
        svc.post_events(&[json!({"type": "fragmentDelete", "dataset": "crm", "id": "a"})]),
        202
    );
    let got = wait_for(&endpoint, 4);
    assert_eq!(email_of(&got[3]), "a@x");
    assert_eq!(
        got[3].json()["segmentMembership"]["ups"]["johns"]["status"],
        "exited"
    );
}

/// An endpoint that never answers the requests `which` picks while `hang` is set, and answers
/// 200 otherwise.
async fn hanging_endpoint(
    hang: Arc<AtomicBool>,
    which: impl Fn(&Recorded) -> bool + Send + Sync + 'static,
) -> TestServer {
    TestServer::start(move |r| {
        if hang.load(Ordering::SeqCst) && which(r) {
            Reply::Hang
        } else {
            Reply::ok()
        }
    })
    .await
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut list: Vec<PathBuf> = std::fs::read_dir(data.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_cut_and_a_corrupt_record_stops_the_start() {
    let endpoint = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let cfg = write_config(dir.path(), &config(&endpoint.url("")));
    let svc = Service::start(&cfg, &data, &[]);
    for i in 0..3 {
        assert_eq!(svc.post_events(&[person(&format!("p{i}"), "John")]), 202);
    }
    wait_for(&endpoint, 3);
    assert_eq!(svc.sigterm(), Some(0));

    // Power loss mid-write: half a frame at the end.
    let segment = segments(&data).pop().expect("a segment");
    let intact = std::fs::read(&segment).expect("read");
    let mut torn = intact.clone();
    torn.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, b'x', b'y']);
    std::fs::write(&segment, &torn).expect("write");
    let svc = Service::start(&cfg, &data, &[]);
    settles_at(&endpoint, 3, Duration::from_millis(300));
    assert_eq!(svc.post_events(&[person("p9", "John")]), 202);
    wait_for(&endpoint, 4);
    assert_eq!(svc.sigterm(), Some(0));

    // A flipped byte in the middle of the log: the start stops, naming segment and offset.
    let mut bytes = std::fs::read(&segment).expect("read");
    let middle = intact.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&segment, &bytes).expect("write");
    let err = Service::try_start(&cfg, &data, &[])
        .err()
        .expect("the start fails");
    let name = segment.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(err.contains(name) && err.contains("offset"), "{err}");
    // Nothing was cut.
    assert_eq!(std::fs::read(&segment).expect("read"), bytes);
}

/// Snapshots every 3 records on small log segments: the log behind a snapshot is deleted, and
/// after `kill -9` a restart resumes from the snapshot — the export that was still unfinished
/// when it was taken (its event's log is gone) goes out from the snapshot's outbox with its
/// key, and nothing delivered is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_a_snapshot_and_its_outbox() {
    let hang = Arc::new(AtomicBool::new(true));
    let endpoint = hanging_endpoint(hang.clone(), |r| r.body_str().contains("p4@x")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut cfg = config(&endpoint.url(""));
    // The hung request must not time out (and be dead-lettered) before the kill.
    cfg["destinations"][0]["delivery"]["timeoutMs"] = json!(60_000);
    let cfg = write_config(dir.path(), &cfg);
    // Two workers: the records and inputs of a snapshot go back to the workers that own them.
    let args = [
        "--snapshot-every",
        "3",
        "--log-segment-bytes",
        "300",
        "--workers",
        "2",
    ];
    let svc = Service::start(&cfg, &data, &args);
    for i in 0..12 {
        assert_eq!(svc.post_events(&[person(&format!("p{i}"), "John")]), 202);
    }
    let sent = wait_for(&endpoint, 12);
    let hung = sent
        .iter()
        .find(|r| email_of(r) == "p4@x")
        .expect("p4 was tried");
    eventually("every delivered export's acknowledgement recorded", || {
        sent.iter()
            .filter(|r| email_of(r) != "p4@x")
            .all(|r| acked(&data, r.header("idempotency-key").as_deref()))
    });
    let first_segment = || {
        segments(&data)
            .first()
            .and_then(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
    };
    eventually("a snapshot, and the log before it deleted", || {
        data.join("snapshot.bin").exists() && first_segment().is_some_and(|first| first > 4)
    });
    svc.kill9();

    hang.store(false, Ordering::SeqCst);
    let svc = Service::start(&cfg, &data, &args);
    let got = wait_for(&endpoint, 13);
    settles_at(&endpoint, 13, Duration::from_millis(500));
    assert_eq!(email_of(&got[12]), "p4@x");
    assert_eq!(
        got[12].header("idempotency-key"),
        hung.header("idempotency-key")
    );
    // The profiles keep their history: a delete exits one, with its identities.
    assert_eq!(
        svc.post_events(&[json!({"type": "fragmentDelete", "dataset": "crm", "id": "p0"})]),
        202
    );
    let got = wait_for(&endpoint, 14);
    assert_eq!(email_of(&got[13]), "p0@x");
    assert_eq!(
        got[13].json()["segmentMembership"]["ups"]["johns"]["status"],
        "exited"
    );
    assert_eq!(svc.sigterm(), Some(0));
}

/// A snapshot that falls due while the writer is busy is taken once the writer is free, even
/// if no more input comes: after a burst (a snapshot due at every record), the idle service's
/// last snapshot is at the end of its log, so a restart replays none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_service_snapshots_up_to_the_end_of_its_log() {
    let endpoint = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &config(&endpoint.url("")));
    // Each snapshot takes 300 ms to write, so the burst's last records find the writer busy.
    let svc = Service::start_with_env(
        &cfg,
        &dir.path().join("data"),
        &["--snapshot-every", "1"],
        &[("STREAMDEST_TEST_SNAPSHOT_DELAY_MS", "300")],
    );
    let burst: Vec<std::thread::JoinHandle<()>> = (0..4)
        .map(|t| {
            let addr = svc.addr;
            std::thread::spawn(move || {
                for i in 0..15 {
                    let body = Value::from(vec![person(&format!("p{t}-{i}"), "John")]);
                    let (status, _) = support::service::http(
                        addr,
                        "POST",
                        "/v1/events",
                        &[("Content-Type", "application/json")],
                        &body.to_string(),
                    );
                    assert_eq!(status, 202);
                }
            })
        })
        .collect();
    for t in burst {
        t.join().expect("poster");
    }
    // Idle: no snapshot being written, 10 looks in a row.
    let deadline = Instant::now() + WAIT;
    let mut quiet = 0;
    while quiet < 10 {
        let (_, metrics) = svc.request("GET", "/metrics", &[], "");
        let writing = !metrics.contains("streamdest_snapshot_writing 0");
        quiet = if writing { 0 } else { quiet + 1 };
        assert!(Instant::now() < deadline, "still writing snapshots");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(svc.sigterm(), Some(0));
    // The restart reads no log: its last snapshot was taken at the end.
    let svc = Service::start(&cfg, &dir.path().join("data"), &["--snapshot-every", "1"]);
    let deadline = Instant::now() + WAIT;
    let rebuilt = loop {
        let log = svc.stderr();
        if let Some(line) = log.lines().find(|l| l.contains("state rebuilt")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no rebuild line: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let range = rebuilt
        .split("log positions ")
        .nth(1)
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.split_once(".."))
        .map(|(a, b)| (a.to_string(), b.to_string()));
    let (from, to) = range.unwrap_or_else(|| panic!("no positions in {rebuilt:?}"));
    assert_eq!(from, to, "the restart replayed log positions {from}..{to}");
    assert_eq!(svc.sigterm(), Some(0));
}

/// A random history with merges (a shared fragment joins two people), splits (it is deleted),
/// deletes, renames and uploads, every event with its own timestamp.
fn random_history(seed: u64, people: usize, events: usize) -> Vec<Value> {
    let mut state = seed;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let names = ["John", "Jane", "Jo"];
    let stamp = |i: usize| {
        format!(
            "2024-05-01T{:02}:{:02}:{:02}Z",
            i / 3600,
            (i / 60) % 60,
            i % 60
        )
    };
    let mut out = Vec::new();
    for i in 0..events {
        let a = next(people);
        let b = next(people);
        let ts = stamp(i);
        let event = match next(10) {
            0..=4 => {
                json!({"type": "fragment", "dataset": "crm", "id": format!("c{a}"), "timestamp": ts,
                "identityMap": {"email": [{"id": format!("e{a}"), "primary": true}]},
                "attributes": {"person": {"name": {"firstName": names[next(3)], "lastName": format!("L{}", next(4))}}}})
            }
            5 | 6 => {
                json!({"type": "fragment", "dataset": "web", "id": format!("w{}", next(people / 2 + 1)), "timestamp": ts,
                "identityMap": {"email": [{"id": format!("e{a}")}, {"id": format!("e{b}")}], "ecid": [{"id": format!("x{a}")}]},
                "attributes": {"person": {"name": {"firstName": names[next(3)]}}}})
            }
            7 => {
                json!({"type": "fragmentDelete", "dataset": "web", "id": format!("w{}", next(people / 2 + 1)), "timestamp": ts})
            }
            8 => {
                json!({"type": "fragmentDelete", "dataset": "crm", "id": format!("c{a}"), "timestamp": ts})
            }
            _ => json!({"type": "uploadMembers", "audience": "vip", "timestamp": ts,
                "add": [{"namespace": "email", "id": format!("e{a}")}],
                "remove": [{"namespace": "email", "id": format!("e{b}")}]}),
        };
        out.push(event);
    }
    out
}

/// Each export's payload without `lastQualificationTime` (it depends on the history's epochs),
/// by profile.
fn without_times(exports: impl Iterator<Item = (String, Value)>) -> BTreeMap<String, String> {
    exports
        .map(|(profile, mut payload)| {
            if let Some(ups) = payload["segmentMembership"]["ups"].as_object_mut() {
                for v in ups.values_mut() {
                    v.as_object_mut().map(|o| o.remove("lastQualificationTime"));
                }
            }
            (profile, payload.to_string())
        })
        .collect()
}

/// The backfill of a destination added after a history, and of an audience that changed its
/// rule after it, are exactly the profiles a one-epoch replay of the same history finds
/// realized — same identities, attributes and memberships — though the service saw the history
/// in many epochs, with merges, splits and deletes along the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_matches_a_one_epoch_replay_of_the_same_history() {
    for seed in [7, 11, 23] {
        backfill_matches_replay(seed).await;
    }
}

async fn backfill_matches_replay(seed: u64) {
    let endpoint = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut base = config(&endpoint.url(""));
    base["destinations"] = json!([]);
    let cfg = write_config(dir.path(), &base);
    let history = random_history(seed, 40, 400);
    let svc = Service::start(&cfg, &dir.path().join("data"), &["--workers", "2"]);
    for chunk in history.chunks(7) {
        assert_eq!(svc.post_events(chunk), 202);
    }
    // The audience's rule changes after the history; then a destination maps it and `vip`.
    let rule = json!({"mergePolicy": "p", "rule": "person.name.firstName = \"Jo\""});
    assert_eq!(svc.json("PUT", "/v1/audiences/johns", &rule).0, 200);
    let destination = json!({"name": "d", "endpoint": endpoint.url("/d"),
        "audiences": [{"id": "johns"}, {"id": "vip"}],
        "attributes": ["person.name.firstName", "person.name.lastName"]});
    assert_eq!(svc.json("PUT", "/v1/destinations/d", &destination).0, 201);
    std::thread::sleep(Duration::from_millis(300));
    let backfill = settles_at(
        &endpoint,
        endpoint.requests().len(),
        Duration::from_millis(500),
    );
    assert!(!backfill.is_empty());
    let service = without_times(backfill.iter().map(|r| {
        let payload = r.json();
        let ids = &payload["identityMap"];
        let name = ids
            .as_object()
            .and_then(|m| m.iter().min_by(|a, b| a.0.cmp(b.0)))
            .map(|(ns, list)| format!("{ns}:{}", list[0]["id"].as_str().unwrap_or_default()))
            .unwrap_or_default();
        (name, payload)
    }));

    // The reference: the same history replayed as one epoch, with the final configuration.
    let mut reference = base.clone();
    reference["audiences"][0]["rule"] = json!("person.name.firstName = \"Jo\"");
    let mut d = destination.clone();
    d["id"] = json!("d");
    reference["destinations"] = json!([d]);
    let ref_cfg = dir.path().join("reference.json");
    std::fs::write(&ref_cfg, reference.to_string()).expect("write");
    let events = dir.path().join("events.ndjson");
    let text: String = history.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&events, text).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .args(["replay", "--dry-run", "--batch", "100000", "--config"])
        .arg(&ref_cfg)
        .arg("--events")
        .arg(&events)
        .output()
        .expect("replay");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let replayed = without_times(String::from_utf8_lossy(&output.stdout).lines().map(|l| {
        let v: Value = serde_json::from_str(l).expect("a JSON line");
        (
            v["profile"].as_str().unwrap_or_default().to_string(),
            v["payload"].clone(),
        )
    }));
    assert_eq!(
        service.len(),
        backfill.len(),
        "seed {seed}: one export per profile"
    );
    assert_eq!(service, replayed, "seed {seed}");
    // The history is not trivial: merged profiles and upload members are among them.
    let merged = backfill
        .iter()
        .filter(|r| {
            r.json()["identityMap"]["email"]
                .as_array()
                .map_or(0, Vec::len)
                > 1
        })
        .count();
    let vip = backfill
        .iter()
        .filter(|r| !r.json()["segmentMembership"]["ups"]["vip"].is_null())
        .count();
    assert!(
        backfill.len() >= 10 && merged >= 2 && vip >= 2,
        "{} {merged} {vip}",
        backfill.len()
    );
}

/// `--max-log-bytes`: past the budget every write gets 503 with `Retry-After` and changes
/// nothing; reads still work. A budget below two segments is refused at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_budget_answers_503_and_a_tiny_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &config("http://127.0.0.1:9"));
    let err = Service::try_start(
        &cfg,
        &dir.path().join("tiny"),
        &["--max-log-bytes", "100", "--log-segment-bytes", "400"],
    )
    .err()
    .expect("refused");
    assert!(
        err.contains("--max-log-bytes 100 is below two log segments"),
        "{err}"
    );

    let svc = Service::start(
        &cfg,
        &dir.path().join("data"),
        &["--max-log-bytes", "3000", "--log-segment-bytes", "1400"],
    );
    let mut refused = None;
    for i in 0..100 {
        let (status, body) = svc.request(
            "POST",
            "/v1/events",
            &[("Content-Type", "application/json")],
            &person(&format!("p{i}"), "Ann").to_string(),
        );
        if status != 202 {
            refused = Some((status, body));
            break;
        }
    }
    let (status, body) = refused.expect("the budget is reached");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("budget"), "{body}");
    let (status, _) = svc.json(
        "PUT",
        "/v1/audiences/x",
        &json!({"mergePolicy": "p", "source": "upload"}),
    );
    assert_eq!(status, 503);
    assert_eq!(svc.json("GET", "/v1/audiences/x", &Value::Null).0, 404);
    assert_eq!(svc.request("GET", "/healthz", &[], "").0, 200);
}

/// Dead letters through the API: a failing endpoint's export is listed (with the endpoint's
/// answer); after the destination is fixed with a PUT, a redrive sends it to the fixed endpoint
/// with its key and the list empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_and_redrive_to_the_fixed_destination() {
    let broken = TestServer::always(Reply::Full(
        400,
        vec![("Content-Type".into(), "application/json".into())],
        r#"{"error":"field x is missing"}"#.into(),
    ))
    .await;
    let fixed = TestServer::always(Reply::ok()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &config(&broken.url("")));
    let svc = Service::start(&cfg, &dir.path().join("data"), &[]);
    assert_eq!(svc.post_events(&[person("a", "John")]), 202);
    let failed = wait_for(&broken, 1);
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let (status, body) = svc.json("GET", "/v1/destinations/d1/dead-letters", &Value::Null);
        assert_eq!(status, 200, "{body}");
        if body.as_array().is_some_and(|a| !a.is_empty()) {
            break body;
        }
        assert!(Instant::now() < deadline, "no dead letter: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(listed[0]["lastStatus"], 400, "{listed}");
    assert_eq!(
        listed[0]["lastResponseBody"],
        r#"{"error":"field x is missing"}"#
    );
    assert_eq!(
        listed[0]["idempotencyKey"].as_str(),
        failed[0].header("idempotency-key").as_deref()
    );

    let mut d = config(&fixed.url(""))["destinations"][0].clone();
    d.as_object_mut().map(|o| o.remove("id"));
    assert_eq!(svc.json("PUT", "/v1/destinations/d1", &d).0, 200);
    let (status, report) = svc.json(
        "POST",
        "/v1/destinations/d1/dead-letters/redrive",
        &Value::Null,
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["succeeded"], 1, "{report}");
    let got = wait_for(&fixed, 1);
    assert_eq!(
        got[0].header("idempotency-key"),
        failed[0].header("idempotency-key")
    );
    assert_eq!(email_of(&got[0]), "a@x");
    let (_, body) = svc.json("GET", "/v1/destinations/d1/dead-letters", &Value::Null);
    assert_eq!(body, json!([]));
    let (_, metrics) = svc.json("GET", "/v1/destinations/d1/metrics", &Value::Null);
    assert_eq!(metrics["delivered"], 1, "the redrive counts: {metrics}");
    assert_eq!(metrics["deadLettered"], 1, "{metrics}");
    assert_eq!(
        svc.json("GET", "/v1/destinations/nope/dead-letters", &Value::Null)
            .0,
        404
    );
}
