//! The Helm chart, `charts/outpost-webhook`, as a cluster would receive it: `helm lint --strict`,
//! `helm template` read back into k8s-openapi types with unknown fields refused, each value that
//! changes what is rendered, the schema refusing bad values with a message that says where, the
//! built-in policy as the default, the chart against `deploy/plain` on everything that matters
//! (the drift check), and the alert rules through `promtool check` and `promtool test`.
//!
//! helm and promtool are built by `scripts/ensure-helm.sh` and `scripts/ensure-promtool.sh`
//! (`HELM`, `PROMTOOL` override); `kubectl` renders `deploy/` as in tests/manifests.rs.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
};

use base64::Engine as _;
use clap::Parser as _;
use k8s_openapi::{
    api::{
        admissionregistration::v1::{MutatingWebhook, MutatingWebhookConfiguration},
        apps::v1::Deployment,
        core::v1::{Container, PodSpec, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use outpost_webhook::{
    cmd::{Cli, serve::ServeArgs},
    core::{mutate::ObjectKind, policy::Policy, reconcile::Reason},
    k8s::{MANAGED_BY, MANAGED_BY_AUTHENTIK, valid_label_value, valid_qualified_name},
    pki::{Ca, service_dns_names},
};
use serde_json::{Value, json};

use common::manifests::{
    Grant, check_known_kind, documents, grants, in_namespace, kustomize, lease_grants, one,
    rule_grants, self_tls_grants, typed, watch_grants,
};

const RELEASE: &str = "outpost-webhook";
const NAMESPACE: &str = "outpost-webhook";
/// The job the chart's `ServiceMonitor` sets, which every alert rule matches.
const JOB: &str = "outpost-webhook";
/// What every toggle on looks like (tls.mode is set apart: one mode at a time).
const EVERY_TOGGLE: [&str; 8] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "dashboard.enabled=true",
    "--set",
    "watchNamespaces={authentik,sso}",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/outpost-webhook")
}

/// A tool's run succeeded, or the failure shows all it said.
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn helm(args: &[&str]) -> Output {
    Command::new(common::tools::helm())
        .args(args)
        .output()
        .expect("run helm")
}

fn helm_template(args: &[&str]) -> Output {
    let chart = chart();
    let mut all = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    all.extend_from_slice(args);
    helm(&all)
}

/// `helm template` with these extra arguments (`--set k=v`, ...), every document read.
fn template(args: &[&str]) -> Vec<Value> {
    let out = helm_template(args);
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    check_objects(&docs);
    docs
}

/// `helm template` that must fail, saying each of `says`.
fn assert_refused(args: &[&str], says: &[&str]) {
    let out = helm_template(args);
    assert!(!out.status.success(), "helm template {args:?} succeeded");
    let e = String::from_utf8(out.stderr).unwrap();
    for said in says {
        assert!(e.contains(said), "helm template {args:?}: {e}");
    }
}

/// A CA made for this test run, as `tls.mode=secret` wants it: base64 of the PEM.
fn ca_bundle() -> String {
    let ca = Ca::new("chart test", 1).unwrap();
    base64::engine::general_purpose::STANDARD.encode(ca.pem())
}

/// The values of `tls.mode=secret` with the Secret `deploy/plain` expects.
fn secret_mode(ca_bundle: &str) -> Vec<String> {
    [
        "--set",
        "tls.mode=secret",
        "--set",
        "tls.secretName=outpost-webhook-tls",
        "--set-string",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!("tls.caBundle={ca_bundle}")])
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn dns_label(name: &str) -> bool {
    name.len() <= 63
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(dns_label)
}

/// What the apiserver would refuse or misplace, checked on every rendering: each document read
/// into its type; cluster-scoped kinds without a namespace and the others with one; valid names,
/// label keys and values.
fn check_objects(docs: &[Value]) {
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap();
        let cluster_scoped = matches!(
            kind,
            "ClusterRole" | "ClusterRoleBinding" | "MutatingWebhookConfiguration"
        );
        check_known_kind(doc);
        let meta = &doc["metadata"];
        let name = meta["name"].as_str().unwrap();
        assert!(dns_subdomain(name), "{kind} {name}: not a valid name");
        if kind == "Service" {
            assert!(dns_label(name), "Service {name}: not a DNS label");
        }
        assert_eq!(
            meta.get("namespace").is_none(),
            cluster_scoped,
            "{kind} {name}: namespace {}",
            meta["namespace"]
        );
        for (key, value) in meta["labels"].as_object().unwrap() {
            assert!(valid_qualified_name(key), "{kind} {name}: label {key}");
            assert!(
                valid_label_value(value.as_str().unwrap()),
                "{kind} {name}: label {key}={value}"
            );
        }
    }
}

fn kinds(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for d in docs {
        *out.entry(d["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    out
}

fn deployment(docs: &[Value]) -> (Deployment, PodSpec, Container) {
    let d: Deployment = typed(one(docs, "Deployment"));
    let pod = d.spec.template.spec.clone().unwrap();
    let container = pod.containers[0].clone();
    (d, pod, container)
}

fn args(docs: &[Value]) -> Vec<String> {
    deployment(docs).2.args.unwrap()
}

/// The Deployment's `serve` flags as the binary parses them (which also proves them valid).
fn serve_args(docs: &[Value]) -> ServeArgs {
    let cli = Cli::try_parse_from(std::iter::once("outpost-webhook".to_owned()).chain(args(docs)))
        .unwrap_or_else(|e| panic!("the Deployment's args: {e}"));
    match cli.command {
        outpost_webhook::cmd::Command::Serve(serve) => *serve,
        other => panic!("not serve: {other:?}"),
    }
}

fn webhook(docs: &[Value]) -> MutatingWebhook {
    let mwc: MutatingWebhookConfiguration = typed(one(docs, "MutatingWebhookConfiguration"));
    let mut webhooks = mwc.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    webhooks.remove(0)
}

/// Whether a label selector selects these labels, as the apiserver evaluates it.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("operator {other}"),
        }
    });
    by_labels && by_expressions
}

