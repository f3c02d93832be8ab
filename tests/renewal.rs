//! Certificate renewal exactly as docs/operations.md ("Renewing the certificate") says, under
//! load, with no failed request: the files come from the real `certs` and `webhook-config`
//! commands, the server reads them from a Secret-volume layout as the kubelet writes it, and the
//! clients trust what the registration's `caBundle` holds at each step, as the apiserver does.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::too_many_lines
)]

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

/// Issue 17: self-managed TLS renews under load with no failed request. Two replicas keep their
/// certificate in a Secret on a real kube-apiserver, with lifetimes cut to seconds (serving 15 s,
/// so renewed every 10; CA 60 s, so rolled after 40): meanwhile the apiserver itself sends
/// reviews to them through the registration's Service, verifying each against the caBundle it
/// reads from the registration, and every one comes back mutated. The test ends once the
/// serving certificate was renewed twice and the CA rolled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_tls_renews_and_rolls_its_ca_under_load_with_no_failed_request() {
    use common::{control_plane::shared, proxy::ServiceProxy, spawn_served};
    use k8s_openapi::api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{Secret, Service},
    };
    use kube::{Api, api::PostParams};
    use serde_json::{Value, json};

    let front = common::proxy::own_loopback();
    let cp = shared();
    let client = cp.client().await;
    let own = cp.namespace("selftls").await;
    let outposts = cp.namespace("selftls-outposts").await;
    // The registration as webhook-config renders it for a Service, with no caBundle: the
    // webhook fills it.
    let rendered = run(&[
        "webhook-config",
        "--service",
        "ow",
        "--namespace",
        &own,
        "--namespace-selector",
        &format!("kubernetes.io/metadata.name={outposts}"),
    ]);
    let mut registration: Value = serde_saphyr::from_str(&rendered).unwrap();
    let name = format!("outpost-webhook-{own}");
    registration["metadata"]["name"] = json!(name);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(registration).unwrap(),
        )
        .await
        .unwrap();
    // The Service, as kube-proxy would route it.
    let external: Service = serde_json::from_value(json!({
        "metadata": {"name": "ow", "namespace": own},
        "spec": {"type": "ExternalName", "externalName": front.to_string()}}))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &own)
        .create(&PostParams::default(), &external)
        .await
        .unwrap();

    let replica = |pod: &str| {
        let mut command = Command::new(BIN);
        command
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("POD_NAME", pod)
            .env_remove("POD_NAMESPACE")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(common::SERVE_ON_LOOPBACK)
            .args(["--log-format", "json", "--drain-seconds", "1"])
            .args(["--cluster", "on", "--watch-namespace", &outposts])
            .args(["--lease-namespace", &own, "--tls-secret", "ow-tls"])
            .args(["--webhook-configuration", &name, "--service", "ow"])
            .args(["--tls-cert-validity", "15s", "--tls-ca-validity", "60s"]);
        spawn_served(command)
    };
    let a = replica("a");
    let b = replica("b");
    let _front = ServiceProxy::start_on((front, 443).into(), vec![a.addr, b.addr]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while common::health_get(a.health, "/readyz").await.0 != 200
        || common::health_get(b.health, "/readyz").await.0 != 200
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The apiserver's own reviews, one after another, each a dry-run create through the
    // webhook.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        let deployments = Api::<Deployment>::namespaced(client.clone(), &outposts);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/embedded-proxy-deployment.create.json");
        let review: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut object = if review["kind"] == "AdmissionReview" {
            review["request"]["object"].clone()
        } else {
            review
        };
        object["metadata"]["namespace"] = json!(outposts);
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "managedFields",
        ] {
            object["metadata"].as_object_mut().unwrap().remove(k);
        }
        let deployment: Deployment = serde_json::from_value(object).unwrap();
        tokio::spawn(async move {
            let dry_run = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let (mut sent, mut failed) = (0_u32, Vec::new());
            // Bounded: the test stops it, or 4,000 requests.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 4_000 {
                sent += 1;
                match deployments.create(&dry_run, &deployment).await {
                    Ok(d) => {
                        let env = d.spec.template.spec.unwrap().containers[0].env.clone();
                        if !env
                            .iter()
                            .flatten()
                            .any(|e| e.name == "AUTHENTIK_POSTGRESQL__PASSWORD")
                        {
                            failed.push("not mutated".to_owned());
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (sent, failed)
        })
    };

    // Both replicas stay ready throughout: under failurePolicy Fail, two unready replicas at
    // once would be an outage, which the forwarder here (it ignores readiness) would hide.
    let unready = {
        let stop = Arc::clone(&stop);
        let (a_health, b_health) = (a.health, b.health);
        tokio::spawn(async move {
            let mut unready = Vec::new();
            let started = std::time::Instant::now();
            // Bounded: the test stops it, or 10 minutes of samples.
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(600)
            {
                for (name, health) in [("a", a_health), ("b", b_health)] {
                    let (status, body) = common::health_get(health, "/readyz").await;
                    if status != 200 {
                        unready.push(format!("{name} at {:?}: {body}", started.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            unready
        })
    };

    // Watch the Secret until two serving certificates and one CA have followed the first.
    let secrets = Api::<Secret>::namespaced(client.clone(), &own);
    let key = |s: &Secret, k: &str| s.data.as_ref().and_then(|d| d.get(k)).map(|v| v.0.clone());
    let first = secrets.get("ow-tls").await.unwrap();
    let (mut servings, mut cas) = (vec![key(&first, "tls.crt")], vec![key(&first, "ca.crt")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while servings.len() < 3 || cas.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} serving certificates and {} CAs seen",
            servings.len(),
            cas.len()
        );
        let now = secrets.get("ow-tls").await.unwrap();
        if !servings.contains(&key(&now, "tls.crt")) {
            servings.push(key(&now, "tls.crt"));
        }
        if !cas.contains(&key(&now, "ca.crt")) {
            cas.push(key(&now, "ca.crt"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let requests run a few seconds past the last change.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    let unready = unready.await.unwrap();
    assert!(unready.is_empty(), "unready: {unready:?}");
    assert!(sent > 100, "only {sent} reviews sent");
    println!("{sent} reviews through two renewals and a CA roll");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}
