//! The server end to end: a real listener on 127.0.0.1:0, a real HTTP client (hyper's, or a raw
//! socket where the test needs control of the bytes), and an in-memory backend that records
//! every call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::*;

const TOKEN: &str = "tok-canary-7731";

#[derive(Default)]
struct TestBackend {
    calls: Mutex<Vec<String>>,
    objects: Mutex<HashMap<(ObjectKind, String), Value>>,
    not_accepting: AtomicBool,
    events: Mutex<Vec<Value>>,
    members: Mutex<Vec<(String, String)>>,
}

impl TestBackend {
    fn record(&self, call: impl Into<String>) {
        self.calls.lock().expect("test setup").push(call.into());
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("test setup").clone()
    }
}

impl Backend for TestBackend {
    fn ingest(&self, events: Vec<Value>) -> BoxFuture<'_, Result<usize, ApiError>> {
        Box::pin(async move {
            self.record(format!("ingest {}", events.len()));
            if let Some(i) = events.iter().position(|e| e.get("bad").is_some()) {
                return Err(ApiError::bad_event(
                    i,
                    format!("event {i}: bad: not allowed"),
                ));
            }
            let n = events.len();
            self.events.lock().expect("test setup").extend(events);
            Ok(n)
        })
    }

    fn get_object(&self, kind: ObjectKind, id: &str) -> Result<Value, ApiError> {
        self.record(format!("get {} {id}", kind.route()));
        self.objects
            .lock()
            .expect("test setup")
            .get(&(kind, id.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("{} {id}", kind.noun())))
    }

    fn put_object(
        &self,
        kind: ObjectKind,
        id: &str,
        body: Value,
    ) -> BoxFuture<'_, Result<(bool, Value), ApiError>> {
        let id = id.to_string();
        Box::pin(async move {
            self.record(format!("put {} {id}", kind.route()));
            if body.get("invalid").is_some() {
                return Err(crate::config::ConfigError::new("invalid", "unknown field").into());
            }
            let created = self
                .objects
                .lock()
                .expect("test setup")
                .insert((kind, id), body.clone())
                .is_none();
            Ok((created, body))
        })
    }

    fn delete_object(&self, kind: ObjectKind, id: &str) -> BoxFuture<'_, Result<(), ApiError>> {
        let id = id.to_string();
        Box::pin(async move {
            self.record(format!("delete {} {id}", kind.route()));
            if id == "referenced" {
                return Err(ApiError::Conflict("referenced by destination d".into()));
            }
            match self
                .objects
                .lock()
                .expect("test setup")
                .remove(&(kind, id.clone()))
            {
                Some(_) => Ok(()),
                None => Err(ApiError::NotFound(format!("{} {id}", kind.noun()))),
            }
        })
    }

    fn add_members(
        &self,
        audience: &str,
        members: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<usize, ApiError>> {
        let audience = audience.to_string();
        Box::pin(async move {
            self.record(format!("members {audience} {}", members.len()));
            let n = members.len();
            self.members.lock().expect("test setup").extend(members);
            Ok(n)
        })
    }

    fn dead_letters(&self, destination: &str) -> Result<Vec<Value>, ApiError> {
        self.record(format!("dead-letters {destination}"));
        Ok(vec![json!({"entry": 1, "destination": destination})])
    }

    fn redrive(&self, destination: &str) -> BoxFuture<'_, Result<Value, ApiError>> {
        let destination = destination.to_string();
        Box::pin(async move {
            self.record(format!("redrive {destination}"));
            Ok(json!({"redriven": 1}))
        })
    }

    fn destination_metrics(&self, destination: &str) -> Result<Value, ApiError> {
        self.record(format!("destination-metrics {destination}"));
        Ok(json!({"exports": 3}))
    }

    fn metrics(&self) -> MetricsSnapshot {
        self.record("metrics");
        let mut s = MetricsSnapshot {
            events_accepted: 9,
            epochs: 2,
            wal_bytes: 100,
            wal_position: 4,
            ..Default::default()
        };
        s.destinations.insert(
            "d1".into(),
            DestinationMetrics {
                exports: 3,
                delivered: 2,
                latency: LatencyHistogram {
                    buckets: vec![(0.1, 1), (1.0, 2)],
                    sum_s: 0.6,
                    count: 2,
                },
                ..Default::default()
            },
        );
        s
    }

    fn accepting(&self) -> bool {
        // Not recorded: asserts on "nothing called" mean the semantic calls.
        !self.not_accepting.load(Ordering::SeqCst)
    }
}

