//! `doctor` against a real kube-apiserver and etcd on loopback (`common::control_plane`), on
//! state the apiserver itself stored: the registration as `webhook-config` renders it (and as the
//! apiserver defaults it), the webhook's Deployment, Service and policy ConfigMap as `deploy/plain`
//! renders them, outpost Services and Deployments admitted through the real `serve`, Secret
//! `goauthentik`, and `doctor` itself, mostly as the binary run with a kubeconfig. The apiserver
//! runs admission, dry runs, preconditions, defaulting and RBAC; nothing here imitates them.
//!
//! What is not running, the tests do as it would:
//! - no kubelet or kube-controller-manager: the test writes the Pods (Ready) a `ReplicaSet` and a
//!   kubelet would, and the `EndpointSlice`s the endpointslice controller would;
//! - no kube-proxy: the webhook's Service is of type `ExternalName` `localhost`, which the
//!   apiserver's service resolver dials at the registration's port, so the registration still
//!   names a Service; it keeps the selector `deploy/` gives it, which doctor follows to the
//!   webhook's Deployment and its policy;
//! - the webhook's reconciler is kept idle by a Lease another identity holds (as when another
//!   replica leads), so a state written past the webhook stays for doctor to find
//!   (`tests/real_apiserver.rs` shows the reconciler at work).
//!
//! A write "past the webhook" is made the way it happens: while the registration does not select
//! the namespace. Every wait is bounded and polls the apiserver.
//!
//! Needs `scripts/ensure-kube-apiserver.sh` (or `KUBEBUILDER_ASSETS`); without the binaries every
//! test fails with the command that builds them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    fmt::Write as _,
    future::Future,
    io::Read as _,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use common::{
    BIN, Served,
    cluster::{b64, fixture, kustomize, replica, wait_for},
    control_plane::{ControlPlane, shared},
    health_get, spawn_served, temp_dir,
};
use http::Request;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret, Service},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    client::{Body, ClientBuilder},
};
use outpost_webhook::{
    cluster::inspect::{self, Scope},
    core::{
        doctor::{self, Check, Finding, Severity},
        policy::DEFAULT_POLICY_YAML,
    },
};
use serde_json::{Value, json};
use tempfile::TempDir;

const OUTPOST: &str = "ak-outpost-authentik-embedded-outpost";
const PASSWORD: &str = "correct-horse-battery-staple";
const TOKEN: &str = "outpost-api-token-value";
const WEBHOOK: &str = "outpost-webhook";
const CONFIG_CHECKSUM: &str = "outpost-webhook/config-checksum";
/// A change reaching the apiserver's informers (a registration, RBAC) or the webhook.
const BOUND: Duration = Duration::from_secs(20);
/// `doctor` itself: a few dozen requests.
const DOCTOR_BOUND: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Objects

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).unwrap()
}

/// The webhook's Deployment, Service and policy ConfigMap as `deploy/plain` renders them
/// (`kubectl kustomize`, once per test binary).
fn rendered() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| kustomize("plain").1)
}

fn rendered_doc(kind: &str) -> Value {
    rendered()
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("deploy/plain renders no {kind}"))
        .clone()
}

/// A Pod as a `ReplicaSet` would create it and a kubelet report it: Ready, with an IP.
async fn pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &Value,
    container: &str,
    ip: &str,
) {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &typed(
            json!({"metadata": {"name": name, "namespace": namespace, "labels": labels},
                      "spec": {"containers": [{"name": container, "image": "x"}]}}),
        ),
    )
    .await
    .unwrap();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
    )
    .await
    .unwrap();
}

/// The `EndpointSlice` the endpointslice controller would write for Service `service`.
async fn slice(client: &Client, namespace: &str, service: &str, port: (&str, i32), ips: &[&str]) {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x7k2p"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}]});
    create(client, slice).await;
}

/// The API of `object`'s kind, in its namespace (or cluster-wide).
fn api_of(client: &Client, object: &Value) -> Api<DynamicObject> {
    dynamic(
        client,
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["apiVersion"].as_str().unwrap(),
        object["kind"].as_str().unwrap(),
    )
}

/// Creates `object`, as the admin.
async fn create(client: &Client, object: Value) {
    api_of(client, &object)
        .create(&PostParams::default(), &typed(object))
        .await
        .unwrap();
}

/// Deletes `object`, as the admin.
async fn delete(client: &Client, object: &Value) {
    api_of(client, object)
        .delete(
            object["metadata"]["name"].as_str().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
}

fn dynamic(client: &Client, namespace: &str, api_version: &str, kind: &str) -> Api<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: match kind.to_ascii_lowercase() {
            k if k.ends_with('y') => format!("{}ies", k.trim_end_matches('y')),
            k => format!("{k}s"),
        },
    };
    if namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), namespace, &resource)
    }
}

// ---------------------------------------------------------------------------------------------
// One test's cluster

/// How a test's cluster is set up.
struct Setup {
    /// The policy the webhook runs: its ConfigMap's `policy.yaml` and `serve --policy`.
    policy: String,
    /// An outpost Deployment runs the embedded outpost (else a default install: the server pods
    /// serve it).
    standalone: bool,
    /// Validity of the webhook's CA.
    ca_days: u32,
    /// Leave out of the registration the fields whose apiserver default is what `webhook-config`
    /// renders.
    defaulted_registration: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            policy: rendered_doc("ConfigMap")["data"]["policy.yaml"]
                .as_str()
                .unwrap()
                .to_owned(),
            standalone: true,
            ca_days: 365,
            defaulted_registration: false,
        }
    }
}

/// A namespace of outposts and one where the webhook runs, the webhook serving, registered and
/// called, and the outposts admitted through it.
struct Cluster {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    webhook_ns: String,
    registration: String,
    certs: TempDir,
    policy_file: PathBuf,
    _policy_dir: TempDir,
    served: Served,
}

impl Cluster {
    async fn healthy() -> Self {
        Self::new(Setup::default()).await
    }

    async fn new(setup: Setup) -> Self {
        let cp = shared();
        let client = cp.client().await;
        let ns = cp.namespace("doctor").await;
        let webhook_ns = cp.namespace("doctor-webhook").await;
        let certs = certs(&webhook_ns, setup.ca_days);
        install_webhook(&client, &webhook_ns, &setup.policy).await;
        hold_lease(&client, &ns).await;
        let policy_dir = temp_dir("doctor-policy");
        let policy_file = policy_dir.path().join("policy.yaml");
        std::fs::write(&policy_file, &setup.policy).unwrap();
        let served = serve(cp, &certs, &ns, &policy_file).await;
        let cluster = Self {
            cp,
            client,
            registration: format!("outpost-webhook-{ns}"),
            ns,
            webhook_ns,
            certs,
            policy_file,
            _policy_dir: policy_dir,
            served,
        };
        cluster.register(setup.defaulted_registration).await;
        cluster.authentik().await;
        if setup.standalone {
            cluster.standalone_outpost().await;
        } else {
            cluster
                .services()
                .create(&PostParams::default(), &outpost_service(&cluster.ns))
                .await
                .unwrap();
            slice(
                &cluster.client,
                &cluster.ns,
                OUTPOST,
                ("http", 9000),
                &["10.0.2.1"],
            )
            .await;
        }
        cluster
    }

