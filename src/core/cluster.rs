//! The cluster facts a decision may depend on, as an input: does a standalone Deployment run an
//! outpost, and what is the data of the Secret keys the policy injects.
//!
//! Pure: no I/O. Admission sees one object at a time, but whether a Service's selector is right
//! depends on another object (the outpost's own Deployment), and whether pods run current
//! credentials depends on a Secret. The shell keeps a watch cache and answers through [`View`];
//! `mutate` builds a [`Snapshot`] from the documents it is given; [`Off`] knows nothing.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{mutate::pod_selector, policy::Outpost};
use crate::k8s::MANAGED_BY;

/// What the decisions may ask of the cluster.
pub trait View {
    /// Whether a Deployment in `namespace` runs `outpost` on its own: its
    /// `spec.selector.matchLabels` are exactly the outpost's five pod labels. `None` when the
    /// view is off and nobody knows.
    fn standalone(&self, namespace: &str, outpost: &Outpost<'_>) -> Option<bool>;

    /// The data of Secret `name` in `namespace`, as SHA-256 digests by key. `None` when the view
    /// is off; an empty map when the Secret does not exist.
    fn secret(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, [u8; 32]>>;

    /// Whether Secret `name` in `namespace` exists and can be read, as far as the view knows.
    /// Views that cannot tell answer [`SecretStatus::Unknown`]: no view, and a snapshot of the
    /// documents given to `mutate`, where a Secret left out says nothing.
    fn secret_status(&self, _namespace: &str, _name: &str) -> SecretStatus {
        SecretStatus::Unknown
    }
}

/// What a watch knows of a Secret the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretStatus {
    /// Not known: no view, or not listed yet.
    Unknown,
    /// Listed, and there.
    Present,
    /// Listed, and not there: a pod whose env reads it does not start.
    Missing,
    /// The apiserver refused to list it (403): the webhook's Role does not name it.
    Unreadable,
}

/// Why a Deployment's pods would not start with the Secrets it reads, as the view knows them: one
/// line per Secret or key, naming it and never its value. Empty when nothing is known to be
/// wrong.
#[must_use]
pub fn secret_problems(
    view: &dyn View,
    namespace: &str,
    refs: &std::collections::BTreeSet<super::policy::SecretRef>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut told = std::collections::BTreeSet::new();
    for r in refs {
        match view.secret_status(namespace, &r.name) {
            SecretStatus::Unknown => {}
            SecretStatus::Missing => {
                if told.insert(&r.name) {
                    out.push(format!(
                        "Secret {} not found in {namespace}; pods reading it will not start",
                        r.name
                    ));
                }
            }
            SecretStatus::Unreadable => {
                if told.insert(&r.name) {
                    out.push(format!(
                        "cannot read Secret {} in {namespace}: the webhook's Role must name it",
                        r.name
                    ));
                }
            }
            SecretStatus::Present => {
                if let Some(key) = &r.key
                    && view
                        .secret(namespace, &r.name)
                        .is_some_and(|data| !data.contains_key(key))
                {
                    out.push(format!(
                        "Secret {} has no key {key}; pods reading it will not start",
                        r.name
                    ));
                }
            }
        }
    }
    out
}

/// No view of the cluster: every question is answered "unknown".
#[derive(Debug, Clone, Copy, Default)]
pub struct Off;

impl View for Off {
    fn standalone(&self, _: &str, _: &Outpost<'_>) -> Option<bool> {
        None
    }

    fn secret(&self, _: &str, _: &str) -> Option<BTreeMap<String, [u8; 32]>> {
        None
    }
}

/// Pod selectors as sorted label maps: the form both sides are compared in.
pub type Labels = BTreeMap<String, String>;

/// The facts, held in memory: built from documents (`mutate`) or kept up to date by the watch
/// cache, event by event. Lookups cost a map search, whatever the number of outposts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Each outpost Deployment's `matchLabels`, by (namespace, name).
    deployments: BTreeMap<(String, String), Labels>,
    /// How many Deployments in a namespace carry each `matchLabels`.
    selectors: BTreeMap<(String, Labels), usize>,
    /// Per (namespace, name), the digest of each key's data.
    secrets: BTreeMap<(String, String), BTreeMap<String, [u8; 32]>>,
}

