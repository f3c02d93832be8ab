//! Issue 13's acceptance, end to end: the real binary (`serve --cluster on`) against a fake
//! kube-apiserver in this process (`common::kube_fake`) that keeps objects, streams watch
//! events, and runs admission through the webhook's own `/mutate` on every PATCH, as the
//! apiserver does. Loopback only. Every wait is bounded (the issue's own "within 10 s", or the
//! Lease duration plus a margin) and polls the fake's state.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{
    BIN, Served, certs_into, health_get,
    kube_fake::{FakeApi, kubeconfig},
    serve_with, temp_dir,
};
use serde_json::{Value, json};
use tempfile::TempDir;

const NS: &str = "authentik";
const OUTPOST: &str = "ak-outpost-authentik-embedded-outpost";
const CHECKSUM: &str = "outpost-webhook/secret-checksum";
const POLL: Duration = Duration::from_millis(50);
/// The bound for the Service to follow its pods and for a Secret change to roll.
const BOUND: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Secret `goauthentik` with the five keys the built-in policy reads, and one it does not.
fn secret(password: &str, unreferenced: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
    "metadata": {"name": "goauthentik", "namespace": NS},
    "data": {
        "AUTHENTIK_POSTGRESQL__HOST": b64("postgresql"),
        "AUTHENTIK_POSTGRESQL__PORT": b64("5432"),
        "AUTHENTIK_POSTGRESQL__USER": b64("authentik"),
        "AUTHENTIK_POSTGRESQL__PASSWORD": b64(password),
        "AUTHENTIK_POSTGRESQL__NAME": b64("authentik"),
        "AUTHENTIK_SECRET_KEY": b64(unreferenced),
    }})
}

fn server_pods() -> Value {
    json!({"app.kubernetes.io/name": "authentik", "app.kubernetes.io/component": "server"})
}

fn outpost_pods() -> Value {
    json!({"app.kubernetes.io/name": "authentik-outpost-proxy",
           "app.kubernetes.io/managed-by": "goauthentik.io",
           "goauthentik.io/outpost-name": "authentik-embedded-outpost",
           "goauthentik.io/outpost-type": "proxy",
           "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"})
}

/// One `serve --cluster on` child, with its own kubeconfig (its token names it in the fake's
/// record of each PATCH); killed on drop.
struct Replica {
    served: Served,
    name: String,
    _dir: TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.served.child.kill();
        let _ = self.served.child.wait();
    }
}

impl Replica {
    fn start(api: std::net::SocketAddr, certs: &TempDir, name: &str) -> Self {
        let dir = temp_dir("e2e-kube");
        let config = dir.path().join("kubeconfig");
        std::fs::write(&config, kubeconfig(api, name)).unwrap();
        let mut command = Command::new(BIN);
        command
            .env("KUBECONFIG", &config)
            .env("POD_NAME", name)
            .env_remove("POD_NAMESPACE")
            .env_remove("KUBERNETES_SERVICE_HOST");
        let served = serve_with(
            command,
            certs,
            &[
                "--cluster",
                "on",
                "--watch-namespace",
                NS,
                "--lease-namespace",
                "outpost-webhook",
            ],
        );
        Self {
            served,
            name: name.to_owned(),
            _dir: dir,
        }
    }

