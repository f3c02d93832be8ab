//! `doctor`'s checks: the operator's upgrade checklist (is the webhook registered and reachable,
//! does each outpost Service select ready pods, does each outpost Deployment carry what the policy
//! injects) as pure functions over a snapshot of the cluster.
//!
//! Pure: no I/O and no clock (the time is an input). The shell (`cluster::inspect`) reads the
//! objects, makes the dry runs and keeps only digests of Secret data, so no Secret value can reach
//! a finding.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    cluster::{Labels, Snapshot, deployment_selector},
    mutate::{
        ObjectKind, identify_outpost, mutate_in, outpost_container, pod_selector, secret_checksum,
    },
    policy::{Outpost, Policy},
    quantity::{Quantity, covers},
};
use crate::{
    k8s::{
        EMBEDDED_SELECTOR, MANAGED_BY, OUTPOST_NAME, OUTPOST_TYPE, OUTPOST_UUID, SECRET_CHECKSUM,
    },
    pki::x509,
};

/// How bad a finding is. `fail` makes `doctor` exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

impl Severity {
    /// The word printed before a finding.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// Each check, with the stable id scripts and alerts may match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    RegistrationExists,
    RegistrationMatches,
    RegistrationNamespaces,
    RegistrationCaBundle,
    RegistrationCaExpiry,
    RegistrationService,
    NamespaceOutposts,
    AdmissionDryRun,
    AdmissionConverged,
    ServiceSelector,
    ServiceEndpoints,
    DeploymentEnv,
    DeploymentSecretRefs,
    DeploymentReplicas,
    DeploymentChecksum,
    DeploymentVersion,
    PodOutpostMode,
    PodSessionBackend,
}

impl Check {
    /// The stable id, as `-o json` prints it.
    #[must_use]
    pub fn id(self) -> &'static str {
        match self {
            Self::RegistrationExists => "registration.exists",
            Self::RegistrationMatches => "registration.matches",
            Self::RegistrationNamespaces => "registration.namespaces",
            Self::RegistrationCaBundle => "registration.ca-bundle",
            Self::RegistrationCaExpiry => "registration.ca-expiry",
            Self::RegistrationService => "registration.service",
            Self::NamespaceOutposts => "namespace.outposts",
            Self::AdmissionDryRun => "admission.dry-run",
            Self::AdmissionConverged => "admission.converged",
            Self::ServiceSelector => "service.selector",
            Self::ServiceEndpoints => "service.endpoints",
            Self::DeploymentEnv => "deployment.env",
            Self::DeploymentSecretRefs => "deployment.secret-refs",
            Self::DeploymentReplicas => "deployment.replicas",
            Self::DeploymentChecksum => "deployment.checksum",
            Self::DeploymentVersion => "deployment.version",
            Self::PodOutpostMode => "pod.outpost-mode",
            Self::PodSessionBackend => "pod.session-backend",
        }
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.id())
    }
}

/// What a finding is about, for grouping the text output: the registration, a namespace, or one
/// outpost.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Registration,
    Namespace(String),
    Outpost { namespace: String, name: String },
}

/// One line of `doctor`'s report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: Check,
    pub severity: Severity,
    /// `Kind/namespace/name`, or `Kind/name` for a cluster-scoped object.
    pub object: String,
    /// What was found and, unless it is `ok`, what to do.
    pub message: String,
    #[serde(skip)]
    pub group: Group,
}

/// The report as `doctor -o json` prints it.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub findings: &'a [Finding],
}

/// A Secret's data as a SHA-256 digest per key.
pub type Digests = BTreeMap<String, [u8; 32]>;

/// A dry run's object: kind, namespace, name.
pub type DryRunKey = (ObjectKind, String, String);

/// What a no-op dry-run PATCH of an outpost object got back.
#[derive(Debug, Clone, PartialEq)]
pub enum DryRun {
    /// The object admission made of it.
    Returned(Value),
    /// The apiserver refused it (a webhook down or denying, say), with its message.
    Refused(String),
    /// The object changed between the list and the dry run.
    Conflict,
}

