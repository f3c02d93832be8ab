//! The admission router in-process (tower `oneshot`, no sockets): each class of bad request gets
//! its exact status code and `Status` body, and is counted by reason.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{sync::Arc, time::Duration};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::Request;
use outpost_webhook::{
    core::policy::Policy,
    pki,
    serve::{App, Limits, health_router, polled::Polled, router, tls::ServingCert},
};
use serde_json::{Value, json};
use tower::ServiceExt as _;

fn app(max_body_bytes: usize) -> Arc<App> {
    let g = pki::generate(&["localhost".into()], 1).unwrap();
    let cert =
        ServingCert::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes(), "c", "k").unwrap();
    Arc::new(App::new(
        Polled::fixed(Policy::builtin().unwrap()),
        Arc::new(Polled::fixed(cert)),
        None,
        Limits {
            max_body_bytes,
            default_timeout: Duration::from_secs(10),
        },
    ))
}

async fn call(app: &Arc<App>, req: Request<Body>) -> (u16, Value) {
    let resp = router(Arc::clone(app)).oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/mutate?timeout=10s")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
           "code": code, "reason": reason, "message": message})
}

fn review(api_version: &str) -> Value {
    json!({"apiVersion": api_version, "kind": "AdmissionReview", "request": {
        "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Service"},
        "operation": "CREATE", "object": {"metadata": {"name": "x"}}}})
}

#[tokio::test]
async fn a_good_review_is_answered_200() {
    let app = app(1 << 20);
    let (code, body) = call(&app, post(review("admission.k8s.io/v1").to_string())).await;
    assert_eq!(code, 200);
    assert_eq!(body["response"], json!({"uid": "u", "allowed": true}));
}

/// Each class of bad request: what is sent, and the exact status and `Status` body answered.
#[tokio::test]
async fn bad_requests_get_their_status_and_a_status_body() {
    let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    let v1beta1 = review("admission.k8s.io/v1beta1").to_string();
    let cases: Vec<(&str, Request<Body>, u16, &str, &str)> = vec![
        (
            "truncated JSON",
            post("{\"apiVersion\": "),
            400,
            "not_json",
            "body is not valid JSON: EOF while parsing a value at line 1 column 15",
        ),
        (
            "invalid UTF-8",
            post(Bytes::from_static(b"{\"a\":\"\xff\"}")),
            400,
            "not_json",
            "body is not valid JSON: not UTF-8: invalid utf-8 sequence of 1 bytes from index 6",
        ),
        (
            "empty body",
            post(""),
            400,
            "not_json",
            "body is not valid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            "no request",
            post(no_request.to_string()),
            400,
            "no_request",
            "AdmissionReview has no request",
        ),
        (
            "v1beta1",
            post(v1beta1),
            400,
            "bad_api_version",
            "apiVersion \"admission.k8s.io/v1beta1\" is not supported; only admission.k8s.io/v1 is",
        ),
        (
            "GET",
            Request::get("/mutate").body(Body::empty()).unwrap(),
            405,
            "method_not_allowed",
            "GET is not allowed here; use POST",
        ),
        (
            "YAML",
            Request::post("/mutate")
                .header("content-type", "application/yaml")
                .body(Body::from("a: b"))
                .unwrap(),
            415,
            "unsupported_media_type",
            "Content-Type must be application/json, got application/yaml",
        ),
        (
            "unknown path",
            Request::post("/validate").body(Body::empty()).unwrap(),
            404,
            "not_found",
            "no such path /validate; admission is served at /mutate",
        ),
    ];
    let app = app(1 << 20);
    for (what, req, code, reason, message) in cases {
        let answered = call(&app, req).await;
        assert_eq!(answered, (code, status(code, reason, message)), "{what}");
    }
}

#[tokio::test]
async fn a_request_without_uid_is_400() {
    let app = app(1 << 20);
    let mut r = review("admission.k8s.io/v1");
    r["request"].as_object_mut().unwrap().remove("uid");
    let (code, body) = call(&app, post(r.to_string())).await;
    assert_eq!(code, 400);
    assert_eq!(body["reason"], "bad_shape");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("missing field `uid`"),
        "{body}"
    );
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_it_is_read() {
    let app = app(1024);
    // The body is never sent: the Content-Length alone decides.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let req = Request::post("/mutate")
        .header("content-type", "application/json")
        .header("content-length", "67108864")
        .body(Body::new(common::ChannelBody(rx)))
        .unwrap();
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), call(&app, req))
        .await
        .unwrap();
    assert_eq!(
        (code, body),
        (
            413,
            status(
                413,
                "body_too_large",
                "body of 67108864 bytes is over the limit of 1024 bytes"
            )
        )
    );
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413() {
    let app = app(1024);
    let (code, body) = call(&app, post(vec![b' '; 4096])).await;
    assert_eq!(
        (code, body),
        (
            413,
            status(
                413,
                "body_too_large",
                "body is over the limit of 1024 bytes"
            )
        )
    );
}

#[tokio::test]
async fn a_body_that_does_not_arrive_within_the_apiservers_timeout_is_408() {
    let app = app(1 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tx.send(Bytes::from_static(b"{\"apiVersion\":"))
        .await
        .unwrap();
    let req = Request::post("/mutate?timeout=200ms")
        .header("content-type", "application/json")
        .body(Body::new(common::ChannelBody(rx)))
        .unwrap();
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), call(&app, req))
        .await
        .unwrap();
    assert_eq!(
        (code, body),
        (
            408,
            status(408, "body_timeout", "the body did not arrive within 200ms")
        )
    );
    drop(tx);
}

#[tokio::test]
async fn rejections_are_counted_by_reason() {
    let app = app(1 << 20);
    call(&app, post("nope")).await;
    call(&app, Request::get("/mutate").body(Body::empty()).unwrap()).await;
    let resp = health_router(Arc::clone(&app))
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "outpost_webhook_bad_requests_total{reason=\"not_json\"} 1",
        "outpost_webhook_bad_requests_total{reason=\"method_not_allowed\"} 1",
        "outpost_webhook_admission_requests_total{kind=\"other\",operation=\"none\",outcome=\"rejected\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
}

#[tokio::test]
async fn readiness_fails_while_draining_and_health_stays_up() {
    let app = app(1 << 20);
    let get = |path: &'static str| {
        let app = Arc::clone(&app);
        async move {
            health_router(app)
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("/readyz").await, 200);
    app.start_draining();
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200);
}