    /// authentik's Secrets, and its server: a Deployment, a ready pod, an `EndpointSlice`.
    async fn authentik(&self) {
        let (client, ns) = (&self.client, &self.ns);
        let secrets = Api::<Secret>::namespaced(client.clone(), ns);
        for secret in [
            json!({"metadata": {"name": "goauthentik", "namespace": ns}, "data": {
                "AUTHENTIK_POSTGRESQL__HOST": b64("postgresql"),
                "AUTHENTIK_POSTGRESQL__PORT": b64("5432"),
                "AUTHENTIK_POSTGRESQL__USER": b64("authentik"),
                "AUTHENTIK_POSTGRESQL__PASSWORD": b64(PASSWORD),
                "AUTHENTIK_POSTGRESQL__NAME": b64("authentik"),
                "AUTHENTIK_SECRET_KEY": b64("unreferenced")}}),
            json!({"metadata": {"name": OUTPOST, "namespace": ns}, "data": {
                "authentik_host": b64("https://authentik.example"),
                "authentik_host_browser": b64(""),
                "token": b64(TOKEN), "authentik_host_insecure": b64("false")}}),
        ] {
            secrets
                .create(&PostParams::default(), &typed(secret))
                .await
                .unwrap();
        }
        let server_deployment = fixture("unrelated-goauthentik-server-deployment.update.json", ns);
        let server_pods = server_deployment["spec"]["template"]["metadata"]["labels"].clone();
        self.deployments()
            .create(&PostParams::default(), &typed(server_deployment))
            .await
            .unwrap();
        pod(
            client,
            ns,
            "goauthentik-server-5d8f-a",
            &server_pods,
            "server",
            "10.0.2.1",
        )
        .await;
        slice(
            client,
            ns,
            "goauthentik-server",
            ("http", 9000),
            &["10.0.2.1"],
        )
        .await;
    }

    /// The embedded outpost as its own Deployment, admitted; its Service, created once the
    /// webhook's cache has seen the Deployment (so it selects the outpost's pods); two ready pods
    /// and their `EndpointSlice`.
    async fn standalone_outpost(&self) {
        let (client, ns) = (&self.client, &self.ns);
        let created = self
            .deployments()
            .create(
                &PostParams::default(),
                &typed(fixture("embedded-proxy-deployment.create.json", ns)),
            )
            .await
            .unwrap();
        let labels =
            serde_json::to_value(&created.spec.template.metadata).unwrap()["labels"].clone();
        let wanted = created.spec.selector.match_labels.clone().unwrap();
        let services = self.services();
        let service = outpost_service(ns);
        wait_for(
            BOUND,
            "the webhook sees the standalone Deployment",
            || async {
                let s = services.create(&dry_post(), &service).await.ok()?;
                (s.spec?.selector? == wanted).then_some(())
            },
        )
        .await;
        services
            .create(&PostParams::default(), &service)
            .await
            .unwrap();
        for (i, suffix) in ["7c9f-a", "7c9f-b"].iter().enumerate() {
            let name = format!("{OUTPOST}-{suffix}");
            pod(
                client,
                ns,
                &name,
                &labels,
                "proxy",
                &format!("10.0.3.{}", i + 1),
            )
            .await;
        }
        slice(
            client,
            ns,
            OUTPOST,
            ("http", 9000),
            &["10.0.3.1", "10.0.3.2"],
        )
        .await;
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn registrations(&self) -> Api<MutatingWebhookConfiguration> {
        Api::all(self.client.clone())
    }

    /// Registers the webhook as `webhook-config` renders it for this test's namespaces, at the
    /// port `serve` listens on; waits until the apiserver calls it.
    async fn register(&self, defaulted: bool) {
        let out = Command::new(BIN)
            .arg("webhook-config")
            .arg("--ca-bundle")
            .arg(self.certs.path().join("ca.crt"))
            .args(["--namespace", &self.webhook_ns, "--namespace-selector"])
            .arg(format!("kubernetes.io/metadata.name={}", self.ns))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut doc: Value = serde_saphyr::from_slice(&out.stdout).unwrap();
        doc["metadata"]["name"] = json!(self.registration);
        let webhook = &mut doc["webhooks"][0];
        // The ExternalName Service is dialled at the registration's port: serve's.
        webhook["clientConfig"]["service"]["port"] = json!(self.served.addr.port());
        if defaulted {
            let w = webhook.as_object_mut().unwrap();
            w.remove("matchPolicy");
            w.remove("failurePolicy");
        }
        self.registrations()
            .create(&PostParams::default(), &typed(doc))
            .await
            .unwrap();
        self.wait_webhook_called(true).await;
    }

    /// Waits until a dry-run create of an outpost Deployment (named `ak-outpost-probe`) comes
    /// back with a config checksum that `wanted` accepts (`None`: no checksum, the webhook was
    /// not called).
    async fn wait_probe(&self, what: &str, wanted: impl Fn(Option<&String>) -> bool) {
        let probe: Deployment = typed(probe(&self.ns));
        let deployments = self.deployments();
        wait_for(BOUND, what, || async {
            let d = deployments.create(&dry_post(), &probe).await.ok()?;
            let annotations = d.spec.template.metadata?.annotations.unwrap_or_default();
            wanted(annotations.get(CONFIG_CHECKSUM)).then_some(())
        })
        .await;
    }

    /// Waits until the apiserver does (or no longer does) call the webhook for this namespace:
    /// the probe comes back with (or without) the config checksum every policy here puts on it.
    async fn wait_webhook_called(&self, called: bool) {
        self.wait_probe(&format!("the webhook called: {called}"), |c| {
            c.is_some() == called
        })
        .await;
    }

    /// Changes the webhook's policy: its ConfigMap, and the file its pods read (as the kubelet
    /// updates a ConfigMap volume); waits until `serve` has reloaded it (the probe comes back with
    /// the new policy's config checksum).
    async fn change_policy(&self, policy: &str) {
        let configmap = rendered_doc("ConfigMap")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.webhook_ns)
            .patch(
                &configmap,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"policy.yaml": policy}})),
            )
            .await
            .unwrap();
        std::fs::write(&self.policy_file, policy).unwrap();
        let parsed = outpost_webhook::core::policy::Policy::from_yaml("p.yaml", policy).unwrap();
        let probe = probe(&self.ns);
        let outpost = outpost_webhook::core::mutate::identify_outpost(&probe).unwrap();
        let want = parsed
            .for_outpost(&outpost)
            .deployment
            .checksum
            .clone()
            .unwrap()
            .value;
        self.wait_probe("the webhook runs the new policy", |c| c == Some(&want))
            .await;
    }

    /// Waits until a dry-run PATCH of the outpost Deployment is refused with an error that
    /// `refused` accepts.
    async fn wait_dry_run_refused(&self, what: &str, refused: impl Fn(&kube::Error) -> bool) {
        let deployments = self.deployments();
        wait_for(BOUND, what, || async {
            let e = deployments
                .patch(OUTPOST, &dry_patch(), &Patch::Merge(json!({})))
                .await
                .err()?;
            refused(&e).then_some(())
        })
        .await;
    }

    /// The stored `resourceVersion`s of the outpost Service and Deployment.
    async fn versions(&self) -> (Option<String>, Option<String>) {
        let service = self.services().get(OUTPOST).await.unwrap();
        let deployment = self.deployments().get(OUTPOST).await.unwrap();
        (
            service.metadata.resource_version,
            deployment.metadata.resource_version,
        )
    }

    /// `kubectl -n <ns> <args> deployment/<the outpost>` as the admin.
    fn kubectl_on_outpost(&self, args: &[&str]) {
        let out = self
            .cp
            .kubectl()
            .args(["-n", &self.ns])
            .args(args)
            .arg(format!("deployment/{OUTPOST}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Patches the first webhook of the registration.
    async fn patch_webhook(&self, patch: Value) {
        let mut r =
            serde_json::to_value(self.registrations().get(&self.registration).await.unwrap())
                .unwrap();
        json_patch::merge(&mut r["webhooks"][0], &patch);
        self.registrations()
            .replace(&self.registration, &PostParams::default(), &typed(r))
            .await
            .unwrap();
    }

    /// Runs `write` while the registration does not select this namespace, as a write made while
    /// the webhook was not installed; then selects it again and waits until it is called.
    async fn past_the_webhook<F: Future<Output = ()>>(&self, write: impl FnOnce() -> F) {
        let elsewhere = json!({"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": format!("{}-elsewhere", self.ns)}}});
        self.patch_webhook(elsewhere).await;
        self.wait_webhook_called(false).await;
        write().await;
        let here = json!({"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": self.ns}}});
        self.patch_webhook(here).await;
        self.wait_webhook_called(true).await;
    }

    /// `doctor -o json` as a user runs it, with the admin's kubeconfig and `extra` flags.
    fn doctor(&self, extra: &[&str]) -> Doctor {
        self.doctor_as(&self.cp.kubeconfig, extra)
    }

    fn doctor_as(&self, kubeconfig: &Path, extra: &[&str]) -> Doctor {
        let mut args = vec![
            "doctor",
            "-n",
            &self.ns,
            "--registration",
            &self.registration,
            "-o",
            "json",
        ];
        args.extend(extra);
        let (code, stdout, stderr) = run(kubeconfig, &args);
        let report: Value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
        };
        let findings = report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| Found {
                check: f["check"].as_str().unwrap().to_owned(),
                severity: f["severity"].as_str().unwrap().to_owned(),
                object: f["object"].as_str().unwrap().to_owned(),
                message: f["message"].as_str().unwrap().to_owned(),
            })
            .collect();
        let doctor = Doctor {
            code,
            report,
            findings,
            stderr,
        };
        doctor.assert_no_secret_values(&stdout);
        doctor
    }

    /// The text report, for a reader of the test's output.
    fn doctor_text(&self) -> String {
        let (_, stdout, _) = run(
            &self.cp.kubeconfig,
            &[
                "doctor",
                "-n",
                &self.ns,
                "--registration",
                &self.registration,
            ],
        );
        stdout
    }
}