/// What `doctor` read of the cluster. Secrets are held as digests of their data by key: the
/// checks need key names and whether data changed, never a value.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Unix seconds, for certificate expiry.
    pub now: i64,
    /// The MutatingWebhookConfiguration's name.
    pub registration_name: String,
    /// It as stored, `None` when it does not exist.
    pub registration: Option<Value>,
    /// What `webhook-config` renders for it (the webhooks' `clientConfig` is not compared).
    pub expected: Value,
    /// The Service the registration calls (`clientConfig.service`), when it exists.
    pub webhook_service: Option<Value>,
    /// The namespaces looked at.
    pub namespaces: Vec<String>,
    /// The outpost Services (label `app.kubernetes.io/managed-by=goauthentik.io`).
    pub services: Vec<Value>,
    /// Every Deployment in the namespaces: outposts' and authentik's own server.
    pub deployments: Vec<Value>,
    /// Every Pod in the namespaces.
    pub pods: Vec<Value>,
    /// Every `EndpointSlice` in the namespaces and in the webhook Service's namespace.
    pub endpoint_slices: Vec<Value>,
    /// Each Secret read, by (namespace, name): the digest of each key's data; `None` when it
    /// does not exist.
    pub secrets: BTreeMap<(String, String), Option<Digests>>,
    /// What a no-op dry-run PATCH of each outpost object got back.
    pub dry_runs: BTreeMap<DryRunKey, DryRun>,
    /// The labels of each namespace that could be read, for the registration's
    /// `namespaceSelector`.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// With `--logs`: the start of each outpost pod's log, by (namespace, pod).
    pub logs: Option<BTreeMap<(String, String), String>>,
}

/// Certificates expiring sooner than this are a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Runs every check.
#[must_use]
pub fn check(policy: &Policy, inputs: &Inputs) -> Vec<Finding> {
    let mut out = registration(inputs);
    let view = view(inputs);
    for namespace in &inputs.namespaces {
        let services: Vec<&Value> = in_namespace(&inputs.services, namespace)
            .filter(|s| identify_outpost(s).is_some())
            .collect();
        let deployments: Vec<&Value> = in_namespace(&inputs.deployments, namespace)
            .filter(|d| identify_outpost(d).is_some())
            .collect();
        if services.is_empty() && deployments.is_empty() {
            out.push(Finding {
                check: Check::NamespaceOutposts,
                severity: Severity::Warn,
                object: format!("Namespace/{namespace}"),
                message: format!(
                    "no outpost Service or Deployment (label {MANAGED_BY}=goauthentik.io): is \
                     authentik in another namespace? Pass it with --namespace"
                ),
                group: Group::Namespace(namespace.clone()),
            });
        }
        for s in &services {
            out.extend(service(policy, inputs, &view, namespace, s));
        }
        for d in &deployments {
            out.extend(deployment(policy, inputs, &view, namespace, d));
        }
    }
    out.sort_by(|a, b| a.group.cmp(&b.group));
    out
}

/// `doctor`'s exit code for `findings`: 1 when any failed, else 0.
#[must_use]
pub fn exit_code(findings: &[Finding]) -> u8 {
    u8::from(findings.iter().any(|f| f.severity == Severity::Fail))
}

/// The cluster as admission would see it: outpost Deployments and Secret digests.
fn view(inputs: &Inputs) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for d in &inputs.deployments {
        if let Some(labels) = deployment_selector(d) {
            snapshot.put_deployment(namespace_of(d), name_of(d), labels);
        }
    }
    for ((namespace, name), data) in &inputs.secrets {
        if let Some(data) = data {
            snapshot.put_secret(namespace, name, data.clone());
        }
    }
    snapshot
}