impl Snapshot {
    /// A snapshot of `objects`: Deployments and Secrets are noted, everything else ignored.
    /// `default_namespace` stands in for objects that name none (as `kubectl` does).
    #[must_use]
    pub fn of<'a>(objects: impl IntoIterator<Item = &'a Value>, default_namespace: &str) -> Self {
        let mut snapshot = Self::default();
        for object in objects {
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(default_namespace);
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match object.get("kind").and_then(Value::as_str) {
                Some("Deployment") => {
                    if let Some(labels) = deployment_selector(object) {
                        snapshot.put_deployment(namespace, name, labels);
                    }
                }
                Some("Secret") => snapshot.put_secret(namespace, name, secret_digests(object)),
                _ => {}
            }
        }
        snapshot
    }

    /// Notes an outpost Deployment's `matchLabels` (replacing what was noted for it).
    pub fn put_deployment(&mut self, namespace: &str, name: &str, match_labels: Labels) {
        self.remove_deployment(namespace, name);
        *self
            .selectors
            .entry((namespace.to_owned(), match_labels.clone()))
            .or_default() += 1;
        self.deployments
            .insert((namespace.to_owned(), name.to_owned()), match_labels);
    }

    /// Forgets a Deployment.
    pub fn remove_deployment(&mut self, namespace: &str, name: &str) {
        let Some(old) = self
            .deployments
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        let key = (namespace.to_owned(), old);
        if let Some(n) = self.selectors.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.selectors.remove(&key);
            }
        }
    }

    /// Notes a Secret's data digests.
    pub fn put_secret(&mut self, namespace: &str, name: &str, data: BTreeMap<String, [u8; 32]>) {
        self.secrets
            .insert((namespace.to_owned(), name.to_owned()), data);
    }

    /// The data digests noted for a Secret, if it was noted.
    #[must_use]
    pub fn secret_data(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, [u8; 32]>> {
        self.secrets.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Forgets a Secret.
    pub fn remove_secret(&mut self, namespace: &str, name: &str) {
        self.secrets
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// How many outpost Deployments are noted.
    #[must_use]
    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }

    /// How many Secrets are noted.
    #[must_use]
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }
}

impl View for Snapshot {
    fn standalone(&self, namespace: &str, outpost: &Outpost<'_>) -> Option<bool> {
        let wanted: Labels = pod_selector(outpost)
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
            .collect();
        Some(self.selectors.contains_key(&(namespace.to_owned(), wanted)))
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, [u8; 32]>> {
        Some(
            self.secrets
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned()
                .unwrap_or_default(),
        )
    }
}

/// An outpost Deployment's `spec.selector.matchLabels`, when it is one authentik's controller
/// manages and the selector is plain labels.
#[must_use]
pub fn deployment_selector(deployment: &Value) -> Option<Labels> {
    let managed = deployment
        .pointer("/metadata/labels")
        .and_then(|l| l.get(MANAGED_BY))
        .and_then(Value::as_str);
    if managed != Some(crate::k8s::MANAGED_BY_AUTHENTIK) {
        return None;
    }
    deployment
        .pointer("/spec/selector/matchLabels")?
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

/// A Secret's data, as a digest per key. The digests go into an annotation and a log line may
/// name a key, so no value is ever kept, only its SHA-256.
#[must_use]
pub fn secret_digests(secret: &Value) -> BTreeMap<String, [u8; 32]> {
    let mut out = BTreeMap::new();
    // `data` holds base64 text; `stringData` (write-only, but present in files given to `mutate`)
    // plain text, which the apiserver merges over `data`. Both are hashed as the bytes a pod
    // reads, so a file and the stored Secret agree.
    let text = |field: &str| {
        secret
            .get(field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k, v.as_str()?)))
    };
    for (key, b64) in text("data") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_else(|_| b64.as_bytes().to_vec());
        out.insert(key.clone(), digest(&bytes));
    }
    for (key, plain) in text("stringData") {
        out.insert(key.clone(), digest(plain.as_bytes()));
    }
    out
}

/// The digest of one key's data.
#[must_use]
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