/// The namespace names, of `candidates`, that a namespaceSelector selects: the apiserver labels
/// every namespace with its own name.
fn selected_namespaces<'a>(selector: &LabelSelector, candidates: &[&'a str]) -> Vec<&'a str> {
    candidates
        .iter()
        .copied()
        .filter(|ns| {
            let labels = [("kubernetes.io/metadata.name".to_owned(), (*ns).to_owned())].into();
            selects(selector, &labels)
        })
        .collect()
}

fn policy_secrets(docs: &[Value]) -> BTreeSet<String> {
    let text = one(docs, "ConfigMap")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    Policy::from_yaml("ConfigMap", text).unwrap().secret_names()
}

/// The union of the grants of every Role in `ns`.
fn role_grants_in(docs: &[Value], ns: &str) -> BTreeSet<Grant> {
    in_namespace(docs, "Role", ns)
        .into_iter()
        .flat_map(|r| grants(&typed::<Role>(r)))
        .collect()
}

/// Both renderings have Roles in the same namespaces, granting the same in each.
fn assert_same_roles(ours: &[Value], theirs: &[Value]) {
    let namespaces = |docs: &[Value]| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| d["kind"] == "Role")
            .map(|d| d["metadata"]["namespace"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(namespaces(ours), namespaces(theirs));
    for ns in namespaces(theirs) {
        assert_eq!(
            role_grants_in(ours, &ns),
            role_grants_in(theirs, &ns),
            "Roles in {ns}"
        );
    }
}

/// Every `RoleBinding` and `ClusterRoleBinding` names a Role of its own kind that is rendered, and
/// the webhook's `ServiceAccount` as its one subject.
fn assert_bindings_name_only_the_service_account(docs: &[Value]) {
    let sa = one(docs, "ServiceAccount");
    let subject = (
        "ServiceAccount".to_owned(),
        sa["metadata"]["name"].as_str().unwrap().to_owned(),
        Some(sa["metadata"]["namespace"].as_str().unwrap().to_owned()),
    );
    for doc in docs {
        let (role_ref, subjects) = match doc["kind"].as_str().unwrap() {
            "RoleBinding" => {
                let b: RoleBinding = typed(doc);
                assert_eq!(
                    b.role_ref.kind, "Role",
                    "never a ClusterRole in a namespace"
                );
                let ns = doc["metadata"]["namespace"].as_str().unwrap();
                let role = in_namespace(docs, "Role", ns)
                    .into_iter()
                    .any(|r| r["metadata"]["name"] == b.role_ref.name.as_str());
                assert!(
                    role,
                    "{ns}: RoleBinding to a missing Role {}",
                    b.role_ref.name
                );
                (b.role_ref, b.subjects.unwrap())
            }
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = typed(doc);
                let role = docs.iter().any(|d| {
                    d["kind"] == "ClusterRole" && d["metadata"]["name"] == b.role_ref.name.as_str()
                });
                assert!(role, "ClusterRoleBinding to a missing {}", b.role_ref.name);
                (b.role_ref, b.subjects.unwrap())
            }
            _ => continue,
        };
        let got: Vec<_> = subjects
            .into_iter()
            .map(|s| (s.kind, s.name, s.namespace))
            .collect();
        assert_eq!(got, std::slice::from_ref(&subject), "{}", role_ref.name);
    }
}

#[test]
fn helm_lint_strict_passes_with_defaults_and_with_every_toggle_on() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let bundle = ca_bundle();
    let secret = secret_mode(&bundle);
    let mut every: Vec<&str> = EVERY_TOGGLE.to_vec();
    every.extend(["--set", "networkPolicy.enabled=true"]);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("defaults", vec![]),
        ("every toggle, tls.mode self", every.clone()),
        (
            "every toggle, tls.mode cert-manager",
            [every.as_slice(), &["--set", "tls.mode=cert-manager"]].concat(),
        ),
        (
            "every toggle, tls.mode secret",
            [every.as_slice(), &strs(&secret)].concat(),
        ),
        (
            "every toggle off",
            vec!["--set", "networkPolicy.enabled=false"],
        ),
    ];
    for (what, values) in cases {
        let mut all = vec!["lint", "--strict", chart, "--namespace", NAMESPACE];
        all.extend(values);
        assert_ok(&helm(&all), what);
    }
}

