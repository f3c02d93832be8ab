//! Certificate renewal exactly as docs/operations.md ("Renewing the certificate") says, under
//! load, with no failed request: the files come from the real `certs` and `webhook-config`
//! commands, the server reads them from a Secret-volume layout as the kubelet writes it, and the
//! clients trust what the registration's `caBundle` holds at each step, as the apiserver does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use base64::Engine as _;
use common::{Load, TestServer, assert_no_failures};
use outpost_webhook::pki;

const BIN: &str = env!("CARGO_BIN_EXE_outpost-webhook");

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `outpost-webhook certs` into `dir`, with the loopback address the test dials as a SAN.
fn certs(dir: &Path, ca: Option<&Path>) {
    let mut args = vec![
        "certs".to_owned(),
        "--out".into(),
        dir.display().to_string(),
        "--san".into(),
        "127.0.0.1".into(),
        "--days".into(),
        "30".into(),
    ];
    if let Some(ca) = ca {
        for (flag, file) in [("--ca-cert", "ca.crt"), ("--ca-key", "ca.key")] {
            args.extend([flag.into(), ca.join(file).display().to_string()]);
        }
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The PEM the registration's `caBundle` holds after `webhook-config --ca-bundle ...`.
fn ca_bundle(files: &[&Path]) -> String {
    let mut args = vec!["webhook-config".to_owned()];
    for f in files {
        args.extend(["--ca-bundle".into(), f.join("ca.crt").display().to_string()]);
    }
    let yaml = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let doc: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    let encoded = doc["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// The kubelet's update of the Secret volume to the files in `from`, then the server's next poll.
fn apply_secret(server: &TestServer, generation: u32, from: &Path) {
    common::write_secret_volume(
        server.dir.path(),
        generation,
        &read(from, "tls.crt"),
        &read(from, "tls.key"),
    );
    server.running.app.reload();
}

/// Runs `step` while 4 clients that trust `bundle` load `server` (each reconnecting every 10
/// requests, so new connections see what is served now), and asserts that none failed.
async fn no_request_fails(server: &TestServer, bundle: &str, step: impl FnOnce()) {
    let load = Load::start(server.addr(), bundle, 4, 10);
    load.wait_for(25, Duration::from_secs(20)).await;
    step();
    load.wait_for(load.answered() + 50, Duration::from_secs(20))
        .await;
    assert_no_failures(&load.finish().await, 75);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_the_serving_certificate_and_rotating_the_ca_as_documented_fail_no_request() {
    let work = tempfile::tempdir().unwrap();
    let (old, renewed, new) = (
        work.path().join("old"),
        work.path().join("renewed"),
        work.path().join("new"),
    );
    // Install: a CA and a serving certificate; the registration holds the CA.
    certs(&old, None);
    let server = TestServer::start_with_certs(
        pki::Generated {
            ca_pem: read(&old, "ca.crt"),
            cert_pem: read(&old, "tls.crt"),
            key_pem: read(&old, "tls.key"),
        },
        |_| {},
    )
    .await;
    let installed = ca_bundle(&[&old]);

    // Renewal: a new serving certificate from the same CA. The caBundle does not change.
    certs(&renewed, Some(&old));
    no_request_fails(&server, &installed, || apply_secret(&server, 2, &renewed)).await;

    // CA rotation, step 1: the registration trusts the old and the new CA.
    certs(&new, None);
    let both = ca_bundle(&[&old, &new]);
    no_request_fails(&server, &both, || {}).await;
    // Step 2: the Secret gets the new CA's serving certificate.
    no_request_fails(&server, &both, || apply_secret(&server, 3, &new)).await;
    // Step 3: the registration drops the old CA.
    no_request_fails(&server, &ca_bundle(&[&new]), || {}).await;

    let app = Arc::clone(&server.running.app);
    let (ok, refused) = app
        .metrics
        .reloads(outpost_webhook::serve::metrics::Reloaded::Certificate);
    assert_eq!((ok, refused), (2, 0));
}
