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
        last_response_body: None,
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
            "lastResponseBody",
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

/// The dead letter's `lastResponseBody`, as `dead-letters list` prints it.
fn listed_body(store: &DeadLetterStore) -> serde_json::Value {
    let lines = list_json_lines(store, None);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    v["lastResponseBody"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400s_body_is_kept_in_the_dead_letter() {
    let body = r#"{"error":"field x is missing"}"#;
    let server = TestServer::always(Reply::Full(
        400,
        vec![("content-type".into(), "application/json".into())],
        body.into(),
    ))
    .await;
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (1, Some(400)));
    assert_eq!(e.last_response_body.as_deref(), Some(body));
    assert_eq!(listed_body(&store), json!(body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_is_cut_to_its_first_kib() {
    // 3 KiB: "é" (2 bytes) after 1023 ASCII bytes straddles the 1024-byte cut.
    let body = format!("{}é{}", "a".repeat(1023), "z".repeat(3 * 1024 - 1025));
    assert_eq!(body.len(), 3 * 1024);
    let server = TestServer::always(Reply::Full(500, vec![], body)).await;
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination(
            "d",
            &server.url("/"),
            json!({"delivery": {"maxRetries": 0}}),
        )],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let listed = listed_body(&store);
    let kept = listed.as_str().expect("a string");
    assert!(kept.len() <= 1024, "{}", kept.len());
    assert_eq!(kept, "a".repeat(1023), "cut on the character boundary");
    assert_eq!(store.list(None)[0].last_status, Some(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_body_when_the_last_attempt_got_no_response() {
    // Timeouts only.
    let server = TestServer::always(Reply::Hang).await;
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination(
            "d",
            &server.url("/"),
            json!({"delivery": {"timeoutMs": 150, "maxRetries": 1}}),
        )],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(listed_body(&store), serde_json::Value::Null);

    // A 500 with a body, then a timeout: it is the last attempt's (absent) body that counts.
    let server = TestServer::sequence(vec![
        Reply::Full(500, vec![], "first attempt".into()),
        Reply::Hang,
    ])
    .await;
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination(
            "d",
            &server.url("/"),
            json!({"delivery": {"timeoutMs": 150, "maxRetries": 1}}),
        )],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(server.count(), 2);
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (2, None));
    assert_eq!(listed_body(&store), serde_json::Value::Null);

    // An empty body is no body.
    let server = TestServer::always(Reply::Status(400)).await;
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(listed_body(&store), serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_redrive_replaces_the_body() {
    let server = TestServer::always(Reply::Json(422, json!({"error": "bad email"}))).await;
    let (dir, store) = temp_store();
    let mut old = letter("a", &server.url("/"));
    old.last_response_body = Some("from before".into());
    store.put(old).unwrap();
    let report = redrive(store.clone(), None).await;
    assert_eq!(
        report,
        RedriveReport {
            succeeded: 0,
            failed: 1
        }
    );
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (4, Some(422)));
    let expected = json!({"error": "bad email"}).to_string();
    assert_eq!(listed_body(&store), json!(expected));
    // Durable: the update record carries it.
    drop(store);
    let store = DeadLetterStore::open(dir.path()).unwrap();
    assert_eq!(listed_body(&store), json!(expected));
}

/// `[len][crc32][body]` for a record written by hand.
fn frame(record: &serde_json::Value) -> Vec<u8> {
    let body = record.to_string().into_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[test]
fn a_store_written_before_response_bodies_were_kept_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let destination = serde_json::to_value(letter("a", "http://127.0.0.1:1/").destination).unwrap();
    // The records as an older version wrote them: no `lastResponseBody` anywhere.
    let put = |id: u64, profile: &str| {
        json!({"op": "put", "id": id, "destination": destination, "profile": profile, "epoch": 1,
               "idempotencyKey": format!("key-{profile}"), "payload": "eyJwIjoxfQ==", "attempts": 3,
               "lastStatus": 503, "lastError": "HTTP 503 Service Unavailable",
               "storedAtMs": 1_700_000_000_000_i64, "updatedAtMs": 1_700_000_000_000_i64})
    };
    let mut log = b"SDDLQ\0\0\x01".to_vec();
    log.extend(frame(&put(1, "email:a")));
    log.extend(frame(&put(2, "email:b")));
    log.extend(frame(&json!({"op": "update", "id": 2, "attempts": 6, "lastStatus": 400,
                             "lastError": "HTTP 400 Bad Request", "updatedAtMs": 1_700_000_001_000_i64})));
    std::fs::write(log_path(dir.path()), &log).unwrap();

    let ro = DeadLetterStore::open_read_only(dir.path()).unwrap();
    assert!(ro.damage().is_empty(), "{:?}", ro.damage());
    let lines = list_json_lines(&ro, None);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["lastResponseBody"], serde_json::Value::Null, "{v}");
    }
    let b: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(
        (b["attempts"].clone(), b["lastStatus"].clone()),
        (json!(6), json!(400))
    );

    // Opened for writing, the old log takes new updates with a body.
    let store = DeadLetterStore::open(dir.path()).unwrap();
    assert!(
        store
            .update(1, 4, Some(400), "HTTP 400 Bad Request", Some("{}"))
            .unwrap()
    );
    drop(store);
    let store = DeadLetterStore::open(dir.path()).unwrap();
    assert_eq!(
        store.get(1).unwrap().last_response_body.as_deref(),
        Some("{}")
    );
    assert_eq!(store.get(2).unwrap().last_response_body, None);
}
