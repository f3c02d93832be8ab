//! `deploy/` as a cluster would receive it: every kustomization rendered with
//! `kubectl kustomize`, every document read into its k8s-openapi type with unknown fields refused,
//! and the invariants that keep the webhook safe checked, including the registration's CEL
//! `matchConditions`, evaluated against the fixtures.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{collections::BTreeMap, path::Path, process::Command};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use outpost_webhook::{
    cmd::webhook_config::{self, Options, Target},
    core::{
        admission::{DEFAULT_HEALTH_PORT, DEFAULT_PORT, MUTATE_PATH, TIMEOUT_SECONDS},
        policy::unknown_field,
    },
    pki::service_dns_names,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

fn render(overlay: &str) -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl is needed to render deploy/ (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text).unwrap()
}

/// Reads a document into its type, refusing fields the type does not know.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
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

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// Reads every document of a rendering into its type.
fn check_types(docs: &[Value]) {
    for doc in docs {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => drop(typed::<Namespace>(doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ConfigMap" => drop(typed::<ConfigMap>(doc)),
            "Service" => drop(typed::<Service>(doc)),
            "Deployment" => drop(typed::<Deployment>(doc)),
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(doc)),
            "MutatingWebhookConfiguration" => drop(typed::<MutatingWebhookConfiguration>(doc)),
            "Issuer" | "Certificate" => check_cert_manager(doc),
            other => panic!("unexpected kind {other}"),
        }
    }
}

/// cert-manager's kinds have no k8s-openapi type: check them against the fields of
/// cert-manager.io/v1 that these manifests use.
fn check_cert_manager(doc: &Value) {
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

fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "only matchLabels are used"
    );
    selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"))
}

fn seconds(go_duration: &str) -> i64 {
    i64::try_from(
        outpost_webhook::duration::parse_go_duration(go_duration)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

#[test]
fn every_kustomization_renders_into_known_types() {
    for overlay in ["base", "cert-manager", "plain"] {
        let docs = render(overlay);
        assert!(docs.len() >= 6, "{overlay}");
        check_types(&docs);
        for doc in &docs {
            if doc["kind"] != "Namespace" && doc["kind"] != "MutatingWebhookConfiguration" {
                assert_eq!(
                    doc["metadata"]["namespace"], "outpost-webhook",
                    "{overlay} {}",
                    doc["kind"]
                );
            }
        }
    }
}

#[test]
fn the_deployment_is_available_hardened_and_drains_as_the_code_expects() {
    let docs = render("base");
    let d: Deployment = typed(one(&docs, "Deployment"));
    let spec = d.spec;
    assert_eq!(spec.replicas, Some(2));
    let rolling = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        serde_json::to_value(rolling.max_unavailable).unwrap(),
        json!(0)
    );
    let template = spec.template;
    let meta = template.metadata.unwrap();
    let pod_labels = meta.labels.unwrap();
    assert!(matches(&spec.selector, &pod_labels));
    let pod = template.spec.unwrap();

    let spread = pod.topology_spread_constraints.unwrap();
    assert!(
        spread
            .iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname")
    );
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(pod.automount_service_account_token, Some(false));

    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    let resources = c.resources.clone().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());

    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "serve");
    let port = |name: &str| {
        c.ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .container_port
    };
    assert_eq!(port("https"), i32::from(DEFAULT_PORT));
    assert_eq!(port("health"), i32::from(DEFAULT_HEALTH_PORT));
    assert!(arg(&args, "--addr").ends_with(&format!(":{DEFAULT_PORT}")));
    assert!(arg(&args, "--health-addr").ends_with(&format!(":{DEFAULT_HEALTH_PORT}")));
    assert_eq!(
        seconds(arg(&args, "--request-timeout")),
        i64::try_from(TIMEOUT_SECONDS).unwrap()
    );

    let probe_path =
        |p: Option<k8s_openapi::api::core::v1::Probe>| p.unwrap().http_get.unwrap().path.unwrap();
    assert_eq!(probe_path(c.readiness_probe.clone()), "/readyz");
    assert_eq!(probe_path(c.liveness_probe.clone()), "/healthz");

    // The preStop sleep and the drain add up within the grace period.
    let pre_stop = c
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .sleep
        .unwrap()
        .seconds;
    let drain: i64 = arg(&args, "--drain-seconds").parse().unwrap();
    assert_eq!(pre_stop, drain, "the preStop sleep matches --drain-seconds");
    let grace = seconds(arg(&args, "--shutdown-grace"));
    assert!(pod.termination_grace_period_seconds.unwrap() >= pre_stop + drain + grace);

    // The certificate and policy files the flags name are on the mounted volumes.
    let mounts = c.volume_mounts.clone().unwrap();
    for flag in ["--tls-cert", "--tls-key", "--policy"] {
        let file = arg(&args, flag);
        assert!(
            mounts
                .iter()
                .any(|m| file.starts_with(&format!("{}/", m.mount_path))),
            "{flag}"
        );
    }

    // A policy edit rolls the pods: the annotation carries the ConfigMap's hashed name.
    let cm_name = one(&docs, "ConfigMap")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cm_name.starts_with("outpost-webhook-policy-"), "{cm_name}");
    assert_eq!(
        meta.annotations.unwrap()["outpost-webhook.io/policy-configmap"],
        cm_name
    );
    let volumes = pod.volumes.unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == cm_name))
    );

    // The shipped policy is valid.
    let policy_text = one(&docs, "ConfigMap")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    outpost_webhook::core::policy::Policy::from_yaml("ConfigMap", policy_text).unwrap();
}

