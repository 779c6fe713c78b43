//! The dead-letter store (durability, torn and corrupt tails) and redrive / list through the
//! egress. Corruption in the middle of the log and full disks: tests/deadletter_integrity.rs.

mod support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde_json::json;
use streamdest::config::{Auth, Delivery};
use streamdest::egress::{RedriveReport, list_json_lines, redrive};
use streamdest::storage::{DamageKind, DeadLetterStore, DestinationSettings, NewDeadLetter};
use support::*;

fn letter(profile: &str, url: &str) -> NewDeadLetter {
    NewDeadLetter {
        destination: DestinationSettings {
            id: "d".into(),
            request_url: url.into(),
            headers: vec![("x-team".into(), "growth".into())],
            auth: Auth::None,
            delivery: Delivery::default(),
            tls: None,
        },
        profile: profile.into(),
        epoch: 1,
        idempotency_key: format!("key-{profile}"),
        payload: Bytes::from(json!({"p": profile}).to_string()),
        attempts: 3,
        last_status: Some(503),
        last_error: "HTTP 503 Service Unavailable".into(),
    }
}

fn log_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("deadletters.log")
}

#[test]
fn store_survives_reopen_and_ignores_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DeadLetterStore::open(dir.path()).unwrap();
        for p in ["a", "b", "c"] {
            store.put(letter(p, "http://127.0.0.1:1/")).unwrap();
        }
    }
    // A torn append: a frame header promising more bytes than follow.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(log_path(dir.path()))
        .unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'])
        .unwrap();
    drop(f);
    {
        let store = DeadLetterStore::open(dir.path()).unwrap();
        assert_eq!(
            store
                .list(None)
                .iter()
                .map(|e| e.profile.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        let damage = store.damage();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].kind, DamageKind::TornTail);
        assert!(
            store.preserved_copy().is_none(),
            "a torn tail is not corruption"
        );
        store.put(letter("d", "http://127.0.0.1:1/")).unwrap();
    }
    let store = DeadLetterStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 4, "appends after a truncated tail are kept");
}

