//! Egress authentication against real local endpoint and token servers: bearer, OAuth2
//! password and client credentials (form body and RFC 6749 Basic), the single-flight token
//! cache, expiry and `refresh_token`, `401` handling, and a token endpoint that is down.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use streamdest::egress::Outcome;
use support::*;

fn form(r: &Recorded) -> std::collections::BTreeMap<String, String> {
    r.form().into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_password_grant_sends_the_form_and_uses_the_token() {
    let tokens = TestServer::always(Reply::token("tok-pw", json!(3600))).await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2Password", "accessTokenUrl": tokens.url("/oauth/token"), "clientId": "cid",
                      "clientSecret": "c secret&=", "username": "user@x", "password": "p@ss word"});
    let (egress, outcomes) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(
        outcomes.all()[0].1,
        Outcome::Delivered {
            attempts: 1,
            status: 200
        }
    );
    let t = &tokens.requests()[0];
    assert_eq!(t.method, "POST");
    assert_eq!(t.target, "/oauth/token");
    assert_eq!(
        t.header("content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let f = form(t);
    assert_eq!(f["grant_type"], "password");
    assert_eq!(f["username"], "user@x");
    assert_eq!(f["password"], "p@ss word");
    assert_eq!(f["client_id"], "cid");
    assert_eq!(f["client_secret"], "c secret&=");
    assert_eq!(t.header("authorization"), None);
    assert_eq!(
        endpoint.requests()[0].header("authorization").as_deref(),
        Some("Bearer tok-pw")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_in_the_form_body() {
    let tokens = TestServer::always(Reply::token("tok-cc", json!(3600))).await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s3", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let t = &tokens.requests()[0];
    let f = form(t);
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_id"], "cid");
    assert_eq!(f["client_secret"], "s3");
    assert_eq!(t.header("authorization"), None);
    assert_eq!(
        endpoint.requests()[0].header("authorization").as_deref(),
        Some("Bearer tok-cc")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_basic_authorization_follows_rfc6749() {
    let tokens = TestServer::always(Reply::token("tok-basic", json!("3600"))).await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "1PpG/Q 1",
                      "clientSecret": "z/tZ9VwFZqApmIQ+ZH1I5pLk/uB4ud:X2/8bL+wfFTt1rFw=",
                      "clientCredentialsType": "basicAuthorization"});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    let t = &tokens.requests()[0];
    assert_eq!(
        t.header("authorization").as_deref(),
        Some(
            "Basic MVBwRyUyRlErMTp6JTJGdFo5VndGWnFBcG1JUSUyQlpIMUk1cExrJTJGdUI0dWQlM0FYMiUyRjhiTCUyQndmRlR0MXJGdyUzRA=="
        )
    );
    let f = form(t);
    assert_eq!(f["grant_type"], "client_credentials");
    assert!(!f.contains_key("client_secret") && !f.contains_key("client_id"));
    assert_eq!(
        endpoint.requests()[0].header("authorization").as_deref(),
        Some("Bearer tok-basic")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_exports_share_one_token_fetch() {
    let tokens = TestServer::always(Reply::Delay(
        Duration::from_millis(100),
        Box::new(Reply::token("tok-1", json!(3600))),
    ))
    .await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, outcomes) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        1024,
    );
    for p in 0..200 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    assert_eq!(tokens.count(), 1, "exactly one token request");
    assert_eq!(endpoint.count(), 200);
    assert!(
        outcomes
            .all()
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Delivered { attempts: 1, .. }))
    );
    assert_eq!(egress.stats().destinations["d"].token_requests, 1);
    assert!(
        endpoint
            .requests()
            .iter()
            .all(|r| r.header("authorization").as_deref() == Some("Bearer tok-1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_token_is_refreshed_with_the_refresh_token() {
    // expires_in "1" (a string): reused for 0.75 s (margin a quarter), then refreshed.
    let tokens = TestServer::start(|r| {
        if r.seq == 0 {
            Reply::Json(
                200,
                json!({"access_token": "tok-a", "expires_in": "1", "refresh_token": "ref-1"}),
            )
        } else {
            Reply::Json(200, json!({"access_token": "tok-b", "expires_in": 3600}))
        }
    })
    .await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2Password", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "cs", "username": "u", "password": "pw"});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.submit(export("d", "ecid:2", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(tokens.count(), 1, "reused while fresh");
    tokio::time::sleep(Duration::from_millis(800)).await;
    egress.submit(export("d", "ecid:1", 2)).await.unwrap();
    egress.drain().await;
    let t = tokens.requests();
    assert_eq!(t.len(), 2);
    let f = form(&t[1]);
    assert_eq!(f["grant_type"], "refresh_token");
    assert_eq!(f["refresh_token"], "ref-1");
    assert_eq!(
        endpoint.requests()[2].header("authorization").as_deref(),
        Some("Bearer tok-b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refresh_falls_back_to_a_new_grant() {
    let tokens = TestServer::start(|r| match r.seq {
        0 => Reply::Json(
            200,
            json!({"access_token": "tok-a", "expires_in": 0, "refresh_token": "ref-1"}),
        ),
        1 => Reply::Json(400, json!({"error": "invalid_grant"})),
        _ => Reply::token("tok-c", json!(3600)),
    })
    .await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, outcomes) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        None,
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    egress.submit(export("d", "ecid:1", 2)).await.unwrap();
    egress.drain().await;
    let grants: Vec<String> = tokens
        .requests()
        .iter()
        .map(|r| form(r)["grant_type"].clone())
        .collect();
    assert_eq!(
        grants,
        vec!["client_credentials", "refresh_token", "client_credentials"]
    );
    assert_eq!(
        endpoint.requests()[1].header("authorization").as_deref(),
        Some("Bearer tok-c")
    );
    assert!(
        outcomes
            .all()
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Delivered { attempts: 1, .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_forces_one_refresh_and_one_more_attempt_not_counted_as_a_retry() {
    let tokens =
        TestServer::start(|r| Reply::token(&format!("tok-{}", r.seq + 1), json!(3600))).await;
    let endpoint = TestServer::start(|r| {
        if r.header("authorization").as_deref() == Some("Bearer tok-1") {
            Reply::Status(401)
        } else {
            Reply::ok()
        }
    })
    .await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    // maxRetries 0: the extra attempt after a 401 is not a retry.
    let dest = destination(
        "d",
        &endpoint.url("/"),
        json!({"auth": auth, "delivery": {"maxRetries": 0, "timeoutMs": 1000}}),
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
    assert_eq!(tokens.count(), 2);
    assert_eq!(endpoint.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_401_is_final() {
    let tokens =
        TestServer::start(|r| Reply::token(&format!("tok-{}", r.seq + 1), json!(3600))).await;
    let endpoint = TestServer::always(Reply::Status(401)).await;
    let (_dir, store) = temp_store();
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(endpoint.count(), 2);
    assert_eq!(tokens.count(), 2);
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (2, Some(401)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_dead_letters_with_null_status_and_bounded_attempts() {
    let (_dir, store) = temp_store();
    let addr = refused_addr();
    let endpoint = TestServer::always(Reply::ok()).await;
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": format!("http://{addr}/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, outcomes) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        Some(store.clone()),
        64,
    );
    for p in 0..20 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    assert_eq!(endpoint.count(), 0);
    let entries = store.list(None);
    assert_eq!(entries.len(), 20);
    for e in &entries {
        assert_eq!((e.attempts, e.last_status), (3, None));
        assert!(
            e.last_error.contains("access token request failed"),
            "{}",
            e.last_error
        );
    }
    assert_eq!(outcomes.all().len(), 20);
    let token_requests = egress.stats().destinations["d"].token_requests;
    assert!(
        (1..=60).contains(&token_requests),
        "{token_requests} token requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_errors_are_shared_by_waiters_and_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let tokens = TestServer::start(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        Reply::Delay(
            Duration::from_millis(50),
            Box::new(Reply::Json(500, json!({"error": "server_error"}))),
        )
    })
    .await;
    let endpoint = TestServer::always(Reply::ok()).await;
    let (_dir, store) = temp_store();
    let auth = json!({"type": "oauth2ClientCredentials", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                      "clientSecret": "s", "clientCredentialsType": "bodyFormEncoded"});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        Some(store.clone()),
        256,
    );
    for p in 0..100 {
        egress
            .submit(export("d", &format!("ecid:{p}"), 1))
            .await
            .unwrap();
    }
    egress.drain().await;
    let n = calls.load(Ordering::SeqCst);
    // 100 exports × 3 attempts without sharing would be 300 token requests.
    assert!(n <= 30, "{n} token requests for 100 exports");
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (3, None));
    assert!(
        e.last_error.contains("HTTP 500 (server_error)"),
        "{}",
        e.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_with_a_missing_env_secret_fails_at_once() {
    let endpoint = TestServer::always(Reply::ok()).await;
    let (_dir, store) = temp_store();
    let auth = json!({"type": "bearer", "token": {"env": "STREAMDEST_EGRESS_TEST_UNSET_TOKEN"}});
    let (egress, _) = egress_with(
        vec![destination("d", &endpoint.url("/"), json!({"auth": auth}))],
        Some(store.clone()),
        16,
    );
    egress.submit(export("d", "ecid:1", 1)).await.unwrap();
    egress.drain().await;
    assert_eq!(endpoint.count(), 0);
    let e = &store.list(None)[0];
    assert_eq!((e.attempts, e.last_status), (1, None));
    assert!(
        e.last_error.contains("STREAMDEST_EGRESS_TEST_UNSET_TOKEN"),
        "{}",
        e.last_error
    );
}
