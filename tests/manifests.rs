//! `deploy/` as a cluster would receive it: every kustomization rendered with
//! `kubectl kustomize`, every document read into its k8s-openapi type with unknown fields refused,
//! and the invariants that keep the webhook safe checked, including the registration's CEL
//! `matchConditions`, evaluated against the fixtures, and RBAC that is exactly what the cluster
//! view uses.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{Namespace, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, Role, RoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use outpost_webhook::{
    cmd::{
        Cli,
        serve::ServeArgs,
        webhook_config::{self, Options, Target},
    },
    core::{
        admission::{DEFAULT_HEALTH_PORT, DEFAULT_PORT, MUTATE_PATH, TIMEOUT_SECONDS},
        policy::{DEFAULT_POLICY_YAML, Outpost, Policy},
    },
    pki::service_dns_names,
};
use serde_json::{Value, json};

use common::manifests::{
    check_known_kind, grants, in_namespace, lease_grants, one, rule_grants, self_tls_grants, typed,
    watch_grants,
};

fn render(overlay: &str) -> Vec<Value> {
    common::manifests::kustomize(overlay)
}

/// Reads every document of `overlay`'s rendering into its type.
fn check_types(overlay: &str, docs: &[Value]) {
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap();
        // Nothing cluster-wide but self-managed TLS's grant on its own registration (checked in
        // its own test); the Prometheus Operator's kinds are the chart's alone.
        assert!(
            !kind.starts_with("Cluster") || overlay == "self-tls",
            "{overlay}: {kind}"
        );
        assert!(doc["apiVersion"] != "monitoring.coreos.com/v1", "{kind}");
        check_known_kind(doc);
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

/// The labels of the webhook's pods.
fn pod_labels(docs: &[Value]) -> BTreeMap<String, String> {
    let d: Deployment = typed(one(docs, "Deployment"));
    d.spec.template.metadata.unwrap().labels.unwrap()
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

/// The overlays a cluster applies: base alone has no certificate and no watched-namespace RBAC.
const OVERLAYS: [&str; 2] = ["cert-manager", "plain"];

/// Every directory of `deploy/` that holds a kustomization.
fn kustomizations() -> Vec<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut dirs: Vec<String> = std::fs::read_dir(deploy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs
}

/// The Deployment's `serve` flags as the binary parses them (which also proves them valid).
fn serve_args(docs: &[Value]) -> ServeArgs {
    let d: Deployment = typed(one(docs, "Deployment"));
    let args = d.spec.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let cli = Cli::try_parse_from(std::iter::once("outpost-webhook".to_owned()).chain(args))
        .unwrap_or_else(|e| panic!("the Deployment's args: {e}"));
    match cli.command {
        outpost_webhook::cmd::Command::Serve(serve) => *serve,
        other => panic!("not serve: {other:?}"),
    }
}

#[test]
fn every_kustomization_renders_into_known_types() {
    let dirs = kustomizations();
    assert_eq!(dirs, ["base", "cert-manager", "plain", "self-tls", "watch"]);
    let watched = serve_args(&render("base")).watch_namespaces;
    for dir in &dirs {
        let docs = render(dir);
        assert!(docs.len() >= 2, "{dir}");
        check_types(dir, &docs);
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap();
            if kind == "Namespace" || kind == "MutatingWebhookConfiguration" {
                continue;
            }
            if kind.starts_with("Cluster") {
                assert!(doc["metadata"].get("namespace").is_none(), "{dir} {kind}");
                continue;
            }
            let ns = doc["metadata"]["namespace"].as_str().unwrap();
            // Only the watched namespaces' Role and RoleBinding live outside the webhook's own.
            let watch_rbac = (doc["kind"] == "Role" || doc["kind"] == "RoleBinding")
                && doc["metadata"]["name"] == "outpost-webhook"
                && watched.iter().any(|w| w == ns);
            assert!(
                ns == "outpost-webhook" || watch_rbac,
                "{dir} {} {} in {ns}",
                doc["kind"],
                doc["metadata"]["name"]
            );
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
fn the_pod_has_the_token_and_lease_identity_the_cluster_view_needs() {
    let docs = render("base");
    let d: Deployment = typed(one(&docs, "Deployment"));
    let pod = d.spec.template.spec.unwrap();
    // The token is mounted for the cluster view, in this pod only: the account does not automount.
    assert_eq!(pod.automount_service_account_token, Some(true));
    let sa: ServiceAccount = typed(one(&docs, "ServiceAccount"));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.automount_service_account_token, Some(false));

    // The Lease identity ($POD_NAME) and namespace (--lease-namespace's env) from the downward API.
    let serve = Cli::command().find_subcommand("serve").unwrap().clone();
    let lease_env = serve
        .get_arguments()
        .find(|a| a.get_long() == Some("lease-namespace"))
        .unwrap()
        .get_env()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let c = &pod.containers[0];
    let env = c.env.clone().unwrap();
    let field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("env {name} missing"))
            .value_from
            .clone()
            .unwrap()
            .field_ref
            .unwrap()
            .field_path
    };
    assert_eq!(field("POD_NAME"), "metadata.name");
    assert_eq!(field(&lease_env), "metadata.namespace");
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
    // Admission only: health and metrics are scraped from the pods, not the Service.
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].port, 443);
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    let container = &d.spec.template.spec.unwrap().containers[0];
    let target = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| ports[0].target_port == Some(IntOrString::String(p.name.clone().unwrap())))
        .unwrap();
    assert_eq!(target.container_port, i32::from(DEFAULT_PORT));
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

