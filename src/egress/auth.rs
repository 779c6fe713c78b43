//! The `Authorization` header of a destination (SPEC §4): none, bearer, or an OAuth2 access
//! token (password or client-credentials grant) kept in a per-destination cache.
//!
//! # Token cache
//!
//! - A token is reused until [`refresh_margin`] before its `expires_in` runs out. A response
//!   without `expires_in` is taken to last [`DEFAULT_EXPIRES_IN`] (one hour); `expires_in` may
//!   be a number or a numeric string.
//! - When the token is due, it is refreshed with `grant_type=refresh_token` if the server
//!   gave a `refresh_token`; if that fails, or there is none, a new token is fetched with the
//!   configured grant.
//! - Single flight: the cache is a `tokio::sync::Mutex` held across the fetch. Callers that
//!   waited while a fetch ran take its result, success or failure, instead of fetching again,
//!   so N concurrent requests with no valid token cause exactly one token request (and a
//!   token endpoint that is down sees one request per round of waiters, not one per export).
//! - A `401` from the endpoint invalidates the token that was sent (unless another request
//!   already replaced it) and fetches a new one: [`Authorizer::refresh_after_401`].
//!
//! # Secrets
//!
//! Secret values and tokens live only in `Secret`s, `HeaderValue`s marked sensitive and
//! private fields of types whose `Debug` redacts them. Errors name the token endpoint's status
//! and its OAuth `error` code (a restricted character set) but never a secret, a token or the
//! response body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Uri};
use tokio::time::Instant;

use super::error::SettingsError;
use super::transport::{Body, Transport};
use crate::config::{Auth, ClientCredentialsType};
use crate::secret::{MissingSecret, Secret};

/// Assumed lifetime of a token whose response has no `expires_in`.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);
/// The largest body read from a token endpoint.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// How long before expiry a token is replaced: a quarter of its lifetime, at most 30 s.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 4).min(Duration::from_secs(30))
}

/// Why no `Authorization` header could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A secret names an unset environment variable: final, retrying cannot help.
    #[error(transparent)]
    MissingSecret(#[from] MissingSecret),
    /// A secret or token cannot be sent in a header (control characters): final.
    #[error("{0} is not a valid header value")]
    InvalidValue(&'static str),
    /// The token could not be fetched: a failed attempt, retried like a connection error.
    #[error("access token request failed: {0}")]
    TokenFetch(String),
}

impl AuthError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::TokenFetch(_))
    }
}

/// `Basic base64(urlencode(id):urlencode(secret))`, per RFC 6749 §2.3.1 (each part
/// `application/x-www-form-urlencoded`, space as `+`).
pub fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    let id: String = url::form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
    let secret: String = url::form_urlencoded::byte_serialize(client_secret.as_bytes()).collect();
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, AuthError> {
    let mut v = HeaderValue::try_from(value).map_err(|_| AuthError::InvalidValue(what))?;
    v.set_sensitive(true);
    Ok(v)
}

/// An `Authorization` header and the generation of the token it carries (0 when not OAuth2).
#[derive(Clone)]
pub struct Credential {
    pub header: Option<HeaderValue>,
    pub generation: u64,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("header", &self.header.as_ref().map(|_| "<redacted>"))
            .field("generation", &self.generation)
            .finish()
    }
}

/// Makes the `Authorization` header of one destination.
#[derive(Debug)]
pub enum Authorizer {
    None,
    Bearer(Secret),
    OAuth2(Arc<TokenCache>),
}

