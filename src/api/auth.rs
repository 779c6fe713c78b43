//! The API token: every route but `/healthz` needs exactly `Authorization: Bearer <token>` when
//! one is configured. The token is never logged, echoed or `Debug`-printed, and is compared in
//! constant time.

use std::fmt;

use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;

use crate::secret::{MissingSecret, Secret};

use super::ApiError;

/// The configured API token. Prints as `ApiToken(<redacted>)`.
#[derive(Clone)]
pub struct ApiToken {
    /// The whole expected header value: `Bearer <token>`.
    expected: Vec<u8>,
}

impl ApiToken {
    /// `None` for an empty token (no client could send it usefully; configure none instead).
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into();
        if token.is_empty() {
            return None;
        }
        Some(ApiToken {
            expected: format!("Bearer {token}").into_bytes(),
        })
    }

    /// The token from a configured secret (`--api-token`, `STREAMDEST_API_TOKEN`, or `{"env":…}`);
    /// `Ok(None)` when it is empty.
    pub fn from_secret(secret: &Secret) -> Result<Option<Self>, MissingSecret> {
        Ok(Self::new(secret.expose()?))
    }

    /// Whether the request carries exactly one `Authorization` header equal to `Bearer <token>`.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        constant_time_eq(value.as_bytes(), &self.expected)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// `Err(Unauthorized)` unless `token` is `None` or the headers carry it.
pub(crate) fn check(token: Option<&ApiToken>, headers: &HeaderMap) -> Result<(), ApiError> {
    match token {
        Some(token) if !token.allows(headers) => Err(ApiError::Unauthorized),
        _ => Ok(()),
    }
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!*e);
        diff |= std::hint::black_box(g ^ e);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn exact_bearer_only() {
        let t = ApiToken::new("s3cret-canary").unwrap();
        assert!(t.allows(&headers(&["Bearer s3cret-canary"])));
        assert!(!t.allows(&headers(&[])));
        assert!(!t.allows(&headers(&["Bearer s3cret-canar"])));
        assert!(!t.allows(&headers(&["Bearer s3cret-canaryy"])));
        assert!(!t.allows(&headers(&["bearer s3cret-canary"])));
        assert!(!t.allows(&headers(&["Bearer  s3cret-canary"])));
        assert!(!t.allows(&headers(&["s3cret-canary"])));
        assert!(!t.allows(&headers(&["Bearer s3cret-canary", "Bearer s3cret-canary"])));
        assert!(ApiToken::new("").is_none());
        assert!(check(None, &headers(&[])).is_ok());
        assert_eq!(check(Some(&t), &headers(&[])), Err(ApiError::Unauthorized));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = ApiToken::new("s3cret-canary").unwrap();
        assert!(!format!("{t:?}").contains("canary"));
        let o = super::super::ApiOptions {
            api_token: Some(t),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("canary"));
    }
}