#[test]
fn defaults_render_every_object_of_a_working_install_and_nothing_that_needs_a_crd() {
    let docs = template(&[]);
    let want: BTreeMap<String, usize> = [
        ("ServiceAccount", 1),
        // tls.mode self: the watched namespace's, the Lease's and the TLS Secret's.
        ("Role", 3),
        ("RoleBinding", 3),
        // tls.mode self: the registration's caBundle, by name.
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("ConfigMap", 1),
        ("Deployment", 1),
        ("Service", 1),
        ("PodDisruptionBudget", 1),
        ("NetworkPolicy", 1),
        ("MutatingWebhookConfiguration", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(kinds(&docs), want);
    assert_bindings_name_only_the_service_account(&docs);

    // Everything but the watched namespace's RBAC lives in the release namespace.
    for doc in &docs {
        let ns = &doc["metadata"]["namespace"];
        let watch_rbac = (doc["kind"] == "Role" || doc["kind"] == "RoleBinding")
            && ns == "authentik"
            && doc["metadata"]["name"] == RELEASE;
        assert!(
            ns.is_null() || ns == NAMESPACE || watch_rbac,
            "{} {} in {ns}",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }

    // The hardened, available Deployment of deploy/: tests/manifests.rs checks the details, and
    // the drift test below that the two agree.
    let (d, pod, c) = deployment(&docs);
    assert_eq!(d.spec.replicas, Some(2));
    assert_eq!(pod.automount_service_account_token, Some(true));
    let sa: ServiceAccount = typed(one(&docs, "ServiceAccount"));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.automount_service_account_token, Some(false));
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/outpost-webhook/outpost-webhook:0.1.0")
    );

    // The registration can never match the webhook's own namespace or Deployment, so it cannot
    // block its own rollout.
    let w = webhook(&docs);
    let own_labels = d.metadata.labels.unwrap();
    assert!(!selects(w.object_selector.as_ref().unwrap(), &own_labels));
    let pod_labels = one(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"].clone();
    let pod_labels: BTreeMap<String, String> = serde_json::from_value(pod_labels).unwrap();
    assert!(!selects(w.object_selector.as_ref().unwrap(), &pod_labels));
    assert_eq!(
        selected_namespaces(
            w.namespace_selector.as_ref().unwrap(),
            &["authentik", NAMESPACE, "default"]
        ),
        ["authentik"]
    );
    let outpost: BTreeMap<String, String> =
        [(MANAGED_BY.to_owned(), MANAGED_BY_AUTHENTIK.to_owned())].into();
    assert!(selects(w.object_selector.as_ref().unwrap(), &outpost));

    // The Service carries admission only, to the https port.
    let svc: Service = typed(one(&docs, "Service"));
    let ports = svc.spec.unwrap().ports.unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, 443);
}

#[test]
fn the_install_notes_lead_with_the_roll_of_existing_outposts() {
    // A client-side dry run renders NOTES.txt without a cluster (KUBECONFIG points nowhere).
    let chart = chart();
    let out = Command::new(common::tools::helm())
        .args([
            "install",
            "--dry-run=client",
            RELEASE,
            chart.to_str().unwrap(),
        ])
        .args(["--namespace", NAMESPACE])
        .env("KUBECONFIG", repo().join("no-such-kubeconfig"))
        .output()
        .unwrap();
    assert_ok(&out, "helm install --dry-run=client");
    let text = String::from_utf8(out.stdout).unwrap();
    let notes = text.split_once("NOTES:\n").unwrap().1;
    let first: String = notes.lines().take(5).collect::<Vec<_>>().join(" ");
    for says in [
        "ALREADY HAS OUTPOSTS",
        "rolls each existing outpost Deployment",
        "one write a second",
        "about 17 minutes for 1,000 outposts",
        "Event",
    ] {
        assert!(
            first.contains(says),
            "NOTES do not open with {says:?}: {notes}"
        );
    }
    assert!(notes.contains("tls.mode self"), "{notes}");
}

#[test]
fn each_watched_namespace_gets_its_role_binding_flag_and_place_in_the_namespace_selector() {
    let docs = template(&["--set", "watchNamespaces={authentik,sso}"]);
    let secrets = policy_secrets(&docs);
    assert_eq!(secrets, BTreeSet::from(["goauthentik".to_owned()]));
    for ns in ["authentik", "sso"] {
        assert_eq!(in_namespace(&docs, "Role", ns).len(), 1, "{ns}");
        assert_eq!(in_namespace(&docs, "RoleBinding", ns).len(), 1, "{ns}");
        assert_eq!(role_grants_in(&docs, ns), watch_grants(&secrets), "{ns}");
    }
    assert_bindings_name_only_the_service_account(&docs);
    // The Lease, in the release namespace: get and update on the one name, and create (the TLS
    // Secret's Role is beside it in tls.mode self; the self-mode test checks it).
    let lease = in_namespace(&docs, "Role", NAMESPACE)
        .into_iter()
        .find(|r| r["metadata"]["name"] == format!("{RELEASE}-lease"))
        .unwrap();
    assert_eq!(grants(&typed(lease)), lease_grants());

    let watch: Vec<String> = args(&docs)
        .iter()
        .filter_map(|a| a.strip_prefix("--watch-namespace=").map(str::to_owned))
        .collect();
    assert_eq!(watch, ["authentik", "sso"]);
    let w = webhook(&docs);
    assert_eq!(
        selected_namespaces(
            w.namespace_selector.as_ref().unwrap(),
            &["authentik", "sso", NAMESPACE, "kube-system"]
        ),
        ["authentik", "sso"]
    );
}

#[test]
fn tls_self_mode_lets_the_webhook_keep_its_secret_and_registration_by_name_only() {
    let docs = template(&[]);
    let a = args(&docs);
    let flag = |name: &str| {
        a.iter()
            .find_map(|x| x.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing from {a:?}"))
            .to_owned()
    };
    let secret = flag("--tls-secret");
    assert_eq!(secret, format!("{RELEASE}-tls"));
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(flag("--webhook-configuration"), mwc["metadata"]["name"]);
    let svc = one(&docs, "Service");
    assert_eq!(flag("--service"), svc["metadata"]["name"]);
    assert!(
        !a.iter()
            .any(|x| x.starts_with("--tls-cert") || x.starts_with("--tls-key"))
    );

    // The webhook fills caBundle; the chart leaves it (and cert-manager's annotation) out.
    let w = webhook(&docs);
    assert_eq!(w.client_config.ca_bundle, None);
    assert!(mwc["metadata"].get("annotations").is_none());
    // No certificate volume: the Secret is read through the API.
    let (_, pod, _) = deployment(&docs);
    assert!(pod.volumes.unwrap().iter().all(|v| v.secret.is_none()));

    // In the release namespace: the Lease, and the one Secret by name (create cannot be named);
    // cluster-wide, get and patch of this registration alone.
    let (own, cluster) = self_tls_grants(&secret, mwc["metadata"]["name"].as_str().unwrap());
    assert_eq!(role_grants_in(&docs, NAMESPACE), own);
    let cr: ClusterRole = typed(one(&docs, "ClusterRole"));
    assert_eq!(rule_grants(&cr.rules.unwrap()), cluster);
    assert_bindings_name_only_the_service_account(&docs);

    // A Secret name of one's own is used throughout.
    let docs = template(&["--set", "tls.secretName=webhook-pki"]);
    assert!(args(&docs).contains(&"--tls-secret=webhook-pki".to_owned()));
    assert!(role_grants_in(&docs, NAMESPACE).contains(&(
        String::new(),
        "secrets".to_owned(),
        Some("webhook-pki".to_owned()),
        "patch".to_owned()
    )));
}

#[test]
fn tls_cert_manager_mode_mounts_the_certificate_it_issues_and_injects_its_ca() {
    let docs = template(&["--set", "tls.mode=cert-manager"]);
    assert!(docs.iter().all(|d| d["kind"] != "ClusterRole"));
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let inject = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .unwrap();
    let (ns, cert_name) = inject.split_once('/').unwrap();
    assert_eq!(ns, NAMESPACE);
    let cert = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == cert_name)
        .unwrap();
    let svc = one(&docs, "Service");
    assert_eq!(
        cert["spec"]["dnsNames"],
        json!(service_dns_names(
            svc["metadata"]["name"].as_str().unwrap(),
            NAMESPACE
        ))
    );
    let (_, pod, c) = deployment(&docs);
    let secret = pod
        .volumes
        .unwrap()
        .iter()
        .find_map(|v| v.secret.clone())
        .unwrap()
        .secret_name
        .unwrap();
    assert_eq!(cert["spec"]["secretName"], secret.as_str());
    let a = c.args.unwrap();
    assert!(a.contains(&"--tls-cert=/tls/tls.crt".to_owned()), "{a:?}");
    assert!(a.contains(&"--tls-key=/tls/tls.key".to_owned()), "{a:?}");
    assert!(
        c.volume_mounts
            .unwrap()
            .iter()
            .any(|m| m.name == "tls" && m.mount_path == "/tls")
    );
    // The private CA chain: self-signed Issuer -> CA Certificate -> CA Issuer -> serving one.
    let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap();
    let ca_issuer = docs
        .iter()
        .find(|d| d["kind"] == "Issuer" && d["metadata"]["name"] == issuer)
        .unwrap();
    let ca_secret = &ca_issuer["spec"]["ca"]["secretName"];
    let ca_cert = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == *ca_secret)
        .unwrap();
    assert_eq!(ca_cert["spec"]["isCA"], true);
    serve_args(&docs);

    // An issuer of one's own replaces the private CA.
    let docs = template(&[
        "--set",
        "tls.mode=cert-manager",
        "--set",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
        "--set",
        "tls.certManager.issuerRef.name=corp-ca",
    ]);
    assert!(docs.iter().all(|d| d["kind"] != "Issuer"));
    let cert = one(&docs, "Certificate");
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"kind": "ClusterIssuer", "name": "corp-ca"})
    );
}

