//! Events on the objects the reconciler writes: why it pointed a Service at an outpost's pods or
//! restored its selector, why it rolled an outpost (the Secret and key names that changed, never
//! a value), why it did not, and a write the apiserver refused. `kubectl describe` on the object
//! then says what outpost-webhook did and why.
//!
//! Network I/O: `events.k8s.io/v1` Events in the object's namespace, through kube-runtime's
//! recorder, which turns repeats of one event (same object, reason and action within minutes)
//! into one Event with a count. Best effort: an Event that cannot be written is logged once and
//! never holds up a write.

use std::{collections::BTreeSet, sync::Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource as _, ResourceExt as _,
    api::DynamicObject,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tracing::warn;

use super::cache::Cache;
use crate::{
    core::{
        mutate::{ObjectKind, identify_outpost},
        policy::Policy,
        reconcile::{Reason, Write},
    },
    k8s::{ORIGINAL_SELECTOR, SECRET_CHECKSUM},
};

/// The reporting controller named on every Event.
pub const CONTROLLER: &str = "outpost-webhook";

/// Writes the reconciler's Events.
pub struct Events {
    recorder: Option<Recorder>,
    policy: Box<dyn Fn() -> std::sync::Arc<Policy> + Send + Sync>,
    /// Namespaces where writing an Event failed, so each is logged once.
    failed: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// Events written with `client`, reported by `identity` (the pod's name).
    #[must_use]
    pub fn new(
        client: Client,
        identity: &str,
        policy: impl Fn() -> std::sync::Arc<Policy> + Send + Sync + 'static,
    ) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(identity.to_owned()),
        };
        Self {
            recorder: Some(Recorder::new(client, reporter)),
            policy: Box::new(policy),
            failed: Mutex::new(BTreeSet::new()),
        }
    }

    /// After a successful write of `object` for `write`.
    pub async fn wrote(
        &self,
        cache: &Cache,
        reason: Reason,
        write: &Write,
        object: &DynamicObject,
    ) {
        let note = self.why(cache, reason, write, object);
        let event = Event {
            type_: EventType::Normal,
            reason: reason.event_reason().into(),
            note: Some(note),
            action: action(write.kind).into(),
            secondary: None,
        };
        self.publish(&event, &reference_of(write.kind, object))
            .await;
    }

    /// After the apiserver refused a write.
    pub async fn refused(&self, write: &Write, e: &kube::Error) {
        let answer = match e {
            kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
            other => other.to_string(),
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "WriteRefused".into(),
            note: Some(truncate(&format!(
                "outpost-webhook could not write this object ({}): {answer}. It tries again",
                write.reason.as_str()
            ))),
            action: action(write.kind).into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some(api_version(write.kind).into()),
            kind: Some(write.kind.as_str().into()),
            name: Some(write.name.clone()),
            namespace: Some(write.namespace.clone()),
            ..ObjectReference::default()
        };
        self.publish(&event, &reference).await;
    }

    /// An outpost Deployment whose Secrets changed is not rolled: its pods could not start.
    pub async fn held_back(&self, object: &DynamicObject, problems: &[String]) {
        let event = Event {
            type_: EventType::Warning,
            reason: "NotRolled".into(),
            note: Some(truncate(&format!(
                "outpost-webhook did not roll this outpost: {}",
                problems.join("; ")
            ))),
            action: "Roll".into(),
            secondary: None,
        };
        self.publish(&event, &reference_of(ObjectKind::Deployment, object))
            .await;
    }

    async fn publish(&self, event: &Event, reference: &ObjectReference) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        if let Err(e) = recorder.publish(event, reference).await {
            let namespace = reference.namespace.clone().unwrap_or_default();
            let new = self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(namespace.clone());
            if new {
                warn!(
                    %namespace,
                    error = %e,
                    "Cannot write an Event (RBAC: create and patch events.k8s.io events); the \
                     writes go on without them"
                );
            }
        }
    }

    /// The Event's note for a write: what was done and why, naming objects and keys only.
    fn why(&self, cache: &Cache, reason: Reason, write: &Write, object: &DynamicObject) -> String {
        let value = serde_json::to_value(object).unwrap_or_default();
        let outpost = identify_outpost(&value).map_or_else(String::new, |o| o.name.to_owned());
        truncate(&match reason {
            Reason::SelectorFollowsPods => format!(
                "Selector set to the pods of the Deployment that runs outpost {outpost} on its \
                 own; the controller's selector is kept in annotation {ORIGINAL_SELECTOR}"
            ),
            Reason::SelectorRestored => format!(
                "Selector restored from annotation {ORIGINAL_SELECTOR}: no Deployment runs \
                 outpost {outpost} on its own now, so the authentik server pods serve it"
            ),
            Reason::SecretChanged => {
                let policy = (self.policy)();
                let changed: Vec<String> = identify_outpost(&value)
                    .map(|o| policy.for_outpost(&o).deployment.secret_refs())
                    .unwrap_or_default()
                    .iter()
                    .map(|r| r.name.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter_map(|secret| {
                        let keys = cache.changed_keys(&write.namespace, &secret);
                        (!keys.is_empty())
                            .then(|| format!("Secret {secret} key(s) {}", keys.join(", ")))
                    })
                    .collect();
                if changed.is_empty() {
                    format!(
                        "Pods rolled: {SECRET_CHECKSUM} set to the data of the Secret keys this \
                         outpost reads (its first fix, or a change made while no replica watched)"
                    )
                } else {
                    format!("Pods rolled: {} changed", changed.join("; "))
                }
            }
        })
    }
}

fn action(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Service => "PatchSelector",
        ObjectKind::Deployment => "Roll",
    }
}

fn api_version(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Service => "v1",
        ObjectKind::Deployment => "apps/v1",
    }
}

fn reference_of(kind: ObjectKind, object: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version(kind).into()),
        kind: Some(kind.as_str().into()),
        name: Some(object.name_any()),
        namespace: object.namespace(),
        uid: object.meta().uid.clone(),
        resource_version: object.meta().resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// An Event note holds at most 1 KiB.
fn truncate(s: &str) -> String {
    let mut out = s.to_owned();
    if let Some((cut, _)) = out.char_indices().nth(1000) {
        out.truncate(cut);
    }
    out
}
