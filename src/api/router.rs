//! Routes: a request → checks (auth, accepting, method, id, body) → one backend call → a
//! response. See the table in the [module docs](super).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::body::{self, EventsFormat};
use super::error::{empty_response, json_response};
use super::{ApiError, ApiOptions, Backend, ObjectKind, auth, metrics};

/// What the server shares between connections.
pub(crate) struct ApiState {
    pub backend: Arc<dyn Backend>,
    pub options: ApiOptions,
}

/// The routes, ids not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Metrics,
    Events,
    Object(ObjectKind, &'a str),
    Members(&'a str),
    DeadLetters(&'a str),
    Redrive(&'a str),
    DestinationMetrics(&'a str),
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        Some(match segments.as_slice() {
            ["healthz"] => Route::Healthz,
            ["metrics"] => Route::Metrics,
            ["v1", "events"] => Route::Events,
            ["v1", kind, id] => Route::Object(ObjectKind::from_route(kind)?, id),
            ["v1", "audiences", id, "members"] => Route::Members(id),
            ["v1", "destinations", id, "dead-letters"] => Route::DeadLetters(id),
            ["v1", "destinations", id, "dead-letters", "redrive"] => Route::Redrive(id),
            ["v1", "destinations", id, "metrics"] => Route::DestinationMetrics(id),
            _ => return None,
        })
    }

    /// The methods the route answers, for 405's `Allow`.
    fn allow(&self) -> &'static str {
        match self {
            Route::Healthz | Route::Metrics | Route::DeadLetters(_) => "GET",
            Route::DestinationMetrics(_) => "GET",
            Route::Events | Route::Members(_) | Route::Redrive(_) => "POST",
            Route::Object(..) => "GET, PUT, DELETE",
        }
    }

    fn id(&self) -> Option<&'a str> {
        match *self {
            Route::Healthz | Route::Metrics | Route::Events => None,
            Route::Object(_, id)
            | Route::Members(id)
            | Route::DeadLetters(id)
            | Route::Redrive(id)
            | Route::DestinationMetrics(id) => Some(id),
        }
    }
}

/// Answers one request, and logs it (debug: method, path, status, duration).
pub(crate) async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = match respond(&state, req).await {
        Ok(response) => response,
        Err((error, allow)) => {
            let mut response = error.into_response();
            if let Some(allow) = allow {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            response
        }
    };
    tracing::debug!(
        target: "streamdest::api",
        %method,
        path = %path,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

type Failure = (ApiError, Option<&'static str>);

fn plain(e: ApiError) -> Failure {
    (e, None)
}

async fn respond(
    state: &ApiState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Failure> {
    let path = req.uri().path().to_string();
    let route = Route::parse(&path);
    let method = req.method().clone();

    if route == Some(Route::Healthz) {
        if method != Method::GET {
            return Err((ApiError::MethodNotAllowed, Some("GET")));
        }
        return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})));
    }
    // Auth first: an unauthenticated request learns nothing and calls nothing.
    auth::check(state.options.api_token.as_ref(), req.headers()).map_err(plain)?;
    let backend = &*state.backend;
    if !backend.accepting() {
        return Err(plain(ApiError::shutting_down()));
    }
    let Some(route) = route else {
        return Err(plain(ApiError::NotFound(format!("no route {path}"))));
    };
    let allowed = matches!(
        (&route, &method),
        (
            Route::Metrics | Route::DeadLetters(_) | Route::DestinationMetrics(_),
            &Method::GET
        ) | (
            Route::Events | Route::Members(_) | Route::Redrive(_),
            &Method::POST
        ) | (
            Route::Object(..),
            &Method::GET | &Method::PUT | &Method::DELETE
        )
    );
    if !allowed {
        return Err((ApiError::MethodNotAllowed, Some(route.allow())));
    }
    let id = route.id().map(body::decode_id).transpose().map_err(plain)?;
    let id = id.as_deref().unwrap_or("");

    let limit = state.options.max_body;
    let media_type = body::media_type(req.headers()).map_err(plain)?;
    let media_type = media_type.as_deref();
    // The body of a request whose route takes one: its length is checked before it is polled.
    let read = |req: Request<Incoming>| async move {
        body::check_content_length(req.headers(), limit)?;
        body::read_body(req.into_body(), limit).await
    };

    let result: Result<Response<Full<Bytes>>, ApiError> = async {
        match route {
            Route::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
            Route::Metrics => {
                let openmetrics = req
                    .headers()
                    .get_all(ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                let (content_type, text) = metrics::encode(backend.metrics(), openmetrics)
                    .map_err(|_| ApiError::Internal("could not encode the metrics".into()))?;
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                Ok(response)
            }
            Route::Events => {
                let format = EventsFormat::of(media_type)?;
                let bytes = read(req).await?;
                let events = body::parse_events(&bytes, format)?;
                let accepted = backend.ingest(events).await?;
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({ "accepted": accepted }),
                ))
            }
            Route::Object(kind, _) => match method {
                Method::GET => Ok(json_response(
                    StatusCode::OK,
                    &backend.get_object(kind, id)?,
                )),
                Method::PUT => {
                    if let Some(other) = media_type.filter(|m| *m != "application/json") {
                        return Err(ApiError::UnsupportedMediaType(other.to_string()));
                    }
                    let bytes = read(req).await?;
                    let object = body::parse_object(media_type, &bytes)?;
                    let (created, object) = backend.put_object(kind, id, object).await?;
                    let status = if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    Ok(json_response(status, &object))
                }
                _ => {
                    backend.delete_object(kind, id).await?;
                    Ok(empty_response(StatusCode::NO_CONTENT))
                }
            },
            Route::Members(_) => {
                if let Some(other) =
                    media_type.filter(|m| !matches!(*m, "text/csv" | "application/csv"))
                {
                    return Err(ApiError::UnsupportedMediaType(other.to_string()));
                }
                let bytes = read(req).await?;
                let members = body::parse_members_csv(media_type, &bytes)?;
                let accepted = backend.add_members(id, members).await?;
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({ "accepted": accepted }),
                ))
            }
            Route::DeadLetters(_) => Ok(json_response(
                StatusCode::OK,
                &serde_json::Value::Array(backend.dead_letters(id)?),
            )),
            Route::Redrive(_) => Ok(json_response(StatusCode::OK, &backend.redrive(id).await?)),
            Route::DestinationMetrics(_) => Ok(json_response(
                StatusCode::OK,
                &backend.destination_metrics(id)?,
            )),
        }
    }
    .await;
    result.map_err(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/healthz"), Some(Route::Healthz));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::parse("/v1/events"), Some(Route::Events));
        assert_eq!(
            Route::parse("/v1/merge-policies/p1"),
            Some(Route::Object(ObjectKind::MergePolicy, "p1"))
        );
        assert_eq!(
            Route::parse("/v1/audiences/"),
            Some(Route::Object(ObjectKind::Audience, ""))
        );
        assert_eq!(
            Route::parse("/v1/audiences/a/members"),
            Some(Route::Members("a"))
        );
        assert_eq!(
            Route::parse("/v1/destinations/d/dead-letters/redrive"),
            Some(Route::Redrive("d"))
        );
        assert_eq!(
            Route::parse("/v1/destinations/d/metrics"),
            Some(Route::DestinationMetrics("d"))
        );
        assert_eq!(Route::parse("/v1/audiences"), None);
        assert_eq!(Route::parse("/v1/widgets/x"), None);
        assert_eq!(Route::parse("/v1/audiences/a/dead-letters"), None);
        assert_eq!(Route::parse("/healthz/"), None);
        assert_eq!(Route::parse(""), None);
    }
}