/// The embedded outpost's Deployment under another name: what a dry-run create shows admission
/// making of an outpost Deployment in `namespace`.
fn probe(namespace: &str) -> Value {
    let mut probe = fixture("embedded-proxy-deployment.create.json", namespace);
    probe["metadata"]["name"] = json!("ak-outpost-probe");
    probe
}

/// Applies the RFC 6902 operations `ops` to object `name`, as the admin.
async fn json_patch<K>(api: &Api<K>, name: &str, ops: Value) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch: json_patch::Patch = serde_json::from_value(ops).unwrap();
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .unwrap()
}

fn dry_post() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

fn dry_patch() -> PatchParams {
    PatchParams {
        dry_run: true,
        ..PatchParams::default()
    }
}

fn outpost_service(namespace: &str) -> Service {
    typed(fixture("embedded-proxy-service.create.json", namespace))
}

/// The webhook's CA (valid `ca_days`) and certificate for `outpost-webhook.<namespace>.svc`, the
/// name the apiserver verifies for a Service registration.
fn certs(namespace: &str, ca_days: u32) -> TempDir {
    let certs = temp_dir("doctor-certs");
    let out = Command::new(BIN)
        .args(["certs", "--service", WEBHOOK, "--namespace", namespace])
        .args(["--san", "127.0.0.1", "--ca-days"])
        .arg(ca_days.to_string())
        .arg("--days")
        .arg(ca_days.min(30).saturating_sub(5).max(1).to_string())
        .arg("--out")
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    certs
}

/// The webhook's ConfigMap (holding `policy`), Deployment and Service as `deploy/plain` renders
/// them, in `namespace`; two ready pods of the Deployment and the Service's `EndpointSlice`.
async fn install_webhook(client: &Client, namespace: &str, policy: &str) {
    let mut configmap = rendered_doc("ConfigMap");
    configmap["metadata"]["namespace"] = json!(namespace);
    configmap["data"]["policy.yaml"] = json!(policy);
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &typed(configmap))
        .await
        .unwrap();
    let mut deployment = rendered_doc("Deployment");
    deployment["metadata"]["namespace"] = json!(namespace);
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &typed(deployment))
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &typed(webhook_service(namespace)))
        .await
        .unwrap();
    for (i, name) in ["outpost-webhook-7d9f-aaaaa", "outpost-webhook-7d9f-bbbbb"]
        .iter()
        .enumerate()
    {
        let ip = format!("10.0.1.{}", i + 1);
        pod(client, namespace, name, &pod_labels, "webhook", &ip).await;
    }
    slice(
        client,
        namespace,
        WEBHOOK,
        ("https", 8443),
        &["10.0.1.1", "10.0.1.2"],
    )
    .await;
}

/// The webhook's Service as `deploy/plain` renders it, in `namespace`. No kube-proxy: an
/// `ExternalName` the apiserver dials itself, with the rendered selector kept.
fn webhook_service(namespace: &str) -> Value {
    let mut service = rendered_doc("Service");
    service["metadata"]["namespace"] = json!(namespace);
    service["spec"]["type"] = json!("ExternalName");
    service["spec"]["externalName"] = json!("localhost");
    service
}

/// The reconciler stays idle: another identity holds the Lease, for ten years.
async fn hold_lease(client: &Client, namespace: &str) {
    let now = "2026-01-01T00:00:00.000000Z";
    create(
        client,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": WEBHOOK, "namespace": namespace},
            "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 315_360_000,
                     "acquireTime": now, "renewTime": now}}),
    )
    .await;
}