#[test]
fn tls_secret_mode_mounts_the_given_secret_and_pins_its_ca_bundle() {
    let bundle = ca_bundle();
    let docs = template(&strs(&secret_mode(&bundle)));
    let w = webhook(&docs);
    let pinned = w.client_config.ca_bundle.unwrap().0;
    assert!(
        String::from_utf8(pinned)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let (_, pod, _) = deployment(&docs);
    let secret = pod
        .volumes
        .unwrap()
        .iter()
        .find_map(|v| v.secret.clone())
        .unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("outpost-webhook-tls"));
    assert!(docs.iter().all(|d| d["kind"] != "ClusterRole"));
    serve_args(&docs);

    // What is missing or wrong is named.
    assert_refused(
        &["--set", "tls.mode=secret"],
        &["tls.mode=secret needs tls.secretName"],
    );
    assert_refused(
        &["--set", "tls.mode=secret", "--set", "tls.secretName=x"],
        &["tls.mode=secret needs tls.caBundle"],
    );
    assert_refused(
        &[
            "--set",
            "tls.mode=secret",
            "--set",
            "tls.secretName=x",
            "--set-string",
            "tls.caBundle=bm90IGEgY2VydGlmaWNhdGU=",
        ],
        &["tls.caBundle must be base64 of PEM certificates"],
    );
    assert_refused(
        &["--set-string", &format!("tls.caBundle={bundle}")],
        &["tls.caBundle is used only with tls.mode=secret"],
    );
}