fn registration(inputs: &Inputs) -> Vec<Finding> {
    let object = format!("MutatingWebhookConfiguration/{}", inputs.registration_name);
    let finding = |check, severity, message: String| Finding {
        check,
        severity,
        object: object.clone(),
        message,
        group: Group::Registration,
    };
    let Some(stored) = &inputs.registration else {
        return vec![finding(
            Check::RegistrationExists,
            Severity::Fail,
            "does not exist: no outpost write is fixed. Install it (README, Install), or \
             `outpost-webhook webhook-config --ca-bundle ca.crt | kubectl apply -f -`"
                .into(),
        )];
    };
    let mut out = vec![finding(
        Check::RegistrationExists,
        Severity::Ok,
        "exists".into(),
    )];
    let webhooks = |v: &Value| -> Vec<Value> {
        v.get("webhooks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let stored_hooks = webhooks(stored);
    for want in webhooks(&inputs.expected) {
        let name = want.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(have) = stored_hooks
            .iter()
            .find(|h| h.get("name").and_then(Value::as_str) == Some(name))
        else {
            out.push(finding(
                Check::RegistrationMatches,
                Severity::Fail,
                format!("has no webhook {name}: re-apply deploy/ or `webhook-config`"),
            ));
            continue;
        };
        out.push(matches(&finding, name, &want, have));
        out.extend(selects_namespaces(&finding, inputs, name, have));
        out.extend(ca_bundle(&finding, inputs.now, have));
        out.push(service_reference(&finding, inputs, have));
    }
    out
}

/// The stored webhook against the rendered one, field by field, `clientConfig` aside.
fn matches(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    name: &str,
    want: &Value,
    have: &Value,
) -> Finding {
    let differ: Vec<String> = want
        .as_object()
        .into_iter()
        .flatten()
        // Which namespaces are the operator's choice: checked against each namespace instead.
        .filter(|(k, _)| !matches!(k.as_str(), "clientConfig" | "namespaceSelector"))
        .filter(|(k, v)| have.get(k.as_str()) != Some(*v))
        .map(|(k, v)| match (v, have.get(k.as_str())) {
            (Value::String(w), Some(Value::String(h))) => format!("{k} is {h}, want {w}"),
            (_, None) => format!("{k} is missing"),
            _ => format!("{k} differs"),
        })
        .collect();
    if differ.is_empty() {
        finding(
            Check::RegistrationMatches,
            Severity::Ok,
            format!(
                "webhook {name} matches `webhook-config`: rules, objectSelector, matchConditions, failurePolicy"
            ),
        )
    } else {
        finding(
            Check::RegistrationMatches,
            Severity::Fail,
            format!(
                "webhook {name} differs from `webhook-config`: {}. Re-apply deploy/ or \
                 `webhook-config`",
                differ.join("; ")
            ),
        )
    }
}

/// The webhook's `namespaceSelector` selects every checked namespace whose labels could be read:
/// in a namespace it skips, outpost writes go unfixed, and a dry run there proves nothing.
fn selects_namespaces(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    inputs: &Inputs,
    name: &str,
    webhook: &Value,
) -> Vec<Finding> {
    let selector = webhook.get("namespaceSelector");
    inputs
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns, inputs.namespace_labels.get(ns)?)))
        .map(|(ns, labels)| {
            if label_selector_matches(selector, labels) {
                finding(
                    Check::RegistrationNamespaces,
                    Severity::Ok,
                    format!("webhook {name} sees namespace {ns}"),
                )
            } else {
                finding(
                    Check::RegistrationNamespaces,
                    Severity::Fail,
                    format!(
                        "webhook {name}'s namespaceSelector does not select namespace {ns}: its \
                         outposts are never fixed. Set it (`webhook-config --namespace-selector`) \
                         to labels namespace {ns} has"
                    ),
                )
            }
        })
        .collect()
}

/// A Kubernetes `LabelSelector` (`matchLabels` and `matchExpressions`) against `labels`; an
/// absent or empty selector selects everything, as the apiserver reads it.
fn label_selector_matches(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let have = labels.get(key).map(String::as_str);
            match e.get("operator").and_then(Value::as_str) {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            }
        });
    match_labels && expressions
}

/// The CA bundle holds CA certificates only, none expired; a private key is a failure.
fn ca_bundle(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    now: i64,
    webhook: &Value,
) -> Vec<Finding> {
    let encoded = webhook
        .pointer("/clientConfig/caBundle")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if encoded.is_empty() {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle is empty: the apiserver cannot verify the webhook. With \
             cert-manager, check that cainjector runs; else `webhook-config --ca-bundle ca.crt`"
                .into(),
        )];
    }
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle is not base64".into(),
        )];
    };
    // Look for a key before anything else: saying which block is wrong is not enough when a
    // private key sits in a cluster-scoped object anyone with read access can see.
    if String::from_utf8_lossy(&pem).contains("PRIVATE KEY-----") {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle holds a PRIVATE KEY: treat the key as leaked, issue a new \
             certificate and set caBundle to the CA certificate only"
                .into(),
        )];
    }
    let ders = match x509::ca_bundle(&pem) {
        Ok(ders) => ders,
        Err(e) => {
            return vec![finding(
                Check::RegistrationCaBundle,
                Severity::Fail,
                format!("clientConfig.caBundle {e}"),
            )];
        }
    };
    let mut out = vec![finding(
        Check::RegistrationCaBundle,
        Severity::Ok,
        format!("caBundle holds {} CA certificate(s) and no key", ders.len()),
    )];
    for (i, der) in ders.iter().enumerate() {
        let Some(not_after) = x509::not_after(der) else {
            continue;
        };
        let days = (not_after - now).div_euclid(86_400);
        let (severity, message) = if not_after <= now {
            (
                Severity::Fail,
                format!(
                    "CA certificate {} expired {} day(s) ago: the apiserver refuses the webhook. \
                     Renew it (docs/operations.md, certificate renewal)",
                    i + 1,
                    -days
                ),
            )
        } else if days < EXPIRY_WARNING_DAYS {
            (
                Severity::Warn,
                format!(
                    "CA certificate {} expires in {days} day(s): renew it before then \
                     (docs/operations.md, certificate renewal)",
                    i + 1
                ),
            )
        } else {
            (
                Severity::Ok,
                format!("CA certificate {} expires in {days} days", i + 1),
            )
        };
        out.push(finding(Check::RegistrationCaExpiry, severity, message));
    }
    out
}

