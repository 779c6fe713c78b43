//! The HTTP API of `streamdest run` (SPEC §6): HTTP only. What requests mean (durability,
//! validation of events and objects, the dataflow) is the [`Backend`]'s; this module routes,
//! authenticates, limits and parses bodies, and turns [`ApiError`]s into responses.
//!
//! Parts: [`router`] (routes → backend calls), [`body`] (limits and parsing), [`auth`] (the API
//! token), [`error`] (the typed error and its JSON body), [`metrics`] (the Prometheus
//! exposition), [`server`] (the accept loop and graceful shutdown). Start it with [`serve`].
//!
//! # Routes
//!
//! | route | success | |
//! | --- | --- | --- |
//! | `GET /healthz` | 200 `{"status":"ok"}` | no auth; answered even while shutting down |
//! | `POST /v1/events` | 202 `{"accepted":N}` | a JSON object, a JSON array of objects, or NDJSON (`application/x-ndjson`, one object per non-empty line) |
//! | `GET /v1/{kind}/{id}` | 200 the object | `kind`: `merge-policies`, `audiences`, `destinations` |
//! | `PUT /v1/{kind}/{id}` | 201 created / 200 replaced, with the object as GET returns it | body: a JSON object |
//! | `DELETE /v1/{kind}/{id}` | 204, no body | 409 when another object references it |
//! | `POST /v1/audiences/{id}/members` | 202 `{"accepted":N}` | `text/csv`: header `namespace,id`, one pair per line |
//! | `GET /v1/destinations/{id}/dead-letters` | 200 a JSON array | |
//! | `POST /v1/destinations/{id}/dead-letters/redrive` | 200 the backend's report | |
//! | `GET /v1/destinations/{id}/metrics` | 200 JSON | |
//! | `GET /metrics` | 200 Prometheus text | OpenMetrics when `Accept` asks for it ([`metrics`]) |
//!
//! A known path with another method gets 405 (with `Allow`); an unknown path 404. An id is
//! percent-decoded and must be 1 to [`body::MAX_ID_LEN`] bytes of `[A-Za-z0-9._:-]`, else 400.
//! A missing `Content-Type` means JSON (CSV for members); another than the route takes gets 415.
//!
//! # Auth
//!
//! With [`ApiOptions::api_token`] set, every route but `/healthz` needs exactly one
//! `Authorization: Bearer <token>` header (compared in constant time), else 401 before anything
//! else happens: the backend is not called at all. The token is never logged or echoed;
//! [`auth::ApiToken`] prints as `<redacted>`.
//!
//! # Limits
//!
//! A body above [`ApiOptions::max_body`] (default 16 MiB) gets 413 with `Connection: close`:
//! from `Content-Length` alone without reading the body (a client that sent
//! `Expect: 100-continue` gets no `100 Continue`), or, for a chunked body, as soon as the bytes
//! read pass the limit. The service keeps serving other connections and requests.
//!
//! # Errors
//!
//! Every error body is JSON `{"error": "<reason>"}`; a bad event adds `"index": <0-based index of
//! the first bad event>` (for NDJSON, counting non-empty lines), and nothing of the request is
//! applied. While [`Backend::accepting`] is false (shutting down) every route but `/healthz` gets
//! 503 with `Retry-After: 5`.
//!
//! # Logging
//!
//! Each request is logged at debug level (target `streamdest::api`) with method, path (no query),
//! status and duration; never bodies, queries or headers.

pub mod auth;
pub mod body;
pub mod error;
pub mod metrics;
pub mod router;
pub mod server;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;

use serde_json::Value;

pub use auth::ApiToken;
pub use error::ApiError;
pub use metrics::{DestinationMetrics, LatencyHistogram, MetricsSnapshot};
pub use server::serve;

/// A boxed future that can be sent between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default body limit: 16 MiB.
pub const DEFAULT_MAX_BODY: u64 = 16 * 1024 * 1024;

