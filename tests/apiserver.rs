//! The server as a kube-apiserver sees it: TLS verified against the CA bundle with the
//! Service's DNS name, HTTP/1.1 keep-alive (and h2 through ALPN), `POST /mutate?timeout=10s`,
//! AdmissionReview v1 in and out. Every test runs on 127.0.0.1 with ephemeral ports.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Http1, TestServer, apply_answer, golden_reviews, health_get, read_json, review_request,
};
use http_body_util::Full;
use hyper::Request;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use outpost_webhook::serve::metrics::Reloaded;
use serde_json::{Value, json};

#[tokio::test]
async fn every_golden_review_over_one_keep_alive_connection() {
    let server = TestServer::start().await;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let reviews = golden_reviews();
    assert!(reviews.len() >= 15);
    let mut patched = 0;
    for (name, review) in &reviews {
        let (status, answer) = client.review(review).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let object = apply_answer(review, &answer);
        if answer["response"].get("patch").is_some() {
            patched += 1;
        }
        match review["request"]["kind"]["kind"].as_str().unwrap() {
            "Deployment" if !object.is_null() => {
                serde_json::from_value::<Deployment>(object)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            "Service" => {
                serde_json::from_value::<Service>(object).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            _ => {}
        }
    }
    assert!(patched >= 8, "only {patched} reviews were patched");
    // All of it went over the one connection.
    assert!(!client.task.is_finished());
    let (_, metrics) = health_get(server.running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_webhook_connections_open 1"),
        "{metrics}"
    );
    server.running.shutdown();
    server.running.wait().await;
}

#[tokio::test]
async fn create_and_update_of_the_embedded_service_select_the_outpost_pods() {
    let server = TestServer::start_with_policy(&common::outpost_selector_policy()).await;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    for (name, review) in golden_reviews()
        .into_iter()
        .filter(|(n, _)| n.starts_with("embedded-service"))
    {
        let (status, answer) = client.review(&review).await;
        assert_eq!(status, 200);
        let service: Service = serde_json::from_value(apply_answer(&review, &answer)).unwrap();
        let selector = service.spec.unwrap().selector.unwrap();
        assert_eq!(selector.len(), 5, "{name}");
        assert_eq!(
            selector["app.kubernetes.io/name"],
            "authentik-outpost-proxy"
        );
    }
}

#[tokio::test]
async fn dry_run_gets_the_same_answer() {
    let server = TestServer::start_with_policy(&common::outpost_selector_policy()).await;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let wet = &common::golden_review("embedded-service-create");
    let mut dry = wet.clone();
    dry["request"]["dryRun"] = json!(true);
    let (_, a) = client.review(wet).await;
    let (_, b) = client.review(&dry).await;
    assert_eq!(a, b);
    assert!(a["response"]["patch"].is_string());
}

#[tokio::test]
async fn http2_through_alpn_with_concurrent_streams() {
    let server = TestServer::start().await;
    let config = common::client_config(&server.ca_pem, &[b"h2"], None);
    let tls = common::tls_connect(server.addr(), config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for (name, review) in golden_reviews().into_iter().take(8) {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = review_request(&review);
            *req.version_mut() = hyper::Version::HTTP_2;
            // h2 carries the scheme and authority as pseudo-headers.
            *req.uri_mut() = format!("https://{}/mutate?timeout=10s", common::SERVER_NAME)
                .parse()
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let (status, answer) = read_json(resp).await;
            assert_eq!(status, 200, "{name}");
            apply_answer(&review, &answer);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn the_certificate_names_the_service_and_is_verified_against_the_ca() {
    let server = TestServer::start().await;
    // A client that trusts another CA refuses the server.
    let other = common::certs();
    let config = common::client_config(&other.ca_pem, &[b"http/1.1"], None);
    let err = common::tls_connect(server.addr(), config)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

async fn status_and_body(server: &TestServer, req: Request<Full<Bytes>>) -> (u16, Value) {
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let resp = client.send(req).await.unwrap();
    read_json(resp).await
}

#[tokio::test]
async fn bad_requests_over_tls_get_a_status_body_and_are_counted() {
    let server = TestServer::start().await;
    let req = Request::post("/mutate?timeout=10s")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"apiVersion\":")))
        .unwrap();
    let (status, body) = status_and_body(&server, req).await;
    assert_eq!(status, 400);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "not_json");
    let (_, metrics) = health_get(server.running.health_addr, "/metrics").await;
    assert!(metrics.contains("outpost_webhook_bad_requests_total{reason=\"not_json\"} 1"));
}

#[tokio::test]
async fn rotated_certificate_is_served_to_new_connections_and_garbage_is_refused() {
    let server = TestServer::start().await;
    let app = &server.running.app;
    let first = peer_certificate(&server, &server.ca_pem).await;

    // The kubelet swaps `..data` to a new directory holding a certificate from the same CA?
    // cert-manager renews with a new key; here a whole new CA, so the old client must fail.
    let renewed = common::certs();
    common::write_secret_volume(server.dir.path(), 2, &renewed.cert_pem, &renewed.key_pem);
    app.reload();
    assert_eq!(app.metrics.reloads(Reloaded::Certificate), (1, 0));
    let second = peer_certificate(&server, &renewed.ca_pem).await;
    assert_ne!(first, second);

    // A garbage certificate is refused, counted once, and the renewed one keeps serving.
    common::write_secret_volume(
        server.dir.path(),
        3,
        "-----BEGIN CERTIFICATE-----\nnope\n",
        &renewed.key_pem,
    );
    app.reload();
    app.reload();
    assert_eq!(app.metrics.reloads(Reloaded::Certificate), (1, 1));
    assert_eq!(peer_certificate(&server, &renewed.ca_pem).await, second);

    // So is a key that does not match the certificate.
    let stranger = common::certs();
    common::write_secret_volume(server.dir.path(), 4, &renewed.cert_pem, &stranger.key_pem);
    app.reload();
    assert_eq!(app.metrics.reloads(Reloaded::Certificate), (1, 2));
    assert_eq!(peer_certificate(&server, &renewed.ca_pem).await, second);
}

async fn peer_certificate(server: &TestServer, ca_pem: &str) -> Vec<u8> {
    let config = common::client_config(ca_pem, &[b"http/1.1"], None);
    let tls = common::tls_connect(server.addr(), config).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_new_policy_is_used_from_the_next_request_and_a_bad_one_is_refused() {
    let dir = common::temp_dir("policy");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "rules: [{deployment: {replicas: 3}}]").unwrap();
    let path = policy.clone();
    let server = TestServer::start_with(|c| c.policy = Some(path)).await;
    let app = &server.running.app;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let review = &common::golden_review("embedded-deployment-create");
    let replicas = |answer: &Value| apply_answer(review, answer)["spec"]["replicas"].clone();

    let (_, answer) = client.review(review).await;
    assert_eq!(replicas(&answer), 3);

    std::fs::write(&policy, "rules: [{deployment: {replicas: 4}}]").unwrap();
    app.reload();
    let (_, answer) = client.review(review).await;
    assert_eq!(replicas(&answer), 4);

    std::fs::write(&policy, "rules: [{deployment: {replicas: -1}}]").unwrap();
    app.reload();
    let (_, answer) = client.review(review).await;
    assert_eq!(replicas(&answer), 4, "the last good policy stays in force");
    assert_eq!(app.metrics.reloads(Reloaded::Policy), (1, 1));
    let (_, metrics) = health_get(server.running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_webhook_reloads_total{what=\"policy\",result=\"failure\"} 1")
    );
}

#[tokio::test]
async fn shutdown_fails_readiness_first_and_finishes_the_request_in_flight() {
    let server = TestServer::start().await;
    let health = server.running.health_addr;
    assert_eq!(health_get(health, "/readyz").await.0, 200);

    // A request whose body is still arriving when the shutdown begins.
    let review = golden_reviews().remove(0).1;
    let body = serde_json::to_vec(&review).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let config = common::client_config(&server.ca_pem, &[b"http/1.1"], None);
    let tls = common::tls_connect(server.addr(), config).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/mutate?timeout=10s")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(common::ChannelBody(rx))
        .unwrap();
    let (first_half, second_half) = body.split_at(body.len() / 2);
    tx.send(Bytes::copy_from_slice(first_half)).await.unwrap();
    let in_flight = tokio::spawn(async move { sender.send_request(req).await });
    tokio::time::sleep(Duration::from_millis(50)).await;

    server.running.shutdown();
    // Readiness fails at once, while the listener still accepts.
    assert_eq!(
        health_get(health, "/readyz").await,
        (503, "draining\n".into())
    );
    let mut late = Http1::connect(server.addr(), &server.ca_pem).await;
    assert_eq!(
        late.review(&review).await.0,
        200,
        "still serving during the drain"
    );

    tx.send(Bytes::copy_from_slice(second_half)).await.unwrap();
    drop(tx);
    let resp = in_flight.await.unwrap().unwrap();
    let (status, answer) = read_json(resp).await;
    assert_eq!(status, 200);
    apply_answer(&review, &answer);

    let addr = server.addr();
    tokio::time::timeout(Duration::from_secs(5), server.running.wait())
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    drop(late);
}

#[tokio::test]
async fn a_client_that_stalls_in_its_headers_is_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server =
        TestServer::start_with(|c| c.settings.header_timeout = Duration::from_millis(300)).await;
    let config = common::client_config(&server.ca_pem, &[b"http/1.1"], None);
    let mut slow = common::tls_connect(server.addr(), config).await.unwrap();
    slow.write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        .await
        .unwrap();
    slow.flush().await.unwrap();

    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let (_, review) = golden_reviews().remove(0);
    assert_eq!(client.review(&review).await.0, 200);

    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stalled connection was never closed");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_given() {
    let dir = common::temp_dir("client-ca");
    let apiserver = outpost_webhook::pki::generate_client("kube-apiserver", 1).unwrap();
    std::fs::write(dir.path().join("client-ca.crt"), &apiserver.ca_pem).unwrap();
    let ca_path = dir.path().join("client-ca.crt");
    let server = TestServer::start_with(|c| c.client_ca = Some(ca_path)).await;
    let (_, review) = golden_reviews().remove(0);

    // With the apiserver's client certificate: served.
    let config = common::client_config(
        &server.ca_pem,
        &[b"http/1.1"],
        Some((&apiserver.cert_pem, &apiserver.key_pem)),
    );
    let mut client = Http1::connect_with(server.addr(), config).await;
    assert_eq!(client.review(&review).await.0, 200);

    // Without one, or with one from another CA: the handshake (or first read) fails.
    let stranger = outpost_webhook::pki::generate_client("someone", 1).unwrap();
    for identity in [
        None,
        Some((stranger.cert_pem.as_str(), stranger.key_pem.as_str())),
    ] {
        let config = common::client_config(&server.ca_pem, &[b"http/1.1"], identity);
        let refused = review_status(server.addr(), config, &review);
        assert!(
            refused
                .await
                .is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused),
            "a client without the right certificate was served"
        );
    }
    let (_, metrics) = health_get(server.running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_webhook_tls_handshake_failures_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn create_and_update_of_every_shared_fixture_converge_over_one_connection() {
    let server = TestServer::start_with_policy(&common::outpost_selector_policy()).await;
    let mut client = Http1::connect(server.addr(), &server.ca_pem).await;
    let fixtures = common::fixture_objects();
    assert_eq!(fixtures.len(), 7);
    for (name, object) in &fixtures {
        let create = common::review_for(&format!("{name}-create"), "CREATE", object, None);
        let (status, answer) = client.review(&create).await;
        assert_eq!(status, 200, "{name}");
        let stored = apply_answer(&create, &answer);
        let outpost = !name.starts_with("unrelated-");
        assert_eq!(
            stored != *object,
            outpost && !name.starts_with("public-proxy-service"),
            "{name}"
        );

        // The controller's later strategic-merge PATCH: its reference object merged over what is
        // stored (the selector keys unite, replicas return to the controller's value).
        let mut merged = stored.clone();
        if let Some(selector) = object["spec"]["selector"]
            .as_object()
            .filter(|_| object["kind"] == "Service")
        {
            for (k, v) in selector {
                merged["spec"]["selector"][k] = v.clone();
            }
        }
        if object["kind"] == "Deployment" {
            merged["spec"]["replicas"] = object["spec"]["replicas"].clone();
        }
        let update =
            common::review_for(&format!("{name}-update"), "UPDATE", &merged, Some(&stored));
        let (status, answer) = client.review(&update).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(
            apply_answer(&update, &answer),
            stored,
            "{name}: UPDATE must converge to what CREATE stored"
        );

        // And the stored object, sent again, needs nothing.
        let again = common::review_for(&format!("{name}-again"), "UPDATE", &stored, Some(&stored));
        let (_, answer) = client.review(&again).await;
        assert!(
            answer["response"].get("patch").is_none(),
            "{name}: {answer}"
        );
        match object["kind"].as_str().unwrap() {
            "Deployment" => drop(serde_json::from_value::<Deployment>(stored).unwrap()),
            _ => drop(serde_json::from_value::<Service>(stored).unwrap()),
        }
    }
}

#[tokio::test]
async fn a_new_client_ca_is_picked_up_and_the_old_one_refused() {
    let dir = common::temp_dir("client-ca-reload");
    let ca_path = dir.path().join("client-ca.crt");
    let old = outpost_webhook::pki::generate_client("kube-apiserver", 1).unwrap();
    std::fs::write(&ca_path, &old.ca_pem).unwrap();
    let server = TestServer::start_with(|c| c.client_ca = Some(ca_path.clone())).await;
    let (_, review) = golden_reviews().remove(0);
    let accepted = async |identity: &outpost_webhook::pki::Generated| {
        let config = common::client_config(
            &server.ca_pem,
            &[b"http/1.1"],
            Some((&identity.cert_pem, &identity.key_pem)),
        );
        review_status(server.addr(), config, &review).await.ok() == Some(200)
    };
    assert!(accepted(&old).await);

    // The apiserver's client certificate is reissued from a new CA, and the file replaced.
    let new = outpost_webhook::pki::generate_client("kube-apiserver", 1).unwrap();
    std::fs::write(&ca_path, &new.ca_pem).unwrap();
    server.running.app.reload();
    assert!(accepted(&new).await, "the new client CA was not picked up");
    assert!(!accepted(&old).await, "the old client CA is still trusted");

    // A broken file is refused and the CA in force stays.
    std::fs::write(&ca_path, "not a certificate").unwrap();
    server.running.app.reload();
    assert!(accepted(&new).await);
    assert_eq!(
        server
            .running
            .app
            .metrics
            .reloads(outpost_webhook::serve::metrics::Reloaded::ClientCa),
        (1, 1)
    );
}

/// One review over a new connection with `config`: the HTTP status, or why the handshake or the
/// request failed.
async fn review_status(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    review: &serde_json::Value,
) -> std::io::Result<u16> {
    let tls = common::tls_connect(addr, config).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(review_request(review))
        .await
        .map_err(std::io::Error::other)?;
    Ok(resp.status().as_u16())
}