#[test]
fn monitoring_values_add_a_service_monitor_the_alert_rules_and_a_dashboard() {
    let docs = template(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.additionalLabels.release=kube-prometheus-stack",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "dashboard.enabled=true",
    ]);
    // The admission Service keeps 443 alone; a Service of its own carries the health port.
    let services: Vec<Service> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .map(typed)
        .collect();
    assert_eq!(services.len(), 2);
    let (metrics, admission): (Vec<&Service>, Vec<&Service>) = services.iter().partition(|s| {
        s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
            .name
            .as_deref()
            == Some("health")
    });
    let admission_ports = admission[0].spec.clone().unwrap().ports.unwrap();
    assert_eq!(
        admission_ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [443]
    );
    let metrics = metrics[0];
    let metrics_labels = metrics.metadata.labels.clone().unwrap();
    let metrics_port = &metrics.spec.clone().unwrap().ports.unwrap()[0];
    assert_eq!(metrics_port.port, 8080);

    // The ServiceMonitor selects that Service alone, scrapes /metrics on its port, and names the
    // job the alert rules match.
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let selector: LabelSelector = serde_json::from_value(sm["spec"]["selector"].clone()).unwrap();
    assert!(selects(&selector, &metrics_labels));
    let admission_labels = admission[0].metadata.labels.clone().unwrap();
    assert!(!selects(&selector, &admission_labels));
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!([NAMESPACE])
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], metrics_port.name.as_deref().unwrap());
    assert_eq!(endpoint["path"], "/metrics");
    let job_label = sm["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(metrics_labels[job_label], JOB);

    // The PrometheusRule is files/alerts.yaml, as it is.
    let rules: Value = serde_saphyr::from_str(&alerts_text()).unwrap();
    assert_eq!(one(&docs, "PrometheusRule")["spec"], rules);

    // The dashboard, for Grafana's sidecar.
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .unwrap();
    let json: Value =
        serde_json::from_str(cm["data"]["outpost-webhook.json"].as_str().unwrap()).unwrap();
    assert_eq!(json, dashboard());

    // Off by default, and the NetworkPolicy can be left out.
    let defaults = kinds(&template(&[]));
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(!defaults.contains_key(kind));
    }
    assert_eq!(defaults["ConfigMap"], 1);
    let without = template(&["--set", "networkPolicy.enabled=false"]);
    assert!(without.iter().all(|d| d["kind"] != "NetworkPolicy"));
}

#[test]
fn wrong_value_types_and_unknown_keys_fail_with_the_schemas_message() {
    let schema = "values don't meet the specifications of the schema";
    for (set, says) in [
        (
            "replicaCount=two",
            "at '/replicaCount': got string, want integer",
        ),
        ("replicas=3", "additional properties 'replicas' not allowed"),
        ("tls.mode=vault", "at '/tls/mode'"),
        ("tls.ca=x", "additional properties 'ca' not allowed"),
        ("watchNamespaces[0]=Auth_Entik", "at '/watchNamespaces/0'"),
        ("failurePolicy=fail", "at '/failurePolicy'"),
        ("timeoutSeconds=60", "at '/timeoutSeconds'"),
        ("networkPolicy.enabled=yes", "at '/networkPolicy/enabled'"),
        ("image.digest=latest", "at '/image/digest'"),
    ] {
        assert_refused(&["--set", set], &[schema, says]);
    }
    // No namespace list at all, and the release namespace watched.
    assert_refused(
        &["--set", "watchNamespaces=null"],
        &["missing property 'watchNamespaces'"],
    );
    assert_refused(
        &["--set", &format!("watchNamespaces={{{NAMESPACE}}}")],
        &["watchNamespaces holds the release namespace"],
    );
}

