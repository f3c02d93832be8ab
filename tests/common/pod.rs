//! `serve` as a pod runs it against the test control plane: in a private mount namespace where
//! `/var/run/secrets/kubernetes.io/serviceaccount` holds the `ServiceAccount`'s token (from the
//! `TokenRequest` API), the apiserver's CA and the namespace, with `KUBERNETES_SERVICE_HOST` and
//! `KUBERNETES_SERVICE_PORT` set, so the binary finds in-cluster configuration exactly as it does
//! in a pod. The container's volumes are directories here; the rendered args are rewritten to
//! point at them. No kubelet runs it: nothing restarts it, and the probes are the test's.

use std::{path::Path, process::Command};

use serde_json::Value;
use tempfile::TempDir;

use super::{
    control_plane::ControlPlane,
    pki::temp_dir,
    process::{BIN, Served, spawn_served},
};

/// What a pod of the webhook's Deployment is given.
pub struct PodSpec<'a> {
    /// The pod's name (`POD_NAME`) and namespace (`POD_NAMESPACE`, the token's namespace).
    pub name: &'a str,
    pub namespace: &'a str,
    /// The `ServiceAccount` token to mount.
    pub token: &'a str,
    /// The container's args after the binary's name (`serve ...`).
    pub args: Vec<String>,
    /// Each volume's mount path in the container, and the directory on this machine that holds
    /// its files.
    pub volumes: Vec<(String, &'a Path)>,
}

/// A running pod: its process and the directory its service account files came from.
pub struct Pod {
    pub served: Served,
    pub name: String,
    _secrets: TempDir,
}

/// The container args with each volume's mount path mapped to its directory here, and the
/// listen addresses moved to ephemeral loopback ports (two replicas share this machine).
fn rewritten(spec: &PodSpec<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for arg in &spec.args {
        if arg.starts_with("--addr") || arg.starts_with("--health-addr") {
            continue;
        }
        let mut arg = arg.clone();
        for (mount, dir) in &spec.volumes {
            arg = arg.replace(&format!("={mount}/"), &format!("={}/", dir.display()));
        }
        out.push(arg);
    }
    out.extend([
        "--addr=127.0.0.1:0".into(),
        "--health-addr=127.0.0.1:0".into(),
    ]);
    out
}

impl Pod {
    /// Starts the pod's process and waits until it serves.
    pub fn start(cp: &ControlPlane, spec: &PodSpec<'_>) -> Self {
        let secrets = temp_dir("serviceaccount");
        std::fs::write(secrets.path().join("token"), spec.token).unwrap();
        std::fs::write(secrets.path().join("ca.crt"), &cp.ca_pem).unwrap();
        std::fs::write(secrets.path().join("namespace"), spec.namespace).unwrap();
        // /var/run is /run here: a private tmpfs over it shows the binary only these files.
        let script = format!(
            "set -e; mount --make-rprivate /; mount -t tmpfs -o size=1m tmpfs /run; \
             d=/run/secrets/kubernetes.io/serviceaccount; mkdir -p $d; \
             cp '{src}/token' '{src}/ca.crt' '{src}/namespace' $d/; exec \"$0\" \"$@\"",
            src = secrets.path().display()
        );
        // Killed with the test binary, however it ends (the parent-death signal, as the control
        // plane's processes are).
        let mut command = Command::new("setpriv");
        command
            .args([
                "--pdeathsig",
                "KILL",
                "--",
                "unshare",
                "-m",
                "sh",
                "-c",
                &script,
                BIN,
            ])
            .args(rewritten(spec))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", cp.port.to_string())
            .env("POD_NAME", spec.name)
            .env("POD_NAMESPACE", spec.namespace);
        let mut served = spawn_served(command);
        spec.name.clone_into(&mut served.label);
        Self {
            served,
            name: spec.name.to_owned(),
            _secrets: secrets,
        }
    }
}

/// The args of the first container of a rendered Deployment, after `serve`'s binary name.
pub fn container_args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// Each volume mount of the first container of a rendered Deployment: mount path and volume.
pub fn volume_mounts(deployment: &Value) -> Vec<(String, Value)> {
    let spec = &deployment["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    spec["containers"][0]["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let volume = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .cloned()
                .unwrap_or(Value::Null);
            (m["mountPath"].as_str().unwrap().to_owned(), volume)
        })
        .collect()
}