/// `serve --cluster on` watching `namespace`, with the admin's kubeconfig and the policy file
/// its ConfigMap holds, as the kubelet would mount it; once ready.
async fn serve(cp: &ControlPlane, certs: &TempDir, namespace: &str, policy: &Path) -> Served {
    let served = spawn_served(replica(
        &cp.kubeconfig,
        certs,
        namespace,
        &format!("{namespace}-replica"),
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--reload-interval",
            "200ms",
        ],
    ));
    wait_for(BOUND, "/readyz answers 200", || async {
        (health_get(served.health, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    served
}

/// Runs the binary with `KUBECONFIG`; its exit code, stdout and stderr, waiting at most
/// [`DOCTOR_BOUND`].
fn run(kubeconfig: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read while it runs: a full pipe would stall it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > DOCTOR_BOUND {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap(), err_reader.join().unwrap())
}

/// One finding of `doctor -o json`.
#[derive(Debug, Clone)]
struct Found {
    check: String,
    severity: String,
    object: String,
    message: String,
}

struct Doctor {
    code: Option<i32>,
    report: Value,
    findings: Vec<Found>,
    stderr: String,
}

impl Doctor {
    fn show(&self) -> String {
        let mut s = format!("exit {:?}\n", self.code);
        for f in &self.findings {
            let _ = writeln!(
                s,
                "  {:<4} {:<24} {}: {}",
                f.severity, f.check, f.object, f.message
            );
        }
        s.push_str(&self.stderr);
        s
    }

    fn with(&self, severity: &str) -> Vec<(String, String)> {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .map(|f| (f.check.clone(), f.object.clone()))
            .collect()
    }

    /// Asserts the exit code and exactly these failures, as (check, object).
    fn assert_fails(&self, want: &[(String, String)]) {
        assert_eq!(self.fails(), want, "{}", self.show());
        let code = i32::from(!want.is_empty());
        assert_eq!(self.code, Some(code), "{}", self.show());
    }

    fn fails(&self) -> Vec<(String, String)> {
        self.with("fail")
    }

    fn warns(&self) -> Vec<(String, String)> {
        self.with("warn")
    }

    /// The first finding of `check`.
    fn finding(&self, check: Check) -> &Found {
        self.findings
            .iter()
            .find(|f| f.check == check.id())
            .unwrap_or_else(|| panic!("no {} in\n{}", check.id(), self.show()))
    }

    /// Asserts that the first finding of `check` has `severity` and says `words`.
    fn says(&self, check: Check, severity: &str, words: &str) {
        let f = self.finding(check);
        assert_eq!(f.severity, severity, "{}", self.show());
        assert!(f.message.contains(words), "{}", self.show());
    }

    /// The finding of `check` on `object`.
    fn finding_on(&self, check: Check, object: &str) -> &Found {
        self.findings
            .iter()
            .find(|f| f.check == check.id() && f.object == object)
            .unwrap_or_else(|| panic!("no {} on {object} in\n{}", check.id(), self.show()))
    }

    fn has(&self, check: Check) -> bool {
        self.findings.iter().any(|f| f.check == check.id())
    }

    fn assert_no_secret_values(&self, stdout: &str) {
        for value in [PASSWORD, TOKEN] {
            for form in [value.to_owned(), b64(value)] {
                assert!(!stdout.contains(&form), "{form} in {stdout}");
                assert!(!self.stderr.contains(&form), "{form} in {}", self.stderr);
            }
        }
    }
}

fn deployment_object(c: &Cluster) -> String {
    format!("Deployment/{}/{OUTPOST}", c.ns)
}

fn service_object(c: &Cluster) -> String {
    format!("Service/{}/{OUTPOST}", c.ns)
}

fn pair(check: Check, object: &str) -> (String, String) {
    (check.id().to_owned(), object.to_owned())
}

// ---------------------------------------------------------------------------------------------
// A healthy cluster

/// Every check that applies to a standalone outpost runs and passes, against the policy the
/// webhook's Deployment mounts; `-o json` says which policy and counts the findings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_standalone_outpost_passes_every_check() {
    let c = Cluster::healthy().await;
    let d = c.doctor(&[]);
    // `cargo test --test doctor_real -- --nocapture healthy` shows the report.
    println!("{}", c.doctor_text());
    assert_eq!(d.code, Some(0), "{}", d.show());
    assert_eq!(d.fails(), [], "{}", d.show());
    assert_eq!(d.warns(), [], "{}", d.show());
    for check in [
        Check::RegistrationExists,
        Check::RegistrationMatches,
        Check::RegistrationNamespaces,
        Check::RegistrationCaBundle,
        Check::RegistrationCaExpiry,
        Check::RegistrationService,
        Check::PolicySource,
        Check::AdmissionDryRun,
        Check::AdmissionConverged,
        Check::ServiceSelector,
        Check::ServiceEndpoints,
        Check::DeploymentEnv,
        Check::DeploymentSecretRefs,
        Check::DeploymentReplicas,
        Check::DeploymentChecksum,
        Check::DeploymentVersion,
    ] {
        assert!(
            d.findings
                .iter()
                .any(|f| f.check == check.id() && f.severity == "ok"),
            "no ok {} in\n{}",
            check.id(),
            d.show()
        );
    }
    let configmap = rendered_doc("ConfigMap")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = d.finding(Check::PolicySource);
    assert_eq!(
        policy.object,
        format!("ConfigMap/{}/{configmap}", c.webhook_ns)
    );
    assert_eq!(
        d.report["policy"],
        format!(
            "key policy.yaml of ConfigMap {0}/{configmap}, which the webhook's Deployment \
             {0}/outpost-webhook mounts",
            c.webhook_ns
        )
    );
    assert_eq!(
        d.report["summary"],
        json!({"ok": d.findings.len(), "warn": 0, "fail": 0})
    );
    assert!(
        d.finding(Check::RegistrationService)
            .message
            .contains("2 ready endpoint(s)"),
        "{}",
        d.show()
    );
}

/// The apiserver fills in what a registration leaves out (`matchPolicy`, `failurePolicy`): the
/// stored object says more than was applied, and means what `webhook-config` renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_apiserver_defaulted_matches_what_webhook_config_renders() {
    let c = Cluster::new(Setup {
        defaulted_registration: true,
        ..Setup::default()
    })
    .await;
    let stored = c.registrations().get(&c.registration).await.unwrap();
    let w = &stored.webhooks.as_ref().unwrap()[0];
    assert_eq!(w.match_policy.as_deref(), Some("Equivalent"));
    assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
    let d = c.doctor(&[]);
    d.says(Check::RegistrationMatches, "ok", "");
    d.assert_fails(&[]);
}

/// A default install: no outpost Deployment, the Service selects the authentik server pods, and
/// that is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_install_with_the_embedded_outpost_in_the_server_passes() {
    let c = Cluster::new(Setup {
        standalone: false,
        ..Setup::default()
    })
    .await;
    let d = c.doctor(&[]);
    d.assert_fails(&[]);
    let selector = d.finding(Check::ServiceSelector);
    assert!(
        selector
            .message
            .contains("selects the authentik server pods"),
        "{}",
        d.show()
    );
}