#[test]
fn store_ignores_a_corrupt_last_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DeadLetterStore::open(dir.path()).unwrap();
        store.put(letter("a", "http://127.0.0.1:1/")).unwrap();
        store.put(letter("b", "http://127.0.0.1:1/")).unwrap();
    }
    let path = log_path(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x55; // flip bits inside the last record's body
    std::fs::write(&path, &bytes).unwrap();
    let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
    assert_eq!(
        ro.list(None)
            .iter()
            .map(|e| e.profile.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert!(ro.damage()[0].is_corrupt(), "{:?}", ro.damage());
    let store = DeadLetterStore::open(dir.path()).unwrap();
    assert_eq!(store.len(), 1);
    let copy = store
        .preserved_copy()
        .expect("the corrupt original is kept");
    assert_eq!(std::fs::read(copy).unwrap(), bytes);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn a_file_that_is_not_a_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), b"hello world, not a log").unwrap();
    assert!(DeadLetterStore::open(dir.path()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_delivers_with_the_same_key_and_removes_the_entry() {
    let up = Arc::new(AtomicBool::new(false));
    let gate = up.clone();
    let server = TestServer::start(move |_| {
        if gate.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::Status(503)
        }
    })
    .await;
    let (_dir, store) = temp_store();
    let dest = destination(
        "d",
        &server.url("/in"),
        json!({"headers": "x-team:growth", "queryParameters": "a=1"}),
    );
    let (egress, _) = egress_with(vec![dest], Some(store.clone()), 16);
    egress.submit(export("d", "email:x", 4)).await.unwrap();
    egress.drain().await;
    assert_eq!(store.len(), 1);
    drop(egress);

    up.store(true, Ordering::SeqCst);
    let report = redrive(store.clone(), None).await;
    assert_eq!(
        report,
        RedriveReport {
            succeeded: 1,
            failed: 0
        }
    );
    assert!(store.is_empty());
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    let keys: Vec<_> = reqs
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    assert!(keys.iter().all(|k| k == "d/email:x/4"), "{keys:?}");
    let last = reqs.last().unwrap();
    assert_eq!(last.target, "/in?a=1");
    assert_eq!(last.header("x-team").as_deref(), Some("growth"));
    assert_eq!(last.json(), json!({"profile": "email:x", "epoch": 4}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_redrive_keeps_the_entry_and_adds_attempts() {
    let server = TestServer::always(Reply::Status(503)).await;
    let other = TestServer::always(Reply::ok()).await;
    let (dir, store) = temp_store();
    store.put(letter("a", &server.url("/"))).unwrap();
    let mut elsewhere = letter("b", &other.url("/"));
    elsewhere.destination.id = "e".into();
    store.put(elsewhere).unwrap();

    let report = redrive(store.clone(), Some("d")).await;
    assert_eq!(
        report,
        RedriveReport {
            succeeded: 0,
            failed: 1
        }
    );
    assert_eq!(
        other.count(),
        0,
        "the filter leaves other destinations alone"
    );
    let e = &store.list(Some("d"))[0];
    assert_eq!((e.attempts, e.last_status), (6, Some(503)));
    // Durable: a reopened store sees the update.
    drop(store);
    let store = Arc::new(DeadLetterStore::open(dir.path()).unwrap());
    assert_eq!(store.list(Some("d"))[0].attempts, 6);
    let report = redrive(store.clone(), Some("e")).await;
    assert_eq!(
        report,
        RedriveReport {
            succeeded: 1,
            failed: 0
        }
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_through_a_running_egress_uses_oauth2_from_the_store() {
    let tokens = TestServer::always(Reply::token("tok-r", json!(3600))).await;
    let up = Arc::new(AtomicBool::new(false));
    let gate = up.clone();
    let endpoint = TestServer::start(move |_| {
        if gate.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::Status(400)
        }
    })
    .await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        Some(store.clone()),
        16,
    );
    for p in 0..3 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    assert_eq!(store.len(), 3);
    up.store(true, Ordering::SeqCst);
    let report = egress.redrive(Some("d")).await.unwrap();
    assert_eq!(
        report,
        RedriveReport {
            succeeded: 3,
            failed: 0
        }
    );
    assert!(
        endpoint.requests()[3..]
            .iter()
            .all(|r| r.header("authorization").as_deref() == Some("Bearer tok-r"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_one_json_object_per_entry() {
    let addr = refused_addr();
    let (_dir, store) = temp_store();
    let dest = destination(
        "d",
        &format!("http://{addr}/"),
        json!({"delivery": {"maxRetries": 0, "timeoutMs": 500}}),
    );
    let (egress, _) = egress_with(vec![dest], Some(store.clone()), 16);
    egress.submit(export("d", "email:x", 1)).await.unwrap();
    egress.drain().await;
    let lines = list_json_lines(&store, None);
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "destination",
            "profile",
            "attempts",
            "lastStatus",
            "lastError",
            "payload",
            "entry",
            "idempotencyKey",
            "firstFailedAt",
            "lastFailedAt"
        ]
    );
    let stored = &store.list(None)[0];
    assert_eq!(v["entry"], stored.id);
    assert_eq!(v["idempotencyKey"], stored.idempotency_key.as_str());
    assert_eq!(v["firstFailedAt"], v["lastFailedAt"]);
    assert_eq!(v["destination"], "d");
    assert_eq!(v["profile"], "email:x");
    assert_eq!(v["attempts"], 1);
    assert_eq!(v["lastStatus"], serde_json::Value::Null);
    assert!(
        v["lastError"]
            .as_str()
            .unwrap()
            .contains("connection error")
    );
    assert_eq!(v["payload"], json!({"profile": "email:x", "epoch": 1}));
    assert!(list_json_lines(&store, Some("other")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_dead_letters_every_export_durably() {
    let addr = refused_addr();
    let (dir, store) = temp_store();
    let dest = destination(
        "d",
        &format!("http://{addr}/"),
        json!({"delivery": {"maxRetries": 0, "timeoutMs": 500}}),
    );
    let (egress, outcomes) = egress_with(vec![dest], Some(store.clone()), 4096);
    let start = std::time::Instant::now();
    for p in 0..1000 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(egress.stats().dead_lettered, 1000);
    assert!(outcomes.all().iter().all(|(_, o)| matches!(
        o,
        streamdest::egress::Outcome::DeadLettered { entry: Some(_), .. }
    )));
    // Every entry is on disk (group commit): a reader sees them all.
    let reader = DeadLetterStore::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.len(), 1000);
    let mut profiles: Vec<String> = reader.list(None).into_iter().map(|e| e.profile).collect();
    profiles.sort();
    profiles.dedup();
    assert_eq!(profiles.len(), 1000);
}
