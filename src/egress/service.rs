//! The delivery service: one round of the retry policy for one export (SPEC §4).
//!
//! An *attempt* is: get the `Authorization` (maybe fetching a token), take one of the
//! destination's `maxInFlight` slots, send with the `timeoutMs` deadline; then
//! [`RetryPolicy::classify`] says what follows (its table, in short):
//!
//! | result                                   | then                                        |
//! |------------------------------------------|---------------------------------------------|
//! | `2xx`                                    | delivered                                   |
//! | `401` with OAuth2, first time this round | new token, one more attempt at once (not a retry) |
//! | `retryOn` status, connection error, timeout, token fetch failure | retry after backoff / `Retry-After`, at most `maxRetries` times |
//! | any other status, missing secret         | failed at once                              |
//!
//! The slot is held only while the request is in flight, not during backoff, so a
//! destination's slow or failing profiles do not starve the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::header::RETRY_AFTER;
use tokio::sync::Semaphore;

use super::auth::Authorizer;
use super::error::{DeliveryError, SettingsError, last_error_text};
use super::request::RequestTemplate;
use super::retry::{Decision, Observed, RetryPolicy, parse_retry_after};
use super::transport::{Transport, TransportError};
use crate::storage::DestinationSettings;

/// Tunables shared by every destination of an egress (and by redrive).
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub retry_after_cap: Duration,
    /// The largest response body read from an endpoint (the rest is not read).
    pub max_response_body: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            backoff_base: super::retry::DEFAULT_BACKOFF_BASE,
            backoff_cap: super::retry::DEFAULT_BACKOFF_CAP,
            retry_after_cap: super::retry::DEFAULT_RETRY_AFTER_CAP,
            max_response_body: 64 * 1024,
        }
    }
}

/// Per-destination counters.
#[derive(Debug)]
pub struct Counters {
    pub exports: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    /// Failed after the retries and stored in the dead-letter store (or failed with no store
    /// configured).
    pub dead_lettered: AtomicU64,
    /// Failed after the retries and could not be stored: kept in memory
    /// ([`super::Egress::unstored`]).
    pub not_stored: AtomicU64,
    /// Submitted and not yet finished (queued or being delivered).
    pub pending: AtomicU64,
    /// HTTP requests sent to the endpoint.
    pub requests: AtomicU64,
    pub latency: std::sync::Mutex<Histogram<u64>>,
    /// Retries by the cause of the attempt before them ([`retry_cause`]).
    pub retry_causes: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits; larger values saturate. Constant, valid bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            exports: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            not_stored: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            latency: std::sync::Mutex::new(new_histogram()),
            retry_causes: Default::default(),
        }
    }
}

/// One destination, ready to deliver: validated request template, auth, policy, slots.
#[derive(Debug)]
pub struct DestinationRuntime {
    pub settings: DestinationSettings,
    pub template: RequestTemplate,
    pub authorizer: Authorizer,
    pub policy: RetryPolicy,
    pub timeout: Duration,
    pub in_flight: Arc<Semaphore>,
    /// Shared with the runtime that replaces this one (a changed destination keeps counting).
    pub counters: Arc<Counters>,
    pub max_response_body: usize,
    /// Dead letters not yet reported in a warning (see [`DestinationRuntime::warn_failure`]).
    failures: std::sync::Mutex<FailureLog>,
    /// Retries not yet reported (see [`DestinationRuntime::count_retry`]).
    retries: std::sync::Mutex<RetryLog>,
}

/// Rate-limits the warnings of a failing destination: one line at once, then at most one
/// summary a [`FAILURE_LOG_PERIOD`], however many exports fail.
#[derive(Debug, Default)]
struct FailureLog {
    last: Option<std::time::Instant>,
    since_last: u64,
}

/// Retries not yet reported, by cause.
#[derive(Debug, Default)]
struct RetryLog {
    last: Option<std::time::Instant>,
    since_last: std::collections::BTreeMap<&'static str, u64>,
}

/// What made an attempt fail and be retried, for counting: the status class of a response
/// (`HTTP 503`…), a timeout, a failed token fetch, or a connection error.
pub fn retry_cause(error: &DeliveryError) -> &'static str {
    match error {
        DeliveryError::Status(408) => "HTTP 408",
        DeliveryError::Status(429) => "HTTP 429",
        DeliveryError::Status(500) => "HTTP 500",
        DeliveryError::Status(502) => "HTTP 502",
        DeliveryError::Status(503) => "HTTP 503",
        DeliveryError::Status(504) => "HTTP 504",
        DeliveryError::Status(401) => "HTTP 401",
        DeliveryError::Status(s) if *s >= 500 => "HTTP 5xx (other)",
        DeliveryError::Status(_) => "HTTP 4xx (other)",
        DeliveryError::Transport(TransportError::Timeout(_)) => "timeout",
        DeliveryError::Auth(_) => "token fetch",
        DeliveryError::Transport(_)
        | DeliveryError::InvalidIdempotencyKey
        | DeliveryError::Tls(_) => "connection error",
    }
}

