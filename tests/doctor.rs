//! `doctor` where a real apiserver cannot take it (`tests/doctor_real.rs` runs every other
//! scenario against a real kube-apiserver): pod logs, which a kubelet serves, read through a mock
//! apiserver (a `tower-test` mock `Service` behind `kube::Client`); and the binary against an
//! apiserver that is not there. The mock answers reads from a world of objects built from the
//! shared fixtures, and a dry-run PATCH as the apiserver does: it runs admission, here the
//! webhook's own core, when the registration exists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    collections::BTreeMap,
    io::Read as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use outpost_webhook::{
    cluster::inspect::{self, InspectError, Scope},
    cmd::webhook_config::{Options, render},
    core::{
        cluster::Snapshot,
        doctor::{self, Check, Finding, Inputs, Severity},
        mutate::{ObjectKind, mutate_in},
        policy::Policy,
    },
    pki,
};
use serde_json::{Value, json};

const NS: &str = "authentik";
const OUTPOST: &str = "ak-outpost-authentik-embedded-outpost";
const PASSWORD: &str = "correct-horse-battery-staple";
const TOKEN: &str = "outpost-api-token-value";

fn fixture(name: &str) -> Value {
    common::fixture_objects()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The cluster the mock apiserver serves.
#[derive(Clone)]
struct World {
    registration: Option<Value>,
    objects: Vec<Value>,
    logs: BTreeMap<String, Vec<u8>>,
}

impl World {
    fn kind(&self, kind: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .cloned()
            .collect()
    }

    fn find_mut(&mut self, kind: &str, name: &str) -> &mut Value {
        self.objects
            .iter_mut()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap()
    }

    /// What admission (the webhook's core) makes of `object`, seeing this world.
    fn admit(&self, policy: &Policy, kind: ObjectKind, object: &Value) -> Value {
        let view = Snapshot::of(&self.objects, NS);
        let outcome = mutate_in(policy, &view, NS, kind, object);
        let mut out = object.clone();
        json_patch::patch(&mut out, &outcome.ops).unwrap();
        out
    }
}

fn registration(ca_days: u32) -> Value {
    let ca = pki::Ca::new("outpost-webhook-ca", ca_days).unwrap();
    let yaml = render(&Options::shipped(Some(ca.pem().into_bytes()))).unwrap();
    serde_saphyr::from_str(&yaml).unwrap()
}

fn expected() -> Value {
    let mut r = registration(365);
    for w in r["webhooks"].as_array_mut().unwrap() {
        w.as_object_mut().unwrap().remove("clientConfig");
    }
    r
}

fn pod(name: &str, labels: &Value, ready: bool, container: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "labels": labels},
           "spec": {"containers": [{"name": container, "image": "x"}]},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" } }]}})
}