/// The binding in `ns` gives Role `role` to the webhook's `ServiceAccount` and no one else.
fn assert_bound(docs: &[Value], ns: &str, role: &str) {
    let sa = one(docs, "ServiceAccount");
    let bindings = in_namespace(docs, "RoleBinding", ns);
    assert_eq!(bindings.len(), 1, "one RoleBinding in {ns}");
    let binding: RoleBinding = typed(bindings[0]);
    assert_eq!(binding.role_ref.kind, "Role", "{ns}: never a ClusterRole");
    assert_eq!(binding.role_ref.name, role);
    let subjects: Vec<(String, String, Option<String>)> = binding
        .subjects
        .unwrap()
        .into_iter()
        .map(|s| (s.kind, s.name, s.namespace))
        .collect();
    assert_eq!(
        subjects,
        [(
            "ServiceAccount".to_owned(),
            sa["metadata"]["name"].as_str().unwrap().to_owned(),
            Some(sa["metadata"]["namespace"].as_str().unwrap().to_owned()),
        )],
        "{ns}"
    );
}

#[test]
fn the_rbac_is_namespaced_and_exactly_what_the_cluster_view_uses() {
    let base = render("base");
    let registration = one(&base, "MutatingWebhookConfiguration");
    for overlay in OVERLAYS {
        let docs = render(overlay);
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap();
            assert!(!kind.starts_with("Cluster"), "{overlay}: {kind}");
        }
        let serve = serve_args(&docs);
        let policy_text = one(&docs, "ConfigMap")["data"]["policy.yaml"]
            .as_str()
            .unwrap();
        let secrets = Policy::from_yaml("ConfigMap", policy_text)
            .unwrap()
            .secret_names();
        assert!(!secrets.is_empty());
        // deploy/plain leaves the registration to webhook-config, which renders base's.
        let selector: LabelSelector =
            serde_json::from_value(registration["webhooks"][0]["namespaceSelector"].clone())
                .unwrap();

        // Each watched namespace: the cache's list and watch (get besides), the reconciler's
        // patch and Events, and the policy's Secrets by name; no create, update, delete, nor
        // other Secrets.
        let wanted = watch_grants(&secrets);
        for ns in &serve.watch_namespaces {
            let roles = in_namespace(&docs, "Role", ns);
            assert_eq!(roles.len(), 1, "{overlay}: one Role in {ns}");
            let role: Role = typed(roles[0]);
            assert_eq!(grants(&role), wanted, "{overlay} {ns}");
            assert_bound(&docs, ns, role.metadata.name.as_deref().unwrap());
            let labels: BTreeMap<String, String> =
                [("kubernetes.io/metadata.name".to_owned(), ns.clone())].into();
            assert!(matches(&selector, &labels), "the registration covers {ns}");
        }

        // The Lease, in the namespace the pods run in (--lease-namespace from POD_NAMESPACE):
        // get and update on the one name (src/cluster/lease.rs), and create, which RBAC cannot
        // limit by name.
        let own = one(&docs, "Deployment")["metadata"]["namespace"]
            .as_str()
            .unwrap();
        assert!(!serve.watch_namespaces.iter().any(|w| w == own));
        let roles = in_namespace(&docs, "Role", own);
        assert_eq!(roles.len(), 1, "{overlay}: one Role in {own}");
        let role: Role = typed(roles[0]);
        assert_eq!(grants(&role), lease_grants(), "{overlay}");
        assert_bound(&docs, own, role.metadata.name.as_deref().unwrap());

        // And nothing else.
        let namespaces = serve.watch_namespaces.len() + 1;
        assert_eq!(
            docs.iter().filter(|d| d["kind"] == "Role").count(),
            namespaces
        );
        assert_eq!(
            docs.iter().filter(|d| d["kind"] == "RoleBinding").count(),
            namespaces
        );
    }
}

