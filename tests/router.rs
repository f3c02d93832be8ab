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
            max_inflight_bytes: 32 << 20,
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

/// A body arrives in however many frames the connection cut it into; the review must not change
/// with the cut (the server keeps a single frame as it is and joins several).
#[tokio::test]
async fn a_body_cut_into_frames_is_answered_as_the_whole_body_is() {
    let app = app(1 << 20);
    let bytes = serde_json::to_vec(&common::golden_review("embedded-deployment-create")).unwrap();
    let (code, whole) = call(&app, post(bytes.clone())).await;
    assert_eq!(code, 200);
    assert!(whole["response"]["patch"].is_string(), "{whole}");
    let third = bytes.len() / 3;
    let cuts: [&[usize]; 4] = [&[0], &[1], &[third, 2 * third], &[0, 0, third, bytes.len()]];
    for cut in cuts {
        for declared in [true, false] {
            let mut frames = Vec::new();
            let mut from = 0;
            for &to in cut.iter().chain([&bytes.len()]) {
                frames.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
                    &bytes[from..to],
                )));
                from = to;
            }
            let mut req =
                Request::post("/mutate?timeout=10s").header("content-type", "application/json");
            if declared {
                req = req.header("content-length", bytes.len());
            }
            let req = req
                .body(Body::from_stream(futures::stream::iter(frames)))
                .unwrap();
            assert_eq!(
                call(&app, req).await,
                (200, whole.clone()),
                "cut at {cut:?}"
            );
        }
    }
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

/// A review whose uid and object name are `uid` and `name`.
fn review_named(uid: &str, name: &str) -> String {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Service"}, "name": name,
        "namespace": "authentik", "operation": "CREATE", "object": {"metadata": {"name": name}}}})
    .to_string()
}

#[tokio::test(start_paused = true)]
async fn a_timeout_over_thirty_seconds_is_capped_at_thirty() {
    let app = app(1 << 20);
    // The body never arrives; the client asks to be waited for 1000 hours.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let req = Request::post("/mutate?timeout=1000h")
        .header("content-type", "application/json")
        .body(Body::new(common::ChannelBody(rx)))
        .unwrap();
    let (code, body) = call(&app, req).await;
    assert_eq!(
        (code, body),
        (
            408,
            status(408, "body_timeout", "the body did not arrive within 30s")
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_large_body_waits_for_the_budget_and_a_small_one_does_not() {
    // Room for one largest body (1 MiB, held twice) beside the small lane.
    let max_body = 1 << 20;
    let g = pki::generate(&["localhost".into()], 1).unwrap();
    let cert =
        ServingCert::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes(), "c", "k").unwrap();
    let app = Arc::new(App::new(
        Polled::fixed(Policy::builtin().unwrap()),
        Arc::new(Polled::fixed(cert)),
        None,
        Limits {
            max_body_bytes: max_body,
            default_timeout: Duration::from_secs(10),
            max_inflight_bytes: outpost_webhook::serve::budget::minimum_budget(max_body),
        },
    ));
    // A client declares a largest body and sends part of it: its bytes are reserved.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tx.send(Bytes::from_static(b"{")).await.unwrap();
    let holding = Request::post("/mutate?timeout=30s")
        .header("content-type", "application/json")
        .header("content-length", max_body.to_string())
        .body(Body::new(common::ChannelBody(rx)))
        .unwrap();
    let held = tokio::spawn(router(Arc::clone(&app)).oneshot(holding));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // A second large body, whole, cannot be reserved before its deadline: 503, not read.
    let mut big = serde_json::from_str::<Value>(&review_named("u", "x")).unwrap();
    big["request"]["object"]["metadata"]["annotations"] =
        json!({"example.com/big": "x".repeat(512 << 10)});
    let mut req = post(big.to_string());
    *req.uri_mut() = "/mutate?timeout=2s".parse().unwrap();
    let (code, body) = call(&app, req).await;
    assert_eq!(
        (code, body),
        (
            503,
            status(
                503,
                "overloaded",
                "the request bytes in flight are at --max-inflight-bytes; retry"
            )
        )
    );
    // A small review, its length declared as the apiserver declares it, is answered meanwhile.
    let small = review_named("u", "x");
    let req = Request::post("/mutate?timeout=2s")
        .header("content-type", "application/json")
        .header("content-length", small.len().to_string())
        .body(Body::from(small))
        .unwrap();
    let (code, _) = call(&app, req).await;
    assert_eq!(code, 200);
    drop(tx);
    let _ = held.await;
}

#[tokio::test]
async fn an_object_with_too_many_kept_values_is_allowed_unpatched_with_a_warning() {
    let app = app(8 << 20);
    let mut r: Value = serde_json::from_str(&review_named("u", "x")).unwrap();
    r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let env: Vec<Value> = (0..50_000)
        .map(|i| json!({"name": format!("V{i}"), "value": "x"}))
        .collect();
    r["request"]["object"]["spec"] =
        json!({"template": {"spec": {"containers": [{"name": "proxy", "env": env}]}}});
    // Not built, and not refused either: a 4xx would make the apiserver refuse the write.
    let (code, body) = call(&app, post(r.to_string())).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["response"]["uid"], "u");
    assert_eq!(body["response"]["allowed"], true);
    assert!(body["response"].get("patch").is_none(), "{body}");
    assert!(
        body["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("over 2048 values"),
        "{body}"
    );
}

#[tokio::test]
async fn readiness_fails_with_a_reason_when_the_certificate_has_expired() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let serving = ServingCert::from_pem(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        "c",
        "k",
    )
    .unwrap();
    let app = Arc::new(App::new(
        Polled::fixed(Policy::builtin().unwrap()),
        Arc::new(Polled::fixed(serving)),
        None,
        Limits::default(),
    ));
    let resp = health_router(Arc::clone(&app))
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("the serving certificate expired at 1609459200"),
        "{body}"
    );
    assert!(!app.ready());
}

/// Log lines written by the real subscriber into memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn logged(format: outpost_webhook::logging::LogFormat, body: String) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        outpost_webhook::logging::subscriber(format, tracing::Level::DEBUG, move || writer.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    let (code, _) = call(&app(1 << 20), post(body)).await;
    assert_eq!(code, 200);
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn a_uid_or_name_with_a_newline_or_escape_cannot_forge_a_plain_log_line() {
    let uid = "u-1\nINFO forged: Mutated\u{1b}[31m";
    let name = "x\r\nINFO forged too";
    let text = logged(
        outpost_webhook::logging::LogFormat::Plain,
        review_named(uid, name),
    )
    .await;
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(
        text.contains(r"u-1\nINFO forged: Mutated\u{1b}[31m"),
        "{text}"
    );
    assert!(text.contains(r"object_name=x\r\nINFO forged too"), "{text}");
}

#[tokio::test]
async fn json_logs_keep_the_span_name_apart_from_the_object_name() {
    let text = logged(
        outpost_webhook::logging::LogFormat::Json,
        review_named("u-1", "ak-outpost-x"),
    )
    .await;
    let line: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(line["span"]["name"], "review", "{line}");
    assert_eq!(line["span"]["object_name"], "ak-outpost-x", "{line}");
    assert_eq!(line["span"]["uid"], "u-1", "{line}");
}
