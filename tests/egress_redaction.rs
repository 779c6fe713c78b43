//! Canary secrets never appear in TRACE-level logs, `Debug` output, stats, error texts or (for
//! env-referenced secrets and fetched tokens) the dead-letter store.
//!
//! One test per binary: it installs the global tracing subscriber and sets an env var.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;
use support::*;

const ENV_TOKEN: &str = "canary-env-7f3a";
const CLIENT_SECRET: &str = "canary-cs-91b2";
const PASSWORD: &str = "canary-pw-44e0";
const ACCESS_TOKEN: &str = "canary-tok-5d6c";
const BASIC_SECRET: &str = "canary-cb-0a9e";
const CANARIES: [&str; 5] = [
    ENV_TOKEN,
    CLIENT_SECRET,
    PASSWORD,
    ACCESS_TOKEN,
    BASIC_SECRET,
];

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_clean(what: &str, text: &str) {
    for canary in CANARIES {
        assert!(
            !text.contains(canary),
            "{what} contains the secret {canary}:\n{text}"
        );
    }
}

#[test]
fn secrets_stay_out_of_logs_debug_errors_and_the_store() {
    // SAFETY: set before any other thread of this test binary exists (single test, runtime
    // built below).
    unsafe { std::env::set_var("STREAMDEST_CANARY_TOKEN", ENV_TOKEN) };
    let capture = Capture::default();
    let writer = capture.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoint_503 = TestServer::always(Reply::Status(503)).await;
        let endpoint_401 = TestServer::always(Reply::Status(401)).await;
        // Token server for the password grant: first an error that echoes the secret, then a token.
        let tokens = TestServer::start(|r| {
            if r.seq == 0 {
                Reply::Json(400, json!({"error": "invalid_client", "error_description": format!("bad secret {CLIENT_SECRET}")}))
            } else {
                Reply::Json(200, json!({"access_token": ACCESS_TOKEN, "expires_in": 3600, "refresh_token": ACCESS_TOKEN}))
            }
        })
        .await;
        let tokens_401 = TestServer::always(Reply::Json(401, json!({"error": format!("no {BASIC_SECRET}")}))).await;
        let (dir, store) = temp_store();
        let destinations = vec![
            destination("bearer", &endpoint_503.url("/"), json!({"auth": {"type": "bearer", "token": {"env": "STREAMDEST_CANARY_TOKEN"}}})),
            destination(
                "password",
                &endpoint_401.url("/"),
                json!({"auth": {"type": "oauth2Password", "accessTokenUrl": tokens.url("/t"), "clientId": "cid",
                                "clientSecret": CLIENT_SECRET, "username": "u", "password": PASSWORD}}),
            ),
            destination(
                "basic",
                &endpoint_503.url("/"),
                json!({"auth": {"type": "oauth2ClientCredentials", "accessTokenUrl": tokens_401.url("/t"), "clientId": "cid",
                                "clientSecret": BASIC_SECRET, "clientCredentialsType": "basicAuthorization"}}),
            ),
        ];
        let (egress, outcomes) = egress_with(destinations.clone(), Some(store.clone()), 64);
        for d in ["bearer", "password", "basic"] {
            egress.submit(export(d, "email:canary@x", 1)).await.unwrap();
        }
        egress.drain().await;
        assert_eq!(store.len(), 3);
        let report = egress.redrive(None).await.unwrap();
        assert_eq!(report.failed, 3);

        // The endpoints did get the secrets (the test is meaningful).
        assert_eq!(endpoint_503.requests()[0].header("authorization").unwrap(), format!("Bearer {ENV_TOKEN}"));
        assert!(endpoint_401.requests().iter().any(|r| r.header("authorization").unwrap() == format!("Bearer {ACCESS_TOKEN}")));

        assert_clean("Debug of the egress", &format!("{egress:?}"));
        assert_clean("Debug of the stats", &format!("{:?}", egress.stats()));
        assert_clean("stats JSON", &egress.stats().to_json().to_string());
        assert_clean("Debug of the destinations", &format!("{destinations:?}"));
        assert_clean("Debug of the outcomes", &format!("{:?}", outcomes.all()));
        for entry in store.list(None) {
            assert_clean("Debug of a dead letter", &format!("{entry:?}"));
            assert_clean("lastError", &entry.last_error);
        }
        assert_clean("dead-letters list", &streamdest::egress::list_json_lines(&store, None).join("\n"));
        // The store keeps env references as references and never a fetched token (literal
        // secrets from the config are stored, in a 0600 file).
        let raw = String::from_utf8_lossy(&std::fs::read(dir.path().join("deadletters.log")).unwrap()).into_owned();
        assert!(raw.contains("STREAMDEST_CANARY_TOKEN"));
        assert!(!raw.contains(ENV_TOKEN) && !raw.contains(ACCESS_TOKEN));
        let bad = destination("x", "http://127.0.0.1:1/", json!({"headers": format!("x-key:{PASSWORD}\u{1}")}));
        if let Err(e) = streamdest::egress::Egress::new(vec![bad], None, Default::default()) {
            assert_clean("an egress error", &e.to_string());
            assert_clean("an egress error's Debug", &format!("{e:?}"));
        }
    });
    drop(rt);

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("failed after their retries"),
        "the capture works:\n{logs}"
    );
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"));
    assert_clean("the logs", &logs);
}
