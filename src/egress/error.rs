//! Why a delivery failed, typed; turned into text only where `lastError` is stored or
//! printed (the dead-letter store, [`super::Outcome`], the logs). Every text is the one the
//! store and the tests know, and none contains a secret.

use hyper::StatusCode;

use super::auth::AuthError;
use super::transport::TransportError;

/// Why an attempt (or a round) failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The endpoint answered with a non-`2xx` status: `HTTP 503 Service Unavailable`.
    #[error("{}", status_text(*.0))]
    Status(u16),
    /// No response: timeout, connection or TLS handshake failure.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// No `Authorization` header: a missing secret, an invalid value, a failed token fetch.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The idempotency key cannot be sent in a header.
    #[error("idempotency key is not a valid header value")]
    InvalidIdempotencyKey,
    /// The destination's TLS files could not be read (any more).
    #[error("{0}")]
    Tls(String),
}

/// `HTTP 503 Service Unavailable`, or `HTTP 599` for a status without a reason phrase.
fn status_text(status: u16) -> String {
    match StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("HTTP {status} {reason}"),
        None => format!("HTTP {status}"),
    }
}

impl DeliveryError {
    /// The response's status, `None` when the attempt got no response.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status(status) => Some(*status),
            _ => None,
        }
    }
}

/// `lastError`: the text of a round's last error, empty when delivered.
pub fn last_error_text(error: Option<&DeliveryError>) -> String {
    error.map(ToString::to_string).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn texts_are_the_stored_ones() {
        let rows: Vec<(DeliveryError, &str)> = vec![
            (DeliveryError::Status(503), "HTTP 503 Service Unavailable"),
            (DeliveryError::Status(401), "HTTP 401 Unauthorized"),
            (DeliveryError::Status(599), "HTTP 599"),
            (
                TransportError::Timeout(Duration::from_millis(2000)).into(),
                "timed out after 2000 ms",
            ),
            (
                TransportError::Connect("tcp connect error".into()).into(),
                "connection error: tcp connect error",
            ),
            (
                AuthError::TokenFetch("HTTP 500".into()).into(),
                "access token request failed: HTTP 500",
            ),
            (
                DeliveryError::InvalidIdempotencyKey,
                "idempotency key is not a valid header value",
            ),
            (DeliveryError::Tls("tls.ca: x".into()), "tls.ca: x"),
        ];
        for (error, text) in rows {
            assert_eq!(error.to_string(), text);
        }
        assert_eq!(last_error_text(None), "");
    }
}