struct Server {
    addr: SocketAddr,
    backend: Arc<TestBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(options: ApiOptions) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let addr = listener.local_addr().expect("test setup");
        let backend = Arc::new(TestBackend::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, backend.clone(), options, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            backend,
            stop: Some(stop),
            task,
        }
    }

    async fn default() -> Server {
        Server::start(ApiOptions::default()).await
    }

    async fn with_limit(max_body: u64) -> Server {
        Server::start(ApiOptions {
            max_body,
            ..Default::default()
        })
        .await
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().expect("test setup").send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns after shutdown")
            .expect("test setup")
            .expect("test setup");
    }

    /// One request over a fresh connection, with hyper's client.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("test setup");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("test setup");
        let resp = sender.send_request(req).await.expect("the exchange");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the exchange")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], Bytes::new()).await
    }

    async fn post_json(&self, path: &str, body: &str) -> Reply {
        self.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// An error reply: the status, and `error` a string.
    fn assert_error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/json");
        let j = self.json();
        assert!(j["error"].is_string(), "{j}");
        j
    }
}

/// Writes `head` (and `body`) on a raw socket, reads until the server closes or `wait` passes.
async fn raw_exchange(addr: SocketAddr, head: &str, body: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("socket I/O");
    if !body.is_empty() {
        s.write_all(body).await.expect("socket I/O");
    }
    read_some(&mut s, wait).await
}