// ---------------------------------------------------------------------------------------------
// The outposts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outpost_pods_gone_is_a_failure_on_the_service() {
    let c = Cluster::healthy().await;
    let pods = Api::<Pod>::namespaced(c.client.clone(), &c.ns);
    for suffix in ["7c9f-a", "7c9f-b"] {
        pods.delete(&format!("{OUTPOST}-{suffix}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    dynamic(&c.client, &c.ns, "discovery.k8s.io/v1", "EndpointSlice")
        .delete(&format!("{OUTPOST}-x7k2p"), &DeleteParams::default())
        .await
        .unwrap();
    let d = c.doctor(&[]);
    d.assert_fails(&[pair(Check::ServiceEndpoints, &service_object(&c))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_var_removed_past_the_webhook_is_a_failure_on_the_deployment() {
    let c = Cluster::healthy().await;
    let deployments = c.deployments();
    c.past_the_webhook(|| async {
        let d = deployments.get(OUTPOST).await.unwrap();
        let env = d.spec.template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let at = env
            .iter()
            .position(|e| e.name == "AUTHENTIK_POSTGRESQL__PASSWORD")
            .unwrap();
        json_patch(
            &deployments,
            OUTPOST,
            json!([
            {"op": "remove", "path": format!("/spec/template/spec/containers/0/env/{at}")}]),
        )
        .await;
    })
    .await;
    let d = c.doctor(&[]);
    // `cargo test --test doctor_real -- --nocapture env_var_removed` shows the report.
    println!("{}", c.doctor_text());
    let object = deployment_object(&c);
    d.assert_fails(&[
        pair(Check::AdmissionConverged, &object),
        pair(Check::DeploymentEnv, &object),
    ]);
    let env = d.finding(Check::DeploymentEnv);
    assert!(
        env.message
            .contains("missing AUTHENTIK_POSTGRESQL__PASSWORD"),
        "{}",
        d.show()
    );
    assert!(
        env.message.contains("a write got past the webhook"),
        "{}",
        d.show()
    );
    assert!(
        env.message.contains("rollout restart deployment/"),
        "{}",
        d.show()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_key_is_a_failure_naming_the_key_not_its_value() {
    let c = Cluster::healthy().await;
    Api::<Secret>::namespaced(c.client.clone(), &c.ns)
        .patch(
            "goauthentik",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"AUTHENTIK_POSTGRESQL__PASSWORD": null}})),
        )
        .await
        .unwrap();
    let d = c.doctor(&[]);
    d.assert_fails(&[pair(Check::DeploymentSecretRefs, &deployment_object(&c))]);
    let f = d.finding(Check::DeploymentSecretRefs);
    assert!(
        f.message
            .contains("Secret goauthentik has no key AUTHENTIK_POSTGRESQL__PASSWORD"),
        "{}",
        f.message
    );
    // The pods still run the old data (no reconciler rolled them): the checksum says so.
    let checksum = d.finding(Check::DeploymentChecksum);
    assert_eq!(checksum.severity, "warn", "{}", d.show());
    assert!(checksum.message.contains("old Secret data"), "{}", d.show());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_union_selector_and_server_pods_beside_a_standalone_deployment_fail() {
    let c = Cluster::healthy().await;
    let services = c.services();
    // The controller's strategic-merge PATCH of its reference object merges its pair into the
    // fixed selector: the 6-key union, stored while the webhook did not see it.
    let reference = fixture("embedded-proxy-service.create.json", &c.ns);
    c.past_the_webhook(|| async {
        let s = services
            .patch(
                OUTPOST,
                &PatchParams::default(),
                &Patch::Strategic(&reference),
            )
            .await
            .unwrap();
        assert_eq!(s.spec.unwrap().selector.unwrap().len(), 6);
    })
    .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    d.says(Check::ServiceSelector, "fail", "6-key union");

    // The controller's own selector, while a standalone Deployment runs the outpost.
    c.past_the_webhook(|| async {
        json_patch(
            &services,
            OUTPOST,
            json!([{"op": "replace",
            "path": "/spec/selector", "value": {"app.kubernetes.io/name": "authentik",
                                               "app.kubernetes.io/component": "server"}}]),
        )
        .await;
    })
    .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    d.says(
        Check::ServiceSelector,
        "fail",
        "server pods while Deployment",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_drift_from_the_server_is_a_warning_naming_both() {
    let c = Cluster::healthy().await;
    json_patch(
        &c.deployments(),
        "goauthentik-server",
        json!([{"op": "replace",
        "path": "/spec/template/spec/containers/0/image",
        "value": "ghcr.io/goauthentik/server:2026.5.1"}]),
    )
    .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(0), "{}", d.show());
    let f = d.finding(Check::DeploymentVersion);
    assert_eq!(f.severity, "warn");
    assert!(
        f.message.contains("2026.2.4") && f.message.contains("2026.5.1"),
        "{}",
        f.message
    );
}

/// The apiserver stores a `fieldRef` with its default `apiVersion`; the policy does not say it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_the_apiserver_defaulted_still_matches_the_policy() {
    let policy = "rules:
  - match: {}
    service: {selector: auto}
    deployment:
      env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
      checksumAnnotation: outpost-webhook/config-checksum
";
    let c = Cluster::new(Setup {
        policy: policy.into(),
        ..Setup::default()
    })
    .await;
    let stored = c.deployments().get(OUTPOST).await.unwrap();
    let env = &stored.spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let pod_ip = env.iter().find(|e| e.name == "POD_IP").unwrap();
    assert_eq!(
        pod_ip
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .api_version
            .as_deref(),
        Some("v1")
    );
    let d = c.doctor(&[]);
    d.says(Check::DeploymentEnv, "ok", "");
    d.assert_fails(&[]);
}

// ---------------------------------------------------------------------------------------------
// The registration

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_registration_is_a_failure() {
    let c = Cluster::healthy().await;
    c.registrations()
        .delete(&c.registration, &DeleteParams::default())
        .await
        .unwrap();
    let d = c.doctor(&[]);
    d.assert_fails(&[pair(
        Check::RegistrationExists,
        &format!("MutatingWebhookConfiguration/{}", c.registration),
    )]);
    // With nothing to follow to the webhook's policy, the report says what it judged against.
    d.says(Check::PolicySource, "warn", "built-in policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_expiring_in_ten_days_is_a_warning_and_exits_zero() {
    let c = Cluster::new(Setup {
        ca_days: 10,
        ..Setup::default()
    })
    .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(0), "{}", d.show());
    // The apiserver verified the webhook with that CA: the dry runs went through.
    assert_eq!(d.fails(), [], "{}", d.show());
    assert!(
        d.findings
            .iter()
            .any(|f| f.check == Check::AdmissionDryRun.id())
    );
    let expiry = d.finding(Check::RegistrationCaExpiry);
    assert_eq!(expiry.severity, "warn");
    assert!(
        expiry.message.contains("expires in 9 day") || expiry.message.contains("expires in 10 day"),
        "{}",
        expiry.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_in_the_ca_bundle_is_a_failure() {
    let c = Cluster::healthy().await;
    let read = |f: &str| std::fs::read_to_string(c.certs.path().join(f)).unwrap();
    let bundle = format!("{}{}", read("ca.crt"), read("ca.key"));
    c.patch_webhook(json!({"clientConfig": {"caBundle": b64(&bundle)}}))
        .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    d.says(Check::RegistrationCaBundle, "fail", "PRIVATE KEY");
    assert!(!d.show().contains("BEGIN"), "{}", d.show());
}

/// Outposts written while the registration skipped their namespace are never fixed, and a dry
/// run there proves nothing: the namespace check fails rather than passing falsely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_the_registration_skips_is_a_failure_not_a_false_pass() {
    let c = Cluster::healthy().await;
    let identity = json!({"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "identity"}}});
    c.patch_webhook(identity).await;
    c.wait_webhook_called(false).await;
    // Written while the webhook never saw it: no injected env.
    c.deployments()
        .delete(OUTPOST, &DeleteParams::default())
        .await
        .unwrap();
    let deployments = c.deployments();
    wait_for(BOUND, "the Deployment is gone", || async {
        deployments
            .get_opt(OUTPOST)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    deployments
        .create(
            &PostParams::default(),
            &typed(fixture("embedded-proxy-deployment.create.json", &c.ns)),
        )
        .await
        .unwrap();
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    let f = d.finding(Check::RegistrationNamespaces);
    assert_eq!(f.severity, "fail", "{}", d.show());
    assert!(
        f.message.contains(&format!("namespace {}", c.ns)),
        "{}",
        f.message
    );
}

/// `doctor -n` of a namespace that is not there fails, rather than finding nothing wrong in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_does_not_exist_is_a_failure() {
    let c = Cluster::healthy().await;
    let missing = format!("{}-missing", c.ns);
    let d = c.doctor(&["-n", &missing]);
    d.assert_fails(&[pair(
        Check::NamespaceExists,
        &format!("Namespace/{missing}"),
    )]);
    assert!(
        d.finding(Check::NamespaceExists)
            .message
            .contains("does not exist")
    );
    // The namespace that exists is checked as ever.
    assert_eq!(d.finding(Check::DeploymentEnv).severity, "ok");
}

// ---------------------------------------------------------------------------------------------
// Admission refusing the dry run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_cannot_be_called_is_a_dry_run_failure() {
    let c = Cluster::healthy().await;
    let closed = common::control_plane::free_port();
    let ca = b64(&std::fs::read_to_string(c.certs.path().join("ca.crt")).unwrap());
    // A merge patch cannot drop `service`: replace the client config whole.
    let mut r =
        serde_json::to_value(c.registrations().get(&c.registration).await.unwrap()).unwrap();
    r["webhooks"][0]["clientConfig"] =
        json!({"url": format!("https://127.0.0.1:{closed}/mutate"), "caBundle": ca});
    c.registrations()
        .replace(&c.registration, &PostParams::default(), &typed(r))
        .await
        .unwrap();
    c.wait_dry_run_refused("the apiserver calls the closed port", |e| {
        e.to_string().contains("failed calling webhook")
    })
    .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    d.says(Check::AdmissionDryRun, "fail", "failed calling webhook");
    // A URL registration names no Service to follow to the policy: the report says which policy
    // it used, the built-in one, or the one --policy names.
    let policy = d.finding(Check::PolicySource);
    assert_eq!(policy.severity, "warn");
    assert!(
        policy.message.contains("calls the URL") && policy.message.contains("built-in policy"),
        "{}",
        policy.message
    );
    let d = c.doctor(&["--policy", c.policy_file.to_str().unwrap()]);
    let policy = d.finding(Check::PolicySource);
    assert_eq!(policy.severity, "ok");
    assert_eq!(
        d.report["policy"],
        format!("--policy {}", c.policy_file.display())
    );
}

/// A webhook or admission policy that denies outpost writes answers the dry run with 403 too:
/// that is a finding about admission, not a permission doctor lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denying_webhook_or_admission_policy_is_a_finding_not_missing_rbac() {
    let c = Cluster::healthy().await;
    let selector = json!({"matchLabels": {"kubernetes.io/metadata.name": c.ns}});

    // A ValidatingAdmissionPolicy, the apiserver's own CEL admission.
    let name = format!("freeze-{}", c.ns);
    let admission = "admissionregistration.k8s.io/v1";
    create(
        &c.client,
        json!({"apiVersion": admission, "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"],
                    "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["deployments"]}]},
                "validations": [{"expression": "false", "message": "outposts are frozen",
                                 "reason": "Forbidden"}]}}),
    )
    .await;
    let binding = json!({"apiVersion": admission, "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": selector}}});
    create(&c.client, binding.clone()).await;
    let refused = |needle: &'static str| {
        c.wait_dry_run_refused(needle, move |e| {
            matches!(e, kube::Error::Api(s) if s.code == 403 && s.message.contains(needle))
        })
    };
    refused("ValidatingAdmissionPolicy").await;
    let d = c.doctor(&[]);
    let deployment = deployment_object(&c);
    d.assert_fails(&[pair(Check::AdmissionDryRun, &deployment)]);
    let f = d.finding_on(Check::AdmissionDryRun, &deployment);
    assert!(f.message.contains("outposts are frozen"), "{}", f.message);
    delete(&c.client, &binding).await;

    // A webhook that denies, as a validating webhook of another tool would.
    let denier = Denier::start();
    let hooks = json!({"apiVersion": admission, "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": "deny.example.com", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "namespaceSelector": selector,
            "clientConfig": {"url": format!("https://127.0.0.1:{}/", denier.port),
                             "caBundle": b64(&denier.ca)},
            "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                       "operations": ["UPDATE"], "resources": ["deployments"]}]}]});
    create(&c.client, hooks.clone()).await;
    refused("admission webhook").await;
    let d = c.doctor(&[]);
    d.assert_fails(&[pair(Check::AdmissionDryRun, &deployment)]);
    let f = d.finding_on(Check::AdmissionDryRun, &deployment);
    assert!(
        f.message.contains("deny.example.com") && f.message.contains("denied the request"),
        "{}",
        f.message
    );
    delete(&c.client, &hooks).await;
}

/// Answers an admission review: denied, with the reason.
async fn deny(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, hyper::Error> {
    use http_body_util::BodyExt as _;
    let body = request.into_body().collect().await?.to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    let answer = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": false,
                     "status": {"code": 403, "message": "outposts are frozen"}}});
    Ok(hyper::Response::builder()
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            answer.to_string(),
        )))
        .unwrap())
}