#[test]
fn the_service_and_budget_select_the_webhook_pods() {
    let docs = render("base");
    let d: Deployment = typed(one(&docs, "Deployment"));
    let pod_labels = d.spec.template.metadata.unwrap().labels.unwrap();
    let svc: Service = typed(one(&docs, "Service"));
    let spec = svc.spec.unwrap();
    assert!(
        spec.selector
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    );
    let https = spec
        .ports
        .unwrap()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .unwrap();
    assert_eq!(https.port, 443);
    let pdb: PodDisruptionBudget = typed(one(&docs, "PodDisruptionBudget"));
    let pdb = pdb.spec.unwrap();
    assert!(matches(&pdb.selector.unwrap(), &pod_labels));
    assert_eq!(serde_json::to_value(pdb.min_available).unwrap(), json!(1));
}

#[test]
fn the_registration_is_safe_and_agrees_with_the_code() {
    let docs = render("base");
    let mwc: MutatingWebhookConfiguration = typed(one(&docs, "MutatingWebhookConfiguration"));
    let webhooks = mwc.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    let w = &webhooks[0];
    assert_eq!(w.admission_review_versions, ["v1"]);
    assert_eq!(w.side_effects, "None");
    assert_eq!(
        w.timeout_seconds,
        Some(i32::try_from(TIMEOUT_SECONDS).unwrap())
    );
    assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(w.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(w.match_policy.as_deref(), Some("Equivalent"));
    let service = w.client_config.service.clone().unwrap();
    assert_eq!(service.path.as_deref(), Some(MUTATE_PATH));
    assert_eq!(service.port, Some(443));
    let svc = one(&docs, "Service");
    assert_eq!(service.name, svc["metadata"]["name"].as_str().unwrap());
    assert_eq!(
        service.namespace,
        svc["metadata"]["namespace"].as_str().unwrap()
    );

    let rules = w.rules.clone().unwrap();
    let summary: Vec<Rule> = rules
        .into_iter()
        .map(|r| {
            (
                r.operations.unwrap(),
                r.api_groups.unwrap(),
                r.api_versions.unwrap(),
                r.resources.unwrap(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        summary,
        [
            (
                s(&["CREATE", "UPDATE"]),
                s(&[""]),
                s(&["v1"]),
                s(&["services"])
            ),
            (
                s(&["CREATE", "UPDATE"]),
                s(&["apps"]),
                s(&["v1"]),
                s(&["deployments"])
            ),
        ],
        "CREATE and UPDATE of services and deployments, no subresources"
    );

    // It cannot match the webhook's own namespace or Deployment, so it cannot deadlock itself.
    let ns: Namespace = typed(one(&docs, "Namespace"));
    let mut ns_labels = ns.metadata.labels.unwrap_or_default();
    ns_labels.insert(
        "kubernetes.io/metadata.name".into(),
        ns.metadata.name.unwrap(),
    );
    assert!(!matches(w.namespace_selector.as_ref().unwrap(), &ns_labels));
    let own: Deployment = typed(one(&docs, "Deployment"));
    assert!(!matches(
        w.object_selector.as_ref().unwrap(),
        &own.metadata.labels.unwrap()
    ));
    let authentik: BTreeMap<String, String> = [(
        "kubernetes.io/metadata.name".to_owned(),
        "authentik".to_owned(),
    )]
    .into();
    assert!(matches(w.namespace_selector.as_ref().unwrap(), &authentik));
}

/// A rule as (operations, apiGroups, apiVersions, resources).
type Rule = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

/// Evaluates each `matchConditions` expression with `object` bound, as the apiserver does.
fn conditions_hold(w: &Value, object: &Value) -> bool {
    w["matchConditions"].as_array().unwrap().iter().all(|c| {
        let program = cel::Program::compile(c["expression"].as_str().unwrap()).unwrap();
        let mut context = cel::Context::default();
        context.add_variable_from_value("object", cel::to_value(object).unwrap());
        match program.execute(&context) {
            Ok(cel::Value::Bool(b)) => b,
            other => panic!("{} did not evaluate to a bool: {other:?}", c["name"]),
        }
    })
}

#[test]
fn the_cel_conditions_accept_every_outpost_fixture_and_reject_helms_objects() {
    let docs = render("base");
    let w = &one(&docs, "MutatingWebhookConfiguration")["webhooks"][0];
    let objects = common::fixture_objects();
    assert_eq!(objects.len(), 7);
    for (name, object) in &objects {
        let outpost = !name.starts_with("unrelated-");
        assert_eq!(conditions_hold(w, object), outpost, "{name}");
    }
    // And an object without labels at all.
    assert!(!conditions_hold(w, &json!({"metadata": {"name": "x"}})));
    let mut partial = objects
        .iter()
        .find(|(n, _)| n.starts_with("embedded-proxy-service"))
        .unwrap()
        .1
        .clone();
    partial["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("goauthentik.io/outpost-uuid");
    assert!(!conditions_hold(w, &partial));
}

#[test]
fn cert_manager_issues_the_secret_the_deployment_mounts_for_every_service_name() {
    let docs = render("cert-manager");
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let inject = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .unwrap();
    let (ns, cert_name) = inject.split_once('/').unwrap();
    let cert = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == cert_name)
        .unwrap();
    assert_eq!(cert["metadata"]["namespace"], ns);
    let d: Deployment = typed(one(&docs, "Deployment"));
    let volumes = d.spec.template.spec.unwrap().volumes.unwrap();
    let secret = volumes
        .iter()
        .find_map(|v| v.secret.as_ref())
        .unwrap()
        .secret_name
        .clone()
        .unwrap();
    assert_eq!(cert["spec"]["secretName"], secret.as_str());
    let svc = one(&docs, "Service");
    let names = service_dns_names(
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap(),
    );
    assert_eq!(cert["spec"]["dnsNames"], json!(names));
    // The CA chain: self-signed Issuer -> CA Certificate -> CA Issuer -> serving Certificate.
    let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap();
    let ca_issuer = docs
        .iter()
        .find(|d| d["kind"] == "Issuer" && d["metadata"]["name"] == issuer)
        .unwrap();
    let ca_secret = ca_issuer["spec"]["ca"]["secretName"].as_str().unwrap();
    let ca_cert = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == ca_secret)
        .unwrap();
    assert_eq!(ca_cert["spec"]["isCA"], true);
}

#[test]
fn the_plain_overlay_leaves_the_registration_to_webhook_config() {
    let docs = render("plain");
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "MutatingWebhookConfiguration")
    );
    assert!(docs.iter().any(|d| d["kind"] == "Deployment"));
}

#[test]
fn webhook_config_equals_the_rendered_registration_but_for_ca_bundle_and_client_config() {
    let docs = render("base");
    let mut rendered = one(&docs, "MutatingWebhookConfiguration").clone();
    let ours = webhook_config::render(&Options {
        ca_bundle: Some(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
        target: Target::Url("https://127.0.0.1:8443/mutate".into()),
        namespace_selector: None,
        failure_policy: None,
    })
    .unwrap();
    let mut ours: Value = serde_saphyr::from_str(&ours).unwrap();
    typed::<MutatingWebhookConfiguration>(&ours);
    for doc in [&mut rendered, &mut ours] {
        for w in doc["webhooks"].as_array_mut().unwrap() {
            w.as_object_mut().unwrap().remove("clientConfig");
        }
    }
    assert_eq!(ours, rendered);
}
