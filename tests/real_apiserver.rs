//! The webhook against a real kube-apiserver and etcd on loopback (`common::control_plane`):
//! the registration as `webhook-config` renders it, `deploy/plain` applied and run as two
//! in-cluster replicas under its own RBAC, watch faults a fake never produced, and `doctor` on
//! real state. The apiserver runs admission, dry runs, defaulting, strategic merges, RBAC and
//! field managers itself; nothing here imitates them.
//!
//! Needs `scripts/ensure-kube-apiserver.sh` (README's test command runs it). Without the binaries
//! every test fails with the command that builds them. Every wait is bounded and polls the
//! apiserver's state.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::too_many_lines
)]

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    BIN, Served, certs_into,
    cluster::{
        POLL, User, b64, client_from, fixture, kubeconfig, kustomize, replica, token_client,
        wait_for,
    },
    control_plane::{ControlPlane, shared},
    health_get,
    pod::{Pod, PodSpec, container_args, volume_mounts},
    proxy::ServiceProxy,
    spawn_served, start_served, temp_dir,
};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Secret, Service},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tempfile::TempDir;

const OUTPOST: &str = "ak-outpost-authentik-embedded-outpost";
const SECRET_CHECKSUM: &str = "outpost-webhook/secret-checksum";
const CONFIG_CHECKSUM: &str = "outpost-webhook/config-checksum";
const ORIGINAL_SELECTOR: &str = "outpost-webhook/original-selector";
/// The issue's bound for the Service to follow its pods and for a Secret change to roll.
const BOUND: Duration = Duration::from_secs(10);
/// Waits that no issue bounds (the apiserver's informer taking in a new registration, a fresh
/// replica's first pass): generous, so that a loaded machine does not fail them.
const SETTLE: Duration = Duration::from_secs(30);
/// A Lease taken over after its holder died: the Lease duration (15 s) and a margin.
const TAKEOVER: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Objects

fn embedded_service(namespace: &str) -> Service {
    serde_json::from_value(fixture("embedded-proxy-service.create.json", namespace)).unwrap()
}

fn embedded_deployment(namespace: &str) -> Deployment {
    serde_json::from_value(fixture("embedded-proxy-deployment.create.json", namespace)).unwrap()
}

/// Secret `goauthentik` with the five keys the built-in policy reads, and one it does not.
fn goauthentik(namespace: &str, password: &str, unreferenced: &str) -> Secret {
    serde_json::from_value(json!({
    "metadata": {"name": "goauthentik", "namespace": namespace},
    "data": {
        "AUTHENTIK_POSTGRESQL__HOST": b64("postgresql"),
        "AUTHENTIK_POSTGRESQL__PORT": b64("5432"),
        "AUTHENTIK_POSTGRESQL__USER": b64("authentik"),
        "AUTHENTIK_POSTGRESQL__PASSWORD": b64(password),
        "AUTHENTIK_POSTGRESQL__NAME": b64("authentik"),
        "AUTHENTIK_SECRET_KEY": b64(unreferenced),
    }}))
    .unwrap()
}

/// Changes one key of Secret `goauthentik`.
async fn set_secret_key(client: &Client, namespace: &str, key: &str, value: &str) {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(
            "goauthentik",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {key: b64(value)}})),
        )
        .await
        .unwrap();
}

fn server_pods() -> BTreeMap<String, String> {
    labels(&[
        ("app.kubernetes.io/name", "authentik"),
        ("app.kubernetes.io/component", "server"),
    ])
}

fn outpost_pods() -> BTreeMap<String, String> {
    labels(&[
        ("app.kubernetes.io/name", "authentik-outpost-proxy"),
        ("app.kubernetes.io/managed-by", "goauthentik.io"),
        ("goauthentik.io/outpost-name", "authentik-embedded-outpost"),
        ("goauthentik.io/outpost-type", "proxy"),
        (
            "goauthentik.io/outpost-uuid",
            "0eecac0797c7443c892505f2f4fe3e47",
        ),
    ])
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selector(service: &Service) -> BTreeMap<String, String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
}