impl Authorizer {
    /// From a destination's auth settings. `token_url` is validated here.
    pub fn new(auth: &Auth) -> Result<Self, SettingsError> {
        Ok(match auth {
            Auth::None => Authorizer::None,
            Auth::Bearer { token } => Authorizer::Bearer(token.clone()),
            Auth::Oauth2Password {
                access_token_url,
                client_id,
                client_secret,
                username,
                password,
            } => Authorizer::OAuth2(Arc::new(TokenCache::new(
                access_token_url,
                Grant::Password {
                    client_id: client_id.clone(),
                    client_secret: client_secret.clone(),
                    username: username.clone(),
                    password: password.clone(),
                },
            )?)),
            Auth::Oauth2ClientCredentials {
                access_token_url,
                client_id,
                client_secret,
                client_credentials_type,
            } => Authorizer::OAuth2(Arc::new(TokenCache::new(
                access_token_url,
                Grant::ClientCredentials {
                    client_id: client_id.clone(),
                    client_secret: client_secret.clone(),
                    basic: *client_credentials_type == ClientCredentialsType::BasicAuthorization,
                },
            )?)),
        })
    }

    pub fn is_oauth2(&self) -> bool {
        matches!(self, Authorizer::OAuth2(_))
    }

    /// Token requests made so far (OAuth2), else 0.
    pub fn token_requests(&self) -> u64 {
        match self {
            Authorizer::OAuth2(cache) => cache.requests.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The header for the next request.
    pub async fn credential(
        &self,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<Credential, AuthError> {
        match self {
            Authorizer::None => Ok(Credential {
                header: None,
                generation: 0,
            }),
            Authorizer::Bearer(token) => {
                let header = sensitive(format!("Bearer {}", token.expose()?), "the bearer token")?;
                Ok(Credential {
                    header: Some(header),
                    generation: 0,
                })
            }
            Authorizer::OAuth2(cache) => cache.get(transport, timeout, None).await,
        }
    }

    /// After a `401` to a request that carried token `generation`: a fresh token.
    pub async fn refresh_after_401(
        &self,
        generation: u64,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<Credential, AuthError> {
        match self {
            Authorizer::OAuth2(cache) => cache.get(transport, timeout, Some(generation)).await,
            _ => self.credential(transport, timeout).await,
        }
    }
}

/// The configured OAuth2 grant.
enum Grant {
    Password {
        client_id: String,
        client_secret: Secret,
        username: String,
        password: Secret,
    },
    ClientCredentials {
        client_id: String,
        client_secret: Secret,
        basic: bool,
    },
}

struct Token {
    header: HeaderValue,
    generation: u64,
    refresh_at: Instant,
}

#[derive(Default)]
struct TokenState {
    current: Option<Token>,
    /// Kept past the access token's expiry.
    refresh_token: Option<String>,
    /// The error of the latest fetch, when it failed.
    last_error: Option<String>,
    generation: u64,
}

/// One destination's OAuth2 token cache (single flight).
pub struct TokenCache {
    token_url: Uri,
    grant: Grant,
    state: tokio::sync::Mutex<TokenState>,
    /// Fetches completed; read before waiting for the lock to detect a fetch that ran meanwhile.
    completed: AtomicU64,
    /// HTTP requests made to the token endpoint.
    requests: AtomicU64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("token_url", &self.token_url)
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

enum FetchKind<'a> {
    Grant,
    Refresh(&'a str),
}

impl TokenCache {
    fn new(access_token_url: &str, grant: Grant) -> Result<Self, SettingsError> {
        let token_url: Uri = access_token_url
            .parse()
            .map_err(|_| SettingsError::InvalidTokenUrl)?;
        if !matches!(token_url.scheme_str(), Some("http" | "https")) || token_url.host().is_none() {
            return Err(SettingsError::TokenUrlNotHttp);
        }
        Ok(TokenCache {
            token_url,
            grant,
            state: tokio::sync::Mutex::new(TokenState::default()),
            completed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    /// A valid token; with `rejected`, one newer than that generation.
    async fn get(
        &self,
        transport: &Transport,
        timeout: Duration,
        rejected: Option<u64>,
    ) -> Result<Credential, AuthError> {
        let seen = self.completed.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        if let Some(token) = &state.current {
            let usable = match rejected {
                Some(generation) => token.generation != generation,
                None => Instant::now() < token.refresh_at,
            };
            if usable {
                return Ok(Credential {
                    header: Some(token.header.clone()),
                    generation: token.generation,
                });
            }
        }
        if self.completed.load(Ordering::Acquire) != seen {
            // A fetch finished while this caller waited: share its result.
            if let Some(error) = &state.last_error {
                return Err(AuthError::TokenFetch(error.clone()));
            }
            if let Some(token) = &state.current {
                return Ok(Credential {
                    header: Some(token.header.clone()),
                    generation: token.generation,
                });
            }
        }
        if rejected.is_some() {
            state.current = None;
        }
        let result = self.fetch(&mut state, transport, timeout).await;
        self.completed.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Fetches with the lock held: refresh first when possible, else the configured grant.
    async fn fetch(
        &self,
        state: &mut TokenState,
        transport: &Transport,
        timeout: Duration,
    ) -> Result<Credential, AuthError> {
        state.generation += 1;
        let generation = state.generation;
        let mut outcome = None;
        if let Some(refresh_token) = state.refresh_token.take() {
            match self
                .request(transport, timeout, FetchKind::Refresh(&refresh_token))
                .await
            {
                Ok(parsed) => outcome = Some(Ok(parsed)),
                Err(error) => {
                    tracing::debug!(token_url = %self.token_url, %error, "refresh_token grant failed; requesting a new token");
                }
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None => self.request(transport, timeout, FetchKind::Grant).await,
        };
        match outcome {
            Ok(parsed) => {
                let lifetime = parsed.expires_in.unwrap_or(DEFAULT_EXPIRES_IN);
                let refresh_at = Instant::now() + lifetime.saturating_sub(refresh_margin(lifetime));
                state.refresh_token = parsed.refresh_token;
                state.last_error = None;
                state.current = Some(Token {
                    header: parsed.header.clone(),
                    generation,
                    refresh_at,
                });
                tracing::debug!(token_url = %self.token_url, generation, lifetime_s = lifetime.as_secs(), "fetched an access token");
                Ok(Credential {
                    header: Some(parsed.header),
                    generation,
                })
            }
            Err(error) => {
                state.current = None;
                let text = error.to_string();
                state.last_error = Some(match &error {
                    AuthError::TokenFetch(inner) => inner.clone(),
                    _ => text,
                });
                tracing::warn!(token_url = %self.token_url, %error, "access token request failed");
                Err(error)
            }
        }
    }

    async fn request(
        &self,
        transport: &Transport,
        timeout: Duration,
        kind: FetchKind<'_>,
    ) -> Result<ParsedToken, AuthError> {
        let request = self.token_request(kind)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let exchange = transport
            .send(request, timeout, MAX_TOKEN_RESPONSE)
            .await
            .map_err(|e| AuthError::TokenFetch(format!("token endpoint: {e}")))?;
        let status = exchange.response.status();
        if !status.is_success() {
            let code = oauth_error_code(&exchange.body)
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            return Err(AuthError::TokenFetch(format!(
                "token endpoint answered HTTP {}{code}",
                status.as_u16()
            )));
        }
        parse_token_response(&exchange.body)
    }

    /// The form POST to the token endpoint (RFC 6749 §4.3, §4.4, §6).
    fn token_request(&self, kind: FetchKind<'_>) -> Result<Request<Body>, AuthError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        let mut basic = None;
        match (&self.grant, &kind) {
            (
                Grant::Password {
                    client_id,
                    client_secret,
                    username,
                    password,
                },
                FetchKind::Grant,
            ) => {
                form.append_pair("grant_type", "password")
                    .append_pair("username", username)
                    .append_pair("password", &password.expose()?)
                    .append_pair("client_id", client_id)
                    .append_pair("client_secret", &client_secret.expose()?);
            }
            (
                Grant::Password {
                    client_id,
                    client_secret,
                    ..
                },
                FetchKind::Refresh(refresh_token),
            ) => {
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh_token)
                    .append_pair("client_id", client_id)
                    .append_pair("client_secret", &client_secret.expose()?);
            }
            (
                Grant::ClientCredentials {
                    client_id,
                    client_secret,
                    basic: use_basic,
                },
                kind,
            ) => {
                match kind {
                    FetchKind::Grant => form.append_pair("grant_type", "client_credentials"),
                    FetchKind::Refresh(refresh_token) => form
                        .append_pair("grant_type", "refresh_token")
                        .append_pair("refresh_token", refresh_token),
                };
                if *use_basic {
                    basic = Some(sensitive(
                        basic_authorization(client_id, &client_secret.expose()?),
                        "the client secret",
                    )?);
                } else {
                    form.append_pair("client_id", client_id)
                        .append_pair("client_secret", &client_secret.expose()?);
                }
            }
        }
        let body = Bytes::from(form.finish());
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(self.token_url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if let Some(basic) = basic {
            builder = builder.header(AUTHORIZATION, basic);
        }
        builder
            .body(Body::new(body))
            .map_err(|_| AuthError::TokenFetch("cannot build the token request".into()))
    }
}

struct ParsedToken {
    header: HeaderValue,
    expires_in: Option<Duration>,
    refresh_token: Option<String>,
}

fn parse_token_response(body: &[u8]) -> Result<ParsedToken, AuthError> {
    let fail = |what: &str| AuthError::TokenFetch(format!("token endpoint response {what}"));
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| fail("is not JSON"))?;
    let object = value
        .as_object()
        .ok_or_else(|| fail("is not a JSON object"))?;
    let token = match object.get("access_token") {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t,
        _ => return Err(fail("has no access_token")),
    };
    let expires_in = match object.get("expires_in") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64),
        Some(_) => None,
    };
    // Keep expiries sane (a year at most) so `Instant` arithmetic cannot overflow.
    let expires_in = expires_in.map(|d| d.min(Duration::from_secs(365 * 24 * 3600)));
    let refresh_token = match object.get("refresh_token") {
        Some(serde_json::Value::String(t)) if !t.is_empty() => Some(t.clone()),
        _ => None,
    };
    // The token type is always sent as `Bearer` (the only type RFC 6750 defines for this use).
    let header = sensitive(format!("Bearer {token}"), "the access token")?;
    Ok(ParsedToken {
        header,
        expires_in,
        refresh_token,
    })
}

/// The OAuth2 `error` code of an error response, when it is one (RFC 6749 §5.2 restricts its
/// characters, so it cannot carry a secret of ours verbatim beyond what the server chose).
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    let ok = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    ok.then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6749_basic_authorization_vector() {
        assert_eq!(
            basic_authorization(
                "1PpG/Q 1",
                "z/tZ9VwFZqApmIQ+ZH1I5pLk/uB4ud:X2/8bL+wfFTt1rFw="
            ),
            "Basic MVBwRyUyRlErMTp6JTJGdFo5VndGWnFBcG1JUSUyQlpIMUk1cExrJTJGdUI0dWQlM0FYMiUyRjhiTCUyQndmRlR0MXJGdyUzRA=="
        );
    }

    #[test]
    fn token_responses() {
        let t = parse_token_response(
            br#"{"access_token":"abc","expires_in":"3600","refresh_token":"r"}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(t.refresh_token.as_deref(), Some("r"));
        assert!(t.header.is_sensitive());
        let t = parse_token_response(br#"{"access_token":"abc","expires_in":60}"#)
            .ok()
            .unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(60)));
        let t = parse_token_response(br#"{"access_token":"abc"}"#)
            .ok()
            .unwrap();
        assert_eq!(t.expires_in, None);
        assert!(parse_token_response(br#"{"token":"abc"}"#).is_err());
        assert!(parse_token_response(b"access_token=abc").is_err());
        assert!(parse_token_response(b"{\"access_token\":\"a\\nb\"}").is_err());
    }

    #[test]
    fn margins() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(20)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn error_codes_are_filtered() {
        assert_eq!(
            oauth_error_code(br#"{"error":"invalid_client"}"#).as_deref(),
            Some("invalid_client")
        );
        assert_eq!(
            oauth_error_code(br#"{"error":"bad secret: hunter2"}"#),
            None
        );
        assert_eq!(oauth_error_code(b"nope"), None);
    }
}
