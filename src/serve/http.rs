//! The HTTP surface: `POST /mutate` on the admission port, `/healthz`, `/readyz` and `/metrics`
//! on the health port. Network I/O only through axum.
//!
//! The request flow reads top to bottom in `mutate`: check the content type and size, read the
//! body within the apiserver's deadline, parse the review, run the pure core on the policy in
//! force, answer. [`router`] is the whole admission surface and is tested in-process.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::BodyExt as _;
use tracing::{debug, info, info_span, warn};

use super::{
    app::App,
    metrics::{self, Kind, Operation, Outcome, Reason},
};
use crate::{
    core::{
        admission::{self, MUTATE_PATH, ReviewError},
        mutate::{ObjectKind, Verdict},
    },
    duration::parse_go_duration,
    logging::Escaped,
};

/// The longest deadline a request may ask for: the apiserver's own maximum `timeoutSeconds`. A
/// client's `?timeout=1000h` must not hold a connection and its budget for longer.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);

/// The admission surface: `POST /mutate`, with JSON errors for everything else.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(app)
}

/// The plain-HTTP surface for the kubelet and Prometheus.
pub fn health_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.not_ready() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn method_not_allowed(State(app): State<Arc<App>>, req: Request) -> Response {
    let message = format!("{} is not allowed here; use POST", req.method());
    let (_, body) = req.into_parts();
    let response = reject(
        &app,
        Instant::now(),
        &Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Reason::MethodNotAllowed,
            message,
        ),
    );
    after_response(response, body)
}

async fn not_found(State(app): State<Arc<App>>, req: Request) -> Response {
    let message = format!(
        "no such path {}; admission is served at {MUTATE_PATH}",
        req.uri().path()
    );
    let (_, body) = req.into_parts();
    let response = reject(
        &app,
        Instant::now(),
        &Rejection::new(StatusCode::NOT_FOUND, Reason::NotFound, message),
    );
    after_response(response, body)
}

/// Keeps the request body until the response has been sent, then drops it.
///
/// Over HTTP/2, a request body dropped unread while the response is still to be sent makes hyper
/// (h2) reset the stream with `CANCEL`, and the client sees a stream error instead of the 413 or
/// 415 it was answered. Dropped once the response is complete, it becomes `RST_STREAM(NO_ERROR)`,
/// which RFC 9113 section 8.1 defines as "the response is complete; stop sending the request".
fn after_response(response: Response, request_body: Body) -> Response {
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        Body::new(AfterResponse {
            response: body,
            _request: request_body,
        }),
    )
}

struct AfterResponse {
    response: Body,
    _request: Body,
}

impl hyper::body::Body for AfterResponse {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().response).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.response.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.response.size_hint()
    }
}

/// A request answered with a 4xx: its status, a reason for metrics, and a message for people.
struct Rejection {
    code: StatusCode,
    reason: Reason,
    message: String,
}

impl Rejection {
    fn new(code: StatusCode, reason: Reason, message: String) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }
}

/// A 4xx with a JSON body shaped like a Kubernetes `Status`, which the apiserver logs verbatim.
fn reject(app: &App, started: Instant, r: &Rejection) -> Response {
    app.metrics.bad_request(r.reason, started.elapsed());
    warn!(status = r.code.as_u16(), reason = r.reason.as_str(), detail = %Escaped(&r.message), "Rejected a request");
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": r.code.as_u16(), "reason": r.reason.as_str(), "message": r.message,
    });
    (
        r.code,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The apiserver sends its own deadline as `?timeout=10s` (a Go duration); it is capped at
/// [`MAX_TIMEOUT`].
fn timeout_param(query: Option<&str>) -> Option<Duration> {
    let value = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))?;
    parse_go_duration(value)
        .filter(|d| !d.is_zero())
        .map(|d| d.min(MAX_TIMEOUT))
}

/// `POST /mutate`: reserve the body's bytes, read it, run the core on the policy in force,
/// answer.
async fn mutate(State(app): State<Arc<App>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, mut body) = req.into_parts();
    let response = review(&app, &parts, &mut body, started).await;
    after_response(response, body)
}

async fn review(
    app: &App,
    parts: &axum::http::request::Parts,
    body: &mut Body,
    started: Instant,
) -> Response {
    // The reservation is held until the answer is built: the body and what is parsed from it.
    let (bytes, _reserved) = match read_body(app, parts, body).await {
        Ok(read) => read,
        Err(rejection) => return reject(app, started, &rejection),
    };
    let Some(_slot) = app.budget.parse_slot().await else {
        return reject(app, started, &overloaded());
    };
    match admission::parse(&bytes) {
        Ok(request) => answer(app, &request, started),
        Err(e) => reject(
            app,
            started,
            &Rejection::new(StatusCode::BAD_REQUEST, reason(&e), e.to_string()),
        ),
    }
}

fn overloaded() -> Rejection {
    Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Reason::Overloaded,
        "the request bytes in flight are at --max-inflight-bytes; retry".into(),
    )
}