fn causes_text(causes: &std::collections::BTreeMap<&'static str, u64>) -> String {
    causes
        .iter()
        .map(|(cause, n)| format!("{cause}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How often a failing destination is reported at the default log level.
pub const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(10);

/// A status code for the logs: the number, or `none` when no response came.
pub fn status_field(status: Option<u16>) -> String {
    status.map_or_else(|| "none".to_owned(), |s| s.to_string())
}

impl DestinationRuntime {
    /// Validates the settings (URL, headers, token URL, TLS files readable). Errors name no
    /// secret.
    pub fn new(
        settings: DestinationSettings,
        options: &ServiceOptions,
    ) -> Result<Self, SettingsError> {
        let template = RequestTemplate::new(&settings.request_url, &settings.headers)?;
        let authorizer = Authorizer::new(&settings.auth)?;
        if let Some(tls) = &settings.tls {
            tls.validate()
                .map_err(|e| SettingsError::Config(e.within("tls")))?;
        }
        let policy = RetryPolicy::new(
            &settings.delivery,
            options.backoff_base,
            options.backoff_cap,
            options.retry_after_cap,
        );
        let timeout = Duration::from_millis(settings.delivery.timeout_ms.max(1));
        let in_flight = Arc::new(Semaphore::new(
            settings
                .delivery
                .max_in_flight
                .clamp(1, Semaphore::MAX_PERMITS),
        ));
        Ok(DestinationRuntime {
            settings,
            template,
            authorizer,
            policy,
            timeout,
            in_flight,
            counters: Arc::default(),
            max_response_body: options.max_response_body,
            failures: Default::default(),
            retries: Default::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// Counts a retry by its cause, and reports the retries at the default level in
    /// aggregate: the first at once, then one line a period per destination.
    pub fn count_retry(&self, cause: &'static str) {
        *self
            .counters
            .retry_causes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cause)
            .or_default() += 1;
        let now = std::time::Instant::now();
        let mut log = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        *log.since_last.entry(cause).or_default() += 1;
        if log
            .last
            .is_some_and(|last| now.duration_since(last) < FAILURE_LOG_PERIOD)
        {
            return;
        }
        let causes = std::mem::take(&mut log.since_last);
        log.last = Some(now);
        drop(log);
        tracing::warn!(
            destination = self.id(),
            retries = causes.values().sum::<u64>(),
            causes = %causes_text(&causes),
            retried_total = self.counters.retried.load(Ordering::Relaxed),
            "attempts failed and are retried (one line per destination every 10 s at most)"
        );
    }

    /// Reports an export that failed for good: the first at once, then one summary line a
    /// period, counting the ones in between (a dead endpoint must not flood the log).
    pub fn warn_failure(&self, profile: &str, key: &str, entry: Option<u64>, round: &RoundResult) {
        let now = std::time::Instant::now();
        let mut log = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        log.since_last += 1;
        if log
            .last
            .is_some_and(|last| now.duration_since(last) < FAILURE_LOG_PERIOD)
        {
            return;
        }
        let failed = std::mem::take(&mut log.since_last);
        log.last = Some(now);
        drop(log);
        let entry = entry.map_or_else(|| "none".to_owned(), |e| e.to_string());
        tracing::warn!(
            destination = self.id(),
            profile,
            idempotency_key = key,
            entry = %entry,
            attempts = round.attempts,
            last_status = %status_field(round.last_status),
            last_error = %last_error_text(round.last_error.as_ref()),
            failed_since_last_report = failed,
            dead_lettered_total = self.counters.dead_lettered.load(Ordering::Relaxed),
            retried_total = self.counters.retried.load(Ordering::Relaxed),
            "exports failed after their retries (one line per destination every 10 s at most)"
        );
    }
}

/// The result of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundResult {
    pub delivered: bool,
    /// Attempts made in this round (≥ 1).
    pub attempts: u32,
    /// The last response's status; `None` when the last attempt got no response.
    pub last_status: Option<u16>,
    /// `None` when delivered. Its text (`lastError`) never contains a secret.
    pub last_error: Option<DeliveryError>,
    /// The first [`MAX_KEPT_BODY`] bytes (lossy UTF-8) of the last attempt's response body;
    /// `None` when delivered, when the last attempt got no response, or when its body was
    /// empty (or larger than `max_response_body`, or not read in time).
    pub last_body: Option<String>,
}

/// How much of a failed response's body a dead letter keeps.
pub const MAX_KEPT_BODY: usize = 1024;

/// The first [`MAX_KEPT_BODY`] bytes of a response body as lossy UTF-8, cut on a character
/// boundary; `None` for an empty body.
pub fn kept_body(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    // A character starting before the cut is at most 4 bytes long: read that far so that it
    // is decoded whole rather than as a replacement character.
    let raw = &body[..body.len().min(MAX_KEPT_BODY + 3)];
    let mut text = String::from_utf8_lossy(raw).into_owned();
    if text.len() > MAX_KEPT_BODY {
        let mut cut = MAX_KEPT_BODY;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Some(text)
}

/// One attempt: what it came to (for [`RetryPolicy::classify`]), why it failed, and the
/// response's body (see [`kept_body`]; `None` without a response or when delivered).
struct Attempt {
    observed: Observed,
    /// `None` when delivered.
    error: Option<DeliveryError>,
    body: Option<String>,
    /// The OAuth2 token generation the request carried, to refresh after a `401`.
    generation: Option<u64>,
}

impl Attempt {
    fn unsent(observed: Observed, error: DeliveryError) -> Self {
        Attempt {
            observed,
            error: Some(error),
            body: None,
            generation: None,
        }
    }
}

/// Delivers one export: one round of the retry policy. A destination with TLS settings is
/// sent to (token requests included) through `transport`'s client for them; when their files
/// cannot be read any more, the round fails at once with that error.
pub async fn deliver_round(
    rt: &DestinationRuntime,
    transport: &Transport,
    idempotency_key: &str,
    payload: &Bytes,
) -> RoundResult {
    let own;
    let transport = match &rt.settings.tls {
        None => transport,
        Some(tls) => match transport.with_tls(Some(tls)) {
            Ok(t) => {
                own = t;
                &own
            }
            Err(error) => return failed(rt, 1, DeliveryError::Tls(error), None),
        },
    };
    let mut attempts = 0u32;
    let mut retries = 0u32;
    let mut refresh_for: Option<u64> = None;
    let mut refreshed_after_401 = false;
    let oauth2 = rt.authorizer.is_oauth2();
    loop {
        attempts += 1;
        if attempts > 1 {
            rt.counters.retried.fetch_add(1, Ordering::Relaxed);
        }
        let Attempt {
            observed,
            error,
            body,
            generation,
        } = attempt(rt, transport, idempotency_key, payload, refresh_for.take()).await;
        let status = observed.status();
        // What: the retry logic. When: the backoff policy and the retries left.
        let (retry_after, error) = match (
            rt.policy.classify(&observed, oauth2, refreshed_after_401),
            error,
        ) {
            // An attempt without an error is a 2xx.
            (Decision::Success, _) | (_, None) => {
                tracing::debug!(
                    destination = rt.id(),
                    idempotency_key,
                    status = %status_field(status),
                    attempts,
                    "delivered"
                );
                return RoundResult {
                    delivered: true,
                    attempts,
                    last_status: status,
                    last_error: None,
                    last_body: None,
                };
            }
            (Decision::RefreshToken, _) => {
                tracing::debug!(
                    destination = rt.id(),
                    attempts,
                    "401 from the endpoint; refreshing the access token"
                );
                refreshed_after_401 = true;
                refresh_for = generation;
                continue;
            }
            (Decision::Final, Some(error)) => return failed(rt, attempts, error, body),
            (Decision::Retry { retry_after }, Some(error)) => (retry_after, error),
        };
        if retries >= rt.policy.max_retries {
            return failed(rt, attempts, error, body);
        }
        retries += 1;
        rt.count_retry(retry_cause(&error));
        let delay = rt.policy.random_delay(retries, retry_after);
        tracing::debug!(destination = rt.id(), idempotency_key, status = %status_field(status), %error, attempts, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

fn failed(
    rt: &DestinationRuntime,
    attempts: u32,
    error: DeliveryError,
    body: Option<String>,
) -> RoundResult {
    let status = error.status();
    tracing::debug!(destination = rt.id(), status = %status_field(status), %error, attempts, "delivery failed");
    RoundResult {
        delivered: false,
        attempts,
        last_status: status,
        last_error: Some(error),
        last_body: body,
    }
}

async fn attempt(
    rt: &DestinationRuntime,
    transport: &Transport,
    idempotency_key: &str,
    payload: &Bytes,
    refresh_for: Option<u64>,
) -> Attempt {
    let credential = match refresh_for {
        Some(generation) => {
            rt.authorizer
                .refresh_after_401(generation, transport, rt.timeout)
                .await
        }
        None => rt.authorizer.credential(transport, rt.timeout).await,
    };
    let credential = match credential {
        Ok(c) => c,
        Err(e) => {
            let retryable = e.is_retryable();
            return Attempt::unsent(Observed::TokenFailed { retryable }, e.into());
        }
    };
    let request = match rt
        .template
        .build(idempotency_key, payload, credential.header.as_ref())
    {
        Ok(r) => r,
        Err(e) => return Attempt::unsent(Observed::Unsendable, e),
    };
    let exchange = {
        // The semaphore is never closed; a closed one would mean "no limit" rather than a hang.
        let _slot = rt.in_flight.acquire().await.ok();
        rt.counters.requests.fetch_add(1, Ordering::Relaxed);
        transport
            .send(request, rt.timeout, rt.max_response_body)
            .await
    };
    let exchange = match exchange {
        Ok(x) => x,
        Err(e) => return Attempt::unsent(Observed::NoResponse, e.into()),
    };
    let status = exchange.response.status();
    tracing::trace!(
        destination = rt.id(),
        status = status.as_u16(),
        "endpoint answered"
    );
    if status.is_success() {
        return Attempt {
            observed: Observed::Response {
                status: status.as_u16(),
                retry_after: None,
            },
            error: None,
            body: None,
            generation: Some(credential.generation),
        };
    }
    let retry_after = exchange
        .response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    Attempt {
        observed: Observed::Response {
            status: status.as_u16(),
            retry_after,
        },
        error: Some(DeliveryError::Status(status.as_u16())),
        body: kept_body(&exchange.body),
        generation: Some(credential.generation),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{MAX_KEPT_BODY, kept_body, retry_cause};
    use crate::egress::auth::AuthError;
    use crate::egress::error::DeliveryError;
    use crate::egress::transport::TransportError;

    #[test]
    fn kept_body_is_cut_on_a_char_boundary() {
        assert_eq!(kept_body(b""), None);
        assert_eq!(
            kept_body(b"{\"error\":\"x\"}").as_deref(),
            Some("{\"error\":\"x\"}")
        );
        assert_eq!(
            kept_body(&[b'a'; 3000]).map(|s| s.len()),
            Some(MAX_KEPT_BODY)
        );
        // "é" is 2 bytes: 1023 ASCII bytes then "é" straddles the cut, so it is left out.
        let mut body = vec![b'a'; MAX_KEPT_BODY - 1];
        body.extend_from_slice("éé".as_bytes());
        let kept = kept_body(&body).unwrap_or_default();
        assert_eq!(kept.len(), MAX_KEPT_BODY - 1);
        assert!(kept.bytes().all(|b| b == b'a'));
        // A 4-byte character that ends exactly at the cut is kept whole.
        let mut body = vec![b'a'; MAX_KEPT_BODY - 4];
        body.extend_from_slice("😀😀".as_bytes());
        let kept = kept_body(&body).unwrap_or_default();
        assert_eq!(kept.len(), MAX_KEPT_BODY);
        assert!(kept.ends_with('😀'));
        // Invalid UTF-8 is replaced, and the result still fits.
        let kept = kept_body(&[0xff; 2000]).unwrap_or_default();
        assert!(kept.len() <= MAX_KEPT_BODY && kept.chars().all(|c| c == '\u{fffd}'));
    }

    #[test]
    fn retry_causes_one_row_each() {
        let rows: Vec<(DeliveryError, &str)> = vec![
            (DeliveryError::Status(503), "HTTP 503"),
            (DeliveryError::Status(429), "HTTP 429"),
            (DeliveryError::Status(507), "HTTP 5xx (other)"),
            (DeliveryError::Status(418), "HTTP 4xx (other)"),
            (
                TransportError::Timeout(Duration::from_millis(2000)).into(),
                "timeout",
            ),
            (
                AuthError::TokenFetch("HTTP 500".into()).into(),
                "token fetch",
            ),
            (
                TransportError::Connect("tcp connect error".into()).into(),
                "connection error",
            ),
            (
                TransportError::Tls("TLS: untrusted".into()).into(),
                "connection error",
            ),
        ];
        for (error, cause) in rows {
            assert_eq!(retry_cause(&error), cause, "{error}");
        }
    }
}
