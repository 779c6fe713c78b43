//! Request building: one destination's fixed parts (URL, custom headers), validated once,
//! plus each export's payload, `Idempotency-Key` and `Authorization`.
//!
//! Header order: the custom headers first; then `Content-Type: application/json` unless a
//! custom header set a content type; then `Idempotency-Key` (always ours, replacing any
//! custom one); then `Authorization` from the auth type (replacing a custom one, which the
//! configuration only allows with auth `none`).

use bytes::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};

use super::error::{DeliveryError, SettingsError};
use super::transport::Body;

/// The `Idempotency-Key` header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A destination's request, less what varies per export.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    uri: Uri,
    headers: HeaderMap,
}

impl RequestTemplate {
    /// Validates the URL (absolute `http`/`https`) and the headers. Errors never quote header
    /// values (they may hold credentials); they name the header.
    pub fn new(request_url: &str, headers: &[(String, String)]) -> Result<Self, SettingsError> {
        let uri: Uri = request_url.parse().map_err(|_| SettingsError::InvalidUrl)?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(SettingsError::NotHttpUrl);
        }
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let header_name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| SettingsError::InvalidHeaderName(name.clone()))?;
            let mut header_value = HeaderValue::from_str(value.trim())
                .map_err(|_| SettingsError::InvalidHeaderValue(name.clone()))?;
            if header_name == AUTHORIZATION {
                header_value.set_sensitive(true);
            }
            map.append(header_name, header_value);
        }
        if !map.contains_key(CONTENT_TYPE) {
            map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Ok(RequestTemplate { uri, headers: map })
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request for one attempt.
    pub fn build(
        &self,
        idempotency_key: &str,
        payload: &Bytes,
        authorization: Option<&HeaderValue>,
    ) -> Result<Request<Body>, DeliveryError> {
        let key = HeaderValue::from_str(idempotency_key)
            .map_err(|_| DeliveryError::InvalidIdempotencyKey)?;
        let mut request = Request::new(Body::new(payload.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(IDEMPOTENCY_KEY.clone(), key);
        if let Some(auth) = authorization {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_post_with_headers() {
        let t = RequestTemplate::new(
            "http://h:1/p?a=1&b=2",
            &[("x-a".into(), " 1 ".into()), ("x-a".into(), "2".into())],
        )
        .unwrap();
        let auth = HeaderValue::from_static("Bearer t");
        let r = t
            .build("k1", &Bytes::from_static(b"{}"), Some(&auth))
            .unwrap();
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri().to_string(), "http://h:1/p?a=1&b=2");
        assert_eq!(
            r.headers().get_all("x-a").iter().collect::<Vec<_>>(),
            vec!["1", "2"]
        );
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["idempotency-key"], "k1");
        assert_eq!(r.headers()["authorization"], "Bearer t");
    }

    #[test]
    fn rejects_bad_input_without_quoting_values() {
        assert!(RequestTemplate::new("ftp://h/x", &[]).is_err());
        assert!(RequestTemplate::new("/relative", &[]).is_err());
        let e = RequestTemplate::new("http://h/", &[("x".into(), "sec\nret".into())]).unwrap_err();
        assert_eq!(e, SettingsError::InvalidHeaderValue("x".into()));
        assert!(!e.to_string().contains("sec"), "{e}");
        assert!(RequestTemplate::new("http://h/", &[("bad name".into(), "v".into())]).is_err());
        let t = RequestTemplate::new(
            "http://h/",
            &[("content-type".into(), "application/vnd.x+json".into())],
        )
        .unwrap();
        let r = t.build("k", &Bytes::new(), None).unwrap();
        assert_eq!(r.headers()["content-type"], "application/vnd.x+json");
        assert!(t.build("bad\nkey", &Bytes::new(), None).is_err());
    }
}