/// The Service the registration calls has ready endpoints.
fn service_reference(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    inputs: &Inputs,
    webhook: &Value,
) -> Finding {
    let Some(reference) = webhook.pointer("/clientConfig/service") else {
        let url = webhook
            .pointer("/clientConfig/url")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        return finding(
            Check::RegistrationService,
            Severity::Warn,
            format!("calls the URL {url}, not a Service: its reachability is not checked"),
        );
    };
    let text = |k: &str| reference.get(k).and_then(Value::as_str).unwrap_or_default();
    let (namespace, name) = (text("namespace"), text("name"));
    if inputs.webhook_service.is_none() {
        return finding(
            Check::RegistrationService,
            Severity::Fail,
            format!(
                "calls Service {namespace}/{name}, which does not exist: every outpost write \
                 fails (failurePolicy Fail). Install the webhook's Deployment and Service"
            ),
        );
    }
    let ready = ready_endpoints(&inputs.endpoint_slices, namespace, name);
    if ready == 0 {
        finding(
            Check::RegistrationService,
            Severity::Fail,
            format!(
                "Service {namespace}/{name} has no ready endpoint: every outpost write fails \
                 (failurePolicy Fail). Check `kubectl -n {namespace} get pods` for the webhook"
            ),
        )
    } else {
        finding(
            Check::RegistrationService,
            Severity::Ok,
            format!("Service {namespace}/{name} has {ready} ready endpoint(s)"),
        )
    }
}

fn outpost_group(namespace: &str, outpost: &Outpost<'_>) -> Group {
    Group::Outpost {
        namespace: namespace.to_owned(),
        name: outpost.name.to_owned(),
    }
}

/// Makes findings about one object.
struct About {
    object: String,
    group: Group,
}

impl About {
    fn new(kind: &str, namespace: &str, object: &Value, outpost: &Outpost<'_>) -> Self {
        Self {
            object: format!("{kind}/{namespace}/{}", name_of(object)),
            group: outpost_group(namespace, outpost),
        }
    }

    fn say(&self, check: Check, severity: Severity, message: String) -> Finding {
        Finding {
            check,
            severity,
            object: self.object.clone(),
            message,
            group: self.group.clone(),
        }
    }
}

fn service(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    namespace: &str,
    svc: &Value,
) -> Vec<Finding> {
    let Some(outpost) = identify_outpost(svc) else {
        return Vec::new();
    };
    let about = About::new("Service", namespace, svc, &outpost);
    let name = name_of(svc);
    let mut out = Vec::new();
    out.extend(dry_run(
        policy,
        inputs,
        view,
        &about,
        (ObjectKind::Service, namespace, name),
        svc,
        "re-save the outpost in authentik: its controller writes the Service again, through the \
         webhook",
    ));
    let selector: Labels = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    let embedded = EMBEDDED_SELECTOR
        .iter()
        .all(|(k, v)| selector.get(*k).map(String::as_str) == Some(*v));
    let has_outpost_keys = [OUTPOST_NAME, OUTPOST_TYPE, OUTPOST_UUID]
        .iter()
        .any(|k| selector.contains_key(*k));
    let wanted: Labels = pod_selector(&outpost)
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
        .collect();
    let standalone = in_namespace(&inputs.deployments, namespace)
        .find(|d| deployment_selector(d).as_ref() == Some(&wanted))
        .map(name_of);
    if embedded && has_outpost_keys {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Fail,
            format!(
                "the selector is the {}-key union of the controller's and the outpost's labels, \
                 which no pod carries: a controller PATCH got past the webhook. {}",
                selector.len(),
                "Re-save the outpost in authentik with the webhook running"
            ),
        ));
    } else if embedded && let Some(deployment) = standalone {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Fail,
            format!(
                "selects the authentik server pods while Deployment {deployment} runs the \
                 outpost: forward-auth reaches the wrong pods. Is the webhook's cluster view on \
                 (`serve --cluster`) and the policy's selector auto or outpost?"
            ),
        ));
    } else {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Ok,
            if embedded {
                "selects the authentik server pods, which serve the embedded outpost (no \
                 standalone Deployment runs it)"
                    .into()
            } else {
                format!("selects {}", show_labels(&selector))
            },
        ));
    }
    let selected: Vec<&Value> = selected_pods(&inputs.pods, namespace, &selector).collect();
    let ready_pods = selected.iter().filter(|p| pod_ready(p)).count();
    let endpoints = ready_endpoints(&inputs.endpoint_slices, namespace, name);
    let counts = format!(
        "selects {} pod(s), {ready_pods} ready; {endpoints} ready endpoint(s)",
        selected.len()
    );
    out.push(if ready_pods == 0 || endpoints == 0 {
        about.say(
            Check::ServiceEndpoints,
            Severity::Fail,
            format!(
                "{counts}: requests to the outpost fail and forward-auth falls back. Check the \
                 outpost's pods: `kubectl -n {namespace} get pods -l {}`",
                show_labels(&selector).replace(": ", "=").replace(", ", ",")
            ),
        )
    } else {
        about.say(Check::ServiceEndpoints, Severity::Ok, counts)
    });
    out
}