/// The kinds of control objects, each under its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `/v1/merge-policies/{id}`
    MergePolicy,
    /// `/v1/audiences/{id}`
    Audience,
    /// `/v1/destinations/{id}`
    Destination,
}

impl ObjectKind {
    /// The path segment of the kind's route.
    pub fn route(self) -> &'static str {
        match self {
            ObjectKind::MergePolicy => "merge-policies",
            ObjectKind::Audience => "audiences",
            ObjectKind::Destination => "destinations",
        }
    }

    pub fn from_route(segment: &str) -> Option<Self> {
        match segment {
            "merge-policies" => Some(ObjectKind::MergePolicy),
            "audiences" => Some(ObjectKind::Audience),
            "destinations" => Some(ObjectKind::Destination),
            _ => None,
        }
    }

    /// For messages: `merge policy`, `audience`, `destination`.
    pub fn noun(self) -> &'static str {
        match self {
            ObjectKind::MergePolicy => "merge policy",
            ObjectKind::Audience => "audience",
            ObjectKind::Destination => "destination",
        }
    }
}

/// What the API asks of the service. The API has already authenticated the request, checked
/// [`Backend::accepting`], validated ids and parsed bodies into JSON (events: each a JSON
/// object) or member pairs; the backend gives them meaning. Its errors reach the client as they
/// are (status and message), so their messages must hold no secret.
pub trait Backend: Send + Sync + 'static {
    /// Makes the events durable (write-ahead log) and returns how many were accepted;
    /// `Err(BadRequest { index: Some(i), .. })` names the first bad one, and nothing is applied.
    fn ingest(&self, events: Vec<Value>) -> BoxFuture<'_, Result<usize, ApiError>>;

    /// The object as GET shows it (defaults filled in, secrets redacted); `NotFound` if none.
    fn get_object(&self, kind: ObjectKind, id: &str) -> Result<Value, ApiError>;

    /// Creates or replaces the whole object (`body` is a JSON object). `Ok((true, object))`
    /// when created (201), `Ok((false, object))` when replaced (200); `object` as GET returns it.
    /// An invalid object: `BadRequest` naming the field path, nothing changed.
    fn put_object(
        &self,
        kind: ObjectKind,
        id: &str,
        body: Value,
    ) -> BoxFuture<'_, Result<(bool, Value), ApiError>>;

    /// Deletes the object: `NotFound` if none, `Conflict` if another references it.
    fn delete_object(&self, kind: ObjectKind, id: &str) -> BoxFuture<'_, Result<(), ApiError>>;

    /// Adds members (`(namespace, id)` pairs, from the CSV) to an upload audience; returns how
    /// many were accepted.
    fn add_members(
        &self,
        audience: &str,
        members: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<usize, ApiError>>;

    /// The destination's dead letters, as a list.
    fn dead_letters(&self, destination: &str) -> Result<Vec<Value>, ApiError>;

    /// Redrives the destination's dead letters; the report is answered as is.
    fn redrive(&self, destination: &str) -> BoxFuture<'_, Result<Value, ApiError>>;

    /// The destination's metrics as JSON.
    fn destination_metrics(&self, destination: &str) -> Result<Value, ApiError>;

    /// The counters for `GET /metrics`, taken at scrape time.
    fn metrics(&self) -> MetricsSnapshot;

    /// False while shutting down: every route but `/healthz` answers 503.
    fn accepting(&self) -> bool;
}

/// How the API serves.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The largest request body, in bytes (`--max-body`); default 16 MiB.
    pub max_body: u64,
    /// When set, every route but `/healthz` needs `Authorization: Bearer <token>`.
    pub api_token: Option<ApiToken>,
    /// After shutdown is asked for, how long requests in flight may take before their
    /// connections are dropped. Default 8 s (SPEC §7: exit within 10 s of SIGTERM).
    pub shutdown_grace: std::time::Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            max_body: DEFAULT_MAX_BODY,
            api_token: None,
            shutdown_grace: std::time::Duration::from_secs(8),
        }
    }
}
