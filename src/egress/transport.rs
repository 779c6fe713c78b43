//! The HTTP transport: hyper 1 with hyper-util's pooled legacy client.
//!
//! HTTP/1.1 with keep-alive; over TLS (rustls, webpki roots) HTTP/2 is used when the server
//! offers it through ALPN. The TLS client is built lazily on the first `https` request, so
//! plain-`http` destinations pay nothing for it. One [`Transport`] is shared by every
//! destination of an [`Egress`](super::Egress); clones share the pools.
//!
//! Errors are reported as text built from hyper's error chain (kinds like "tcp connect error:
//! Connection refused"), never from the request: no URL, header or body appears in them.

use std::error::Error as StdError;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The request body type.
pub type Body = Full<Bytes>;

type PlainClient = Client<HttpConnector, Body>;
type TlsClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Why an exchange produced no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No response within the per-attempt timeout.
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection could not be made (refused, DNS, TLS handshake…).
    #[error("connection error: {0}")]
    Connect(String),
    /// The connection failed after it was made (reset, closed early, protocol error).
    #[error("request error: {0}")]
    Request(String),
    /// The URL's scheme is neither `http` nor `https`.
    #[error("unsupported URL scheme")]
    Scheme,
}

/// A response with its (size-limited) body read.
#[derive(Debug)]
pub struct Exchange {
    pub response: Response<()>,
    /// The body, or empty when it was larger than the limit or could not be read in time
    /// (the status still counts).
    pub body: Bytes,
}

/// A shared, pooled HTTP client.
#[derive(Clone)]
pub struct Transport {
    plain: PlainClient,
    tls: Arc<OnceLock<TlsClient>>,
    pool_idle_timeout: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls_ready", &self.tls.get().is_some())
            .finish()
    }
}

impl Default for Transport {
    fn default() -> Self {
        Transport::new()
    }
}

fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

impl Transport {
    /// A transport with a 90 s idle-connection timeout. Must be called inside a tokio runtime
    /// only when it is used; building it needs none.
    pub fn new() -> Self {
        let pool_idle_timeout = Duration::from_secs(90);
        let plain = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(http_connector());
        Transport {
            plain,
            tls: Arc::new(OnceLock::new()),
            pool_idle_timeout,
        }
    }

    fn tls(&self) -> &TlsClient {
        self.tls.get_or_init(|| {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http_connector());
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(self.pool_idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(https)
        })
    }

    /// Sends a request and reads the response within `timeout` (the whole exchange: connect,
    /// request, response head). The body is read best-effort, up to `max_body` bytes, within
    /// what is left of the timeout.
    pub async fn send(
        &self,
        request: Request<Body>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Exchange, TransportError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let future = match request.uri().scheme_str() {
            Some("http") => self.plain.request(request),
            Some("https") => self.tls().request(request),
            _ => return Err(TransportError::Scheme),
        };
        let response = match tokio::time::timeout_at(deadline, future).await {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => {
                let text = error_chain(&e);
                return Err(if e.is_connect() {
                    TransportError::Connect(text)
                } else {
                    TransportError::Request(text)
                });
            }
            Ok(Ok(r)) => r,
        };
        let (parts, body) = response.into_parts();
        let body =
            match tokio::time::timeout_at(deadline, Limited::new(body, max_body).collect()).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                // Too large, broken or slow: the status decides; the connection is dropped.
                _ => Bytes::new(),
            };
        Ok(Exchange {
            response: Response::from_parts(parts, ()),
            body,
        })
    }
}

/// An error and its sources, joined with `": "`, with repeats removed.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}