fn deployment(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    namespace: &str,
    d: &Value,
) -> Vec<Finding> {
    let Some(outpost) = identify_outpost(d) else {
        return Vec::new();
    };
    let about = About::new("Deployment", namespace, d, &outpost);
    let name = name_of(d);
    let restart = format!("`kubectl -n {namespace} rollout restart deployment/{name}`");
    let mut out = dry_run(
        policy,
        inputs,
        view,
        &about,
        (ObjectKind::Deployment, namespace, name),
        d,
        &format!("{restart} (the write goes through the webhook)"),
    );
    let effective = policy.for_outpost(&outpost);
    let fix = &effective.deployment;
    let containers = d
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let container = containers.get(outpost_container(containers, outpost.kind));
    let env: Vec<&Value> = container
        .and_then(|c| c.get("env"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let env_named = |n: &str| {
        env.iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(n))
    };

    if !fix.env.is_empty() {
        let missing: Vec<&str> = fix
            .env
            .iter()
            .filter(|k| env_named(&k.key).is_none())
            .map(|k| k.key.as_str())
            .collect();
        let different: Vec<&str> = fix
            .env
            .iter()
            // As admission compares: the stored entry may carry what the apiserver defaults
            // (`fieldRef.apiVersion`, say) beside what the policy says.
            .filter(|k| env_named(&k.key).is_some_and(|e| !covers(e, &k.value, Quantity::No)))
            .map(|k| k.key.as_str())
            .collect();
        out.push(if missing.is_empty() && different.is_empty() {
            about.say(
                Check::DeploymentEnv,
                Severity::Ok,
                format!("the {} injected env var(s) are present", fix.env.len()),
            )
        } else {
            let mut what = Vec::new();
            if !missing.is_empty() {
                what.push(format!("missing {}", missing.join(", ")));
            }
            if !different.is_empty() {
                what.push(format!("not as the policy says: {}", different.join(", ")));
            }
            about.say(
                Check::DeploymentEnv,
                Severity::Fail,
                format!(
                    "injected env {}: a write got past the webhook. Run {restart}",
                    what.join("; ")
                ),
            )
        });
    }

    out.extend(secret_refs(inputs, &about, namespace, container, &env));

    if let Some(want) = fix.replicas {
        let have = d.pointer("/spec/replicas").and_then(Value::as_i64);
        out.push(if have == Some(i64::from(want)) {
            about.say(
                Check::DeploymentReplicas,
                Severity::Ok,
                format!("replicas {want}, as the policy says"),
            )
        } else {
            let have = have.map_or_else(|| "unset".into(), |h| h.to_string());
            about.say(
                Check::DeploymentReplicas,
                Severity::Fail,
                format!("replicas {have}, the policy says {want}: run {restart}"),
            )
        });
    }

    out.extend(checksums(fix, view, &about, namespace, d, &restart));
    out.extend(version(inputs, &about, namespace, container));
    out.extend(logs(inputs, &about, namespace, &outpost, d));
    out
}

/// A no-op dry-run PATCH goes through admission: it must succeed, and change nothing.
fn dry_run(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    about: &About,
    (kind, namespace, name): (ObjectKind, &str, &str),
    stored: &Value,
    converge: &str,
) -> Vec<Finding> {
    let key = (kind, namespace.to_owned(), name.to_owned());
    let returned = match inputs.dry_runs.get(&key) {
        None => return Vec::new(),
        Some(DryRun::Returned(v)) => v,
        Some(DryRun::Conflict) => {
            return vec![about.say(
                Check::AdmissionDryRun,
                Severity::Warn,
                "the object changed while doctor read it (another writer, an HPA?): run doctor \
                 again"
                    .into(),
            )];
        }
        Some(DryRun::Refused(e)) => {
            return vec![about.say(
                Check::AdmissionDryRun,
                Severity::Fail,
                format!(
                    "a dry-run PATCH was refused: {e}. Outpost writes are refused the same way: \
                     is the webhook running, and does another webhook or policy deny them?"
                ),
            )];
        }
    };
    let mut out = vec![about.say(
        Check::AdmissionDryRun,
        Severity::Ok,
        "a dry-run PATCH through admission succeeds".into(),
    )];
    let changed = changed_fields(stored, returned);
    out.push(if changed.is_empty() {
        about.say(
            Check::AdmissionConverged,
            Severity::Ok,
            "the stored object is what the webhook makes of it".into(),
        )
    } else {
        // Admission ran on the dry run, so the difference is what the webhook would still fix:
        // the object was written while the webhook was down or before it was installed.
        let offline = mutate_in(policy, view, namespace, kind, stored);
        let hint = if offline.ops.is_empty() {
            " (the policy here wants no change: is the webhook's policy another one?)"
        } else {
            ""
        };
        about.say(
            Check::AdmissionConverged,
            Severity::Fail,
            format!(
                "admission would change {}: a write got past the webhook{hint}. Converge: \
                 {converge}",
                changed.join(", ")
            ),
        )
    });
    out
}

/// The Secrets and keys the outpost container's env reads exist. Names only, never values.
fn secret_refs(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    container: Option<&Value>,
    env: &[&Value],
) -> Vec<Finding> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut checked = 0usize;
    let keys = |secret: &str| {
        inputs
            .secrets
            .get(&(namespace.to_owned(), secret.to_owned()))
            .cloned()
    };
    for e in env {
        let Some(r) = e.pointer("/valueFrom/secretKeyRef") else {
            continue;
        };
        let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
        let (secret, key) = (text("name"), text("key"));
        let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
        let var = e.get("name").and_then(Value::as_str).unwrap_or_default();
        checked += 1;
        let problem = match keys(secret) {
            None => continue, // not read: nothing can be said of it
            Some(None) => Some(format!("{var}: Secret {secret} does not exist")),
            Some(Some(data)) if !data.contains_key(key) => {
                Some(format!("{var}: Secret {secret} has no key {key}"))
            }
            Some(Some(_)) => None,
        };
        if let Some(p) = problem {
            if optional {
                warnings.push(p);
            } else {
                problems.push(p);
            }
        }
    }
    for from in container
        .and_then(|c| c.get("envFrom"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(secret) = from.pointer("/secretRef/name").and_then(Value::as_str) else {
            continue;
        };
        checked += 1;
        let optional = from.pointer("/secretRef/optional").and_then(Value::as_bool) == Some(true);
        if let Some(None) = keys(secret) {
            let p = format!("envFrom: Secret {secret} does not exist");
            if optional {
                warnings.push(p);
            } else {
                problems.push(p);
            }
        }
    }
    if checked == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if !problems.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Fail,
            format!(
                "{}: new pods cannot start (CreateContainerConfigError). Restore the key, or \
                 fix the policy's env",
                problems.join("; ")
            ),
        ));
    }
    if !warnings.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Warn,
            format!(
                "{} (optional, so pods start without it)",
                warnings.join("; ")
            ),
        ));
    }
    if out.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Ok,
            format!("the {checked} Secret reference(s) name Secrets and keys that exist"),
        ));
    }
    out
}

