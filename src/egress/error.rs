//! Why a delivery failed ([`DeliveryError`]) or a destination's settings were refused
//! ([`SettingsError`]), typed; turned into text only where `lastError` is stored or printed
//! (the dead-letter store, [`super::Outcome`], the logs, a configuration error). Every text
//! is the one the store and the tests know, and none contains a secret.

use hyper::StatusCode;

use crate::config::ConfigError;

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
    Tls(SettingsError),
}

/// Why a destination's settings were refused (validated once, before any attempt). Texts
/// name the setting, never a header value or a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The endpoint does not parse as a URL.
    #[error("endpoint is not a valid URL")]
    InvalidUrl,
    /// The endpoint is not an absolute `http`/`https` URL with a host.
    #[error("endpoint must be an absolute http or https URL")]
    NotHttpUrl,
    /// A custom header's name (as configured) is not a header name.
    #[error("header {0:?}: not a valid header name")]
    InvalidHeaderName(String),
    /// A custom header's value cannot be sent; the header is named, its value never quoted.
    #[error("header {0:?}: value is not a valid header value")]
    InvalidHeaderValue(String),
    /// The OAuth2 `accessTokenUrl` does not parse as a URL.
    #[error("accessTokenUrl is not a valid URL")]
    InvalidTokenUrl,
    /// The OAuth2 `accessTokenUrl` is not an absolute `http`/`https` URL with a host.
    #[error("accessTokenUrl must be an absolute http or https URL")]
    TokenUrlNotHttp,
    /// A setting the configuration checks: the headers, or a TLS file that cannot be read,
    /// does not parse, or whose key is not the certificate's (`tls.clientKeyFile: …`).
    #[error("{0}")]
    Config(ConfigError),
    /// A `caFile` certificate rustls refuses as a trust anchor.
    #[error("tls.caFile: not usable as a CA: {0}")]
    UnusableCa(String),
    /// The client key rustls refuses with the client certificate.
    #[error("tls.clientKeyFile: {0}")]
    UnusableClientKey(String),
    /// No TLS configuration could be made (the crypto provider's protocol versions).
    #[error("TLS: {0}")]
    TlsConfig(String),
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
            (
                DeliveryError::Tls(SettingsError::Config(ConfigError::new("tls.caFile", "x"))),
                "tls.caFile: x",
            ),
        ];
        for (error, text) in rows {
            assert_eq!(error.to_string(), text);
        }
        assert_eq!(last_error_text(None), "");
    }

    #[test]
    fn settings_texts_are_todays() {
        let rows: Vec<(SettingsError, &str)> = vec![
            (SettingsError::InvalidUrl, "endpoint is not a valid URL"),
            (
                SettingsError::NotHttpUrl,
                "endpoint must be an absolute http or https URL",
            ),
            (
                SettingsError::InvalidHeaderName("bad name".into()),
                "header \"bad name\": not a valid header name",
            ),
            (
                SettingsError::InvalidHeaderValue("x-key".into()),
                "header \"x-key\": value is not a valid header value",
            ),
            (
                SettingsError::InvalidTokenUrl,
                "accessTokenUrl is not a valid URL",
            ),
            (
                SettingsError::TokenUrlNotHttp,
                "accessTokenUrl must be an absolute http or https URL",
            ),
            (
                SettingsError::Config(
                    ConfigError::new("clientKeyFile", "no private key in /k.pem").within("tls"),
                ),
                "tls.clientKeyFile: no private key in /k.pem",
            ),
            (
                SettingsError::Config(ConfigError::new("headers", "header 1: \"a b\" is bad")),
                "headers: header 1: \"a b\" is bad",
            ),
            (
                SettingsError::UnusableCa("bad".into()),
                "tls.caFile: not usable as a CA: bad",
            ),
            (
                SettingsError::UnusableClientKey("bad".into()),
                "tls.clientKeyFile: bad",
            ),
            (
                SettingsError::TlsConfig("no versions".into()),
                "TLS: no versions",
            ),
        ];
        for (error, text) in rows {
            assert_eq!(error.to_string(), text);
        }
    }
}
