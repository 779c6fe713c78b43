//! A local HTTP endpoint for benchmarks, the demo and tests: hyper 1, HTTP/1.1 with
//! keep-alive, on `127.0.0.1:0`, inside the caller's tokio runtime.
//!
//! It reads each request's body, answers `200 {}` (or the configured status) and counts
//! requests and body bytes. An optional [`RequestHook`] sees every request after its body has
//! been read — the moment the endpoint has *received* the export — with the request's head,
//! its body and that instant. `streamdest bench` uses the hook to turn the `Idempotency-Key`
//! into an event-to-receipt latency (see [`crate::bench`]); the demo keeps a sample payload.
//!
//! The receiver stops when [`Receiver::shutdown`] is called or the value is dropped: the
//! accept loop and every open connection are aborted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::{JoinHandle, JoinSet};

/// Called once per request, after its body was read: head, body, receipt instant.
pub type RequestHook = Arc<dyn Fn(&Parts, &Bytes, Instant) + Send + Sync>;

/// How the receiver answers.
#[derive(Clone)]
pub struct ReceiverOptions {
    /// The status of every answer (default `200`).
    pub status: StatusCode,
    pub on_request: Option<RequestHook>,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            status: StatusCode::OK,
            on_request: None,
        }
    }
}

impl std::fmt::Debug for ReceiverOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverOptions")
            .field("status", &self.status)
            .field("on_request", &self.on_request.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

/// What the receiver has seen so far.
#[derive(Debug, Default)]
pub struct ReceiverCounters {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub connections: AtomicU64,
}

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    counters: Arc<ReceiverCounters>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start(options: ReceiverOptions) -> std::io::Result<Receiver> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Binds `addr` and starts serving on the current tokio runtime.
    pub async fn bind(addr: SocketAddr, options: ReceiverOptions) -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(ReceiverCounters::default());
        let task = tokio::spawn(accept_loop(listener, counters.clone(), options));
        Ok(Receiver {
            addr,
            counters,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &Arc<ReceiverCounters> {
        &self.counters
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts connections; dropping (aborting) this task drops the set, which aborts every
/// connection task with it.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    counters: Arc<ReceiverCounters>,
    options: ReceiverOptions,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: back off briefly instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let counters = counters.clone();
                let options = options.clone();
                connections.spawn(serve(stream, counters, options));
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    counters: Arc<ReceiverCounters>,
    options: ReceiverOptions,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let counters = counters.clone();
        let options = options.clone();
        async move {
            let (parts, body) = request.into_parts();
            // A body that fails half-way is still answered; what arrived counts.
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let received = Instant::now();
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters
                .body_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            if let Some(hook) = &options.on_request {
                hook(&parts, &body, received);
            }
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = options.status;
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_requests_and_calls_the_hook() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        let receiver = Receiver::start(ReceiverOptions {
            on_request: Some(Arc::new(move |parts: &Parts, body: &Bytes, _| {
                let key = parts
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                hook_seen.lock().unwrap().push((key, body.len()));
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        let transport = crate::egress::Transport::new();
        for i in 0..3 {
            let request = Request::post(receiver.url("/x"))
                .header("idempotency-key", format!("k{i}"))
                .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
                .unwrap();
            let x = transport
                .send(request, std::time::Duration::from_secs(5), 1024)
                .await
                .unwrap();
            assert_eq!(x.response.status(), StatusCode::OK);
        }
        assert_eq!(receiver.requests(), 3);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![("k0".into(), 7), ("k1".into(), 7), ("k2".into(), 7)]
        );
        receiver.shutdown();
    }
}