/// The pods run the current policy and the current Secret data.
fn checksums(
    fix: &crate::core::policy::DeploymentFix,
    view: &Snapshot,
    about: &About,
    namespace: &str,
    d: &Value,
    restart: &str,
) -> Vec<Finding> {
    let annotations = d
        .pointer("/spec/template/metadata/annotations")
        .and_then(Value::as_object);
    let stored = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    let mut stale = Vec::new();
    let mut checked = false;
    if let Some(checksum) = &fix.checksum {
        checked = true;
        if stored(&checksum.annotation) != Some(checksum.value.as_str()) {
            stale.push(format!("{} (the policy)", checksum.annotation));
        }
        if let Some(want) = secret_checksum(fix, view, namespace)
            && stored(SECRET_CHECKSUM) != Some(want.as_str())
        {
            stale.push(format!("{SECRET_CHECKSUM} (the Secret data)"));
        }
    }
    if !checked {
        return Vec::new();
    }
    vec![if stale.is_empty() {
        about.say(
            Check::DeploymentChecksum,
            Severity::Ok,
            "the pods' checksums match the policy and the Secret data".into(),
        )
    } else {
        about.say(
            Check::DeploymentChecksum,
            Severity::Warn,
            format!(
                "stale {}: the pods run an old config. The reconciler rolls them when it runs; \
                 else {restart}",
                stale.join(" and ")
            ),
        )
    }]
}

