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
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
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
};

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
    if app.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
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
    reject(
        &app,
        Instant::now(),
        &Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Reason::MethodNotAllowed,
            message,
        ),
    )
}

async fn not_found(State(app): State<Arc<App>>, req: Request) -> Response {
    let message = format!(
        "no such path {}; admission is served at {MUTATE_PATH}",
        req.uri().path()
    );
    reject(
        &app,
        Instant::now(),
        &Rejection::new(StatusCode::NOT_FOUND, Reason::NotFound, message),
    )
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
    warn!(status = r.code.as_u16(), reason = r.reason.as_str(), detail = %r.message, "Rejected a request");
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

/// The apiserver sends its own deadline as `?timeout=10s` (a Go duration).
fn timeout_param(query: Option<&str>) -> Option<Duration> {
    let value = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))?;
    parse_go_duration(value).filter(|d| !d.is_zero())
}

/// `POST /mutate`: read the review, run the core on the policy in force, answer.
async fn mutate(State(app): State<Arc<App>>, req: Request) -> Response {
    let started = Instant::now();
    match read_review(&app, req).await {
        Ok(request) => answer(&app, &request, started),
        Err(rejection) => reject(&app, started, &rejection),
    }
}

/// Checks the content type and size, reads the body within the apiserver's deadline, and
/// parses the `AdmissionReview`.
async fn read_review(app: &App, req: Request) -> Result<admission::Request, Rejection> {
    let (parts, body) = req.into_parts();
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
    let deadline = timeout_param(parts.uri.query()).unwrap_or(app.limits.default_timeout);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            return Err(
                if inner
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    let message = format!("body is over the limit of {limit} bytes");
                    Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, Reason::BodyTooLarge, message)
                } else {
                    let message = format!("cannot read the body: {inner}");
                    Rejection::new(StatusCode::BAD_REQUEST, Reason::BadShape, message)
                },
            );
        }
        Err(_) => {
            let message = format!("the body did not arrive within {deadline:?}");
            return Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                Reason::BodyTimeout,
                message,
            ));
        }
    };
    admission::parse(&bytes)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, reason(&e), e.to_string()))
}

/// Runs the core in one span per review, counts, logs and answers 200.
fn answer(app: &App, request: &admission::Request, started: Instant) -> Response {
    let span = info_span!(
        "review",
        uid = %request.uid,
        operation = request.operation_str(),
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        dry_run = request.dry_run,
        ops = tracing::field::Empty,
        duration_us = tracing::field::Empty,
    );
    let _entered = span.enter();
    let policy = app.policy.current();
    let outcome = admission::decide(&policy, &crate::core::cluster::Off, request);
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