#[test]
fn the_shipped_policy_is_the_built_in_one() {
    let docs = render("base");
    let text = one(&docs, "ConfigMap")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    // The same YAML data, comments and layout aside.
    let shipped: Value = serde_saphyr::from_str(text).unwrap();
    let builtin: Value = serde_saphyr::from_str(DEFAULT_POLICY_YAML).unwrap();
    assert_eq!(shipped, builtin);
    // So it compiles to the same policy: the same Secrets, the same fix for every outpost.
    let shipped = Policy::from_yaml("ConfigMap", text).unwrap();
    let builtin = Policy::builtin().unwrap();
    assert_eq!(shipped.rule_count(), builtin.rule_count());
    assert_eq!(shipped.secret_names(), builtin.secret_names());
    let objects = common::fixture_objects();
    for (name, object) in &objects {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels[k].as_str().unwrap_or("");
        let outpost = Outpost {
            name: label("goauthentik.io/outpost-name"),
            kind: label("goauthentik.io/outpost-type"),
            uuid: label("goauthentik.io/outpost-uuid"),
        };
        assert_eq!(
            shipped.for_outpost(&outpost),
            builtin.for_outpost(&outpost),
            "{name}"
        );
    }
}

#[test]
fn the_network_policy_admits_only_the_webhook_and_health_ports_and_reaches_the_apiserver_and_dns() {
    let docs = render("base");
    let np: NetworkPolicy = typed(one(&docs, "NetworkPolicy"));
    let spec = np.spec.unwrap();
    assert!(matches(&spec.pod_selector.unwrap(), &pod_labels(&docs)));
    assert_eq!(
        spec.policy_types.unwrap(),
        ["Ingress".to_owned(), "Egress".to_owned()]
    );
    let ports = |rules: Vec<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>>| {
        let mut out = BTreeSet::new();
        for rule in rules {
            // A rule without ports would open every port.
            assert!(!rule.is_empty());
            for p in rule {
                assert!(p.end_port.is_none());
                let Some(IntOrString::Int(port)) = p.port else {
                    panic!("a numeric port: {p:?}")
                };
                out.insert((port, p.protocol.unwrap()));
            }
        }
        out
    };
    let tcp = |port: i32| (port, "TCP".to_owned());

    // From anywhere (the apiserver's address is not knowable), to admission and health only.
    let ingress = spec.ingress.unwrap();
    assert!(ingress.iter().all(|r| r.from.is_none()));
    let ingress = ports(ingress.into_iter().map(|r| r.ports.unwrap()).collect());
    assert_eq!(
        ingress,
        [
            tcp(i32::from(DEFAULT_PORT)),
            tcp(i32::from(DEFAULT_HEALTH_PORT))
        ]
        .into()
    );

    // To the apiserver's usual ports and DNS, nothing else.
    let egress = spec.egress.unwrap();
    assert!(egress.iter().all(|r| r.to.is_none()));
    let egress = ports(egress.into_iter().map(|r| r.ports.unwrap()).collect());
    assert_eq!(
        egress,
        [
            tcp(443),
            tcp(6443),
            tcp(8443),
            tcp(53),
            (53, "UDP".to_owned())
        ]
        .into()
    );
}

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

