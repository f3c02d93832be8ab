//! Rendered manifests as a cluster receives them, shared by `tests/manifests.rs` (kustomize) and
//! `tests/chart.rs` (Helm, and kustomize to compare): documents read into their k8s-openapi types with unknown fields
//! refused, cert-manager's kinds checked by hand, and RBAC rules flattened into single grants so
//! that two Roles compare whatever their layout.

use std::collections::BTreeSet;

use outpost_webhook::cluster::LEASE_NAME;

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
};
use outpost_webhook::core::policy::unknown_field;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// A directory of `deploy/` rendered with `kubectl kustomize`.
pub fn kustomize(overlay: &str) -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(overlay);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl is needed to render deploy/ (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).unwrap())
}

/// The documents of a multi-document YAML stream, empty ones (a template that rendered nothing)
/// left out.
pub fn documents(text: &str) -> Vec<Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Reads a document into its type, refusing fields the type does not know.
pub fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let t: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    if let Some(field) = unknown_field(doc, &back) {
        panic!(
            "{} {}: unknown field {field}",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    t
}

/// Reads a document of any kind `deploy/` or the chart renders into its type (cert-manager's and
/// the Prometheus Operator's checked by hand); any other kind fails.
pub fn check_known_kind(doc: &Value) {
    match doc["kind"].as_str().unwrap() {
        "Namespace" => drop(typed::<Namespace>(doc)),
        "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
        "ConfigMap" => drop(typed::<ConfigMap>(doc)),
        "Service" => drop(typed::<Service>(doc)),
        "Deployment" => drop(typed::<Deployment>(doc)),
        "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(doc)),
        "NetworkPolicy" => drop(typed::<NetworkPolicy>(doc)),
        "Role" => drop(typed::<Role>(doc)),
        "RoleBinding" => drop(typed::<RoleBinding>(doc)),
        "ClusterRole" => drop(typed::<ClusterRole>(doc)),
        "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
        "MutatingWebhookConfiguration" => drop(typed::<MutatingWebhookConfiguration>(doc)),
        "Issuer" | "Certificate" => check_cert_manager(doc),
        // No k8s-openapi type either; the chart test compares their content.
        "ServiceMonitor" | "PrometheusRule" => {
            assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
        }
        other => panic!("unexpected kind {other}"),
    }
}

/// The one document of `kind`.
pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// The documents of `kind` in namespace `ns`.
pub fn in_namespace<'a>(docs: &'a [Value], kind: &str, ns: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["namespace"] == ns)
        .collect()
}

/// cert-manager's kinds have no k8s-openapi type: check them against the fields of
/// cert-manager.io/v1 that these manifests use.
pub fn check_cert_manager(doc: &Value) {
    assert_eq!(doc["apiVersion"], "cert-manager.io/v1");
    let allowed: &[&str] = match doc["kind"].as_str().unwrap() {
        "Issuer" => &["selfSigned", "ca"],
        _ => &[
            "isCA",
            "commonName",
            "secretName",
            "duration",
            "renewBefore",
            "privateKey",
            "dnsNames",
            "usages",
            "issuerRef",
        ],
    };
    for key in doc["spec"].as_object().unwrap().keys() {
        assert!(
            allowed.contains(&key.as_str()),
            "{}: unexpected spec.{key}",
            doc["metadata"]["name"]
        );
    }
}

/// One permission: (apiGroup, resource, resourceName or none for any, verb).
pub type Grant = (String, String, Option<String>, String);

/// Rules as single permissions.
pub fn rule_grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none());
        let names: Vec<Option<String>> = match &rule.resource_names {
            Some(names) => names.iter().cloned().map(Some).collect(),
            None => vec![None],
        };
        for group in rule.api_groups.clone().unwrap() {
            for resource in rule.resources.clone().unwrap() {
                for name in &names {
                    for verb in &rule.verbs {
                        out.insert((group.clone(), resource.clone(), name.clone(), verb.clone()));
                    }
                }
            }
        }
    }
    out
}

/// A Role's rules as single permissions.
pub fn grants(role: &Role) -> BTreeSet<Grant> {
    rule_grants(role.rules.as_deref().unwrap())
}

/// `verbs` on `resource` of `group`, on the one name or on any.
pub fn grant(group: &str, resource: &str, name: Option<&str>, verbs: &[&str]) -> BTreeSet<Grant> {
    verbs
        .iter()
        .map(|v| {
            (
                group.to_owned(),
                resource.to_owned(),
                name.map(str::to_owned),
                (*v).to_owned(),
            )
        })
        .collect()
}

/// What each watched namespace's Role must grant: the cache's get, list and watch and the
/// reconciler's patch of Services and Deployments, the policy's Secrets by name, and Events.
pub fn watch_grants(secrets: &BTreeSet<String>) -> BTreeSet<Grant> {
    let mut wanted = BTreeSet::new();
    for (group, resource) in [("", "services"), ("apps", "deployments")] {
        wanted.extend(grant(
            group,
            resource,
            None,
            &["get", "list", "watch", "patch"],
        ));
    }
    for name in secrets {
        wanted.extend(grant("", "secrets", Some(name), &["get", "list", "watch"]));
    }
    wanted.extend(grant("events.k8s.io", "events", None, &["create", "patch"]));
    wanted
}

/// What self-managed TLS must grant: in the webhook's namespace, its Secret by name and create
/// (which RBAC cannot limit by name), beside the Lease's grants; cluster-wide, get and patch of
/// its registration alone.
pub fn self_tls_grants(secret: &str, registration: &str) -> (BTreeSet<Grant>, BTreeSet<Grant>) {
    let mut own = lease_grants();
    own.extend(grant(
        "",
        "secrets",
        Some(secret),
        &["get", "list", "watch", "patch"],
    ));
    own.extend(grant("", "secrets", None, &["create"]));
    let cluster = grant(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        Some(registration),
        &["get", "patch"],
    );
    (own, cluster)
}

/// What the Lease Role must grant: get and update on the one name (src/cluster/lease.rs),
/// and create, which RBAC cannot limit by name.
pub fn lease_grants() -> BTreeSet<Grant> {
    let mut lease = grant(
        "coordination.k8s.io",
        "leases",
        Some(LEASE_NAME),
        &["get", "update"],
    );
    lease.extend(grant("coordination.k8s.io", "leases", None, &["create"]));
    lease
}
