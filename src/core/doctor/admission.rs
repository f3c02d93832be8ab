//! The dry run: a no-op PATCH of each outpost object goes through admission as any write does;
//! what the apiserver answers says whether the webhook is called, and what it would still change.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{About, Check, DryRun, Finding, Inputs, Severity};
use crate::core::{
    cluster::Snapshot,
    mutate::{ObjectKind, mutate_in},
    policy::Policy,
};

/// Why admission would change an object it has seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drift<'a> {
    /// The object's config checksum (the annotation named) is not the policy in force's: it was
    /// admitted under an earlier policy, and the next write through the webhook applies this one.
    PolicyChanged { annotation: &'a str },
    /// Only fields the config checksum does not cover (replicas, strategy) differ, and no scale
    /// wrote them: the policy's values changed since the object was last written.
    Unchecksummed,
    /// The replicas were written through the scale subresource (`kubectl scale`, an HPA), which
    /// the webhook is not sent.
    Scaled,
    /// Nothing says it was admitted under another policy: a write got past the webhook.
    PastWebhook,
}

impl Drift<'_> {
    /// How bad `what` (admission would change it) is, and what to say: `converge` is the command
    /// that makes a write through the webhook now.
    pub(super) fn judge(self, what: &str, converge: &str) -> (Severity, String) {
        let next = format!(
            "The next write through the webhook applies the policy in force; to apply it now, \
             {converge}"
        );
        match self {
            Self::PolicyChanged { annotation } => (
                Severity::Warn,
                format!(
                    "{what}: the policy changed since these pods were admitted (their \
                     {annotation} is not the policy's in force). {next}"
                ),
            ),
            Self::Unchecksummed => (
                Severity::Warn,
                format!(
                    "{what}: the policy changed since the object was last written through the \
                     webhook (the config checksum does not cover replicas or strategy, and no \
                     scale wrote them). {next}"
                ),
            ),
            Self::Scaled => (
                Severity::Fail,
                format!(
                    "{what}: the replicas were set through the scale subresource (`kubectl \
                     scale`, an HPA), which the webhook is not sent, so the two fight. Take \
                     replicas out of the policy, or set them there. Converge: {converge}"
                ),
            ),
            Self::PastWebhook => (
                Severity::Fail,
                format!("{what}: a write got past the webhook. Converge: {converge}"),
            ),
        }
    }
}

/// A no-op dry-run PATCH goes through admission: it must succeed, and change nothing.
#[allow(clippy::too_many_arguments)]
pub(super) fn dry_run<'d>(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    about: &About,
    (kind, namespace, name): (ObjectKind, &str, &str),
    stored: &Value,
    drift: impl Fn(&[String]) -> Drift<'d>,
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
        // Admission ran on the dry run, so the difference is what the webhook would still fix.
        let offline = mutate_in(policy, view, namespace, kind, stored);
        let hint = if offline.ops.is_empty() {
            " (the policy doctor judges against wants no change: does the webhook run another \
             one? Pass it with --policy)"
        } else {
            ""
        };
        let (severity, message) = drift(&changed).judge(
            &format!("admission would change {}{hint}", changed.join(", ")),
            converge,
        );
        about.say(Check::AdmissionConverged, severity, message)
    });
    out
}

/// The top-level fields a dry run changed, as `spec.selector`, `metadata.labels`...
pub(super) fn changed_fields(stored: &Value, returned: &Value) -> Vec<String> {
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
