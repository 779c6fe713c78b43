//! The HTTP transport: hyper 1 with hyper-util's pooled legacy client.
//!
//! HTTP/1.1 with keep-alive; over TLS (rustls) HTTP/2 is used when the server offers it
//! through ALPN. One [`Transport`] is shared by every destination of an
//! [`Egress`](super::Egress); clones share the pools.
//!
//! **Trust.** Server certificates are always verified, against the system's trust store
//! (`rustls-native-certs`: the platform's store; on Unix `SSL_CERT_FILE` / `SSL_CERT_DIR` when
//! set, as OpenSSL does), loaded once per process; when it cannot be loaded (no certificate
//! found), against the Mozilla roots compiled in (`webpki-roots`), with a warning. A
//! destination's `tls.caFile` adds its certificates to that store, and its `tls.clientCertFile`
//! / `clientKeyFile` are presented to servers that ask for a client certificate.
//!
//! **Clients.** The default TLS client (no `tls` settings) is built lazily on the first
//! `https` request, so plain-`http` destinations pay nothing for it. Each distinct [`Tls`]
//! gets its own client and pool, made by [`Transport::with_tls`] (which reads the files) and
//! shared by every destination with the same settings.
//!
//! Errors are reported as text built from hyper's error chain (kinds like "tcp connect error:
//! Connection refused"), never from the request: no URL, header or body appears in them. A
//! TLS failure is worded for people ([`TransportError::Tls`]): untrusted issuer, name
//! mismatch (with the host and the names the certificate is for), expiry, a client
//! certificate refused…

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use super::error::SettingsError;
use crate::config::Tls;

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
    /// The connection could not be made (refused, DNS…).
    #[error("connection error: {0}")]
    Connect(String),
    /// The TLS handshake failed (an untrusted or wrong certificate, a client certificate
    /// refused…): a sentence for people, starting with `TLS: `.
    #[error("{0}")]
    Tls(String),
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
    /// The client for destinations without TLS settings, built on first use.
    tls: Arc<OnceLock<TlsClient>>,
    /// One client per distinct TLS settings, shared by every view of this transport.
    custom: Arc<Mutex<HashMap<Tls, TlsClient>>>,
    /// The TLS settings and client this view sends `https` requests with; `None`: the default.
    selected: Option<(Arc<Tls>, TlsClient)>,
    pool_idle_timeout: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls_ready", &self.tls.get().is_some())
            .field("tls_settings", &self.selected.as_ref().map(|(tls, _)| tls))
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
            custom: Arc::default(),
            selected: None,
            pool_idle_timeout,
        }
    }

    /// This transport sending `https` requests with `tls`'s trust and client certificate
    /// (`None` or empty settings: the default client). The client for given settings is made
    /// once, reading its files (an error names the field: `tls.caFile: cannot read …`), and
    /// shared by every clone of this transport; `http` requests share the plain pool.
    pub fn with_tls(&self, tls: Option<&Tls>) -> Result<Transport, SettingsError> {
        let Some(tls) = tls.filter(|t| !t.is_empty()) else {
            return Ok(Transport {
                selected: None,
                ..self.clone()
            });
        };
        if let Some((current, client)) = &self.selected
            && **current == *tls
        {
            return Ok(Transport {
                selected: Some((current.clone(), client.clone())),
                ..self.clone()
            });
        }
        let mut custom = self.custom.lock().unwrap_or_else(|p| p.into_inner());
        let client = match custom.get(tls) {
            Some(client) => client.clone(),
            None => {
                let config = client_config(Some(tls))?;
                let client = self.tls_client(config);
                custom.insert(tls.clone(), client.clone());
                client
            }
        };
        drop(custom);
        Ok(Transport {
            selected: Some((Arc::new(tls.clone()), client)),
            ..self.clone()
        })
    }

    fn tls_client(&self, config: ClientConfig) -> TlsClient {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http_connector());
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https)
    }

    fn tls(&self) -> Result<&TlsClient, TransportError> {
        if let Some((_, client)) = &self.selected {
            return Ok(client);
        }
        if let Some(client) = self.tls.get() {
            return Ok(client);
        }
        // Without settings there is no file to read: this cannot fail, but a failure would
        // still be reported rather than hidden.
        let config = client_config(None).map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(self.tls.get_or_init(|| self.tls_client(config)))
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
            Some("https") => self.tls()?.request(request),
            _ => return Err(TransportError::Scheme),
        };
        let response = match tokio::time::timeout_at(deadline, future).await {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => {
                let client_cert = self
                    .selected
                    .as_ref()
                    .is_some_and(|(tls, _)| tls.client_cert_file.is_some());
                if let Some(text) = tls_failure(&e, client_cert) {
                    return Err(TransportError::Tls(text));
                }
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

/// The system's trust store, loaded once per process; the compiled-in Mozilla roots when it
/// cannot be loaded.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        if added == 0 {
            tracing::warn!(
                errors = %errors.join("; "),
                "no certificate found in the system's trust store: trusting the Mozilla roots \
                 compiled in instead (set SSL_CERT_FILE or SSL_CERT_DIR, or a destination's \
                 tls.caFile, to trust others)"
            );
            return RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
        }
        if !errors.is_empty() || ignored > 0 {
            tracing::warn!(
                trusted = added,
                unparsable = ignored,
                errors = %errors.join("; "),
                "parts of the system's trust store could not be loaded"
            );
        }
        tracing::debug!(trusted = added, "loaded the system's trust store");
        roots
    })
}

