//! What the tests against the real control plane share: the fixtures as objects to create, a
//! bounded wait, rendered manifests, and kubeconfigs for other users or addresses.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;

use super::{control_plane::ControlPlane, pki::temp_dir};

/// How often a wait polls the apiserver or a replica.
pub const POLL: Duration = Duration::from_millis(100);

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// An object of the shared fixtures (`tests/fixtures`) moved into `namespace`, with what the
/// apiserver sets on a stored object removed so that it can be created.
pub fn fixture(name: &str, namespace: &str) -> Value {
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

/// Polls `check` until it returns `Some`, at most `limit`; panics naming `what`.
pub async fn wait_for<T, F: Future<Output = Option<T>>>(
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

/// `kubectl kustomize` of an overlay under deploy/: its text and its documents.
pub fn kustomize(overlay: &str) -> (String, Vec<Value>) {
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

/// Who a kubeconfig authenticates as.
pub enum User<'a> {
    Admin,
    Token(&'a str),
}

/// A kubeconfig for `server` (the apiserver's URL, or a proxy's in front of it) as `user`.
pub fn kubeconfig(cp: &ControlPlane, server: &str, user: &User<'_>) -> (TempDir, PathBuf) {
    let dir = temp_dir("kubeconfig");
    let path: PathBuf = dir.path().join("kubeconfig");
    let d = cp.dir.display();
    let user = match user {
        User::Admin => {
            format!("{{client-certificate: '{d}/admin.crt', client-key: '{d}/admin.key'}}")
        }
        User::Token(t) => format!("{{token: '{t}'}}"),
    };
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
             clusters: [{{name: t, cluster: {{server: '{server}', certificate-authority: '{d}/ca.crt'}}}}]\n\
             users: [{{name: t, user: {user}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n"
        ),
    )
    .unwrap();
    (dir, path)
}

/// A kube client from a kubeconfig file.
pub async fn client_from(path: &Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A client authenticating with a bearer `token`, as a pod does.
pub async fn token_client(cp: &ControlPlane, token: &str) -> kube::Client {
    let (_dir, path) = kubeconfig(cp, &cp.url, &User::Token(token));
    client_from(&path).await
}

/// The command for `serve --cluster on` as replica `name`, with `kubeconfig`, watching
/// `namespace` and holding its Lease there, serving the certificate in `certs`, plus `extra`.
pub fn replica(
    kubeconfig: &Path,
    certs: &TempDir,
    namespace: &str,
    name: &str,
    extra: &[&str],
) -> Command {
    // Killed with the test binary, however it ends (the parent-death signal).
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--", super::process::BIN])
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", name)
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(super::process::SERVE_ON_LOOPBACK)
        .args(["--log-format", "json", "--drain-seconds", "1"])
        .arg("--tls-cert")
        .arg(certs.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(certs.path().join("tls.key"))
        .args(["--cluster", "on", "--watch-namespace", namespace])
        .args(["--lease-namespace", namespace])
        .args(extra);
    command
}