fn slice(namespace: &str, service: &str, ready: usize) -> Value {
    let endpoints: Vec<Value> = (0..ready)
        .map(|i| json!({"addresses": [format!("10.0.0.{i}")], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abcde"), "namespace": namespace,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints})
}

/// A standalone embedded outpost, as the webhook left it: its Service selects its two ready pods,
/// its Deployment carries the policy, the registration is in place with a CA good for a year.
fn healthy(policy: &Policy) -> World {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
    "metadata": {"name": "goauthentik", "namespace": NS},
    "data": {
        "AUTHENTIK_POSTGRESQL__HOST": b64("postgresql.dbaas"),
        "AUTHENTIK_POSTGRESQL__PORT": b64("5432"),
        "AUTHENTIK_POSTGRESQL__USER": b64("authentik"),
        "AUTHENTIK_POSTGRESQL__PASSWORD": b64(PASSWORD),
        "AUTHENTIK_POSTGRESQL__NAME": b64("authentik"),
        "AUTHENTIK_SECRET_KEY": b64("unreferenced"),
    }});
    let api = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": OUTPOST, "namespace": NS},
        "data": {"authentik_host": b64("https://authentik.example"),
                 "authentik_host_browser": b64(""),
                 "token": b64(TOKEN), "authentik_host_insecure": b64("false")}});
    let deployment = fixture("embedded-proxy-deployment.create.json");
    let service = fixture("embedded-proxy-service.create.json");
    let server = fixture("unrelated-goauthentik-server-deployment.update.json");
    let mut world = World {
        registration: Some(registration(365)),
        objects: vec![secret, api, deployment.clone(), server],
        logs: BTreeMap::new(),
    };
    let deployment = world.admit(policy, ObjectKind::Deployment, &deployment);
    let service = world.admit(policy, ObjectKind::Service, &service);
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
    *world.find_mut("Deployment", OUTPOST) = deployment;
    world.objects.extend([
        service,
        pod(&format!("{OUTPOST}-7c9f-a"), &pod_labels, true, "proxy"),
        pod(&format!("{OUTPOST}-7c9f-b"), &pod_labels, true, "proxy"),
        pod(
            "goauthentik-server-5d8f-a",
            &json!({"app.kubernetes.io/name": "authentik", "app.kubernetes.io/component": "server"}),
            true,
            "server",
        ),
        slice(NS, OUTPOST, 2),
        slice(NS, "goauthentik-server", 1),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "outpost-webhook", "namespace": "outpost-webhook"},
               "spec": {"selector": {"app.kubernetes.io/name": "outpost-webhook"}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "outpost-webhook", "namespace": "outpost-webhook"},
               "spec": {"template": {"metadata": {"labels": {
                   "app.kubernetes.io/name": "outpost-webhook"}}}}}),
        slice("outpost-webhook", "outpost-webhook", 2),
        namespace(NS),
    ]);
    for (i, o) in world.objects.iter_mut().enumerate() {
        o["metadata"]["resourceVersion"] = json!(format!("{}", 1000 + i));
    }
    world
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn query(request: &Request<Body>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), common::query::decode(v))
        })
        .collect()
}

fn matches_selector(object: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').all(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            object["metadata"]["labels"][k] == v
        })
    })
}

fn status(code: u16, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{reason} (from the mock apiserver)"), "reason": reason, "code": code}),
    )
}

/// Whether the registration routes writes in `namespace` to the webhook (its `matchLabels`).
fn routed(world: &World, namespace: &str) -> bool {
    let Some(registration) = &world.registration else {
        return false;
    };
    let labels = world
        .objects
        .iter()
        .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == namespace)
        .map(|n| n["metadata"]["labels"].clone())
        .unwrap_or_default();
    registration["webhooks"][0]["namespaceSelector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels[k] == *v)
}

/// Answers one request from `world`, as the apiserver would: a status and a JSON body, or the
/// bytes of a log.
fn answer(
    world: &World,
    policy: &Policy,
    method: &Method,
    path: &str,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> (StatusCode, Result<Value, Vec<u8>>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let json = |(code, v): (StatusCode, Value)| (code, Ok(v));
    if let ["api", "v1", "namespaces", name] = parts.as_slice() {
        return json(
            match world
                .objects
                .iter()
                .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == *name)
            {
                Some(n) => (StatusCode::OK, n.clone()),
                None => status(404, "NotFound"),
            },
        );
    }
    // [api|apis, (group,) version, "namespaces", ns, resource, (name, (sub))]
    let (resource_at, cluster_scoped) = match parts.as_slice() {
        ["api", "v1", "namespaces", ..] => (4, false),
        ["apis", _, "v1", "namespaces", ..] => (5, false),
        ["apis", _, "v1", ..] => (3, true),
        _ => return json(status(404, "NotFound")),
    };
    let resource = parts[resource_at];
    let name = parts.get(resource_at + 1).copied();
    let sub = parts.get(resource_at + 2).copied();
    let namespace = if cluster_scoped {
        ""
    } else {
        parts[resource_at - 1]
    };
    let verb = match (method, name) {
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::PATCH, _) => "patch",
        _ => "other",
    };
    if resource == "mutatingwebhookconfigurations" {
        return json(match &world.registration {
            Some(r) if Some(r["metadata"]["name"].as_str().unwrap()) == name => {
                (StatusCode::OK, r.clone())
            }
            _ => status(404, "NotFound"),
        });
    }
    let kind = match resource {
        "services" => "Service",
        "deployments" => "Deployment",
        "pods" => "Pod",
        "endpointslices" => "EndpointSlice",
        "secrets" => "Secret",
        _ => return json(status(404, "NotFound")),
    };
    let in_ns: Vec<Value> = world
        .kind(kind)
        .into_iter()
        .filter(|o| o["metadata"]["namespace"] == namespace)
        .collect();
    let Some(name) = name else {
        // As the apiserver lists: items carry no apiVersion or kind.
        let items: Vec<Value> = in_ns
            .into_iter()
            .filter(|o| matches_selector(o, q.get("labelSelector")))
            .map(|mut o| {
                let o2 = o.as_object_mut().unwrap();
                o2.remove("apiVersion");
                o2.remove("kind");
                o
            })
            .collect();
        return json((
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": "1"}, "items": items}),
        ));
    };
    let Some(object) = in_ns.into_iter().find(|o| o["metadata"]["name"] == name) else {
        return json(status(404, "NotFound"));
    };
    if sub == Some("log") {
        return match world.logs.get(name) {
            Some(bytes) => (StatusCode::OK, Err(bytes.clone())),
            None => json(status(400, "BadRequest")),
        };
    }
    if verb == "patch" {
        return json(dry_run(world, policy, kind, namespace, object, q, body));
    }
    json((StatusCode::OK, object))
}