/// Checks the content type and size, reserves the body's bytes in the budget, and reads the
/// body, all within the apiserver's deadline.
async fn read_body(
    app: &App,
    parts: &axum::http::request::Parts,
    body: &mut Body,
) -> Result<(Bytes, crate::serve::budget::Reserved), Rejection> {
    if !is_json(&parts.headers) {
        let got = parts
            .headers
            .get(header::CONTENT_TYPE)
            .map_or("none".into(), |v| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            });
        let message = format!("Content-Type must be application/json, got {got}");
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::UnsupportedMediaType,
            message,
        ));
    }
    let limit = app.limits.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > limit as u64) {
        // Refused before a byte of the body is read.
        let message = format!("body of {len} bytes is over the limit of {limit} bytes");
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BodyTooLarge,
            message,
        ));
    }
    let declared = declared.and_then(|n| usize::try_from(n).ok());
    let deadline = timeout_param(parts.uri.query())
        .unwrap_or(app.limits.default_timeout)
        .min(MAX_TIMEOUT);
    let until = tokio::time::Instant::now() + deadline;
    let Ok(Some(reserved)) = tokio::time::timeout_at(until, app.budget.reserve(declared)).await
    else {
        return Err(overloaded());
    };
    let cap = reserved.body_bytes;
    let read = tokio::time::timeout_at(until, async {
        // A body usually arrives as one frame, a slice of the connection's read buffer: it is
        // kept as it is, and copied into one buffer only when a second frame follows.
        let mut one: Option<Bytes> = None;
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    Reason::BadShape,
                    format!("cannot read the body: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let read = one.as_ref().map_or(bytes.len(), Bytes::len);
            if read.saturating_add(data.len()) > cap {
                let message = if cap < limit {
                    format!("body is longer than its Content-Length of {cap} bytes")
                } else {
                    format!("body is over the limit of {limit} bytes")
                };
                return Err(Rejection::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Reason::BodyTooLarge,
                    message,
                ));
            }
            if one.is_none() && bytes.is_empty() {
                one = Some(data);
                continue;
            }
            if let Some(first) = one.take() {
                bytes.reserve_exact(declared.unwrap_or(0).max(first.len()).min(cap));
                bytes.extend_from_slice(&first);
            }
            // Grow at most to the reservation, never to twice a large body.
            if bytes.capacity() - bytes.len() < data.len() {
                let want = (bytes.capacity() * 2)
                    .max(bytes.len() + data.len())
                    .min(cap);
                bytes.reserve_exact(want - bytes.len());
            }
            bytes.extend_from_slice(&data);
        }
        Ok(one.unwrap_or_else(|| Bytes::from(bytes)))
    })
    .await;
    match read {
        Ok(Ok(bytes)) => Ok((bytes, reserved)),
        Ok(Err(rejection)) => Err(rejection),
        Err(_) => {
            let message = format!("the body did not arrive within {deadline:?}");
            Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                Reason::BodyTimeout,
                message,
            ))
        }
    }
}

/// Runs the core in one span per review, counts, logs and answers 200.
fn answer(app: &App, request: &admission::Request, started: Instant) -> Response {
    // Every string from the request is escaped: a uid or name with a newline or an ANSI escape
    // must not write a second, forged line into a plain log. `object_name`, because JSON logs put
    // the span's own `name` ("review") beside its fields.
    let span = info_span!(
        "review",
        uid = %Escaped(&request.uid),
        operation = request.operation_str(),
        kind = %Escaped(&request.kind.kind),
        namespace = %Escaped(request.namespace.as_deref().unwrap_or("")),
        object_name = %Escaped(&request.name),
        dry_run = request.dry_run,
        ops = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    );
    let _entered = span.enter();
    let policy = app.policy.current();
    let outcome = admission::decide(&policy, app.view(), request);
    let body = admission::response(&request.uid, &outcome);

    let elapsed = started.elapsed();
    let kind = ObjectKind::from_gvk(
        &request.kind.group,
        &request.kind.version,
        &request.kind.kind,
    );
    app.metrics.request(
        Kind::from(kind),
        Operation::from(&request.operation),
        Outcome::from(outcome.verdict),
        elapsed,
    );
    app.metrics
        .answered(outcome.ops.len(), outcome.warnings.len());
    let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    // Object contents are never logged, at any level: env values in them may be secrets.
    let verdict = outcome.verdict.as_str();
    match outcome.verdict {
        Verdict::Patched => info!(
            verdict,
            ops = outcome.ops.len(),
            warnings = outcome.warnings.len(),
            duration_us,
            "Mutated"
        ),
        Verdict::Unfixable => warn!(
            verdict, warnings = ?outcome.warnings, duration_us, "Allowed unchanged: cannot fix"
        ),
        Verdict::Skipped | Verdict::Unchanged => debug!(verdict, duration_us, "Allowed unchanged"),
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from(body),
    )
        .into_response()
}

/// The metric and `Status` reason for a body that is not a review the webhook can answer.
fn reason(e: &ReviewError) -> Reason {
    match e {
        ReviewError::NotJson(_) => Reason::NotJson,
        ReviewError::Shape(_) => Reason::BadShape,
        ReviewError::ApiVersion(_) => Reason::BadApiVersion,
        ReviewError::Kind(_) => Reason::BadKind,
        ReviewError::NoRequest => Reason::NoRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_parameter() {
        assert_eq!(
            timeout_param(Some("a=b&timeout=5s")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(timeout_param(Some("timeout=0s")), None);
        assert_eq!(timeout_param(Some("timeout=1000h")), Some(MAX_TIMEOUT));
        assert_eq!(
            timeout_param(Some("timeout=18000000000000000000s18000000000000000000s")),
            None
        );
        assert_eq!(timeout_param(None), None);
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
    }
}