#[test]
fn the_default_policy_is_the_binarys_built_in_one_and_a_change_rolls_the_pods() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-webhook"))
        .args(["policy", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let builtin = String::from_utf8(out.stdout).unwrap();
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    assert_eq!(values["policy"].as_str().unwrap(), builtin, "values.yaml");
    let docs = template(&[]);
    let rendered = one(&docs, "ConfigMap")["data"]["policy.yaml"]
        .as_str()
        .unwrap();
    assert_eq!(rendered, builtin, "the ConfigMap");

    // The pods carry a hash of the policy, so another policy rolls them; and the Secrets it reads
    // are what each watched namespace's Role names.
    let checksum = |docs: &[Value]| {
        deployment(docs)
            .0
            .spec
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["outpost-webhook.io/policy-checksum"]
            .clone()
    };
    let example = repo().join("deploy/policy.example.yaml");
    let set_file = format!("policy={}", example.display());
    let other = template(&["--set-file", &set_file]);
    assert_ne!(checksum(&docs), checksum(&other));
    assert_eq!(
        checksum(&other),
        checksum(&template(&["--set-file", &set_file]))
    );
    let secrets = policy_secrets(&other);
    assert_eq!(
        secrets,
        Policy::from_yaml("example", &std::fs::read_to_string(&example).unwrap())
            .unwrap()
            .secret_names()
    );
    assert_eq!(role_grants_in(&other, "authentik"), watch_grants(&secrets));

    // A policy that reads no Secret grants none: an empty resourceNames would grant them all.
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("keep.yaml");
    std::fs::write(
        &keep,
        "rules:\n  - match: {}\n    service:\n      selector: keep\n",
    )
    .unwrap();
    let docs = template(&["--set-file", &format!("policy={}", keep.display())]);
    assert!(policy_secrets(&docs).is_empty());
    assert_eq!(
        role_grants_in(&docs, "authentik"),
        watch_grants(&BTreeSet::new())
    );
    assert_refused(&["--set", "policy=rules: {"], &["policy is not YAML"]);
}

/// `deploy/plain` as kustomize renders it, with deploy/base's registration (which
/// `webhook-config` applies for that overlay).
fn kustomize_plain() -> Vec<Value> {
    let mut docs = kustomize("plain");
    docs.push(one(&kustomize("base"), "MutatingWebhookConfiguration").clone());
    docs
}

/// The parts of the registration that decide what is sent and how, with the namespaceSelector
/// as the namespaces it selects.
fn webhook_behaviour(w: &MutatingWebhook) -> Value {
    let candidates = ["authentik", "sso", NAMESPACE, "default", "kube-system"];
    json!({
        "name": w.name,
        "admissionReviewVersions": w.admission_review_versions,
        "rules": w.rules,
        "objectSelector": w.object_selector,
        "namespaces": selected_namespaces(w.namespace_selector.as_ref().unwrap(), &candidates),
        "matchConditions": w.match_conditions,
        "failurePolicy": w.failure_policy,
        "sideEffects": w.side_effects,
        "timeoutSeconds": w.timeout_seconds,
        "reinvocationPolicy": w.reinvocation_policy,
        "matchPolicy": w.match_policy,
        "service": w.client_config.service,
    })
}

/// The Deployment's parts that decide how the webhook runs, with the serve flags as parsed.
fn pod_behaviour(docs: &[Value]) -> BTreeMap<String, Value> {
    let (d, pod, c) = deployment(docs);
    let spec = d.spec;
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.mount_path, m.name))
        .collect();
    let all = json!({
        "serve": format!("{:?}", serve_args(docs)),
        "env": c.env,
        "ports": c.ports,
        "podSecurityContext": pod.security_context,
        "securityContext": c.security_context,
        "readinessProbe": c.readiness_probe,
        "livenessProbe": c.liveness_probe,
        "lifecycle": c.lifecycle,
        "resources": c.resources,
        "mounts": mounts,
        "replicas": spec.replicas,
        "strategy": spec.strategy,
        "terminationGracePeriodSeconds": pod.termination_grace_period_seconds,
        "automountServiceAccountToken": pod.automount_service_account_token,
        "enableServiceLinks": pod.enable_service_links,
        "nodeSelector": pod.node_selector,
        "tolerations": pod.tolerations,
    });
    serde_json::from_value(all).unwrap()
}