    /// Waits (at most 10 s) for `/readyz` to turn 200: every cache has listed once.
    async fn ready(&mut self) {
        let deadline = Instant::now() + BOUND;
        while health_get(self.served.health, "/readyz").await.0 != 200 {
            if Instant::now() >= deadline {
                let log = self.log();
                panic!("{} not ready in {BOUND:?}:\n{log}", self.name);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The `outpost_webhook_cluster_leader` gauge: 1 while this replica holds the Lease.
    async fn leader_gauge(&self) -> Option<f64> {
        let (_, text) = health_get(self.served.health, "/metrics").await;
        text.lines().find_map(|l| {
            l.strip_prefix("outpost_webhook_cluster_leader ")?
                .parse()
                .ok()
        })
    }

    /// What the child has logged so far.
    fn log(&mut self) -> String {
        while self.served.next_line(Duration::from_millis(1)).is_some() {}
        self.served.log.join("\n")
    }
}

/// Polls `check` every 50 ms until it returns `Some`, at most `bound`; panics with `what` and
/// the fake's record otherwise.
async fn within<T>(
    api: &FakeApi,
    bound: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(t) = check() {
            return (t, started.elapsed());
        }
        assert!(
            started.elapsed() < bound,
            "{what}: not within {bound:?}; PATCHes: {:#?}",
            api.patches()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Holds for `span` that no new PATCH arrives, polling every 50 ms.
async fn quiet(api: &FakeApi, span: Duration, what: &str) {
    let before = api.patches().len();
    let until = Instant::now() + span;
    while Instant::now() < until {
        let now = api.patches();
        assert_eq!(
            now.len(),
            before,
            "{what}: written during {span:?}: {:#?}",
            &now[before..]
        );
        tokio::time::sleep(POLL).await;
    }
}

fn selector(api: &FakeApi) -> Value {
    api.get("services", NS, OUTPOST).unwrap()["spec"]["selector"].clone()
}

fn deployment_state(api: &FakeApi) -> Option<(String, i64)> {
    let d = api.get("deployments", NS, OUTPOST)?;
    Some((
        d["spec"]["template"]["metadata"]["annotations"][CHECKSUM]
            .as_str()?
            .to_owned(),
        d["metadata"]["generation"].as_i64()?,
    ))
}

/// The fake holds Secret `goauthentik`, and no outpost yet.
async fn default_install() -> (FakeApi, std::net::SocketAddr, TempDir) {
    let (api, addr) = FakeApi::start().await;
    api.put(secret("first", "one"));
    let certs = temp_dir("e2e-certs");
    certs_into(&certs);
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).unwrap();
    api.set_webhooks(Vec::new(), &ca);
    (api, addr, certs)
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.get("leases", "outpost-webhook", "outpost-webhook")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// A default install: the controller creates the embedded outpost's Service, then writes it
/// again (as each later PATCH of it does). Both times admission keeps the server pods, with a warning
/// (what `kubectl` shows).
async fn controller_writes_service(api: &FakeApi) {
    for _ in 0..2 {
        api.write_admitted(fixture("embedded-proxy-service.create.json"))
            .await;
        assert_eq!(selector(api), server_pods());
    }
    let reviews = api.reviews();
    let ops: Vec<&str> = reviews.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(ops, ["CREATE", "UPDATE"]);
    for r in &reviews {
        let warnings = r.warnings.as_array().unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.as_str().unwrap().contains("selector kept")),
            "{r:?}"
        );
        assert!(
            warnings.iter().all(|w| w.as_str().unwrap().len() <= 120),
            "{r:?}"
        );
    }
}

/// The standalone Deployment is created through admission (as the controller's CREATE is); the
/// Service then follows its pods with one reconciler PATCH.
async fn deployment_appears(api: &FakeApi, what: &str) {
    let before = api.patches().len();
    api.write_admitted(fixture("embedded-proxy-deployment.create.json"))
        .await;
    let ((), took) = within(api, BOUND, what, || {
        (selector(api) == outpost_pods()).then_some(())
    })
    .await;
    println!("{what}: Service selects the outpost pods after {took:?}");
    quiet(api, Duration::from_secs(1), what).await;
    // Admission set the Deployment's checksum on CREATE: the reconciler writes only the Service.
    let patches = api.patches()[before..].to_vec();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    let patch = &patches[0];
    assert_eq!(patch.resource, "services");
    assert_eq!(patch.content_type, "application/json-patch+json");
    assert_eq!(patch.name, OUTPOST);
    assert!(
        patch
            .query
            .split('&')
            .any(|kv| kv == "fieldManager=outpost-webhook"),
        "{patch:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_follows_its_pods_and_a_secret_change_rolls_once() {
    let (api, addr, certs) = default_install().await;
    // While no list succeeds, no cache has synced: not ready.
    api.refuse_lists(true);
    let mut replica = Replica::start(addr, &certs, "replica-a");
    api.set_webhooks(
        vec![replica.served.addr],
        &std::fs::read_to_string(certs.path().join("ca.crt")).unwrap(),
    );
    for _ in 0..20 {
        assert_ne!(health_get(replica.served.health, "/readyz").await.0, 200);
        tokio::time::sleep(POLL).await;
    }
    api.refuse_lists(false);
    replica.ready().await;

    // 1. A default install: nothing is written, and the Service keeps the server pods.
    controller_writes_service(&api).await;
    quiet(&api, Duration::from_secs(2), "default install").await;
    assert_eq!(selector(&api), server_pods());

    // 2. A standalone Deployment appears: the Service selects its pods.
    deployment_appears(&api, "standalone Deployment created").await;
    let (admitted_checksum, _) = deployment_state(&api).expect("admission set the checksum");

    // 3. It is deleted: the Service selects the server pods again.
    api.delete("deployments", NS, OUTPOST).unwrap();
    let ((), took) = within(&api, BOUND, "Deployment deleted", || {
        (selector(&api) == server_pods()).then_some(())
    })
    .await;
    println!("Deployment deleted: Service selects the server pods after {took:?}");

    // 4. Present again; a referenced key of Secret goauthentik changes: one roll.
    deployment_appears(&api, "standalone Deployment created again").await;
    let (checksum, generation) = deployment_state(&api).unwrap();
    assert_eq!(checksum, admitted_checksum, "same Secret, same checksum");
    quiet(
        &api,
        Duration::from_secs(1),
        "settled before the Secret change",
    )
    .await;
    let before = api.patches().len();
    api.put(secret("rotated", "one"));
    let ((new_checksum, new_generation), took) =
        within(&api, BOUND, "referenced Secret key changed", || {
            deployment_state(&api).filter(|(c, _)| *c != checksum)
        })
        .await;
    println!("Secret key changed: new checksum after {took:?}");
    assert_eq!(new_generation, generation + 1);
    quiet(&api, Duration::from_secs(3), "after the roll").await;
    assert_eq!(deployment_state(&api).unwrap().1, generation + 1);
    let rolls: Vec<_> = api.patches()[before..].to_vec();
    assert_eq!(rolls.len(), 1, "{rolls:#?}");
    assert_eq!(rolls[0].resource, "deployments");

    // An unreferenced key changes: nothing is written.
    api.put(secret("rotated", "two"));
    quiet(
        &api,
        Duration::from_secs(3),
        "unreferenced Secret key changed",
    )
    .await;
    assert_eq!(deployment_state(&api).unwrap().0, new_checksum);

    // Restarting the replica changes nothing either.
    drop(replica);
    let mut replica = Replica::start(addr, &certs, "replica-a2");
    api.set_webhooks(
        vec![replica.served.addr],
        &std::fs::read_to_string(certs.path().join("ca.crt")).unwrap(),
    );
    replica.ready().await;
    let ((), took) = within(
        &api,
        Duration::from_secs(25),
        "the restarted replica leads",
        || (lease_holder(&api).as_deref() == Some("replica-a2")).then_some(()),
    )
    .await;
    println!("replica restarted: it holds the Lease after {took:?}");
    quiet(&api, Duration::from_secs(3), "after a restart").await;
    assert_eq!(
        deployment_state(&api).unwrap(),
        (new_checksum, generation + 1)
    );
    for p in api.patches() {
        println!(
            "PATCH {} {} {}: {}",
            p.resource, p.name, p.content_type, p.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_the_other_takes_over() {
    let (api, addr, certs) = default_install().await;
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).unwrap();
    let mut a = Replica::start(addr, &certs, "replica-a");
    let mut b = Replica::start(addr, &certs, "replica-b");
    api.set_webhooks(vec![a.served.addr, b.served.addr], &ca);
    a.ready().await;
    b.ready().await;
    controller_writes_service(&api).await;
    let (holder, _) = within(&api, BOUND, "a replica holds the Lease", || {
        lease_holder(&api)
    })
    .await;
    deployment_appears(&api, "standalone Deployment, two replicas").await;
    assert!(
        api.patches().iter().all(|p| p.token == holder),
        "{holder} holds the Lease: {:#?}",
        api.patches()
    );

    let (mut survivor, killed) = if holder == a.name { (b, a) } else { (a, b) };
    assert_eq!(killed.leader_gauge().await, Some(1.0));
    assert_eq!(survivor.leader_gauge().await, Some(0.0));
    let killed_name = killed.name.clone();
    api.set_webhooks(vec![survivor.served.addr], &ca);
    drop(killed);
    let ((), took) = within(
        &api,
        Duration::from_secs(25),
        "the other replica takes the Lease",
        || (lease_holder(&api).as_deref() == Some(&survivor.name)).then_some(()),
    )
    .await;
    println!(
        "{killed_name} killed: {} holds the Lease after {took:?}",
        survivor.name
    );

    let (checksum, generation) = deployment_state(&api).unwrap();
    let before = api.patches().len();
    api.put(secret("rotated", "one"));
    let ((_, new_generation), took) = within(&api, BOUND, "the new leader rolls", || {
        deployment_state(&api).filter(|(c, _)| *c != checksum)
    })
    .await;
    println!("the new leader rolled after {took:?}");
    assert_eq!(new_generation, generation + 1);
    quiet(&api, Duration::from_secs(3), "after the roll").await;
    let rolls = api.patches()[before..].to_vec();
    assert_eq!(rolls.len(), 1, "{rolls:#?}");
    let log = survivor.log();
    assert_eq!(rolls[0].token, survivor.name, "{log}");
}