/// The rustls configuration for `tls`: the system's roots plus `caFile`, and the client
/// certificate when one is set. Errors name the field (`tls.caFile: …`).
fn client_config(tls: Option<&Tls>) -> Result<ClientConfig, SettingsError> {
    let mut roots = system_roots().clone();
    let mut identity = None;
    if let Some(tls) = tls {
        let within = |e: crate::config::ConfigError| SettingsError::Config(e.within("tls"));
        for cert in tls.ca_certificates().map_err(within)? {
            roots
                .add(cert)
                .map_err(|e| SettingsError::UnusableCa(e.to_string()))?;
        }
        identity = tls.client_identity().map_err(within)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SettingsError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| SettingsError::UnusableClientKey(e.to_string())),
    }
}

/// The rustls error in `error`'s chain, worded for people, if the failure is one of TLS.
/// `client_cert` says whether a client certificate was set.
fn tls_failure(error: &(dyn StdError + 'static), client_cert: bool) -> Option<String> {
    find_rustls_error(error, 0).and_then(|e| describe_tls_error(e, client_cert))
}

/// The first `rustls::Error` in `error`'s chain, looking inside `io::Error`s too (their
/// `source()` skips the error they wrap, and hyper-rustls wraps tokio-rustls's `io::Error` in
/// another).
fn find_rustls_error<'a>(
    error: &'a (dyn StdError + 'static),
    depth: usize,
) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if depth < 8
            && let Some(inner) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            && let Some(tls) = find_rustls_error(inner as &(dyn StdError + 'static), depth + 1)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// A unix time as RFC 3339 UTC (seconds).
fn when(time: &UnixTime) -> String {
    i64::try_from(time.as_secs())
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || format!("{} s after 1970", time.as_secs()),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// A rustls error about certificates or the handshake as a sentence starting with `TLS: `;
/// `None` for the others (the caller keeps the raw text).
pub fn describe_tls_error(error: &rustls::Error, client_cert: bool) -> Option<String> {
    use rustls::Error as E;
    let text = match error {
        E::InvalidCertificate(cert) => describe_certificate_error(cert),
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the endpoint requires a client certificate; set tls.clientCertFile and \
             tls.clientKeyFile"
                .to_owned()
        }
        E::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure),
        ) if client_cert => format!(
            "the endpoint refused our client certificate (alert {alert:?}); check that \
             tls.clientCertFile is issued by a CA the endpoint trusts and is still valid"
        ),
        E::AlertReceived(
            alert @ (AlertDescription::HandshakeFailure | AlertDescription::AccessDenied),
        ) => {
            format!(
                "the endpoint refused the handshake (alert {alert:?}); if it requires a client \
                 certificate, set tls.clientCertFile and tls.clientKeyFile"
            )
        }
        E::AlertReceived(alert) => format!("the endpoint ended the handshake (alert {alert:?})"),
        E::NoCertificatesPresented => "the endpoint presented no certificate".to_owned(),
        E::PeerIncompatible(why) => {
            format!("the endpoint's TLS is incompatible with ours ({why:?})")
        }
        // Not about certificates (a server that does not speak TLS, a protocol error): the raw
        // text of the connection error says it as well.
        _ => return None,
    };
    Some(format!("TLS: {text}"))
}