/// A dry-run PATCH, as the apiserver answers it: admission's object, when the registration
/// routes the namespace to the webhook.
fn dry_run(
    world: &World,
    policy: &Policy,
    kind: &str,
    namespace: &str,
    object: Value,
    q: &BTreeMap<String, String>,
    body: &[u8],
) -> (StatusCode, Value) {
    assert_eq!(
        q.get("dryRun").map(String::as_str),
        Some("All"),
        "doctor only dry-runs"
    );
    // The patch changes nothing: it holds the listed resourceVersion, as a precondition.
    let sent: Value = serde_json::from_slice(body).unwrap();
    let version = &object["metadata"]["resourceVersion"];
    let expected = if version.is_null() {
        json!({})
    } else {
        json!({"metadata": {"resourceVersion": version}})
    };
    assert_eq!(sent, expected);
    // The apiserver runs mutating admission on every write, a no-op PATCH included, when a
    // registration routes the object to the webhook.
    if !routed(world, namespace) {
        return (StatusCode::OK, object);
    }
    let kind = if kind == "Service" {
        ObjectKind::Service
    } else {
        ObjectKind::Deployment
    };
    (StatusCode::OK, world.admit(policy, kind, &object))
}

/// Runs `gather` against `world` served by the mock; returns what it read and every request,
/// as `METHOD path?query`.
async fn read(world: World, logs: bool) -> (Result<Inputs, InspectError>, Vec<String>) {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let policy = Policy::builtin().unwrap();
    let server = tokio::spawn(async move {
        // Bounded: doctor sends a few dozen requests for one outpost.
        for _ in 0..200 {
            let Some((request, send)) = handle.next_request().await else {
                return;
            };
            log.lock().unwrap().push(format!(
                "{} {}",
                request.method(),
                request.uri().path_and_query().unwrap()
            ));
            if request.method() == Method::PATCH {
                assert_eq!(
                    request.headers()["content-type"],
                    "application/merge-patch+json"
                );
            }
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let q = query(&request);
            let body = request.into_body().collect_bytes().await.unwrap();
            let (code, body) = answer(&world, &policy, &method, &path, &q, &body);
            let bytes = match body {
                Ok(value) => serde_json::to_vec(&value).unwrap(),
                Err(bytes) => bytes,
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(bytes))
                    .unwrap(),
            );
        }
        panic!("more than 200 requests");
    });
    let scope = Scope {
        namespaces: vec![NS.into()],
        registration: "outpost-webhook".into(),
        policy: Some(Policy::builtin().unwrap()),
        logs,
    };
    let result = inspect::gather(&client, &scope)
        .await
        .map(|gathered| gathered.inputs);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    let requests = seen.lock().unwrap().clone();
    (result, requests)
}