/// The outpost's image tag against the authentik server's.
fn version(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    container: Option<&Value>,
) -> Vec<Finding> {
    let server = in_namespace(&inputs.deployments, namespace).find(|d| {
        let labels = labels_of(d);
        EMBEDDED_SELECTOR
            .iter()
            .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
    });
    let (Some(server), Some(container)) = (server, container) else {
        return Vec::new();
    };
    let server_image = server
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .and_then(|c| c.get(outpost_container(c, "server")))
        .and_then(|c| c.get("image"))
        .and_then(Value::as_str);
    let image = container.get("image").and_then(Value::as_str);
    let (Some(server_image), Some(image)) = (server_image, image) else {
        return Vec::new();
    };
    let (want, have) = (tag(server_image), tag(image));
    vec![if want == have {
        about.say(
            Check::DeploymentVersion,
            Severity::Ok,
            format!(
                "image {have}, as the authentik server ({})",
                name_of(server)
            ),
        )
    } else {
        about.say(
            Check::DeploymentVersion,
            Severity::Warn,
            format!(
                "image tag {have}, but the authentik server ({}) runs {want}: the controller \
                 never upgrades a standalone embedded outpost's Deployment. Set its image to \
                 the server's version",
                name_of(server)
            ),
        )
    }]
}

/// With `--logs`: the outpost mode and session backend each pod reported at start.
fn logs(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    outpost: &Outpost<'_>,
    d: &Value,
) -> Vec<Finding> {
    let (Some(logs), Some(selector)) = (&inputs.logs, deployment_selector(d)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pod in selected_pods(&inputs.pods, namespace, &selector) {
        let pod_name = name_of(pod);
        let Some(log) = logs.get(&(namespace.to_owned(), pod_name.to_owned())) else {
            continue;
        };
        let pod_about = About {
            object: format!("Pod/{namespace}/{pod_name}"),
            group: about.group.clone(),
        };
        let events: Vec<Map<String, Value>> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Map<String, Value>>(l).ok())
            .collect();
        let event = |e: &Map<String, Value>| {
            e.get("event")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if let Some(mode) = events.iter().find(|e| event(e) == "Outpost mode") {
            let embedded = mode.get("embedded").and_then(Value::as_bool);
            out.push(pod_about.say(
                Check::PodOutpostMode,
                Severity::Ok,
                format!(
                    "outpost mode: embedded {}",
                    embedded.map_or_else(|| "unknown".into(), |b| b.to_string())
                ),
            ));
        }
        if outpost.kind != "proxy" {
            continue;
        }
        let backend = events
            .iter()
            .map(event)
            .find(|e| e.contains("session backend"));
        out.push(match backend {
            Some(e) if e.to_ascii_lowercase().contains("postgres") => {
                pod_about.say(Check::PodSessionBackend, Severity::Ok, e)
            }
            Some(e) => pod_about.say(
                Check::PodSessionBackend,
                Severity::Warn,
                format!(
                    "{e}: sessions live in the pod and are lost on restart. authentik uses \
                     PostgreSQL only for an embedded outpost (Outpost.managed \
                     goauthentik.io/outposts/embedded) with the database env injected"
                ),
            ),
            None => pod_about.say(
                Check::PodSessionBackend,
                Severity::Warn,
                "no session backend line at the start of the log (rotated away: the kubelet \
                 serves only the current file; or another log format)"
                    .into(),
            ),
        });
    }
    out
}

/// The top-level fields a dry run changed, as `spec.selector`, `metadata.labels`...
fn changed_fields(stored: &Value, returned: &Value) -> Vec<String> {
    let mut out = BTreeSet::new();
    for section in ["spec", "metadata"] {
        let a = stored.get(section).cloned().unwrap_or(Value::Null);
        let b = returned.get(section).cloned().unwrap_or(Value::Null);
        let (a, b) = if section == "metadata" {
            (
                pick(&a, &["labels", "annotations"]),
                pick(&b, &["labels", "annotations"]),
            )
        } else {
            (a, b)
        };
        for op in json_patch::diff(&a, &b).0 {
            let path = match &op {
                json_patch::PatchOperation::Add(o) => o.path.clone(),
                json_patch::PatchOperation::Remove(o) => o.path.clone(),
                json_patch::PatchOperation::Replace(o) => o.path.clone(),
                json_patch::PatchOperation::Move(o) => o.path.clone(),
                json_patch::PatchOperation::Copy(o) => o.path.clone(),
                json_patch::PatchOperation::Test(o) => o.path.clone(),
            };
            let tokens: Vec<String> = path.tokens().map(|t| t.decoded().into_owned()).collect();
            // Deep enough to say what changed, never down to a label key or list index:
            // `spec.selector`, `spec.template.spec.containers`, `metadata.annotations`.
            let depth = match tokens.first().map(String::as_str) {
                Some("template") => 3,
                _ => 1,
            };
            let tokens: Vec<String> = tokens.into_iter().take(depth).collect();
            out.insert(
                std::iter::once(section.to_owned())
                    .chain(tokens)
                    .collect::<Vec<_>>()
                    .join("."),
            );
        }
    }
    out.into_iter().collect()
}

fn pick(object: &Value, keys: &[&str]) -> Value {
    Value::Object(
        keys.iter()
            .filter_map(|k| Some(((*k).to_owned(), object.get(*k)?.clone())))
            .collect(),
    )
}

/// Ready endpoints in the `EndpointSlice`s of Service `name`. An endpoint whose `ready` condition
/// is unset counts as ready, as the API says consumers should read it.
fn ready_endpoints(slices: &[Value], namespace: &str, name: &str) -> usize {
    in_namespace(slices, namespace)
        .filter(|s| {
            labels_of(s)
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                == Some(name)
        })
        .flat_map(|s| {
            s.get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false))
        .count()
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c.get("type").and_then(Value::as_str) == Some("Ready")
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
}

/// An image reference's tag (`latest` when it names none), without a digest.
fn tag(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}

/// The pods in `namespace` whose labels hold every pair of `selector`; none for an empty
/// selector (a Service without one selects no pod).
pub fn selected_pods<'a>(
    pods: &'a [Value],
    namespace: &'a str,
    selector: &'a Labels,
) -> impl Iterator<Item = &'a Value> {
    in_namespace(pods, namespace).filter(move |p| {
        let labels = labels_of(p);
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    })
}