/// A tiny validating webhook that denies every request, on TLS on loopback.
struct Denier {
    port: u16,
    ca: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Denier {
    fn start() -> Self {
        use hyper_util::rt::TokioIo;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

        let g = outpost_webhook::pki::generate(&["127.0.0.1".into()], 1).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(outpost_webhook::serve::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    CertificateDer::pem_slice_iter(g.cert_pem.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(g.key_pem.as_bytes()).unwrap(),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(deny);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            port,
            ca: g.ca_pem,
            _stop: stop,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What doctor sends

/// Records every request a kube client sends, and after the answer to the one that starts with
/// `after.0`, awaits `after.1` before handing the answer back: a write at an exact point of
/// doctor's sequence, made by a real client to the real apiserver.
/// A write to make, and the request line after whose answer to make it.
type After = Option<(String, Pin<Box<dyn Future<Output = ()> + Send>>)>;

struct Hook<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<After>>,
}

impl<S> tower::Service<Request<Body>> for Hook<S>
where
    S: tower::Service<Request<Body>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let mut line = format!(
            "{} {}",
            request.method(),
            request.uri().path_and_query().unwrap()
        );
        if let Some(t) = request.headers().get("content-type") {
            let _ = write!(line, " ({})", t.to_str().unwrap());
        }
        self.seen.lock().unwrap().push(line.clone());
        let then = {
            let mut after = self.after.lock().unwrap();
            if after
                .as_ref()
                .is_some_and(|(start, _)| line.starts_with(start.as_str()))
            {
                after.take().map(|(_, write)| write)
            } else {
                None
            }
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let answer = call.await;
            if let Some(write) = then {
                write.await;
            }
            answer
        })
    }
}

/// A client as the admin, through a [`Hook`].
async fn hooked(cp: &ControlPlane, after: After) -> (Client, Arc<Mutex<Vec<String>>>) {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let after = Arc::new(Mutex::new(after));
    let recorded = Arc::clone(&seen);
    let client = ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&tower::layer::layer_fn(move |inner| Hook {
            inner,
            seen: Arc::clone(&recorded),
            after: Arc::clone(&after),
        }))
        .build();
    (client, seen)
}

fn scope(c: &Cluster) -> Scope {
    Scope {
        namespaces: vec![c.ns.clone()],
        registration: c.registration.clone(),
        policy: None,
        logs: false,
    }
}