#[test]
fn the_chart_and_deploy_plain_agree_on_rbac_pod_service_and_registration() {
    let bundle = ca_bundle();
    let chart = template(&strs(&secret_mode(&bundle)));
    let plain = kustomize_plain();

    // RBAC, namespace by namespace.
    assert_same_roles(&chart, &plain);
    assert!(
        chart
            .iter()
            .all(|d| !d["kind"].as_str().unwrap().starts_with("Cluster"))
    );
    assert_bindings_name_only_the_service_account(&chart);

    // The pod: flags (as parsed), env, security contexts, probes, preStop, resources, mounts.
    let (ours, theirs) = (pod_behaviour(&chart), pod_behaviour(&plain));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (key, value) in &ours {
        assert_eq!(value, &theirs[key], "the pod's {key}");
    }
    let secret = |docs: &[Value]| {
        deployment(docs)
            .1
            .volumes
            .unwrap()
            .into_iter()
            .find_map(|v| v.secret)
            .unwrap()
            .secret_name
    };
    assert_eq!(secret(&chart), secret(&plain));

    // The registration.
    assert_eq!(
        webhook_behaviour(&webhook(&chart)),
        webhook_behaviour(&webhook(&plain))
    );

    // Service, budget and network policy.
    let svc = |docs: &[Value]| typed::<Service>(one(docs, "Service")).spec.unwrap().ports;
    assert_eq!(svc(&chart), svc(&plain));
    let pdb = |docs: &[Value]| {
        typed::<PodDisruptionBudget>(one(docs, "PodDisruptionBudget"))
            .spec
            .unwrap()
            .min_available
    };
    assert_eq!(pdb(&chart), pdb(&plain));
    let np = |docs: &[Value]| {
        let spec = typed::<NetworkPolicy>(one(docs, "NetworkPolicy"))
            .spec
            .unwrap();
        (spec.policy_types, spec.ingress, spec.egress)
    };
    assert_eq!(np(&chart), np(&plain));

    // The policy (the same YAML data; kustomize's copy has its own comments).
    let policy = |docs: &[Value]| -> Value {
        serde_saphyr::from_str(
            one(docs, "ConfigMap")["data"]["policy.yaml"]
                .as_str()
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(policy(&chart), policy(&plain));

    // With the defaults (tls.mode self) the watched namespace's RBAC is the same too, and the
    // release namespace's is the Lease's plus the TLS Secret's.
    let defaults = template(&[]);
    assert_eq!(
        role_grants_in(&defaults, "authentik"),
        role_grants_in(&plain, "authentik")
    );
    assert!(role_grants_in(&defaults, NAMESPACE).is_superset(&role_grants_in(&plain, NAMESPACE)));
    assert_eq!(
        webhook_behaviour(&webhook(&defaults)),
        webhook_behaviour(&webhook(&plain))
    );
}

/// The chart's default (`tls.mode: self`) and `deploy/self-tls` are the same install: the same
/// grants in every namespace and cluster-wide, the same pod, registration and Service, and no
/// certificate volume in either.
#[test]
fn the_charts_defaults_and_deploy_self_tls_agree_on_rbac_pod_and_registration() {
    let chart = template(&[]);
    let kustomized = kustomize("self-tls");
    assert_same_roles(&chart, &kustomized);
    let cluster_grants = |docs: &[Value]| -> BTreeSet<Grant> {
        docs.iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .flat_map(|d| rule_grants(&typed::<ClusterRole>(d).rules.unwrap()))
            .collect()
    };
    assert_eq!(cluster_grants(&chart), cluster_grants(&kustomized));
    assert_bindings_name_only_the_service_account(&kustomized);

    let (ours, theirs) = (pod_behaviour(&chart), pod_behaviour(&kustomized));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (key, value) in &ours {
        assert_eq!(value, &theirs[key], "the pod's {key}");
    }
    for docs in [&chart, &kustomized] {
        let (_, pod, _) = deployment(docs);
        assert!(pod.volumes.unwrap().iter().all(|v| v.secret.is_none()));
        assert_eq!(webhook(docs).client_config.ca_bundle, None);
    }
    assert_eq!(
        webhook_behaviour(&webhook(&chart)),
        webhook_behaviour(&webhook(&kustomized))
    );
    let svc = |docs: &[Value]| typed::<Service>(one(docs, "Service")).spec.unwrap().ports;
    assert_eq!(svc(&chart), svc(&kustomized));
}

fn files() -> PathBuf {
    chart().join("files")
}

fn alerts_text() -> String {
    std::fs::read_to_string(files().join("alerts.yaml")).unwrap()
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(files().join("dashboard.json")).unwrap()).unwrap()
}

fn promtool(args: &[&str]) -> Output {
    Command::new(common::tools::promtool())
        .args(args)
        .current_dir(files())
        .output()
        .expect("run promtool")
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts_test.yaml"],
    ] {
        assert_ok(&promtool(&args), &format!("promtool {args:?}"));
    }
}