async fn read_some(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `needle` has arrived (or `wait` passes).
async fn read_until(s: &mut TcpStream, needle: &str, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while !String::from_utf8_lossy(&out).contains(needle) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn healthz_and_unknown_paths() {
    let s = Server::default().await;
    let r = s.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"status": "ok"}));
    s.send("POST", "/healthz", &[], "x")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED);
    s.get("/nope").await.assert_error(StatusCode::NOT_FOUND);
    s.get("/v1/widgets/x")
        .await
        .assert_error(StatusCode::NOT_FOUND);
    s.get("/v1/audiences")
        .await
        .assert_error(StatusCode::NOT_FOUND);
    assert!(s.backend.calls().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn events_json_object_array_and_ndjson() {
    let s = Server::default().await;
    let r = s.post_json("/v1/events", r#"{"a":1}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json(), json!({"accepted": 1}));
    let r = s
        .post_json("/v1/events", r#"[{"a":1},{"a":2},{"a":3}]"#)
        .await;
    assert_eq!(r.json(), json!({"accepted": 3}));
    let r = s
        .send(
            "POST",
            "/v1/events",
            &[("content-type", "application/x-ndjson")],
            "{\"a\":1}\n\n{\"a\":2}\r\n",
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json(), json!({"accepted": 2}));
    // No Content-Type: JSON.
    let r = s.send("POST", "/v1/events", &[], r#"{"a":1}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        s.backend.calls(),
        vec!["ingest 1", "ingest 3", "ingest 2", "ingest 1"]
    );
    assert_eq!(s.backend.events.lock().expect("test setup").len(), 7);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_event_bodies_call_nothing() {
    let s = Server::default().await;
    // Element 3 of 5 is not JSON.
    let r = s
        .post_json("/v1/events", r#"[{"a":0},{"a":1},{"a":2},{"a":},{"a":4}]"#)
        .await;
    let j = r.assert_error(StatusCode::BAD_REQUEST);
    assert_eq!(j["index"], 3, "{j}");
    // Element 3 of 5 is not an object.
    let r = s
        .post_json("/v1/events", r#"[{"a":0},{"a":1},{"a":2},"x",{"a":4}]"#)
        .await;
    assert_eq!(r.assert_error(StatusCode::BAD_REQUEST)["index"], 3);
    // NDJSON: the third event (fourth line) is bad.
    let r = s
        .send(
            "POST",
            "/v1/events",
            &[("content-type", "application/x-ndjson")],
            "{\"a\":0}\n{\"a\":1}\n\n{oops\n{\"a\":4}\n",
        )
        .await;
    assert_eq!(r.assert_error(StatusCode::BAD_REQUEST)["index"], 2);
    // Not UTF-8.
    let r = s
        .send(
            "POST",
            "/v1/events",
            &[("content-type", "application/json")],
            &b"{\"a\":\"\xff\xfe\"}"[..],
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST);
    // Empty, and an empty array.
    s.post_json("/v1/events", "")
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    s.post_json("/v1/events", "[]")
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    // Not JSON at all.
    let r = s.post_json("/v1/events", "hello").await;
    assert_eq!(r.assert_error(StatusCode::BAD_REQUEST)["index"], 0);
    // Unsupported content type.
    s.send(
        "POST",
        "/v1/events",
        &[("content-type", "text/plain")],
        "{}",
    )
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(s.backend.calls().is_empty(), "{:?}", s.backend.calls());
    // A backend-refused event: its index comes through.
    let r = s.post_json("/v1/events", r#"[{"a":0},{"bad":1}]"#).await;
    assert_eq!(r.assert_error(StatusCode::BAD_REQUEST)["index"], 1);
    // Wrong method.
    let r = s.get("/v1/events").await;
    r.assert_error(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");
    s.shutdown().await;
}

#[tokio::test]
async fn objects_crud() {
    let s = Server::default().await;
    for kind in ["merge-policies", "audiences", "destinations"] {
        let path = format!("/v1/{kind}/obj-1");
        s.get(&path).await.assert_error(StatusCode::NOT_FOUND);
        let r = s
            .send(
                "PUT",
                &path,
                &[("content-type", "application/json")],
                r#"{"v":1}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.json(), json!({"v": 1}));
        let r = s.send("PUT", &path, &[], r#"{"v":2}"#).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), json!({"v": 2}));
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), json!({"v": 2}));
        let r = s.send("DELETE", &path, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert!(r.body.is_empty());
        s.send("DELETE", &path, &[], Bytes::new())
            .await
            .assert_error(StatusCode::NOT_FOUND);
        let r = s.send("POST", &path, &[], "{}").await;
        r.assert_error(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers["allow"], "GET, PUT, DELETE");
    }
    // Bad PUT bodies: never reach the backend.
    let before = s.backend.calls().len();
    for body in ["[1,2]", "\"x\"", "{", ""] {
        s.send("PUT", "/v1/audiences/a", &[], body)
            .await
            .assert_error(StatusCode::BAD_REQUEST);
    }
    s.send(
        "PUT",
        "/v1/audiences/a",
        &[("content-type", "text/csv")],
        "{}",
    )
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(s.backend.calls().len(), before);
    // A backend validation error names the path; a conflict is 409.
    let j = s
        .send("PUT", "/v1/audiences/a", &[], r#"{"invalid":1}"#)
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert_eq!(j["error"], "invalid: unknown field");
    s.send("DELETE", "/v1/merge-policies/referenced", &[], Bytes::new())
        .await
        .assert_error(StatusCode::CONFLICT);
    s.shutdown().await;
}

#[tokio::test]
async fn ids_are_checked() {
    let s = Server::default().await;
    let long = format!("/v1/audiences/{}", "a".repeat(body::MAX_ID_LEN + 1));
    for path in [
        "/v1/audiences/",
        long.as_str(),
        "/v1/audiences/a%2Fb",
        "/v1/audiences/a%20b",
        "/v1/audiences/a%zz",
        "/v1/audiences/%C3%A9",
        "/v1/destinations/a$b/metrics",
        "/v1/audiences//members",
    ] {
        // `members` only takes POST.
        let r = if path.ends_with("/members") {
            s.send(
                "POST",
                path,
                &[("content-type", "text/csv")],
                "namespace,id\n",
            )
            .await
        } else {
            s.get(path).await
        };
        r.assert_error(StatusCode::BAD_REQUEST);
    }
    // Percent-decoded ids reach the backend decoded.
    let r = s.get("/v1/audiences/a%3Ab.c_d-e").await;
    r.assert_error(StatusCode::NOT_FOUND);
    assert_eq!(s.backend.calls(), vec!["get audiences a:b.c_d-e"]);
    s.shutdown().await;
}

#[tokio::test]
async fn members_csv() {
    let s = Server::default().await;
    let path = "/v1/audiences/up-1/members";
    let r = s
        .send(
            "POST",
            path,
            &[("content-type", "text/csv; charset=utf-8")],
            "\u{feff}namespace,id\r\nemail,a@x.com\r\n\r\n\"crm\",\"1,\"\"2\"\"\"\r\n",
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(r.json(), json!({"accepted": 2}));
    assert_eq!(
        *s.backend.members.lock().expect("test setup"),
        vec![
            ("email".to_string(), "a@x.com".to_string()),
            ("crm".to_string(), "1,\"2\"".to_string())
        ]
    );
    // Header missing.
    let j = s
        .send(
            "POST",
            path,
            &[("content-type", "text/csv")],
            "email,a@x.com\n",
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(
        j["error"].as_str().expect("test setup").contains("line 1"),
        "{j}"
    );
    // Wrong field count on line 3.
    let j = s
        .send(
            "POST",
            path,
            &[("content-type", "text/csv")],
            "namespace,id\nemail,a\nemail,b,c\n",
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST);
    assert!(
        j["error"].as_str().expect("test setup").contains("line 3"),
        "{j}"
    );
    // Not CSV.
    s.send("POST", path, &[("content-type", "application/json")], "{}")
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(s.backend.calls(), vec!["members up-1 2"]);
    s.shutdown().await;
}

#[tokio::test]
async fn dead_letters_redrive_and_destination_metrics() {
    let s = Server::default().await;
    let r = s.get("/v1/destinations/d1/dead-letters").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([{"entry": 1, "destination": "d1"}]));
    let r = s
        .send(
            "POST",
            "/v1/destinations/d1/dead-letters/redrive",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"redriven": 1}));
    let r = s.get("/v1/destinations/d1/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"exports": 3}));
    s.get("/v1/destinations/d1/dead-letters/redrive")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED);
    s.send(
        "POST",
        "/v1/destinations/d1/dead-letters",
        &[],
        Bytes::new(),
    )
    .await
    .assert_error(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        s.backend.calls(),
        vec!["dead-letters d1", "redrive d1", "destination-metrics d1"]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn prometheus_metrics() {
    let s = Server::default().await;
    let r = s.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .expect("test setup")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(r.body.to_vec()).expect("test setup");
    for name in [
        "streamdest_events_accepted_total counter",
        "streamdest_epochs_total counter",
        "streamdest_wal_bytes gauge",
        "streamdest_wal_position gauge",
        "streamdest_exports_total counter",
        "streamdest_deliveries_total counter",
        "streamdest_retries_total counter",
        "streamdest_dead_letters_total counter",
        "streamdest_backlog_exports gauge",
        "streamdest_delivery_latency_seconds histogram",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}\n")),
            "{name} in\n{text}"
        );
    }
    assert!(text.contains("streamdest_events_accepted_total 9\n"));
    assert!(text.contains("streamdest_deliveries_total{destination=\"d1\"} 2\n"));
    assert!(
        text.contains(
            "streamdest_delivery_latency_seconds_bucket{destination=\"d1\",le=\"1.0\"} 2\n"
        ) || text.contains(
            "streamdest_delivery_latency_seconds_bucket{destination=\"d1\",le=\"1\"} 2\n"
        ),
        "{text}"
    );
    // Every sample line: name{labels} value, the value a number.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().expect("test setup");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    let r = s
        .send(
            "GET",
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
            Bytes::new(),
        )
        .await;
    assert!(
        r.headers["content-type"]
            .to_str()
            .expect("test setup")
            .starts_with("application/openmetrics-text")
    );
    assert!(String::from_utf8_lossy(&r.body).ends_with("# EOF\n"));
    s.shutdown().await;
}

#[tokio::test]
async fn token_auth() {
    let s = Server::start(ApiOptions {
        api_token: ApiToken::new(TOKEN),
        ..Default::default()
    })
    .await;
    // Missing, wrong, lower-case scheme: 401, nothing called, token never echoed.
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "bearer tok-canary-7731")],
        vec![("authorization", "Basic dG9rLWNhbmFyeS03NzMx")],
        vec![("authorization", "Bearer tok-canary-77311")],
    ] {
        for (method, path) in [
            ("POST", "/v1/events"),
            ("GET", "/metrics"),
            ("GET", "/v1/audiences/a"),
            ("GET", "/nope"),
        ] {
            let r = s.send(method, path, &headers, r#"{"a":1}"#).await;
            r.assert_error(StatusCode::UNAUTHORIZED);
            assert!(!String::from_utf8_lossy(&r.body).contains("canary"));
            assert!(!format!("{:?}", r.headers).contains("canary"));
        }
    }
    assert!(s.backend.calls().is_empty());
    // /healthz needs none.
    assert_eq!(s.get("/healthz").await.status, StatusCode::OK);
    // The right token.
    let auth = format!("Bearer {TOKEN}");
    let r = s
        .send(
            "POST",
            "/v1/events",
            &[("authorization", auth.as_str())],
            r#"{"a":1}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = s
        .send(
            "GET",
            "/metrics",
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.backend.calls(), vec!["ingest 1", "metrics"]);
    s.shutdown().await;
}

#[tokio::test]
async fn unavailable_while_shutting_down() {
    let s = Server::default().await;
    s.backend.not_accepting.store(true, Ordering::SeqCst);
    for (method, path) in [
        ("POST", "/v1/events"),
        ("GET", "/metrics"),
        ("GET", "/v1/audiences/a"),
        ("PUT", "/v1/audiences/a"),
    ] {
        let r = s.send(method, path, &[], r#"{"a":1}"#).await;
        r.assert_error(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers["retry-after"], "5");
    }
    assert_eq!(s.get("/healthz").await.status, StatusCode::OK);
    assert!(s.backend.calls().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn oversize_content_length_is_refused_unread() {
    let s = Server::with_limit(1024).await;
    // 100 MiB announced, nothing sent: the 413 comes from the headers alone.
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 104857600\r\n\r\n";
    let reply = raw_exchange(s.addr, head, b"", Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    assert!(reply.contains("\"error\""), "{reply}");
    // The same through the limit of 1 KiB + 1 for control objects and CSV.
    for path in ["/v1/audiences/a", "/v1/audiences/a/members"] {
        let method = if path.ends_with("members") {
            "POST"
        } else {
            "PUT"
        };
        let head = format!("{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 1025\r\n\r\n");
        let reply = raw_exchange(s.addr, &head, b"", Duration::from_secs(5)).await;
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    }
    assert!(s.backend.calls().is_empty());
    // Still serving.
    let r = s.post_json("/v1/events", r#"{"a":1}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // At the limit exactly: accepted.
    let body = format!("{{\"a\":\"{}\"}}", "x".repeat(1024 - 8));
    assert_eq!(body.len(), 1024);
    assert_eq!(
        s.post_json("/v1/events", &body).await.status,
        StatusCode::ACCEPTED
    );
    s.shutdown().await;
}

#[tokio::test]
async fn oversize_chunked_body_is_refused() {
    let s = Server::with_limit(1024).await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await
        .expect("test setup");
    // 4 chunks of 512 bytes: past the limit in the third.
    for _ in 0..4 {
        let chunk = format!("200\r\n{}\r\n", " ".repeat(512));
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let reply = read_some(&mut stream, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(s.backend.calls().is_empty());
    // Still serving; a chunked body under the limit is fine.
    let r = s.post_json("/v1/events", r#"{"a":1}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let reply = raw_exchange(
        s.addr,
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        b"7\r\n{\"a\":1}\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    s.shutdown().await;
}

#[tokio::test]
async fn expect_continue_too_large_gets_413_without_100() {
    let s = Server::with_limit(1024).await;
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 104857600\r\nexpect: 100-continue\r\n\r\n";
    let reply = raw_exchange(s.addr, head, b"", Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(!reply.contains("100 Continue"), "{reply}");
    // An unauthenticated one gets its 401 without a 100 either.
    let s2 = Server::start(ApiOptions {
        api_token: ApiToken::new(TOKEN),
        ..Default::default()
    })
    .await;
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n\
                expect: 100-continue\r\n\r\n";
    let mut stream = TcpStream::connect(s2.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("socket I/O");
    let reply = read_until(&mut stream, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    s2.shutdown().await;
    s.shutdown().await;
}

#[tokio::test]
async fn expect_continue_normal_gets_100_then_202() {
    let s = Server::default().await;
    let body = br#"[{"a":1},{"a":2}]"#;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("socket I/O");
    // The body is sent only after the 100.
    let interim = read_until(&mut stream, "\r\n\r\n", Duration::from_secs(5)).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    stream.write_all(body).await.expect("socket I/O");
    let reply = read_some(&mut stream, Duration::from_secs(5)).await;
    let all = format!("{interim}{reply}");
    assert!(all.contains("HTTP/1.1 202"), "{all}");
    assert!(all.contains(r#"{"accepted":2}"#), "{all}");
    s.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let s = Server::default().await;
    // A request in flight: headers and half the body sent.
    let body = br#"{"a":1}"#;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("socket I/O");
    stream.write_all(&body[..3]).await.expect("socket I/O");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = s.addr;
    let backend = s.backend.clone();
    let stopping = tokio::spawn(s.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections.
    assert!(TcpStream::connect(addr).await.is_err());
    // The one in flight completes.
    stream.write_all(&body[3..]).await.expect("socket I/O");
    let reply = read_some(&mut stream, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    stopping.await.expect("the exchange");
    assert_eq!(backend.calls(), vec!["ingest 1"]);
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let s = Server::default().await;
    let stream = TcpStream::connect(s.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("test setup");
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::post("/v1/events")
            .header("host", "x")
            .body(Full::new(Bytes::from(format!("{{\"i\":{i}}}"))))
            .expect("test setup");
        let resp = sender.send_request(req).await.expect("the exchange");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        resp.into_body().collect().await.expect("the exchange");
    }
    s.shutdown().await;
}