/// Doctor reads, follows the registration to the webhook's policy, and dry-runs each outpost
/// object with a merge patch that changes nothing: exactly these requests, and nothing stored
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_sends_reads_and_dry_runs_only_and_exactly_these() {
    let c = Cluster::healthy().await;
    let before = c.versions().await;
    let (client, seen) = hooked(c.cp, None).await;
    let gathered = inspect::gather(&client, &scope(&c)).await.unwrap();
    assert!(
        matches!(
            gathered.inputs.policy_source,
            Some(doctor::PolicySource::InForce(
                doctor::PolicyRef::ConfigMap { .. }
            ))
        ),
        "{:?}",
        gathered.inputs.policy_source
    );
    let (ns, wns) = (&c.ns, &c.webhook_ns);
    let configmap = rendered_doc("ConfigMap")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let svc = format!("/api/v1/namespaces/{ns}/services");
    let deploy = format!("/apis/apps/v1/namespaces/{ns}/deployments");
    let merge = "(application/merge-patch+json)";
    assert_eq!(
        *seen.lock().unwrap(),
        [
            format!(
                "GET /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{}",
                c.registration
            ),
            format!("GET /api/v1/namespaces/{wns}/services/outpost-webhook"),
            format!(
                "GET /apis/discovery.k8s.io/v1/namespaces/{wns}/endpointslices?&labelSelector=kubernetes.io%2Fservice-name%3Doutpost-webhook"
            ),
            format!("GET /apis/apps/v1/namespaces/{wns}/deployments?"),
            format!("GET /api/v1/namespaces/{wns}/configmaps/{configmap}"),
            format!("GET /api/v1/namespaces/{ns}"),
            format!("GET {svc}?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgoauthentik.io"),
            format!("GET {deploy}?"),
            format!("GET /api/v1/namespaces/{ns}/pods?"),
            format!("GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?"),
            format!("GET /api/v1/namespaces/{ns}/secrets/{OUTPOST}"),
            format!("GET /api/v1/namespaces/{ns}/secrets/goauthentik"),
            format!("GET /apis/events.k8s.io/v1/namespaces/{ns}/events?"),
            format!("PATCH {svc}/{OUTPOST}?&dryRun=All {merge}"),
            format!("PATCH {deploy}/{OUTPOST}?&dryRun=All {merge}"),
        ]
    );
    let after = c.versions().await;
    assert_eq!(before, after, "a dry run stored something");
}

/// Another writer changes the Deployment between doctor's list and its dry run: the listed
/// `resourceVersion`, sent as a precondition, makes the apiserver answer 409, which is a warning
/// to run doctor again, not a difference to blame on the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_written_during_the_check_is_a_warning() {
    let c = Cluster::healthy().await;
    let deployments = c.deployments();
    let write = Box::pin(async move {
        deployments
            .patch(
                OUTPOST,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": "1"}}})),
            )
            .await
            .unwrap();
    });
    let last_read = format!("GET /api/v1/namespaces/{}/secrets/goauthentik", c.ns);
    let (client, _) = hooked(c.cp, Some((last_read, write))).await;
    let mut inputs = inspect::gather(&client, &scope(&c)).await.unwrap();
    inputs.inputs.expected = expected_registration();
    let findings = doctor::check(&inputs.policy, &inputs.inputs);
    let dry: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.check == Check::AdmissionDryRun)
        .collect();
    assert_eq!(
        dry.iter()
            .map(|f| (f.object.clone(), f.severity))
            .collect::<Vec<_>>(),
        [
            (service_object(&c), Severity::Ok),
            (deployment_object(&c), Severity::Warn)
        ],
        "{}",
        doctor::render_text(&findings)
    );
    assert!(dry[1].message.contains("changed while doctor read it"));
    assert_eq!(
        doctor::exit_code(&findings),
        0,
        "{}",
        doctor::render_text(&findings)
    );
}

fn expected_registration() -> Value {
    use outpost_webhook::cmd::webhook_config::{Options, render};
    serde_saphyr::from_str(&render(&Options::shipped(None)).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// A kubeconfig for `ServiceAccount` `namespace/name`, with a token from the `TokenRequest` API.
async fn service_account_kubeconfig(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> PathBuf {
    let token = cp.token(namespace, name).await;
    let path = dir.join("kubeconfig");
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
    path
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

/// What doctor reads and dry-runs in the outposts' namespace, as README lists it; `list pods`
/// only with `pods`.
fn outposts_rules(pods: bool) -> Value {
    let lists: &[&str] = if pods {
        &["services", "pods"]
    } else {
        &["services"]
    };
    json!([
        rule(&[""], lists, &["list"]),
        rule(&["apps"], &["deployments"], &["list"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], &["list"]),
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
         "resourceNames": ["goauthentik", OUTPOST]},
        rule(&[""], &["services"], &["patch"]),
        rule(&["apps"], &["deployments"], &["patch"]),
    ])
}

/// What doctor reads in the webhook's namespace, as README lists it.
fn webhook_rules() -> Value {
    json!([
        rule(&[""], &["services", "configmaps"], &["get"]),
        rule(&["apps"], &["deployments"], &["list"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], &["list"]),
    ])
}

/// `ServiceAccount` `doctor` in the outposts' namespace, bound to a `ClusterRole` that may get the
/// registration and to a Role with `rules` in each namespace; its kubeconfig, in `dir`.
async fn grant_doctor(c: &Cluster, roles: &[(&str, Value)], dir: &Path) -> PathBuf {
    let sa = "doctor";
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.client.clone(), &c.ns)
        .create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": sa}})),
        )
        .await
        .unwrap();
    let subject = json!([{"kind": "ServiceAccount", "name": sa, "namespace": c.ns}]);
    let object = |kind: &str, namespace: &str, name: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
               "metadata": {"name": name, "namespace": namespace}})
    };
    let name = format!("doctor-{}", c.ns);
    let mut role = object("ClusterRole", "", &name);
    role["rules"] = json!([{"apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "resourceNames": [c.registration], "verbs": ["get"]}]);
    let mut bindings = vec![(String::new(), "ClusterRole", name.clone(), role)];
    for (namespace, rules) in roles {
        let mut role = object("Role", namespace, sa);
        role["rules"] = rules.clone();
        bindings.push(((*namespace).to_owned(), "Role", sa.to_owned(), role));
    }
    for (namespace, kind, name, role) in bindings {
        create(&c.client, role).await;
        let mut binding = object(&format!("{kind}Binding"), &namespace, &name);
        binding["subjects"] = subject.clone();
        binding["roleRef"] =
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name});
        create(&c.client, binding).await;
    }
    service_account_kubeconfig(c.cp, &c.ns, sa, dir).await
}