fn template_annotation(d: &Deployment, key: &str) -> Option<String> {
    d.spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

fn env_names(d: &Deployment) -> Vec<String> {
    d.spec.template.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect()
}

fn generation(d: &Deployment) -> i64 {
    d.metadata.generation.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Waiting

// ---------------------------------------------------------------------------------------------
// The webhook

/// Registers the webhook at `url` for `namespace` only, as `webhook-config` renders it, under
/// the name `name`; returns once the apiserver calls it (a dry-run create of the embedded
/// outpost's Deployment comes back with the injected env).
async fn register(cp: &ControlPlane, name: &str, namespace: &str, url: &str, ca: &Path) {
    let out = Command::new(BIN)
        .arg("webhook-config")
        .arg("--ca-bundle")
        .arg(ca)
        .arg("--url")
        .arg(url)
        .arg("--namespace-selector")
        .arg(format!("kubernetes.io/metadata.name={namespace}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut doc: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    doc["metadata"]["name"] = json!(name);
    let registration: MutatingWebhookConfiguration = serde_json::from_value(doc).unwrap();
    let client = cp.client().await;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &registration)
        .await
        .unwrap();
    // The apiserver reads registrations through an informer: wait until this one is in force.
    let deployments = Api::<Deployment>::namespaced(client, namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let probe = embedded_deployment(namespace);
    wait_for(
        SETTLE,
        "the apiserver calls the new registration",
        || async {
            let d = deployments.create(&dry_run, &probe).await.ok()?;
            env_names(&d)
                .contains(&"AUTHENTIK_POSTGRESQL__PASSWORD".to_owned())
                .then_some(())
        },
    )
    .await;
}

/// `serve --cluster on` with the admin's kubeconfig, watching `namespace` and holding its Lease
/// there, serving the certificate in `certs`.
fn serve_on(cp: &ControlPlane, certs: &TempDir, namespace: &str) -> Served {
    spawn_served(replica(
        &cp.kubeconfig,
        certs,
        namespace,
        &format!("{namespace}-replica"),
        &[],
    ))
}

async fn ready(served: &Served) {
    wait_for(BOUND, "/readyz answers 200", || async {
        (health_get(served.health, "/readyz").await.0 == 200).then_some(())
    })
    .await;
}

/// The value of an unlabelled metric from `/metrics`.
async fn metric(served: &Served, name: &str) -> Option<f64> {
    let (status, text) = health_get(served.health, "/metrics").await;
    if status != 200 {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The control plane itself

#[tokio::test]
async fn the_control_plane_is_the_pinned_release() {
    let cp = shared();
    let version = cp.client().await.apiserver_version().await.unwrap();
    assert_eq!(
        version.git_version,
        common::control_plane::kubernetes_version()
    );
}

// ---------------------------------------------------------------------------------------------
// The registration

/// The registration `webhook-config` renders, on the real apiserver: dry runs are mutated and
/// store nothing; the controller's strategic-merge PATCH, which merges its selector back into
/// the stored one (the 6-key union), converges on what the CREATE stored, and a second identical
/// PATCH changes nothing (no new resourceVersion or generation); `kubectl rollout restart`'s
/// PATCH keeps the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_applies_the_webhooks_patches_and_the_controllers_patch_converges() {
    let cp = shared();
    let ns = cp.namespace("registration").await;
    let client = cp.client().await;
    let certs = temp_dir("registration-certs");
    certs_into(&certs);
    let served = serve_on(cp, &certs, &ns);
    ready(&served).await;
    let url = format!("https://127.0.0.1:{}/mutate", served.addr.port());
    register(
        cp,
        &format!("outpost-webhook-{ns}"),
        &ns,
        &url,
        &certs.path().join("ca.crt"),
    )
    .await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &goauthentik(&ns, "pw", "k"))
        .await
        .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };

    // A dry run is mutated and stores nothing.
    let dry = deployments
        .create(&dry_run, &embedded_deployment(&ns))
        .await
        .unwrap();
    assert_eq!(dry.spec.replicas, Some(2));
    assert!(template_annotation(&dry, SECRET_CHECKSUM).is_some());
    assert!(deployments.get_opt(OUTPOST).await.unwrap().is_none());

    // The standalone Deployment, stored as admission fixed it.
    let created = deployments
        .create(&PostParams::default(), &embedded_deployment(&ns))
        .await
        .unwrap();
    for key in ["HOST", "PORT", "USER", "PASSWORD", "NAME"] {
        assert!(
            env_names(&created).contains(&format!("AUTHENTIK_POSTGRESQL__{key}")),
            "{key}"
        );
    }
    let pod_labels = created.spec.template.metadata.as_ref();
    assert_eq!(
        pod_labels.unwrap().labels.as_ref().unwrap()["app.kubernetes.io/component"],
        "server"
    );
    assert!(template_annotation(&created, CONFIG_CHECKSUM).is_some());
    assert_eq!(generation(&created), 1);

    // The Service: once the cache has seen the standalone Deployment, a dry-run create selects
    // the outpost's pods; the real create stores that and records the controller's selector.
    wait_for(
        BOUND,
        "a dry-run Service create selects the outpost's pods",
        || async {
            let s = services
                .create(&dry_run, &embedded_service(&ns))
                .await
                .ok()?;
            (selector(&s) == outpost_pods()).then_some(())
        },
    )
    .await;
    let stored = services
        .create(&PostParams::default(), &embedded_service(&ns))
        .await
        .unwrap();
    assert_eq!(selector(&stored), outpost_pods());
    assert_eq!(
        serde_json::from_str::<BTreeMap<String, String>>(
            &stored.metadata.annotations.as_ref().unwrap()[ORIGINAL_SELECTOR]
        )
        .unwrap(),
        server_pods()
    );

    // The controller's update: a strategic-merge PATCH of its whole reference object.
    let controller = PatchParams::default();
    let reference = fixture("embedded-proxy-service.create.json", &ns);
    let dry_patch = services
        .patch(
            OUTPOST,
            &PatchParams {
                dry_run: true,
                ..PatchParams::default()
            },
            &Patch::Strategic(&reference),
        )
        .await
        .unwrap();
    assert_eq!(selector(&dry_patch), outpost_pods());
    for _ in 0..2 {
        let patched = services
            .patch(OUTPOST, &controller, &Patch::Strategic(&reference))
            .await
            .unwrap();
        assert_eq!(selector(&patched), outpost_pods());
        assert_eq!(
            patched.metadata.resource_version, stored.metadata.resource_version,
            "the stored Service is what the CREATE stored: nothing was written"
        );
    }

    // The same for the Deployment: a PATCH of its reference object leaves the generation.
    let reference = fixture("embedded-proxy-deployment.create.json", &ns);
    for _ in 0..2 {
        let patched = deployments
            .patch(OUTPOST, &controller, &Patch::Strategic(&reference))
            .await
            .unwrap();
        assert_eq!(generation(&patched), 1);
        assert_eq!(env_names(&patched), env_names(&created));
    }

    // `kubectl rollout restart`: a new pod template, so one new generation, still fixed.
    let restarted = deployments
        .patch(
            OUTPOST,
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-12-03T10:00:00Z"}}}}})),
        )
        .await
        .unwrap();
    assert_eq!(generation(&restarted), 2);
    assert_eq!(env_names(&restarted), env_names(&created));
    assert_eq!(
        template_annotation(&restarted, SECRET_CHECKSUM),
        template_annotation(&created, SECRET_CHECKSUM)
    );
    Api::<MutatingWebhookConfiguration>::all(client)
        .delete(&format!("outpost-webhook-{ns}"), &DeleteParams::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// deploy/plain, as deployed

/// `kubectl apply --dry-run=server -o json` of `object`: the object as admission left it.
fn kubectl_apply_dry_run(cp: &ControlPlane, object: &Value) -> Value {
    let out = cp.kubectl_with(
        &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
        &object.to_string(),
    );
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kubectl apply -f -` of `text` as the admin; its output.
fn kubectl_apply(cp: &ControlPlane, text: &str) -> String {
    let out = cp.kubectl_with(&["apply", "-f", "-"], text);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The webhook as `deploy/plain` installs it, on the test control plane: the rendered objects
/// applied, the TLS Secret made by `certs`, and each replica a process that sees in-cluster
/// configuration with its `ServiceAccount`'s token and runs the rendered container args with the
/// rendered volumes.
struct Installed {
    certs: TempDir,
    policy: TempDir,
    deployment: Value,
    token: String,
}

impl Installed {
    async fn apply(cp: &ControlPlane) -> Self {
        cp.create_namespace("authentik").await;
        let (text, docs) = kustomize("plain");
        kubectl_apply(cp, &text);
        let certs = temp_dir("plain-certs");
        let out = Command::new(BIN)
            .args(["certs", "--service", "outpost-webhook", "--namespace"])
            .args(["outpost-webhook", "--san", "127.0.0.1", "--out"])
            .arg(certs.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let secret = cp
            .kubectl()
            .args(["-n", "outpost-webhook", "create", "secret", "tls"])
            .arg("outpost-webhook-tls")
            .arg(format!("--cert={}", certs.path().join("tls.crt").display()))
            .arg(format!("--key={}", certs.path().join("tls.key").display()))
            .output()
            .unwrap();
        assert!(
            secret.status.success(),
            "{}",
            String::from_utf8_lossy(&secret.stderr)
        );
        let policy = temp_dir("plain-policy");
        let configmap = doc(&docs, "ConfigMap");
        for (file, content) in configmap["data"].as_object().unwrap() {
            std::fs::write(policy.path().join(file), content.as_str().unwrap()).unwrap();
        }
        let token = cp.token("outpost-webhook", "outpost-webhook").await;
        Self {
            certs,
            policy,
            deployment: doc(&docs, "Deployment").clone(),
            token,
        }
    }

    /// A replica named `name`, as the kubelet would run the rendered pod.
    fn pod(&self, cp: &ControlPlane, name: &str) -> Pod {
        let volumes = volume_mounts(&self.deployment)
            .into_iter()
            .map(|(path, volume)| {
                let dir = if volume.get("secret").is_some() {
                    self.certs.path()
                } else {
                    self.policy.path()
                };
                (path, dir)
            })
            .collect();
        Pod::start(
            cp,
            &PodSpec {
                name,
                namespace: "outpost-webhook",
                token: &self.token,
                args: container_args(&self.deployment),
                volumes,
            },
        )
    }
}

/// Which of `pods` says it holds the Lease (`outpost_webhook_cluster_leader 1`), sampled once.
async fn leaders(pods: &[&Pod]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pods {
        if metric(&p.served, "outpost_webhook_cluster_leader").await == Some(1.0) {
            out.push(p.name.clone());
        }
    }
    out
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "outpost-webhook")
        .get_opt("outpost-webhook")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Waits until the outpost Deployment's pod template has a new secret checksum and one new
/// generation, and checks that no second write follows the first (the reconciler wrote once).
async fn rolls_once(deployments: &Api<Deployment>, before: &Deployment) -> Deployment {
    let was = template_annotation(before, SECRET_CHECKSUM);
    let rolled = wait_for(BOUND, "the outpost Deployment rolls", || async {
        let d = deployments.get(OUTPOST).await.ok()?;
        (template_annotation(&d, SECRET_CHECKSUM) != was).then_some(d)
    })
    .await;
    assert_eq!(generation(&rolled), generation(before) + 1);
    // And no second write follows: the reconciler has seen its own write within a second or two
    // (the next pass plans from it); 3 s of samples.
    for _ in 0..30 {
        tokio::time::sleep(POLL).await;
        let now = deployments.get(OUTPOST).await.unwrap();
        assert_eq!(generation(&now), generation(&rolled), "a second roll");
    }
    rolled
}

/// `deploy/plain` on a real apiserver, two replicas in-cluster under its own RBAC: exactly one
/// leads; the embedded outpost's Service follows a standalone Deployment and back; a referenced
/// Secret key change rolls the outpost once, an unreferenced one not at all; killing the leader
/// hands over and the next change still rolls; no replica logs a 403; and the `ServiceAccount`
/// cannot read a Secret the policy does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_plain_runs_two_replicas_under_its_own_rbac() {
    let cp = shared();
    let client = cp.client().await;
    let installed = Installed::apply(cp).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "authentik");
    secrets
        .create(
            &PostParams::default(),
            &goauthentik("authentik", "pw-1", "k-1"),
        )
        .await
        .unwrap();
    let other: Secret = serde_json::from_value(json!({
        "metadata": {"name": "authentik-other", "namespace": "authentik"},
        "data": {"K": b64("v")}}))
    .unwrap();
    secrets
        .create(&PostParams::default(), &other)
        .await
        .unwrap();

    let a = installed.pod(cp, "outpost-webhook-7d9f-aaaaa");
    let b = installed.pod(cp, "outpost-webhook-7d9f-bbbbb");
    ready(&a.served).await;
    ready(&b.served).await;
    // The Service, as kube-proxy would route it; the registration last, as README orders it.
    let service = ServiceProxy::start(vec![a.served.addr, b.served.addr]);
    register(
        cp,
        "outpost-webhook",
        "authentik",
        &format!("https://127.0.0.1:{}/mutate", service.addr.port()),
        &installed.certs.path().join("ca.crt"),
    )
    .await;

    // Exactly one leader, in every sample, and the Lease names it.
    let leader = wait_for(TAKEOVER, "one replica holds the Lease", || async {
        let l = leaders(&[&a, &b]).await;
        (l.len() == 1).then(|| l[0].clone())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(leaders(&[&a, &b]).await, std::slice::from_ref(&leader));
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        lease_holder(&client).await.as_deref(),
        Some(leader.as_str())
    );

    // A default install: the Service keeps the controller's selector.
    let services = Api::<Service>::namespaced(client.clone(), "authentik");
    let deployments = Api::<Deployment>::namespaced(client.clone(), "authentik");
    let created = services
        .create(&PostParams::default(), &embedded_service("authentik"))
        .await
        .unwrap();
    assert_eq!(selector(&created), server_pods());

    // A standalone Deployment appears: the leader points the Service at its pods; it goes: the
    // selector is restored.
    deployments
        .create(&PostParams::default(), &embedded_deployment("authentik"))
        .await
        .unwrap();
    wait_for(BOUND, "the Service selects the outpost's pods", || async {
        let s = services.get(OUTPOST).await.ok()?;
        (selector(&s) == outpost_pods()).then_some(())
    })
    .await;
    deployments
        .delete(OUTPOST, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(BOUND, "the Service's selector is restored", || async {
        let s = services.get(OUTPOST).await.ok()?;
        (selector(&s) == server_pods()).then_some(())
    })
    .await;
    let mut outpost = deployments
        .create(&PostParams::default(), &embedded_deployment("authentik"))
        .await
        .unwrap();
    wait_for(BOUND, "the Service follows the new Deployment", || async {
        let s = services.get(OUTPOST).await.ok()?;
        (selector(&s) == outpost_pods()).then_some(())
    })
    .await;

    // An unreferenced key changes, then a referenced one: exactly one roll. Had the first
    // rolled, the generation would have moved twice.
    set_secret_key(&client, "authentik", "AUTHENTIK_SECRET_KEY", "k-2").await;
    set_secret_key(
        &client,
        "authentik",
        "AUTHENTIK_POSTGRESQL__PASSWORD",
        "pw-2",
    )
    .await;
    outpost = rolls_once(&deployments, &outpost).await;

    // Each write left an Event saying why, as `kubectl get events` shows it.
    let out = cp
        .kubectl()
        .args([
            "-n",
            "authentik",
            "get",
            "events.events.k8s.io",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Value = serde_json::from_slice(&out.stdout).unwrap();
    let said = |kind: &str, reason: &str| -> Vec<String> {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["regarding"]["kind"] == kind && e["reason"] == reason)
            .map(|e| {
                assert_eq!(e["reportingController"], "outpost-webhook");
                assert_eq!(e["regarding"]["name"], OUTPOST);
                e["note"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(
        said("Deployment", "SecretChanged"),
        ["Pods rolled: Secret goauthentik key(s) AUTHENTIK_POSTGRESQL__PASSWORD changed"]
    );
    assert!(said("Service", "SelectorFollowsOutpostPods").contains(
        &"Selector set to the pods of the Deployment that runs outpost authentik-embedded-outpost \
          on its own; the controller's selector is kept in annotation \
          outpost-webhook/original-selector"
            .to_owned()
    ));
    assert_eq!(
        said("Service", "SelectorRestored"),
        [
            "Selector restored from annotation outpost-webhook/original-selector: no Deployment \
          runs outpost authentik-embedded-outpost on its own now, so the authentik server pods \
          serve it"
        ]
    );

    // The leader dies without releasing the Lease: the other takes over, and the next change
    // still rolls, once.
    let (mut dead, alive) = if a.name == leader { (a, b) } else { (b, a) };
    dead.served.child.kill().unwrap();
    dead.served.child.wait().unwrap();
    service.set_backends(vec![alive.served.addr]);
    wait_for(TAKEOVER, "the other replica takes the Lease", || async {
        (leaders(&[&alive]).await.len() == 1
            && lease_holder(&client).await.as_deref() == Some(alive.name.as_str()))
        .then_some(())
    })
    .await;
    set_secret_key(
        &client,
        "authentik",
        "AUTHENTIK_POSTGRESQL__PASSWORD",
        "pw-3",
    )
    .await;
    rolls_once(&deployments, &outpost).await;

    // Nothing was refused: RBAC allows all the webhook does.
    let mut alive = alive;
    for pod in [&mut dead, &mut alive] {
        let log = pod.served.lines_so_far().join("\n");
        assert!(
            // Digits such as 403 turn up in timestamps; the refusal lines are in words.
            !log.contains("orbidden")
                && !log.contains("refused")
                && !log.contains("Cannot write an Event"),
            "{}:\n{log}",
            pod.name
        );
    }

    // doctor shows the latest Event on each outpost object.
    let out = Command::new(BIN)
        .env("KUBECONFIG", &cp.kubeconfig)
        .args(["doctor", "-n", "authentik", "-o", "json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let latest: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == "object.event")
        .collect();
    assert!(
        latest.iter().any(|f| f["object"]
            == format!("Deployment/authentik/{OUTPOST}")
            && f["message"]
                .as_str()
                .unwrap()
                .contains("SecretChanged: Pods rolled: Secret goauthentik key(s) AUTHENTIK_POSTGRESQL__PASSWORD changed")),
        "{latest:?}"
    );

    // The ServiceAccount reads the Secret the policy names, and no other.
    let as_webhook = token_client(cp, &installed.token).await;
    let its_secrets = Api::<Secret>::namespaced(as_webhook, "authentik");
    its_secrets.get("goauthentik").await.unwrap();
    let refused = its_secrets.get("authentik-other").await.unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 403),
        "{refused}"
    );
}

/// Which of `replicas` say they hold the Lease, sampled once.
async fn leading(replicas: &[(&str, &Served)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, served) in replicas {
        if metric(served, "outpost_webhook_cluster_leader").await == Some(1.0) {
            out.push((*name).to_owned());
        }
    }
    out
}

/// The events.k8s.io Events on object `name` of `kind` in `namespace`.
async fn events_on(client: &Client, namespace: &str, kind: &str, name: &str) -> Vec<Value> {
    let events: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &kube::api::ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&()),
    );
    events
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The Lease

/// Issue 19: two replicas started together on a released Lease, five times: in no 0.1 s sample
/// do both say they lead, and one of them does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_a_released_lease_never_both_lead() {
    let cp = shared();
    let client = cp.client().await;
    let certs = temp_dir("race-certs");
    certs_into(&certs);
    for trial in 0..5 {
        let ns = cp.namespace("race").await;
        let released: Lease = serde_json::from_value(json!({
            "metadata": {"name": "outpost-webhook", "namespace": ns},
            "spec": {"leaseDurationSeconds": 15, "leaseTransitions": 4}}))
        .unwrap();
        Api::<Lease>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &released)
            .await
            .unwrap();
        let mut a = start_served(replica(&cp.kubeconfig, &certs, &ns, "a", &[]));
        let mut b = start_served(replica(&cp.kubeconfig, &certs, &ns, "b", &[]));
        a.wait_serving();
        b.wait_serving();
        let mut led = std::collections::BTreeSet::new();
        for _ in 0..80 {
            let now = leading(&[("a", &a), ("b", &b)]).await;
            assert!(now.len() <= 1, "trial {trial}: both lead");
            led.extend(now);
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(
            led.len(),
            1,
            "trial {trial}: one replica took the Lease and kept it"
        );
        let holder = lease_holder_in(&client, &ns).await;
        assert!(led.contains(holder.as_deref().unwrap()), "trial {trial}");
    }
}

async fn lease_holder_in(client: &Client, namespace: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt("outpost-webhook")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Issue 19: a leader cut off from the apiserver (a partition: its connections go silent)
/// stops acting as leader within the Lease duration, before the other replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_apiserver_stops_before_another_takes_over() {
    let cp = shared();
    let ns = cp.namespace("partition").await;
    let certs = temp_dir("partition-certs");
    certs_into(&certs);
    let link = ServiceProxy::start(vec![([127, 0, 0, 1], cp.port).into()]);
    let (_cut_dir, cut_config) = kubeconfig(
        cp,
        &format!("https://127.0.0.1:{}", link.addr.port()),
        &User::Admin,
    );
    let a = spawn_served(replica(&cut_config, &certs, &ns, "a", &[]));
    wait_for(BOUND, "a leads", || async {
        (leading(&[("a", &a)]).await.len() == 1).then_some(())
    })
    .await;
    let mut b = spawn_served(replica(&cp.kubeconfig, &certs, &ns, "b", &[]));
    ready(&b).await;

    link.cut();
    let cut = Instant::now();
    let mut a_stopped = None;
    let deadline = cut + TAKEOVER * 2;
    loop {
        let now = leading(&[("a", &a), ("b", &b)]).await;
        assert!(
            now.len() <= 1,
            "both lead {:?} after the cut",
            cut.elapsed()
        );
        if a_stopped.is_none() && !now.contains(&"a".to_owned()) {
            a_stopped = Some(cut.elapsed());
        }
        if now == ["b"] {
            break;
        }
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(POLL).await;
    }
    let a_stopped = a_stopped.unwrap();
    assert!(
        a_stopped <= outpost_webhook::core::lease::LEASE_DURATION,
        "a stopped leading {a_stopped:?} after the cut"
    );
    assert_eq!(
        lease_holder_in(&cp.client().await, &ns).await.as_deref(),
        Some("b")
    );
    assert!(
        b.lines_so_far()
            .iter()
            .any(|l| l.contains("holds the reconciler's Lease"))
    );
}

// ---------------------------------------------------------------------------------------------
// Before the registration

/// Issue 19: started before its registration exists (README's order), the leader converges an
/// existing outpost Deployment with the whole fix in one write, never a fragment such as the
/// Secret checksum alone; the write leaves an Event saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_its_registration_the_leader_writes_the_whole_fix_or_nothing() {
    let cp = shared();
    let ns = cp.namespace("unregistered").await;
    let client = cp.client().await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &goauthentik(&ns, "pw", "k"))
        .await
        .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let stored = deployments
        .create(&PostParams::default(), &embedded_deployment(&ns))
        .await
        .unwrap();
    assert!(
        !env_names(&stored).contains(&"AUTHENTIK_POSTGRESQL__PASSWORD".to_owned()),
        "no registration: stored as written"
    );
    let certs = temp_dir("unregistered-certs");
    certs_into(&certs);
    let mut served = spawn_served(replica(&cp.kubeconfig, &certs, &ns, "a", &[]));
    "a".clone_into(&mut served.label);
    let fixed = wait_for(SETTLE, "the leader converges the Deployment", || async {
        let d = deployments.get(OUTPOST).await.ok()?;
        // Every version seen: a checksum comes with the env it belongs to.
        let injected = env_names(&d)
            .iter()
            .filter(|n| n.starts_with("AUTHENTIK_POSTGRESQL__"))
            .count();
        if template_annotation(&d, SECRET_CHECKSUM).is_some() {
            assert_eq!(injected, 5, "a fragment was written");
        }
        (injected == 5).then_some(d)
    })
    .await;
    assert!(template_annotation(&fixed, SECRET_CHECKSUM).is_some());
    assert!(template_annotation(&fixed, CONFIG_CHECKSUM).is_some());
    assert_eq!(generation(&fixed), 2, "one write");
    let events = wait_for(SETTLE, "an Event on the Deployment", || async {
        let e = events_on(&client, &ns, "Deployment", OUTPOST).await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events[0]["reason"], "SecretChanged");
    assert_eq!(events[0]["type"], "Normal");
    assert_eq!(events[0]["reportingController"], "outpost-webhook");
    assert_eq!(events[0]["reportingInstance"], "a");
    assert_eq!(
        events[0]["note"],
        "Pods rolled: outpost-webhook/secret-checksum set to the data of the Secret keys this \
         outpost reads (its first fix, or a change made while no replica watched)"
    );
}

// ---------------------------------------------------------------------------------------------
// Operator mistakes

/// `kubectl create --dry-run=server` of `object`: the warnings kubectl prints.
fn dry_run_warnings(cp: &ControlPlane, object: &Value) -> String {
    let out = cp.kubectl_with(
        &["create", "--dry-run=server", "-o", "name", "-f", "-"],
        &object.to_string(),
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// A Role as `deploy/watch` grants it, in `namespace`, for `ServiceAccount` `namespace/webhook`,
/// with the Lease there too; its token.
async fn webhook_account(cp: &ControlPlane, namespace: &str) -> String {
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "webhook", "namespace": namespace},
        "rules": [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["goauthentik"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": ["outpost-webhook"], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "webhook", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "webhook"},
        "subjects": [{"kind": "ServiceAccount", "name": "webhook", "namespace": namespace}]});
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "webhook", "namespace": namespace}});
    kubectl_apply(
        cp,
        &json!({"apiVersion": "v1", "kind": "List", "items": [account, role, binding]}).to_string(),
    );
    cp.token(namespace, "webhook").await
}

/// Issue 19: a policy naming a Secret the Role does not allow (a typo) is not an outage: the
/// replica stays ready, and a dry run of an outpost Deployment is answered with a warning naming
/// it; the good policy back, nothing is refused any more, without a restart. Then a key removed
/// from the Secret: the next outpost write warns, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_secret_or_a_removed_key_is_a_warning_not_an_outage() {
    let cp = shared();
    let ns = cp.namespace("mistakes").await;
    let client = cp.client().await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &goauthentik(&ns, "pw", "k"))
        .await
        .unwrap();
    let token = webhook_account(cp, &ns).await;
    let (_config_dir, config) = kubeconfig(cp, &cp.url, &User::Token(&token));
    let certs = temp_dir("mistakes-certs");
    certs_into(&certs);
    let policy_dir = temp_dir("mistakes-policy");
    let policy = policy_dir.path().join("policy.yaml");
    let good = outpost_webhook::core::policy::DEFAULT_POLICY_YAML;
    std::fs::write(&policy, good).unwrap();
    let mut served = spawn_served(replica(
        &config,
        &certs,
        &ns,
        "a",
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--reload-interval",
            "500ms",
        ],
    ));
    ready(&served).await;
    register(
        cp,
        &format!("outpost-webhook-{ns}"),
        &ns,
        &format!("https://127.0.0.1:{}/mutate", served.addr.port()),
        &certs.path().join("ca.crt"),
    )
    .await;
    let deployment = fixture("embedded-proxy-deployment.create.json", &ns);
    assert!(!dry_run_warnings(cp, &deployment).contains("outpost-webhook"));

    std::fs::write(
        &policy,
        good.replace("name: goauthentik", "name: goauthentk"),
    )
    .unwrap();
    let warned = wait_for(
        Duration::from_secs(20),
        "a warning naming goauthentk",
        || async {
            assert_eq!(
                health_get(served.health, "/readyz").await.0,
                200,
                "never unready"
            );
            let w = dry_run_warnings(cp, &deployment);
            w.contains("goauthentk").then_some(w)
        },
    )
    .await;
    assert!(
        warned.contains(&format!("cannot read Secret goauthentk in {ns}")),
        "{warned}"
    );
    assert!(metric(&served, "outpost_webhook_cluster_forbidden").await >= Some(1.0));

    std::fs::write(&policy, good).unwrap();
    wait_for(
        Duration::from_secs(20),
        "the good policy back, nothing refused",
        || async {
            (health_get(served.health, "/readyz").await.0 == 200
                && metric(&served, "outpost_webhook_cluster_forbidden").await == Some(0.0)
                && !dry_run_warnings(cp, &deployment).contains("goauthentk"))
            .then_some(())
        },
    )
    .await;

    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "goauthentik",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"AUTHENTIK_POSTGRESQL__PASSWORD": null}})),
        )
        .await
        .unwrap();
    let warned = wait_for(BOUND, "a warning naming the removed key", || async {
        let w = dry_run_warnings(cp, &deployment);
        w.contains("AUTHENTIK_POSTGRESQL__PASSWORD").then_some(w)
    })
    .await;
    assert!(
        warned.contains("Secret goauthentik has no key AUTHENTIK_POSTGRESQL__PASSWORD"),
        "{warned}"
    );
    let log = served.lines_so_far().join("\n");
    assert!(!log.contains("pw"), "no Secret value is logged");
    // The refusal was logged once, in words, not as kube-runtime's raw dump every second.
    assert!(!log.contains("Api(Status"), "{log}");
    let refusals = log
        .lines()
        .filter(|l| l.contains("The apiserver refused a watch"))
        .count();
    assert_eq!(refusals, 1, "{log}");
}

// ---------------------------------------------------------------------------------------------
// Watch faults

/// More outposts than one list page holds (the cache lists 50 at a time): every one is seen,
/// so the lists were continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_500_outposts_are_listed_in_pages_and_all_seen() {
    const N: u32 = 520;
    let cp = shared();
    let ns = cp.namespace("paging").await;
    let client = cp.client().await;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let template = fixture("public-proxy-service.create.json", &ns);
    let mut pending = Vec::new();
    for i in 0..N {
        let mut s = template.clone();
        s["metadata"]["name"] = json!(format!("ak-outpost-many-{i}"));
        s["metadata"]["labels"]["goauthentik.io/outpost-name"] = json!(format!("many-{i}"));
        let service: Service = serde_json::from_value(s).unwrap();
        let services = services.clone();
        pending.push(async move { services.create(&PostParams::default(), &service).await });
        if pending.len() == 20 || i == N - 1 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r.unwrap();
            }
        }
    }
    let certs = temp_dir("paging-certs");
    certs_into(&certs);
    let served = spawn_served(replica(&cp.kubeconfig, &certs, &ns, "a", &[]));
    ready(&served).await;
    wait_for(BOUND, "every outpost Service in the cache", || async {
        let seen = metric(&served, "outpost_webhook_cluster_cache_services").await;
        (seen == Some(f64::from(N))).then_some(())
    })
    .await;
    // More than ten pages.
    const { assert!(N > 10 * outpost_webhook::cluster::cache::PAGE_SIZE) };
}

/// An apiserver restart mid-watch: the watches resume, and a change made after it is seen.
/// Then etcd compacts history while the replica's apiserver is down and another apiserver of
/// the same etcd takes writes: the replica resumes from a resourceVersion that is gone, is
/// answered 410 Gone, lists again, and misses nothing (the Service follows the Deployment
/// created meanwhile, and the Secret changed meanwhile rolls its outpost once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_survive_an_apiserver_restart_and_a_compaction_that_answers_410_gone() {
    let cp = ControlPlane::start();
    let ns = "authentik";
    cp.create_namespace(ns).await;
    let client = cp.client().await;
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    secrets
        .create(&PostParams::default(), &goauthentik(ns, "pw-1", "k"))
        .await
        .unwrap();
    let certs = temp_dir("restart-certs");
    certs_into(&certs);
    let mut served = spawn_served(replica(&cp.kubeconfig, &certs, ns, "a", &[]));
    ready(&served).await;
    register(
        &cp,
        "outpost-webhook",
        ns,
        &format!("https://127.0.0.1:{}/mutate", served.addr.port()),
        &certs.path().join("ca.crt"),
    )
    .await;
    let services = Api::<Service>::namespaced(client.clone(), ns);
    services
        .create(&PostParams::default(), &embedded_service(ns))
        .await
        .unwrap();

    // A restart, nothing changed meanwhile; then a change.
    cp.restart_apiserver();
    let client = cp.client().await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let outpost = wait_for(TAKEOVER, "a write after the restart", || async {
        deployments
            .create(&PostParams::default(), &embedded_deployment(ns))
            .await
            .ok()
    })
    .await;
    wait_for(
        TAKEOVER,
        "the Service follows the new Deployment",
        || async {
            let s = services.get(OUTPOST).await.ok()?;
            (selector(&s) == outpost_pods()).then_some(())
        },
    )
    .await;

    // The replica's apiserver goes down; another one of the same etcd takes the changes, and
    // etcd compacts them away.
    let (other, mut other_process) = cp.second_apiserver(&[]);
    cp.stop_apiserver();
    let (_dir, other_config) = kubeconfig(&cp, &other, &User::Admin);
    let other_client = client_from(&other_config).await;
    Api::<Deployment>::namespaced(other_client.clone(), ns)
        .delete(OUTPOST, &DeleteParams::default())
        .await
        .unwrap();
    set_secret_key(&other_client, ns, "AUTHENTIK_POSTGRESQL__PASSWORD", "pw-2").await;
    let recreated = Api::<Deployment>::namespaced(other_client.clone(), ns)
        .create(&PostParams::default(), &embedded_deployment(ns))
        .await
        .unwrap();
    compact(cp.etcd_url());
    cp.start_apiserver();
    let _ = other_process.kill();
    let _ = other_process.wait();
    // The Deployment made while the replica was away has the checksum of the Secret it read
    // then (the replica's cache was stale, so admission hashed the old data); once the replica
    // lists again it rolls it once.
    let deployments = Api::<Deployment>::namespaced(cp.client().await, ns);
    let rolled = wait_for(TAKEOVER, "the outpost rolls after the relist", || async {
        let d = deployments.get(OUTPOST).await.ok()?;
        (generation(&d) > generation(&recreated)).then_some(d)
    })
    .await;
    assert_eq!(generation(&rolled), generation(&recreated) + 1);
    assert_ne!(generation(&outpost), 0);
    let log = served.lines_so_far().join("\n");
    assert!(
        log.lines().any(|l| l.contains("Watch failed")
            && (l.contains("too old") || l.contains("Expired") || l.contains("Gone"))),
        "the watch was answered 410 Gone:\n{log}"
    );
}

/// Compacts etcd's history up to its current revision, through its JSON gateway.
fn compact(etcd: &str) {
    let post = |path: &str, body: &str| -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-X", "POST", "-d", body])
            .arg(format!("{etcd}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let revision = post("/v3/kv/range", r#"{"key": "AA==", "limit": 1}"#)["header"]["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    post(
        "/v3/kv/compaction",
        &format!(r#"{{"revision": "{revision}", "physical": true}}"#),
    );
}

// ---------------------------------------------------------------------------------------------
// The Helm chart, as installed

/// `helm template` of the chart as release `release` in `namespace`, with `sets`.
fn helm_template(release: &str, namespace: &str, sets: &[&str]) -> (String, Vec<Value>) {
    let mut command = Command::new(common::tools::helm());
    command
        .args(["template", release])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/outpost-webhook"))
        .args(["--namespace", namespace]);
    for set in sets {
        command.args(["--set", set]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    (text, docs)
}

/// Issue 17: the chart with its defaults (self-managed TLS), applied to a bare kube-apiserver,
/// is accepted; two replicas started at once with the rendered args and the chart's
/// `ServiceAccount` token end with one TLS Secret and a caBundle that verifies what both serve;
/// and the apiserver's dry runs of outpost objects come back mutated through the webhook the
/// chart registered. kube-proxy is stood in for: the chart's Service becomes an `ExternalName`
/// Service for a loopback address whose port 443 forwards to both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_with_self_managed_tls_and_its_webhook_answers_the_apiserver() {
    const RELEASE: &str = "chart-test";
    const NS: &str = "chart-system";
    const WATCHED: &str = "chart-authentik";
    let cp = shared();
    let client = cp.client().await;
    cp.create_namespace(NS).await;
    cp.create_namespace(WATCHED).await;
    let (text, docs) = helm_template(RELEASE, NS, &[&format!("watchNamespaces={{{WATCHED}}}")]);
    let applied = kubectl_apply(cp, &text);
    assert!(
        applied.contains("mutatingwebhookconfiguration"),
        "{applied}"
    );
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap()
        .clone();
    let service = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["spec"]["ports"][0]["port"] == 443)
        .unwrap();
    let fullname = service["metadata"]["name"].as_str().unwrap().to_owned();
    let registration = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let registration_name = registration["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        registration["webhooks"][0]["clientConfig"]
            .get("caBundle")
            .is_none(),
        "self-managed: the webhook fills the caBundle"
    );

    // What kube-proxy would do for the Service: an address that reaches the pods.
    let front_ip = common::proxy::own_loopback();
    Api::<Service>::namespaced(client.clone(), NS)
        .delete(&fullname, &DeleteParams::default())
        .await
        .unwrap();
    let external: Service = serde_json::from_value(json!({
        "metadata": {"name": fullname, "namespace": NS},
        "spec": {"type": "ExternalName", "externalName": front_ip.to_string()}}))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &external)
        .await
        .unwrap();

    let policy = temp_dir("chart-policy");
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    for (file, content) in configmap["data"].as_object().unwrap() {
        std::fs::write(policy.path().join(file), content.as_str().unwrap()).unwrap();
    }
    let token = cp.token(NS, &fullname).await;
    let volumes: Vec<(String, &Path)> = volume_mounts(&deployment)
        .into_iter()
        .map(|(path, _)| (path, policy.path()))
        .collect();
    let spec = |name| PodSpec {
        name,
        namespace: NS,
        token: &token,
        args: container_args(&deployment),
        volumes: volumes.clone(),
    };
    let a = Pod::start(cp, &spec("chart-test-outpost-webhook-aaaaa"));
    let b = Pod::start(cp, &spec("chart-test-outpost-webhook-bbbbb"));
    let front = ServiceProxy::start_on((front_ip, 443).into(), vec![a.served.addr, b.served.addr]);
    wait_for(TAKEOVER, "both replicas ready", || async {
        (health_get(a.served.health, "/readyz").await.0 == 200
            && health_get(b.served.health, "/readyz").await.0 == 200)
            .then_some(())
    })
    .await;

    // One Secret, and a caBundle that verifies what both replicas serve, under the Service's
    // name.
    let secrets = Api::<Secret>::namespaced(client.clone(), NS)
        .list(&kube::api::ListParams::default())
        .await
        .unwrap();
    let tls: Vec<&Secret> = secrets
        .items
        .iter()
        .filter(|s| s.type_.as_deref() == Some("kubernetes.io/tls"))
        .collect();
    assert_eq!(tls.len(), 1);
    assert_eq!(
        tls[0].metadata.name.as_deref(),
        Some(format!("{fullname}-tls").as_str())
    );
    let stored = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(&registration_name)
        .await
        .unwrap();
    let bundle = stored.webhooks.as_ref().unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap();
    let bundle = String::from_utf8(bundle.0).unwrap();
    let host = format!("{fullname}.{NS}.svc");
    for pod in [&a, &b] {
        let config = common::client_config(&bundle, &[b"http/1.1"], None);
        common::tls_connect_as(pod.served.addr, config, &host)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{} serves a certificate the caBundle does not verify: {e}",
                    pod.name
                )
            });
    }
    assert!(metric(&a.served, "outpost_webhook_ca_expiry_timestamp_seconds").await > Some(0.0));

    // The apiserver calls the webhook the chart registered, through the Service.
    let mutated = wait_for(
        SETTLE,
        "a dry run of an outpost Deployment is mutated",
        || async {
            let d = Api::<Deployment>::namespaced(client.clone(), WATCHED)
                .create(
                    &PostParams {
                        dry_run: true,
                        ..PostParams::default()
                    },
                    &embedded_deployment(WATCHED),
                )
                .await
                .ok()?;
            env_names(&d)
                .contains(&"AUTHENTIK_POSTGRESQL__PASSWORD".to_owned())
                .then_some(d)
        },
    )
    .await;
    assert!(template_annotation(&mutated, CONFIG_CHECKSUM).is_some());
    Api::<Deployment>::namespaced(client.clone(), WATCHED)
        .create(&PostParams::default(), &embedded_deployment(WATCHED))
        .await
        .unwrap();
    // `kubectl apply --dry-run=server`, as README's Verify says.
    wait_for(
        BOUND,
        "kubectl apply --dry-run=server of the outpost's Service selects its pods",
        || async {
            let service = fixture("embedded-proxy-service.create.json", WATCHED);
            let applied = kubectl_apply_dry_run(cp, &service);
            let s: Service = serde_json::from_value(applied).ok()?;
            (selector(&s) == outpost_pods()).then_some(())
        },
    )
    .await;
    drop(front);
}
