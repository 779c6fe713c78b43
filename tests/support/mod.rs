//! Test helpers: a scriptable HTTP/1.1 server on 127.0.0.1 (endpoint or token server),
//! destination and export builders, and what a run of the binary did.
//!
//! Each test binary uses a subset.
#![allow(dead_code)]

pub mod service;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use streamdest::config::Destination;
use streamdest::egress::Export;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// 0-based, in arrival order.
    pub seq: usize,
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as `application/x-www-form-urlencoded` pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }

    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// What the server answers.
#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    Json(u16, serde_json::Value),
    /// Status, extra headers, body.
    Full(u16, Vec<(String, String)>, String),
    /// Wait, then answer.
    Delay(Duration, Box<Reply>),
    /// Never answer (until the test ends).
    Hang,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Status(200)
    }

    pub fn token(access_token: &str, expires_in: serde_json::Value) -> Reply {
        Reply::Json(
            200,
            serde_json::json!({"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in}),
        )
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A scriptable server: the handler picks each reply from the request (and its `seq`).
pub struct TestServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    /// Requests being answered now, and the most at once.
    active: Arc<(AtomicUsize, AtomicUsize)>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let log: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let seq = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let active: Arc<(AtomicUsize, AtomicUsize)> = Arc::default();
        let task = {
            let log = log.clone();
            let active = active.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (log, seq, handler, active) =
                        (log.clone(), seq.clone(), handler.clone(), active.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let (log, seq, handler, active) =
                                (log.clone(), seq.clone(), handler.clone(), active.clone());
                            async move {
                                let now = active.0.fetch_add(1, Ordering::SeqCst) + 1;
                                active.1.fetch_max(now, Ordering::SeqCst);
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let recorded = Recorded {
                                    seq: seq.fetch_add(1, Ordering::SeqCst),
                                    method: parts.method.to_string(),
                                    target: parts
                                        .uri
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default(),
                                    headers: parts.headers,
                                    body,
                                    at: Instant::now(),
                                };
                                let reply = handler(&recorded);
                                log.lock().unwrap().push(recorded);
                                let response = respond(reply).await;
                                active.0.fetch_sub(1, Ordering::SeqCst);
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        TestServer {
            addr,
            log,
            active,
            task,
        }
    }

    /// A server that answers every request the same way.
    pub async fn always(reply: Reply) -> TestServer {
        TestServer::start(move |_| reply.clone()).await
    }

    /// A server that answers with `replies` in turn, then repeats the last.
    pub async fn sequence(replies: Vec<Reply>) -> TestServer {
        TestServer::start(move |r| replies[r.seq.min(replies.len() - 1)].clone()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }

    /// The most requests answered at once so far.
    pub fn max_concurrent(&self) -> usize {
        self.active.1.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

async fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut reply = reply;
    loop {
        match reply {
            Reply::Delay(d, next) => {
                tokio::time::sleep(d).await;
                reply = *next;
            }
            Reply::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                reply = Reply::Status(200);
            }
            Reply::Status(s) => return build(s, vec![], String::new()),
            Reply::Json(s, v) => {
                return build(
                    s,
                    vec![("content-type".into(), "application/json".into())],
                    v.to_string(),
                );
            }
            Reply::Full(s, h, b) => return build(s, h, b),
        }
    }
}

fn build(status: u16, headers: Vec<(String, String)>, body: String) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("valid test response")
}

/// An address on which nothing listens (bound, then released).
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// A destination from JSON fields over `{"id":id,"endpoint":endpoint}`; the delivery timeout
/// defaults to 1 s here to keep failing tests short.
pub fn destination(id: &str, endpoint: &str, extra: serde_json::Value) -> Destination {
    let mut value =
        serde_json::json!({"id": id, "endpoint": endpoint, "delivery": {"timeoutMs": 1000}});
    if let (Some(obj), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        for (k, v) in extra {
            obj.insert(k, v);
        }
    }
    serde_json::from_value(value).expect("valid destination JSON")
}

pub fn export(destination: &str, profile: &str, epoch: u64) -> Export {
    Export {
        destination: destination.into(),
        profile: profile.into(),
        order_keys: Vec::new(),
        epoch,
        idempotency_key: format!("{destination}/{profile}/{epoch}"),
        payload: Bytes::from(serde_json::json!({"profile": profile, "epoch": epoch}).to_string()),
    }
}

/// Collects every outcome reported through `EgressOptions::on_outcome`.
#[derive(Clone, Default)]
pub struct Outcomes(pub Arc<Mutex<Vec<(Export, streamdest::egress::Outcome)>>>);

impl Outcomes {
    pub fn callback(&self) -> streamdest::egress::OutcomeCallback {
        let log = self.0.clone();
        Arc::new(move |e: &Export, o| log.lock().unwrap().push((e.clone(), o)))
    }

    pub fn all(&self) -> Vec<(Export, streamdest::egress::Outcome)> {
        self.0.lock().unwrap().clone()
    }
}

/// A dead-letter store in a fresh temporary directory (kept alive by the returned guard).
pub fn temp_store() -> (tempfile::TempDir, Arc<streamdest::storage::DeadLetterStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = streamdest::storage::DeadLetterStore::open(dir.path()).expect("open store");
    (dir, Arc::new(store))
}

/// An egress over `destinations`, with a dead-letter store and an outcome log.
pub fn egress_with(
    destinations: Vec<Destination>,
    store: Option<Arc<streamdest::storage::DeadLetterStore>>,
    capacity: usize,
) -> (streamdest::egress::Egress, Outcomes) {
    let outcomes = Outcomes::default();
    let options = streamdest::egress::EgressOptions {
        queue_capacity: capacity,
        on_outcome: Some(outcomes.callback()),
        ..Default::default()
    };
    let egress =
        streamdest::egress::Egress::new(destinations, store, options).expect("valid egress");
    (egress, outcomes)
}

/// What one run of the binary did.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, code: i32, what: &str) {
        assert_eq!(self.code, Some(code), "{what}: {}", self.describe());
    }

    /// The stdout lines, each parsed as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

/// Waits for `child` at most `timeout`; past it, kills it and returns `None`.
pub fn wait_or_kill(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
