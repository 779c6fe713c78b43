//! [`ApiError`]: the typed error of the API and the backend, turned into a status and a JSON
//! body `{"error": "..."}` only at the edge ([`ApiError::into_response`]).

use std::fmt;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::config::ConfigError;

/// What went wrong with a request. Messages are shown to the client: they must never hold a
/// secret, a request body or a header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Status 400; `index` is the 0-based index of the first bad event of an ingest request,
    /// added to the JSON body when present.
    BadRequest {
        message: String,
        index: Option<usize>,
    },
    /// 401: missing or wrong `Authorization`.
    Unauthorized,
    /// 404, with what was not found.
    NotFound(String),
    /// 409, e.g. deleting an object that another still references.
    Conflict(String),
    /// 413: the body is larger than `limit` bytes. The response closes the connection.
    PayloadTooLarge { limit: u64 },
    /// 415, with the content type that was refused.
    UnsupportedMediaType(String),
    /// 503 with `Retry-After: retry_after_s`.
    Unavailable { retry_after_s: u64, message: String },
    /// Status 405.
    MethodNotAllowed,
    /// Status 500; the message is shown: keep it free of secrets.
    Internal(String),
}

impl ApiError {
    /// A 400 without an event index.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            index: None,
        }
    }

    /// A 400 naming the 0-based index of the first bad event.
    pub fn bad_event(index: usize, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            index: Some(index),
        }
    }

    /// The 503 answered while the service shuts down.
    pub fn shutting_down() -> Self {
        ApiError::Unavailable {
            retry_after_s: 5,
            message: "the service is shutting down".into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `{"error": message}`, plus `"index"` for a bad event.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let ApiError::BadRequest {
            index: Some(index), ..
        } = self
        {
            body["index"] = serde_json::json!(index);
        }
        body
    }

    /// The response: status, JSON body, and `Retry-After` (503) or `Connection: close` (413,
    /// whose body was not read).
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = json_response(self.status(), &self.to_json());
        let headers = response.headers_mut();
        match &self {
            ApiError::Unavailable { retry_after_s, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::PayloadTooLarge { .. } => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::BadRequest { message, .. } => f.write_str(message),
            ApiError::Unauthorized => f.write_str("unauthorized"),
            ApiError::NotFound(what) => write!(f, "not found: {what}"),
            ApiError::Conflict(message) => f.write_str(message),
            ApiError::PayloadTooLarge { limit } => {
                write!(f, "request body larger than the limit of {limit} bytes")
            }
            ApiError::UnsupportedMediaType(ct) => write!(f, "unsupported content type: {ct}"),
            ApiError::Unavailable { message, .. } => f.write_str(message),
            ApiError::MethodNotAllowed => f.write_str("method not allowed"),
            ApiError::Internal(message) => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// An invalid object: 400 naming the field path (`rule: audience "x": column 7: …`).
impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// A JSON response with `Content-Type: application/json`.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let text = body.to_string();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An empty response (204).
pub(crate) fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_statuses() {
        let e = ApiError::bad_event(3, "not JSON");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_json(),
            serde_json::json!({"error": "not JSON", "index": 3})
        );
        assert_eq!(
            ApiError::bad_request("x").to_json(),
            serde_json::json!({"error": "x"})
        );
        let r = ApiError::shutting_down().into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "5");
        let r = ApiError::PayloadTooLarge { limit: 10 }.into_response();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.headers()[CONNECTION], "close");
    }

    #[test]
    fn config_errors_name_the_path() {
        let e: ApiError = ConfigError::new("rule", "bad").into();
        assert_eq!(e.to_json()["error"], "rule: bad");
    }
}