async fn doctor_with(world: World, logs: bool) -> (Vec<Finding>, u8) {
    let policy = Policy::builtin().unwrap();
    let (inputs, _) = read(world, logs).await;
    let mut inputs = inputs.unwrap();
    inputs.expected = expected();
    inputs.now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap();
    let findings = doctor::check(&policy, &inputs);
    let code = doctor::exit_code(&findings);
    assert_no_secret_values(&findings);
    (findings, code)
}

fn assert_no_secret_values(findings: &[Finding]) {
    let text = doctor::render_text(findings);
    let json = serde_json::to_string(&doctor::Report::new(findings, None)).unwrap();
    for value in [PASSWORD, TOKEN] {
        for form in [value.to_owned(), b64(value)] {
            assert!(!text.contains(&form), "{form} in\n{text}");
            assert!(!json.contains(&form), "{form} in {json}");
        }
    }
}

// No kubelet runs with the test control plane, so nothing serves pods/log there.
#[tokio::test]
async fn logs_report_the_session_backend_and_warn_on_filesystem() {
    let mut world = healthy(&Policy::builtin().unwrap());
    let mode = r#"{"embedded":true,"event":"Outpost mode","level":"info"}"#;
    world.logs.insert(
        format!("{OUTPOST}-7c9f-a"),
        format!("{mode}\n{{\"event\":\"using PostgreSQL session backend\",\"level\":\"info\"}}\n")
            .into_bytes(),
    );
    world.logs.insert(
        format!("{OUTPOST}-7c9f-b"),
        // `limitBytes` cut the last line in the middle of a character.
        [
            format!("{mode}\nnot json\n{{\"event\":\"using filesystem session backend\"}}\n")
                .as_bytes(),
            "{\"event\":\"caf\u{e9}".as_bytes(),
        ]
        .concat()[..]
            .split_last()
            .unwrap()
            .1
            .to_vec(),
    );
    let (findings, code) = doctor_with(world, true).await;
    assert_eq!(code, 0, "{}", doctor::render_text(&findings));
    let backends: Vec<(Severity, &str)> = findings
        .iter()
        .filter(|f| f.check == Check::PodSessionBackend)
        .map(|f| (f.severity, f.object.as_str()))
        .collect();
    assert_eq!(
        backends,
        [
            (Severity::Ok, format!("Pod/{NS}/{OUTPOST}-7c9f-a").as_str()),
            (
                Severity::Warn,
                format!("Pod/{NS}/{OUTPOST}-7c9f-b").as_str()
            )
        ]
    );
    assert_eq!(
        findings
            .iter()
            .filter(|f| f.check == Check::PodOutpostMode)
            .count(),
        2
    );
}

// ---- The binary against an apiserver that is not there ---------------------------------------

fn kubeconfig(dir: &std::path::Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n\
             - name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    path
}

/// Runs `doctor` with `kubeconfig`; its exit code and standard error, waiting at most 15 s.
fn run_doctor(kubeconfig: &std::path::Path) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-webhook"))
        .arg("doctor")
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > Duration::from_secs(15) {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (code, stderr, started.elapsed())
}

// No apiserver at all: a real one cannot show its own absence.
#[test]
fn an_apiserver_that_refuses_connections_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, stderr, _) = run_doctor(&kubeconfig(
        dir.path(),
        &format!("https://127.0.0.1:{port}"),
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach the apiserver"), "{stderr}");
}

// A real apiserver always completes the TLS handshake.
#[test]
fn an_apiserver_that_never_answers_exits_2_with_one_line() {
    // Accepts the connection and says nothing: the TLS handshake never completes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr, elapsed) = run_doctor(&kubeconfig(dir.path(), &format!("https://{addr}")));
    assert_eq!(code, Some(2), "{stderr} after {elapsed:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach the apiserver"), "{stderr}");
    drop(held);
}

// No kubeconfig, so no apiserver is involved.
#[test]
fn no_kubeconfig_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr, _) = run_doctor(&dir.path().join("missing"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no Kubernetes configuration"), "{stderr}");
}