/// A name as webpki reports it (`DnsName("a.example")`, `IpAddress(10.0.0.1)`), bare.
fn plain_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(name)
}

fn describe_certificate_error(error: &CertificateError) -> String {
    use CertificateError as C;
    match error {
        C::UnknownIssuer => "the endpoint's certificate is not trusted (unknown issuer); set \
                             tls.caFile to its CA"
            .to_owned(),
        C::NotValidForName => {
            "the endpoint's certificate is for other names, not the endpoint's host".to_owned()
        }
        C::NotValidForNameContext {
            expected,
            presented,
        } if presented.is_empty() => format!(
            "the endpoint's certificate names no host (no subjectAltName), not {}",
            expected.to_str()
        ),
        C::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "the endpoint's certificate is for other names ({}), not {}",
            presented
                .iter()
                .map(|n| plain_name(n))
                .collect::<Vec<_>>()
                .join(", "),
            expected.to_str()
        ),
        C::Expired => "the endpoint's certificate has expired".to_owned(),
        C::ExpiredContext { time, not_after } => format!(
            "the endpoint's certificate expired at {} (it is now {})",
            when(not_after),
            when(time)
        ),
        C::NotValidYet => "the endpoint's certificate is not valid yet".to_owned(),
        C::NotValidYetContext { time, not_before } => format!(
            "the endpoint's certificate is not valid before {} (it is now {})",
            when(not_before),
            when(time)
        ),
        C::Revoked => "the endpoint's certificate has been revoked".to_owned(),
        C::BadSignature => "the endpoint's certificate has a bad signature".to_owned(),
        C::BadEncoding => "the endpoint's certificate could not be parsed".to_owned(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "the endpoint's certificate is not for TLS servers (extended key usage)".to_owned()
        }
        C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "the endpoint's certificate is signed with an algorithm we do not support".to_owned()
        }
        C::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            "the endpoint presents a CA certificate as its own (self-signed?); it must present \
             a server certificate issued by a CA, and tls.caFile may name that CA"
                .to_owned()
        }
        other => format!("the endpoint's certificate is not valid: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_bare() {
        assert_eq!(plain_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(plain_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn tls_errors_in_words() {
        let cert = |e| rustls::Error::InvalidCertificate(e);
        assert_eq!(
            describe_tls_error(&cert(CertificateError::UnknownIssuer), false).as_deref(),
            Some(
                "TLS: the endpoint's certificate is not trusted (unknown issuer); set \
                 tls.caFile to its CA"
            )
        );
        assert_eq!(
            describe_tls_error(&cert(CertificateError::NotValidForName), false).as_deref(),
            Some("TLS: the endpoint's certificate is for other names, not the endpoint's host")
        );
        assert_eq!(
            describe_tls_error(
                &cert(CertificateError::NotValidYetContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(0)),
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(86_400)),
                }),
                false
            )
            .as_deref(),
            Some(
                "TLS: the endpoint's certificate is not valid before 1970-01-02T00:00:00Z (it \
                 is now 1970-01-01T00:00:00Z)"
            )
        );
        let alert = rustls::Error::AlertReceived(AlertDescription::BadCertificate);
        assert!(
            describe_tls_error(&alert, true)
                .is_some_and(|t| t.starts_with("TLS: the endpoint refused our client certificate"))
        );
        assert_eq!(
            describe_tls_error(&alert, false).as_deref(),
            Some("TLS: the endpoint ended the handshake (alert BadCertificate)")
        );
        assert_eq!(
            describe_tls_error(&rustls::Error::DecryptError, false),
            None
        );
    }
}
