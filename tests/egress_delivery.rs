//! Egress delivery against a real local HTTP server: request shape, retry policy, timeouts,
//! dead letters, ordering, backpressure.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use streamdest::egress::{EgressError, Outcome};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_carries_query_headers_auth_key_and_payload() {
    let server = TestServer::always(Reply::ok()).await;
    let dest = destination(
        "analytics",
        &server.url("/v1/profiles?own=1"),
        json!({"queryParameters": "source=aep&env=prod", "headers": "x-api-version: 2 , x-team:growth",
               "auth": {"type": "bearer", "token": "tok-123"}}),
    );
    let (egress, outcomes) = egress_with(vec![dest], None, 16);
    let e = export("analytics", "email:a@b.c", 7);
    egress.submit(e.clone()).await.unwrap();
    egress.drain().await;

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/v1/profiles?own=1&source=aep&env=prod");
    assert_eq!(r.header("x-api-version").as_deref(), Some("2"));
    assert_eq!(r.header("x-team").as_deref(), Some("growth"));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        r.header("idempotency-key").as_deref(),
        Some("analytics/email:a@b.c/7")
    );
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer tok-123"));
    assert_eq!(r.body, e.payload);
    assert_eq!(
        outcomes.all()[0].1,
        Outcome::Delivered {
            attempts: 1,
            status: 200
        }
    );
    let stats = egress.stats();
    assert_eq!(
        (
            stats.exports,
            stats.delivered,
            stats.retried,
            stats.dead_lettered
        ),
        (1, 1, 0, 0)
    );
    assert_eq!(stats.latency.len(), 1);
    assert_eq!(stats.destinations["analytics"].requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_500s_then_200_is_delivered_on_the_third_attempt() {
    let server =
        TestServer::sequence(vec![Reply::Status(500), Reply::Status(500), Reply::ok()]).await;
    let (dir, store) = temp_store();
    let (egress, outcomes) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(
        outcomes.all()[0].1,
        Outcome::Delivered {
            attempts: 3,
            status: 200
        }
    );
    let keys: Vec<_> = server
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key"))
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter().all(|k| k == &keys[0]),
        "same Idempotency-Key on every retry"
    );
    let stats = egress.stats();
    assert_eq!(
        (stats.delivered, stats.retried, stats.dead_lettered),
        (1, 2, 0)
    );
    assert!(store.is_empty());
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_503_gives_three_attempts_then_a_dead_letter() {
    let server = TestServer::always(Reply::Status(503)).await;
    let (_dir, store) = temp_store();
    let (egress, outcomes) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(server.count(), 3);
    let entries = store.list(Some("d"));
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].attempts, 3);
    assert_eq!(entries[0].last_status, Some(503));
    assert_eq!(entries[0].idempotency_key, "d/ecid:1/1");
    assert!(
        entries[0].last_error.contains("503"),
        "{}",
        entries[0].last_error
    );
    match &outcomes.all()[0].1 {
        Outcome::DeadLettered {
            attempts: 3,
            last_status: Some(503),
            entry: Some(id),
            ..
        } => assert_eq!(*id, entries[0].id),
        other => panic!("unexpected outcome {other:?}"),
    }
    let stats = egress.stats();
    assert_eq!((stats.dead_lettered, stats.retried), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_outside_retry_on_fail_after_one_attempt() {
    for status in [400u16, 501, 404] {
        let server = TestServer::always(Reply::Status(status)).await;
        let (_dir, store) = temp_store();
        let (egress, _) = egress_with(
            vec![destination("d", &server.url("/"), json!({}))],
            Some(store.clone()),
            16,
        );
        egress.submit(export("d", "ecid:1", 1)).await.unwrap();
        egress.drain().await;
        assert_eq!(server.count(), 1, "status {status}");
        let entries = store.list(None);
        assert_eq!(
            (entries[0].attempts, entries[0].last_status),
            (1, Some(status))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_is_configurable() {
    let server = TestServer::sequence(vec![Reply::Status(409), Reply::ok()]).await;
    let dest = destination(
        "d",
        &server.url("/"),
        json!({"delivery": {"retryOn": [409], "timeoutMs": 1000}}),
    );
    let (egress, outcomes) = egress_with(vec![dest], None, 16);
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(
        outcomes.all()[0].1,
        Outcome::Delivered {
            attempts: 2,
            status: 200
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seconds_is_honoured() {
    let server = TestServer::sequence(vec![
        Reply::Full(429, vec![("retry-after".into(), "1".into())], String::new()),
        Reply::ok(),
    ])
    .await;
    let (egress, outcomes) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(
        outcomes.all()[0].1,
        Outcome::Delivered {
            attempts: 2,
            status: 200
        }
    );
    let reqs = server.requests();
    let waited = reqs[1].at - reqs[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_endpoint_times_out_per_attempt() {
    let server = TestServer::always(Reply::Hang).await;
    let (_dir, store) = temp_store();
    let dest = destination(
        "d",
        &server.url("/"),
        json!({"delivery": {"timeoutMs": 150, "maxRetries": 1}}),
    );
    let (egress, _) = egress_with(vec![dest], Some(store.clone()), 16);
    let start = Instant::now();
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.count(), 2);
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (2, None));
    assert!(
        e.last_error.contains("timed out after 150 ms"),
        "{}",
        e.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_dead_lettered() {
    let addr = refused_addr();
    let (_dir, store) = temp_store();
    let (egress, _) = egress_with(
        vec![destination("d", &format!("http://{addr}/x"), json!({}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (3, None));
    assert!(
        e.last_error.contains("connection error"),
        "{}",
        e.last_error
    );
    assert!(
        !e.last_error.contains(&addr.port().to_string()),
        "no URL in errors: {}",
        e.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_profile_in_order_never_overlapping_and_others_flow_past_it() {
    // Profile "email:slow" takes 150 ms per request; the others answer at once.
    let server = TestServer::start(|r| {
        if r.json()["profile"] == "email:slow" {
            Reply::Delay(Duration::from_millis(150), Box::new(Reply::ok()))
        } else {
            Reply::ok()
        }
    })
    .await;
    let (egress, _) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        None,
        1024,
    );
    let start = Instant::now();
    for epoch in 1..=4 {
        egress
            .submit(export("d", "email:slow", epoch))
            .await
            .unwrap();
    }
    for epoch in 1..=3 {
        for p in 0..40 {
            egress
                .submit(export("d", &format!("email:fast{p}"), epoch))
                .await
                .unwrap();
        }
    }
    egress.drain().await;
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4 + 120);
    let mut per_profile: std::collections::BTreeMap<String, Vec<(u64, Instant)>> =
        Default::default();
    for r in &reqs {
        let v = r.json();
        per_profile
            .entry(v["profile"].as_str().unwrap().to_string())
            .or_default()
            .push((v["epoch"].as_u64().unwrap(), r.at));
    }
    for (profile, seen) in &per_profile {
        let epochs: Vec<u64> = seen.iter().map(|(e, _)| *e).collect();
        let mut sorted = epochs.clone();
        sorted.sort();
        assert_eq!(epochs, sorted, "epoch order for {profile}");
    }
    let slow = &per_profile["email:slow"];
    for pair in slow.windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= Duration::from_millis(140),
            "slow profile's requests overlapped"
        );
    }
    let last_fast = reqs
        .iter()
        .filter(|r| r.json()["profile"] != "email:slow")
        .map(|r| r.at)
        .max()
        .unwrap();
    assert!(
        last_fast < slow[1].1,
        "fast profiles finished before the slow one's second export"
    );
    assert!(
        last_fast - start < Duration::from_millis(400),
        "{:?}",
        last_fast - start
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_bounds_concurrent_requests() {
    let server = TestServer::always(Reply::Delay(
        Duration::from_millis(50),
        Box::new(Reply::ok()),
    ))
    .await;
    let dest = destination(
        "d",
        &server.url("/"),
        json!({"delivery": {"maxInFlight": 3, "timeoutMs": 1000}}),
    );
    let (egress, _) = egress_with(vec![dest], None, 1024);
    for p in 0..24 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    assert_eq!(server.count(), 24);
    assert!(
        server.max_concurrent() <= 3,
        "max concurrent {}",
        server.max_concurrent()
    );
    assert!(server.max_concurrent() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_intake_makes_submit_wait() {
    let release = Arc::new(AtomicBool::new(false));
    let gate = release.clone();
    let server = TestServer::start(move |_| {
        if gate.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::Delay(Duration::from_millis(300), Box::new(Reply::ok()))
        }
    })
    .await;
    let (egress, outcomes) =
        egress_with(vec![destination("d", &server.url("/"), json!({}))], None, 4);
    for p in 0..4 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    assert_eq!(egress.pending(), 4);
    let blocked = tokio::time::timeout(
        Duration::from_millis(100),
        egress.submit(export("d", "ecid:4", 1)),
    )
    .await;
    assert!(
        blocked.is_err(),
        "the fifth submit waits while four are pending"
    );
    assert!(matches!(
        egress.try_submit(export("d", "ecid:5", 1)),
        Ok(Err(_))
    ));
    release.store(true, Ordering::SeqCst);
    egress.submit(export("d", "ecid:6", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(egress.pending(), 0);
    assert_eq!(outcomes.all().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destination_closed_egress_and_bad_headers_are_errors() {
    let server = TestServer::always(Reply::ok()).await;
    let (egress, _) = egress_with(vec![destination("d", &server.url("/"), json!({}))], None, 4);
    assert!(matches!(
        egress.submit(export("nope", "ecid:1", 1)).await,
        Err(EgressError::UnknownDestination(_))
    ));
    egress.close();
    assert!(matches!(
        egress.submit(export("d", "ecid:1", 1)).await,
        Err(EgressError::Closed)
    ));

    let bad = destination("bad", &server.url("/"), json!({"headers": "bad header:1"}));
    let err = streamdest::egress::Egress::new(vec![bad], None, Default::default()).unwrap_err();
    assert!(err.to_string().contains("bad"), "{err}");
    let twice = vec![
        destination("x", &server.url("/"), json!({})),
        destination("x", &server.url("/"), json!({})),
    ];
    assert!(matches!(
        streamdest::egress::Egress::new(twice, None, Default::default()),
        Err(EgressError::DuplicateDestination(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_withdraws_what_has_not_started() {
    let server = TestServer::always(Reply::Delay(
        Duration::from_millis(200),
        Box::new(Reply::ok()),
    ))
    .await;
    let (egress, outcomes) = egress_with(
        vec![destination("d", &server.url("/"), json!({}))],
        None,
        64,
    );
    for epoch in 1..=5 {
        egress.submit(export("d", "ecid:1", epoch)).await.unwrap();
    }
    let withdrawn = egress.cancel_queued();
    assert_eq!(
        withdrawn.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
    egress.drain().await;
    assert_eq!(server.count(), 1);
    assert_eq!(outcomes.all().len(), 1);
}

#[test]
fn submit_blocking_from_a_plain_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, egress) = rt.block_on(async {
        let server = TestServer::always(Reply::ok()).await;
        let (egress, _) = egress_with(vec![destination("d", &server.url("/"), json!({}))], None, 4);
        (server, egress)
    });
    let e2 = egress.clone();
    std::thread::spawn(move || {
        for epoch in 1..=10 {
            e2.submit_blocking(export("d", "ecid:1", epoch)).unwrap();
        }
    })
    .join()
    .unwrap();
    rt.block_on(egress.drain());
    assert_eq!(server.count(), 10);
    assert_eq!(egress.stats().delivered, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_goes_through_rustls_and_a_failed_handshake_is_a_connection_error() {
    // A plain-HTTP server spoken to over https: the TLS handshake fails.
    let server = TestServer::always(Reply::ok()).await;
    let (_dir, store) = temp_store();
    let dest = destination(
        "tls",
        &format!("https://{}/x", server.addr),
        json!({"delivery": {"maxRetries": 1, "timeoutMs": 1000}}),
    );
    let (egress, _) = egress_with(vec![dest], Some(store.clone()), 4);
    egress.submit(export("tls", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (2, None));
    assert!(
        e.last_error.contains("connection error"),
        "{}",
        e.last_error
    );
}
