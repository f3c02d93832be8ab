//! The binary as a pod runs it: certificates from `outpost-webhook certs`, `serve` on
//! ephemeral loopback ports, JSON logs, SIGTERM. Bounded in time: every wait has a deadline.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::{Duration, Instant},
};

use common::{BIN, Http1, apply_answer, certs_into, health_get, serve, temp_dir};
use serde_json::{Value, json};

#[test]
fn certs_writes_a_ca_a_certificate_for_every_service_name_and_a_private_key() {
    let dir = temp_dir("certs");
    certs_into(&dir);
    let mode = |f: &str| {
        std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("tls.key"), 0o600);
    assert_eq!(mode("tls.crt"), 0o644);
    assert_eq!(mode("ca.crt"), 0o644);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let cert = std::fs::read_to_string(dir.path().join("tls.crt")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("tls.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    // The certificate and key are a pair, and the chain verifies for each name the apiserver
    // may dial.
    let store = outpost_webhook::serve::tls::ServingCert::from_pem(
        cert.as_bytes(),
        key.as_bytes(),
        "tls.crt",
        "tls.key",
    )
    .unwrap();
    assert!(store.not_after > 0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut served = serve(&dir, &[]);
        for name in [
            "outpost-webhook",
            "outpost-webhook.outpost-webhook",
            "outpost-webhook.outpost-webhook.svc",
            "outpost-webhook.outpost-webhook.svc.cluster.local",
            "127.0.0.1",
        ] {
            let tcp = tokio::net::TcpStream::connect(served.addr).await.unwrap();
            let config = common::client_config(&ca, &[b"http/1.1"], None);
            tokio_rustls::TlsConnector::from(config)
                .connect(
                    rustls::pki_types::ServerName::try_from(name)
                        .unwrap()
                        .to_owned(),
                    tcp,
                )
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        served.child.kill().unwrap();
        let _ = served.child.wait();
    });
}

#[test]
fn sigterm_fails_readiness_keeps_serving_through_the_drain_and_exits_zero() {
    let dir = temp_dir("sigterm");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut served = serve(&dir, &[]);
    runtime.block_on(async {
        let (mut client, review) = served.assert_serves(&ca).await;

        // A request whose body is still arriving when SIGTERM comes.
        let body = serde_json::to_vec(&review).unwrap();
        let (first_half, second_half) = body.split_at(body.len() / 2);
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
        let config = common::client_config(&ca, &[b"http/1.1"], None);
        let tls = common::tls_connect(served.addr, config).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/mutate?timeout=10s")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(common::ChannelBody(rx))
            .unwrap();
        tx.send(bytes::Bytes::copy_from_slice(first_half))
            .await
            .unwrap();
        let in_flight = tokio::spawn(async move { sender.send_request(req).await });
        tokio::time::sleep(Duration::from_millis(50)).await;

        served.sigterm();
        // Readiness turns before the listener closes, and requests are still answered.
        let deadline = Instant::now() + Duration::from_millis(900);
        loop {
            if health_get(served.health, "/readyz").await.0 == 503 {
                break;
            }
            assert!(Instant::now() < deadline, "/readyz never turned 503");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(client.review(&review).await.0, 200);
        tx.send(bytes::Bytes::copy_from_slice(second_half))
            .await
            .unwrap();
        let (status, answer) = common::read_json(in_flight.await.unwrap().unwrap()).await;
        assert_eq!(status, 200, "the request in flight at SIGTERM completes");
        apply_answer(&review, &answer);
    });
    let status = served.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    while served.next_line(Duration::from_millis(200)).is_some() {}
    let messages: Vec<Value> = served
        .log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let review_line = messages.iter().find(|m| m["message"] == "Mutated").unwrap();
    for field in ["uid", "operation", "kind", "namespace", "object_name"] {
        assert!(
            review_line["span"][field].is_string(),
            "{field} missing from {review_line}"
        );
    }
    assert!(messages.iter().any(|m| m["message"] == "Stopped"));
}

#[test]
fn secret_values_never_reach_the_logs_even_at_trace() {
    let dir = temp_dir("secrets");
    certs_into(&dir);
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "rules: [{deployment: {env: [{name: FROM_POLICY, value: policy-literal-7f1c}]}}]",
    )
    .unwrap();
    let mut served = serve(
        &dir,
        &["--log-level", "trace", "--policy", policy.to_str().unwrap()],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Http1::connect(served.addr, &ca).await;
        let mut review = common::golden_review("embedded-deployment-create");
        review["request"]["object"]["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "DB_PASSWORD", "value": "hunter2-object-literal"}));
        let (status, answer) = client.review(&review).await;
        assert_eq!(status, 200);
        let patched = apply_answer(&review, &answer);
        assert!(patched.to_string().contains("policy-literal-7f1c"));
    });
    served.child.kill().unwrap();
    let _ = served.child.wait();
    while served.next_line(Duration::from_millis(200)).is_some() {}
    let all = served.log.join("\n");
    assert!(all.contains("Mutated"), "trace logs were captured:\n{all}");
    for secret in ["hunter2-object-literal", "policy-literal-7f1c"] {
        assert!(
            !all.contains(secret),
            "{secret} leaked into the logs:\n{all}"
        );
    }
}

#[test]
fn a_bad_certificate_or_policy_at_start_exits_non_zero_naming_the_file() {
    let dir = temp_dir("bad-start");
    certs_into(&dir);
    std::fs::write(dir.path().join("garbage.crt"), "not a certificate").unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "rules:\n  - deployment:\n      replicas: many\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(common::SERVE_ON_LOOPBACK)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        run(&["--tls-cert", "garbage.crt", "--tls-key", "tls.key"]),
        "error: garbage.crt: no PEM CERTIFICATE block"
    );
    assert_eq!(
        run(&["--tls-cert", "missing.crt", "--tls-key", "tls.key"]),
        "error: missing.crt: cannot read: No such file or directory (os error 2)"
    );
    let policy = run(&[
        "--tls-cert",
        "tls.crt",
        "--tls-key",
        "tls.key",
        "--policy",
        "bad.yaml",
    ]);
    assert!(policy.starts_with("error: bad.yaml:3: "), "{policy}");
    assert!(policy.contains("replicas"), "{policy}");
}