/// The headings of a Markdown file as GitHub anchors them.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_fires_in_one_test_stays_quiet_in_another_and_has_a_runbook() {
    let rules: Value = serde_saphyr::from_str(&alerts_text()).unwrap();
    let tests: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(files().join("alerts_test.yaml")).unwrap())
            .unwrap();
    let operations = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let headings = anchors(&operations);

    // Per alert: whether some evaluation expects it firing, and some expects nothing.
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().unwrap() {
        for eval in test["alert_rule_test"].as_array().unwrap() {
            let name = eval["alertname"].as_str().unwrap().to_owned();
            if eval["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_owned();
            assert!(fires.contains(&name), "{name}: no test in which it fires");
            assert!(
                quiet.contains(&name),
                "{name}: no test in which it stays quiet"
            );
            let annotations = &rule["annotations"];
            for key in ["summary", "description", "runbook_url"] {
                assert!(annotations[key].is_string(), "{name}: no {key}");
            }
            let url = annotations["runbook_url"].as_str().unwrap();
            let (page, anchor) = url.split_once('#').unwrap();
            assert!(page.ends_with("/docs/operations.md"), "{name}: {url}");
            assert!(headings.contains(anchor), "{name}: no section #{anchor}");
            assert!(
                ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}"
            );
            alerts.insert(name);
        }
    }
    assert!(alerts.len() >= 8, "{alerts:?}");
    // The tests name no alert that does not exist.
    assert!(fires.is_subset(&alerts) && quiet.is_subset(&alerts));
}

/// The series the server exports, by sample name: the server's registry, and the cluster view's
/// registered beside it (its reconcile counter only shows once a write is counted).
fn exported_series() -> BTreeSet<String> {
    let server = outpost_webhook::serve::metrics::Metrics::default().render();
    let (_lease, leadership) = tokio::sync::watch::channel(None);
    let cluster = Arc::new(outpost_webhook::cluster::metrics::Metrics::new(leadership));
    cluster.write(ObjectKind::Deployment, Reason::SecretChanged, false);
    let mut registry = prometheus_client::registry::Registry::with_prefix("outpost_webhook");
    cluster.register(
        &mut registry,
        Arc::new(outpost_webhook::cluster::Cache::default()),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    (server + &text)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Every `outpost_webhook_...` name in a `PromQL` expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("outpost_webhook_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

/// The expressions of the alert rules and of the dashboard's panels.
fn expressions() -> Vec<(String, String)> {
    let rules: Value = serde_saphyr::from_str(&alerts_text()).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((
                rule["alert"].as_str().unwrap().to_owned(),
                rule["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn the_alerts_and_dashboard_query_only_series_the_server_exports_under_the_monitors_job() {
    let exported = exported_series();
    // Exported only once self-managed TLS has read its Secret: tests/real_apiserver.rs reads it
    // from a replica that did.
    let pending = ["outpost_webhook_ca_expiry_timestamp_seconds"];
    let mut used = BTreeSet::new();
    for (what, expr) in expressions() {
        for name in metric_names(&expr) {
            assert!(
                exported.contains(&name) || pending.contains(&name.as_str()),
                "{what}: {name} is not a series the server exports"
            );
            used.insert(name);
        }
        // Every job matched is the one the ServiceMonitor sets.
        for rest in expr.split("job=\"").skip(1) {
            assert_eq!(rest.split('"').next(), Some(JOB), "{what}: {expr}");
        }
    }
    assert!(used.len() >= 15, "{used:?}");
}

#[test]
fn the_dashboard_reads_a_datasource_variable_and_has_the_operators_panels() {
    let board = dashboard();
    assert!(board["schemaVersion"].as_i64().unwrap() >= 39);
    let variables = board["templating"]["list"].as_array().unwrap();
    let source = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .unwrap();
    assert_eq!(source["query"], "prometheus");
    let uid = format!("${{{}}}", source["name"].as_str().unwrap());
    let panels = board["panels"].as_array().unwrap();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"],
            uid.as_str(),
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(
                target["datasource"]["uid"],
                uid.as_str(),
                "{}",
                panel["title"]
            );
        }
    }
    let titles: BTreeSet<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for title in [
        "Admission rate",
        "Admission latency",
        "Outcomes",
        "Warnings and errors",
        "Patches by kind",
        "Leader",
        "Cache objects",
        "Reconcile writes",
        "Memory",
        "Connections",
    ] {
        assert!(titles.contains(title), "no panel {title}");
    }
    let latency = panels
        .iter()
        .find(|p| p["title"] == "Admission latency")
        .unwrap();
    let exprs: Vec<&str> = latency["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.iter().all(|e| e.starts_with("histogram_quantile(")
        && e.contains("outpost_webhook_admission_duration_seconds_bucket")));
    // Panels do not overlap on the 24-column grid.
    let mut cells = BTreeSet::new();
    for p in panels {
        let at = |k: &str| p["gridPos"][k].as_u64().unwrap();
        let (left, top) = (at("x"), at("y"));
        let (right, bottom) = (left + at("w"), top + at("h"));
        assert!(right <= 24, "{} is wider than the grid", p["title"]);
        for column in left..right {
            for row in top..bottom {
                assert!(cells.insert((column, row)), "{} overlaps", p["title"]);
            }
        }
    }
}
