//! `doctor`'s checks: the operator's upgrade checklist (is the webhook registered and reachable,
//! which policy it runs, does each outpost Service select ready pods, does each outpost Deployment
//! carry what that policy injects) as pure functions over a snapshot of the cluster.
//!
//! Pure: no I/O and no clock (the time is an input). The shell (`cluster::inspect`) reads the
//! objects, makes the dry runs and keeps only digests of Secret data, so no Secret value can reach
//! a finding. One file per part: the registration, where the policy in force comes from, the
//! dry run through admission, Services, Deployments, and the report.

mod admission;
mod deployment;
mod policy;
mod registration;
mod render;
mod service;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

pub use self::{
    policy::{PolicyRef, PolicySource, locate_policy},
    render::{Report, Summary, render_text},
};
use super::{
    cluster::{Labels, Snapshot, deployment_selector},
    mutate::{ObjectKind, identify_outpost},
    policy::{Outpost, Policy},
};
use crate::k8s::MANAGED_BY;

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
    PolicySource,
    NamespaceExists,
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
    ObjectEvent,
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
            Self::PolicySource => "policy.source",
            Self::NamespaceExists => "namespace.exists",
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
            Self::ObjectEvent => "object.event",
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
    /// The Deployments in that Service's namespace, `None` when they were not read (no
    /// Service, or the caller may not list them): which of them the Service selects runs the
    /// webhook, and mounts its policy.
    pub webhook_deployments: Option<Vec<Value>>,
    /// Which policy the checks judge against, and where it came from; `None` when not said.
    pub policy_source: Option<PolicySource>,
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
    /// The namespaces looked at that the apiserver says do not exist (a caller who may not read
    /// Namespaces cannot tell: lists in a missing namespace are just empty).
    pub absent_namespaces: BTreeSet<String>,
    /// With `--logs`: the start of each outpost pod's log, by (namespace, pod).
    pub logs: Option<BTreeMap<(String, String), String>>,
    /// The `events.k8s.io/v1` Events outpost-webhook left in the namespaces; `None` when they
    /// could not be read.
    pub events: Option<Vec<Value>>,
}

/// Certificates expiring sooner than this are a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Runs every check, judging the outposts against `policy`.
#[must_use]
pub fn check(policy: &Policy, inputs: &Inputs) -> Vec<Finding> {
    let mut out = registration::check(inputs);
    out.extend(inputs.policy_source.iter().map(policy::finding));
    let view = view(inputs);
    for namespace in &inputs.namespaces {
        if inputs.absent_namespaces.contains(namespace) {
            out.push(Finding {
                check: Check::NamespaceExists,
                severity: Severity::Fail,
                object: format!("Namespace/{namespace}"),
                message: "does not exist: nothing was checked there. Pass the namespace \
                          authentik's outposts run in with --namespace"
                    .into(),
                group: Group::Namespace(namespace.clone()),
            });
            continue;
        }
        let services: Vec<&Value> = in_namespace(&inputs.services, namespace)
            .filter(|s| identify_outpost(*s).is_some())
            .collect();
        let deployments: Vec<&Value> = in_namespace(&inputs.deployments, namespace)
            .filter(|d| identify_outpost(*d).is_some())
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
            out.extend(service::check(policy, inputs, &view, namespace, s));
            out.extend(latest_event(inputs, "Service", namespace, s));
        }
        for d in &deployments {
            out.extend(deployment::check(policy, inputs, &view, namespace, d));
            out.extend(latest_event(inputs, "Deployment", namespace, d));
        }
    }
    out.sort_by(|a, b| a.group.cmp(&b.group));
    out
}

/// The latest Event outpost-webhook's reconciler left on `object`: what it last did to it and
/// why. A Warning Event (a roll held back, a write refused) is a warning; none, nothing.
fn latest_event(inputs: &Inputs, kind: &str, namespace: &str, object: &Value) -> Option<Finding> {
    let outpost = identify_outpost(object)?;
    let name = name_of(object);
    let latest = inputs
        .events
        .as_ref()?
        .iter()
        .filter(|e| {
            e.pointer("/regarding/kind").and_then(Value::as_str) == Some(kind)
                && e.pointer("/regarding/name").and_then(Value::as_str) == Some(name)
                && namespace_of(e) == namespace
                && e.get("reportingController").and_then(Value::as_str) == Some("outpost-webhook")
        })
        .max_by_key(|e| event_time(e))?;
    let text = |k: &str| latest.get(k).and_then(Value::as_str).unwrap_or_default();
    let severity = if text("type") == "Warning" {
        Severity::Warn
    } else {
        Severity::Ok
    };
    let count = latest
        .pointer("/series/count")
        .and_then(Value::as_i64)
        .map_or_else(String::new, |n| format!(" (x{n})"));
    Some(About::new(kind, namespace, object, &outpost).say(
        Check::ObjectEvent,
        severity,
        format!(
            "latest Event from outpost-webhook, {}{count}: {}: {}",
            event_time(latest),
            text("reason"),
            text("note")
        ),
    ))
}

/// When an Event last happened, as RFC 3339 text (which sorts as time does).
fn event_time(event: &Value) -> String {
    [
        "/series/lastObservedTime",
        "/eventTime",
        "/deprecatedLastTimestamp",
        "/metadata/creationTimestamp",
    ]
    .iter()
    .find_map(|p| event.pointer(p).and_then(Value::as_str))
    .unwrap_or_default()
    .to_owned()
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

/// The Deployments in `namespace` whose pod template carries every pair of `selector`: those
/// whose pods a Service with that selector sends traffic to.
fn runs_pods_of<'a>(
    deployments: &'a [Value],
    namespace: &'a str,
    selector: &'a Labels,
) -> impl Iterator<Item = &'a Value> {
    in_namespace(deployments, namespace).filter(move |d| {
        let labels = labels_of_at(d, "/spec/template/metadata/labels");
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    })
}

fn labels_of(object: &Value) -> Labels {
    labels_of_at(object, "/metadata/labels")
}

/// The string pairs of the map at `pointer` (labels, a selector).
fn labels_of_at(object: &Value, pointer: &str) -> Labels {
    object
        .pointer(pointer)
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