/// README's RBAC for doctor, as Roles on the real apiserver: enough for every check (the
/// namespace's labels are optional and left out here); without `list pods` doctor cannot run
/// and names the verb and resource it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_rbac_is_enough_and_a_refused_read_names_the_verb_and_resource() {
    let c = Cluster::healthy().await;
    let dir = temp_dir("doctor-sa");
    let roles = [
        (c.ns.as_str(), outposts_rules(true)),
        (c.webhook_ns.as_str(), webhook_rules()),
    ];
    let kubeconfig = grant_doctor(&c, &roles, dir.path()).await;

    let d = wait_for(BOUND, "doctor runs under the documented RBAC", || async {
        let d = c.doctor_as(&kubeconfig, &[]);
        (d.code == Some(0)).then_some(d)
    })
    .await;
    assert_eq!(d.fails(), [], "{}", d.show());
    assert_eq!(d.warns(), [], "{}", d.show());
    d.says(Check::PolicySource, "ok", "");
    d.says(Check::RegistrationService, "ok", "");
    // May not read Namespaces: every other check, and no namespace finding.
    assert!(!d.has(Check::RegistrationNamespaces), "{}", d.show());

    let role = dynamic(&c.client, &c.ns, "rbac.authorization.k8s.io/v1", "Role");
    role.patch(
        "doctor",
        &PatchParams::default(),
        &Patch::Merge(json!({"rules": outposts_rules(false)})),
    )
    .await
    .unwrap();
    let d = wait_for(BOUND, "doctor is refused `list pods`", || async {
        let d = c.doctor_as(&kubeconfig, &[]);
        (d.code == Some(2)).then_some(d)
    })
    .await;
    assert_eq!(d.stderr.lines().count(), 1, "{}", d.stderr);
    assert!(
        d.stderr
            .contains(&format!("`list pods` in namespace {}", c.ns)),
        "{}",
        d.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// The policy in force

/// The built-in policy with `replicas: 3`: not what `doctor` would assume, and the same config
/// checksum (it covers the pod template, not replicas).
fn three_replicas() -> String {
    DEFAULT_POLICY_YAML.replace("replicas: 2", "replicas: 3")
}

/// [`three_replicas`] with one more env var: a new config checksum.
fn three_replicas_and_a_log_level() -> String {
    let policy = three_replicas().replace(
        "      checksumAnnotation:",
        "        - name: AUTHENTIK_LOG_LEVEL\n          value: info\n      checksumAnnotation:",
    );
    assert_ne!(policy, three_replicas());
    policy
}

/// Doctor judges against the policy the webhook runs (its ConfigMap), not the built-in one: the
/// outposts it just admitted pass. `--policy` overrides it, and then other replicas, which no
/// scale wrote, read as a policy change (a warning), not as a write past the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_judges_against_the_policy_the_webhook_runs() {
    let c = Cluster::new(Setup {
        policy: three_replicas(),
        ..Setup::default()
    })
    .await;
    let stored = c.deployments().get(OUTPOST).await.unwrap();
    assert_eq!(stored.spec.replicas, Some(3));
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(0), "{}", d.show());
    assert_eq!(d.warns(), [], "{}", d.show());
    assert!(
        d.finding(Check::DeploymentReplicas)
            .message
            .contains("replicas 3")
    );

    let dir = temp_dir("builtin-policy");
    let builtin = dir.path().join("builtin.yaml");
    std::fs::write(&builtin, DEFAULT_POLICY_YAML).unwrap();
    let d = c.doctor(&["--policy", builtin.to_str().unwrap()]);
    assert_eq!(d.code, Some(0), "{}", d.show());
    assert_eq!(d.fails(), [], "{}", d.show());
    let object = deployment_object(&c);
    assert_eq!(
        d.warns(),
        [pair(Check::DeploymentReplicas, &object)],
        "{}",
        d.show()
    );
    let replicas = &d.finding(Check::DeploymentReplicas).message;
    assert!(
        replicas.contains(
            "replicas 3, the policy says 2: the policy changed since the object was last written"
        ) && replicas.contains("rollout restart"),
        "{}",
        d.show()
    );
    assert_eq!(
        d.finding(Check::PolicySource).message,
        format!("judged against --policy {}", builtin.display())
    );
}

/// The webhook's policy changes (its ConfigMap, and the file its pods read): outposts admitted
/// before keep their old config checksum. That is a warning that the next write applies the new
/// policy, with the command that applies it now; after `kubectl rollout restart`, which goes
/// through the webhook, everything passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_since_admission_is_a_warning_and_rollout_restart_applies_it() {
    let c = Cluster::healthy().await;
    let before = c.deployments().get(OUTPOST).await.unwrap();
    c.change_policy(&three_replicas_and_a_log_level()).await;
    assert_eq!(
        c.deployments()
            .get(OUTPOST)
            .await
            .unwrap()
            .metadata
            .resource_version,
        before.metadata.resource_version,
        "nothing wrote the outpost"
    );

    let d = c.doctor(&[]);
    println!("{}", c.doctor_text());
    assert_eq!(d.code, Some(0), "{}", d.show());
    assert_eq!(d.fails(), [], "{}", d.show());
    let object = deployment_object(&c);
    assert_eq!(
        d.warns(),
        [
            pair(Check::AdmissionConverged, &object),
            pair(Check::DeploymentEnv, &object),
            pair(Check::DeploymentReplicas, &object),
            pair(Check::DeploymentChecksum, &object)
        ],
        "{}",
        d.show()
    );
    for check in [
        Check::AdmissionConverged,
        Check::DeploymentEnv,
        Check::DeploymentReplicas,
        Check::DeploymentChecksum,
    ] {
        let m = &d.finding_on(check, &object).message;
        assert!(
            m.contains("the policy changed since these pods were admitted"),
            "{m}"
        );
        assert!(m.contains("rollout restart"), "{m}");
        assert!(!m.contains("got past the webhook"), "{m}");
    }

    c.kubectl_on_outpost(&["rollout", "restart"]);
    let restarted = c.deployments().get(OUTPOST).await.unwrap();
    assert_eq!(restarted.spec.replicas, Some(3));
    let checksum = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_CHECKSUM]
            .clone()
    };
    assert_ne!(checksum(&restarted), checksum(&before));
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(0), "{}", d.show());
    assert_eq!(d.warns(), [], "{}", d.show());
}

/// `webhook-config --namespace <the outposts' namespace>`: the registration calls a Service that
/// is not where the webhook runs. Doctor says so precisely; and when a Service of that name is
/// there, that it selects no webhook pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_naming_the_outposts_namespace_is_a_precise_failure() {
    let c = Cluster::healthy().await;
    c.patch_webhook(json!({"clientConfig": {"service": {"namespace": c.ns}}}))
        .await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    for words in [
        format!(
            "calls Service outpost-webhook in namespace {0}, where no Service outpost-webhook \
             exists",
            c.ns
        ),
        format!("Namespace {} is where outposts run", c.ns),
        "webhook-config --namespace".into(),
    ] {
        d.says(Check::RegistrationService, "fail", &words);
    }

    // A Service of that name in the outposts' namespace, selecting the webhook's labels: no
    // Deployment there runs such pods.
    create(&c.client, webhook_service(&c.ns)).await;
    let d = c.doctor(&[]);
    assert_eq!(d.code, Some(1));
    let words = format!("Service {}/outpost-webhook selects no webhook pods", c.ns);
    d.says(Check::RegistrationService, "fail", &words);
}

/// `kubectl scale` writes the scale subresource, which the webhook is not sent: replicas the
/// policy sets and a scale fight, and doctor says who wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_scaled_past_the_webhook_are_a_failure_naming_the_scale() {
    let c = Cluster::healthy().await;
    c.kubectl_on_outpost(&["scale", "--replicas=1"]);
    let d = c.doctor(&[]);
    let object = deployment_object(&c);
    d.assert_fails(&[
        pair(Check::AdmissionConverged, &object),
        pair(Check::DeploymentReplicas, &object),
    ]);
    let replicas = &d.finding(Check::DeploymentReplicas).message;
    assert!(
        replicas.contains("replicas 1, the policy says 2")
            && replicas.contains("scale subresource"),
        "{replicas}"
    );
}
