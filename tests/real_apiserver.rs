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
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{
    BIN, Served, certs_into,
    control_plane::{ControlPlane, shared},
    health_get,
    pod::{Pod, PodSpec, container_args, volume_mounts},
    proxy::ServiceProxy,
    serve_with, temp_dir,
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
/// The bound for the Service to follow its pods and for a Secret change to roll.
const BOUND: Duration = Duration::from_secs(10);
/// A Lease taken over after its holder died: the Lease duration (15 s) and a margin.
const TAKEOVER: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Objects

/// An object of the shared fixtures (`tests/fixtures`), moved into `namespace`, with what the
/// apiserver sets on a stored object removed so that it can be created.
fn fixture(name: &str, namespace: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut object = if v["kind"] == "AdmissionReview" {
        v["request"]["object"].clone()
    } else {
        v
    };
    let meta = object["metadata"].as_object_mut().unwrap();
    for k in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        meta.remove(k);
    }
    meta.insert("namespace".into(), json!(namespace));
    object.as_object_mut().unwrap().remove("status");
    object
}

fn embedded_service(namespace: &str) -> Service {
    serde_json::from_value(fixture("embedded-proxy-service.create.json", namespace)).unwrap()
}

fn embedded_deployment(namespace: &str) -> Deployment {
    serde_json::from_value(fixture("embedded-proxy-deployment.create.json", namespace)).unwrap()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
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

/// Polls `check` until it returns `Some`, at most `limit`; panics naming `what`.
async fn wait_for<T, F: Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(POLL).await;
    }
}

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
        BOUND,
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
    let mut command = Command::new(BIN);
    command
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("POD_NAME", format!("{namespace}-replica"))
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST");
    serve_with(
        command,
        certs,
        &[
            "--cluster",
            "on",
            "--watch-namespace",
            namespace,
            "--lease-namespace",
            namespace,
        ],
    )
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
        common::control_plane::KUBERNETES_VERSION
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

/// `kubectl kustomize` of an overlay under deploy/: its text and its documents.
fn kustomize(overlay: &str) -> (String, Vec<Value>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text).unwrap();
    (text, docs)
}

/// `kubectl apply -f -` of `text` as the admin; its output.
fn kubectl_apply(cp: &ControlPlane, text: &str) -> String {
    use std::io::Write as _;
    let mut child = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
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
            !log.contains("403") && !log.contains("orbidden"),
            "{}:\n{log}",
            pod.name
        );
    }

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

/// A client authenticating with a bearer `token`, as a pod does.
async fn token_client(cp: &ControlPlane, token: &str) -> Client {
    let dir = temp_dir("token-kubeconfig");
    let path: PathBuf = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
             clusters: [{{name: t, cluster: {{server: '{}', certificate-authority: '{}/ca.crt'}}}}]\n\
             users: [{{name: t, user: {{token: '{token}'}}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n",
            cp.url,
            cp.dir.display()
        ),
    )
    .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}