/// `deploy/self-tls` is `deploy/plain` with the registration, the certificate kept through the
/// API instead of a mounted Secret, and the grants that takes: the Secret by name (and create,
/// which RBAC cannot name) and the registration by name, bound to the webhook's account alone.
#[test]
fn the_self_tls_overlay_keeps_its_secret_and_registration_by_name_only() {
    let docs = render("self-tls");
    let plain = render("plain");
    let serve = serve_args(&docs);
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let secret = serve.tls_secret.clone().unwrap();
    assert_eq!(serve.tls_cert, None);
    assert_eq!(serve.tls_key, None);
    assert_eq!(
        serve.webhook_configuration,
        mwc["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        serve.service,
        one(&docs, "Service")["metadata"]["name"].as_str().unwrap()
    );
    // The certificate's DNS names are the Service's in the pods' namespace.
    let own = one(&docs, "Deployment")["metadata"]["namespace"]
        .as_str()
        .unwrap();
    assert_eq!(
        mwc["webhooks"][0]["clientConfig"]["service"]["namespace"],
        own
    );
    assert!(mwc["webhooks"][0]["clientConfig"].get("caBundle").is_none());
    // Every other flag as deploy/plain has it.
    let flags = |docs: &[Value]| -> Vec<String> {
        let d: Deployment = typed(one(docs, "Deployment"));
        d.spec.template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .into_iter()
            .filter(|a| {
                !a.starts_with("--tls-")
                    && !a.starts_with("--webhook-configuration")
                    && !a.starts_with("--service=")
            })
            .collect()
    };
    assert_eq!(flags(&docs), flags(&plain));
    let d: Deployment = typed(one(&docs, "Deployment"));
    let pod = d.spec.template.spec.unwrap();
    assert!(pod.volumes.unwrap().iter().all(|v| v.secret.is_none()));
    assert!(
        pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .iter()
            .all(|m| m.name != "tls")
    );

    let (own_wanted, cluster_wanted) =
        self_tls_grants(&secret, mwc["metadata"]["name"].as_str().unwrap());
    let own_grants: BTreeSet<_> = in_namespace(&docs, "Role", own)
        .into_iter()
        .flat_map(|r| grants(&typed::<Role>(r)))
        .collect();
    assert_eq!(own_grants, own_wanted);
    let cluster_roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ClusterRole").collect();
    assert_eq!(cluster_roles.len(), 1);
    let cr: ClusterRole = typed(cluster_roles[0]);
    assert_eq!(rule_grants(&cr.rules.clone().unwrap()), cluster_wanted);
    let sa = one(&docs, "ServiceAccount");
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for b in docs.iter().filter(|d| d["kind"] == kind) {
            assert_eq!(
                b["subjects"],
                json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                        "namespace": sa["metadata"]["namespace"]}]),
                "{kind} {}",
                b["metadata"]["name"]
            );
        }
    }
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["roleRef"]["name"], cr.metadata.name.unwrap());
    // The watched namespaces' Roles are deploy/plain's.
    for ns in &serve.watch_namespaces {
        let role = |docs: &[Value]| grants(&typed::<Role>(in_namespace(docs, "Role", ns)[0]));
        assert_eq!(role(&docs), role(&plain), "{ns}");
    }
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