fn labels_of(object: &Value) -> Labels {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

fn show_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return "nothing (no selector)".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn in_namespace<'a>(objects: &'a [Value], namespace: &'a str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| namespace_of(o) == namespace)
}

fn namespace_of(object: &Value) -> &str {
    object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The text report: one line per finding, grouped by the registration, then each outpost.
#[must_use]
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    let mut group = None;
    for f in findings {
        if group != Some(&f.group) {
            let heading = match &f.group {
                Group::Registration => "registration".to_owned(),
                Group::Namespace(ns) => format!("namespace {ns}"),
                Group::Outpost { namespace, name } => {
                    format!("outpost {name} (namespace {namespace})")
                }
            };
            if group.is_some() {
                out.push('\n');
            }
            out.push_str(&heading);
            out.push('\n');
            group = Some(&f.group);
        }
        let _ = writeln!(
            out,
            "  {:<4}  {:<22}  {}: {}",
            f.severity.as_str(),
            f.check.id(),
            f.object,
            f.message
        );
    }
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let _ = writeln!(
        out,
        "\n{} ok, {} warn, {} fail",
        count(Severity::Ok),
        count(Severity::Warn),
        count(Severity::Fail)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_tags_ignore_registry_ports_and_digests() {
        assert_eq!(tag("ghcr.io/goauthentik/proxy:2026.2.4"), "2026.2.4");
        assert_eq!(tag("registry:5000/proxy"), "latest");
        assert_eq!(tag("registry:5000/proxy:1.2@sha256:abc"), "1.2");
        assert_eq!(tag("proxy"), "latest");
    }

    #[test]
    fn an_endpoint_with_no_ready_condition_counts_as_ready() {
        let slices = [json!({"metadata": {"namespace": "a", "labels": {
                "kubernetes.io/service-name": "s"}},
            "endpoints": [{"addresses": ["10.0.0.1"]},
                          {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                          {"addresses": ["10.0.0.3"], "conditions": {"ready": true}}]})];
        assert_eq!(ready_endpoints(&slices, "a", "s"), 2);
        assert_eq!(ready_endpoints(&slices, "b", "s"), 0);
        assert_eq!(ready_endpoints(&slices, "a", "t"), 0);
    }

    #[test]
    fn changed_fields_name_the_field_not_the_key() {
        let stored = json!({"metadata": {"labels": {"a": "1"}, "resourceVersion": "1"},
                            "spec": {"selector": {"x": "1"}, "template": {"spec": {
                                "containers": [{"env": []}]}}}});
        let mut returned = stored.clone();
        returned["metadata"]["resourceVersion"] = json!("2");
        assert!(changed_fields(&stored, &returned).is_empty());
        returned["spec"]["selector"]["y"] = json!("2");
        returned["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "E"}]);
        returned["metadata"]["annotations"] = json!({"k": "v"});
        assert_eq!(
            changed_fields(&stored, &returned),
            [
                "metadata.annotations",
                "spec.selector",
                "spec.template.spec.containers"
            ]
        );
    }

    #[test]
    fn findings_serialize_with_stable_ids_and_no_group() {
        let f = Finding {
            check: Check::ServiceEndpoints,
            severity: Severity::Warn,
            object: "Service/a/b".into(),
            message: "m".into(),
            group: Group::Registration,
        };
        assert_eq!(
            serde_json::to_value(Report { findings: &[f] }).unwrap(),
            json!({"findings": [{"check": "service.endpoints", "severity": "warn",
                                 "object": "Service/a/b", "message": "m"}]})
        );
    }
}
