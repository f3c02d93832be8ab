//! The watch cache: outpost Deployments and Services (label
//! `app.kubernetes.io/managed-by=goauthentik.io`) and the Secrets the policy reads (by name, with a
//! `metadata.name` field selector, so RBAC can name them), in each watched namespace.
//!
//! Network I/O: kube-runtime watchers, list then watch, re-listing with backoff when a watch
//! breaks. Admission reads only this cache, never the API, and keeps answering from the last view
//! when the apiserver goes away.
//!
//! Memory is bounded by what the decisions read, not by what the objects hold. A stored outpost
//! Deployment is about 10 KB of JSON and ten times that as a `serde_json::Value` tree (each map a
//! B-tree node); held whole, 1,000 outposts took about 200 MB. So each object is kept as compact
//! JSON text of the fields the rules read (`core::mutate::READS`: no `managedFields`, `status`,
//! ports, or other containers' specs), and parsed again one at a time when the reconciler plans.
//! Lists are read in pages of [`PAGE_SIZE`], so at most that many full objects are in memory at
//! once, and each is pruned as it arrives.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use futures::StreamExt as _;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret, core::v1::Service};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    core::{
        admission::prune::Keep,
        cluster::{SecretStatus, Snapshot, View, deployment_selector, secret_digests},
        mutate::{CONTAINER_READS, READS},
        policy::Outpost,
    },
    k8s::{MANAGED_BY, MANAGED_BY_AUTHENTIK},
};

/// How many objects one list request asks for. The watcher holds one page of full typed objects
/// (a Deployment with its `managedFields` is tens of KB each) while it hands them over.
pub const PAGE_SIZE: u32 = 50;

/// How long the apiserver holds one watch open before the watcher starts the next (from the
/// last resourceVersion, so nothing is missed). Short enough that a watch whose connection died
/// silently is noticed within a minute: the watch client's read timeout is a little longer.
pub const WATCH_TIMEOUT_SECONDS: u32 = 55;

/// Outpost objects by (namespace, name), each as the compact JSON text of what the rules read.
type Stored = RwLock<BTreeMap<(String, String), Arc<str>>>;

/// What the watchers have seen, and whether they have all settled.
#[derive(Debug, Default)]
pub struct Cache {
    snapshot: RwLock<Snapshot>,
    services: Stored,
    deployments: Stored,
    /// Watchers that have neither listed once nor been refused: planning waits for them, and
    /// readiness waits for those started with the view.
    pending: Mutex<BTreeSet<Watch>>,
    /// Set once every watcher started with the view has settled.
    settled_once: std::sync::atomic::AtomicBool,
    /// What the apiserver refused (403): a watch, a reconcile write or the Lease.
    forbidden: Mutex<BTreeSet<Refusal>>,
    /// The watched namespaces, and the Secret names followed in each: the policy in force names
    /// them, and a reloaded policy may name others ([`Cache::follow_secrets`]) or fewer
    /// ([`Cache::unfollow_secrets`]).
    namespaces: Vec<String>,
    secrets: Mutex<BTreeSet<String>>,
    /// What each followed Secret's watch knows: present, missing, or refused.
    secret_status: RwLock<BTreeMap<(String, String), SecretStatus>>,
    /// The keys whose data changed in each Secret's latest change, for the reconciler's Events.
    changed_keys: RwLock<BTreeMap<(String, String), Vec<String>>>,
    /// The namespaces whose Deployments have been listed: elsewhere (a refused watch) nobody
    /// knows whether a standalone Deployment runs an outpost.
    deployments_listed: RwLock<BTreeSet<String>>,
    /// Woken on every change, for the reconciler.
    pub changed: Notify,
}

/// One watcher: a kind in a namespace, and for Secrets the name it follows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Watch {
    kind: &'static str,
    namespace: String,
    scope: Option<String>,
}

/// A request the apiserver answered 403: what RBAC must allow. Shown as
/// `verb resource (scope) in namespace`, e.g. `patch services in authentik`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    pub verb: String,
    /// The API resource, plural: `services`, `deployments`, `secrets`, `leases`.
    pub resource: &'static str,
    /// A field selector or object name the request was limited to, when RBAC can name it.
    pub scope: Option<String>,
    pub namespace: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(scope) = &self.scope {
            write!(f, " ({scope})")?;
        }
        write!(f, " in {}", self.namespace)
    }
}

impl View for Cache {
    fn standalone(&self, namespace: &str, outpost: &Outpost<'_>) -> Option<bool> {
        // Unknown, not "no", until the Deployments there have been listed: a refused watch must
        // not read as "no standalone Deployment", which would restore every Service's old
        // selector.
        if !self
            .deployments_listed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(namespace)
        {
            return None;
        }
        self.read_snapshot().standalone(namespace, outpost)
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, [u8; 32]>> {
        self.read_snapshot().secret(namespace, name)
    }

    fn secret_status(&self, namespace: &str, name: &str) -> SecretStatus {
        self.secret_status
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(namespace.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(SecretStatus::Unknown)
    }
}

/// The three kinds the cache follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Deployment,
    Service,
    Secret,
}

impl Kind {
    fn of<K: Resource<DynamicType = ()>>() -> Option<Self> {
        match K::kind(&()).as_ref() {
            "Deployment" => Some(Self::Deployment),
            "Service" => Some(Self::Service),
            "Secret" => Some(Self::Secret),
            _ => None,
        }
    }

    fn resource(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::Service => "services",
            Self::Secret => "secrets",
        }
    }
}

/// A watcher of the cache, not yet spawned.
pub type Watcher = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

impl Cache {
    /// The cache and a watcher per kind and namespace, for the caller to spawn. Readiness waits
    /// for each from now on, so that the Secrets the policy reads ([`Cache::follow_secrets`],
    /// whose watchers the caller owns) can be added to what it waits for before any watcher can
    /// have listed.
    #[must_use]
    pub fn watching(client: &Client, namespaces: &[String]) -> (Arc<Self>, Vec<Watcher>) {
        let cache = Arc::new(Self {
            namespaces: namespaces.to_vec(),
            ..Self::default()
        });
        let outposts = watcher::Config::default()
            .labels(&format!("{MANAGED_BY}={MANAGED_BY_AUTHENTIK}"))
            .page_size(PAGE_SIZE)
            .timeout(WATCH_TIMEOUT_SECONDS);
        let mut watchers: Vec<Watcher> = Vec::new();
        for ns in namespaces {
            watchers.push(Box::pin(cache.follow(
                Api::<Deployment>::namespaced(client.clone(), ns),
                outposts.clone(),
                Kind::Deployment,
                ns,
            )));
            watchers.push(Box::pin(cache.follow(
                Api::<Service>::namespaced(client.clone(), ns),
                outposts.clone(),
                Kind::Service,
                ns,
            )));
        }
        (cache, watchers)
    }

    /// A watcher for each Secret in `names`, in each watched namespace, that is not followed yet,
    /// with the name it follows. The caller spawns the futures and owns their lifetime; readiness
    /// waits until each has listed once or been refused.
    pub fn follow_secrets(
        self: &Arc<Self>,
        client: &Client,
        names: &BTreeSet<String>,
    ) -> Vec<(String, impl Future<Output = ()> + Send + 'static + use<>)> {
        let new: Vec<String> = {
            let mut followed = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
            names
                .iter()
                .filter(|n| followed.insert((*n).clone()))
                .cloned()
                .collect()
        };
        let mut watchers = Vec::new();
        for name in &new {
            for ns in &self.namespaces {
                let by_name = watcher::Config::default()
                    .fields(&format!("metadata.name={name}"))
                    .page_size(PAGE_SIZE)
                    .timeout(WATCH_TIMEOUT_SECONDS);
                watchers.push((
                    name.clone(),
                    self.follow(
                        Api::<Secret>::namespaced(client.clone(), ns),
                        by_name,
                        Kind::Secret,
                        ns,
                    ),
                ));
            }
        }
        watchers
    }

    /// Stops following the Secrets not in `names`: the policy in force no longer reads them. What
    /// the cache knew of them, their refusals and their place in readiness go; the names are
    /// returned so that the caller stops their watchers.
    pub fn unfollow_secrets(&self, names: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = {
            let mut followed = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
            let gone = followed.difference(names).cloned().collect();
            followed.retain(|n| names.contains(n));
            gone
        };
        for name in &gone {
            let scope = format!("metadata.name={name}");
            self.lock_pending()
                .retain(|w| !(w.kind == "secrets" && w.scope.as_deref() == Some(scope.as_str())));
            self.lock_forbidden().retain(|r| {
                !(r.resource == "secrets" && r.scope.as_deref() == Some(scope.as_str()))
            });
            for ns in &self.namespaces {
                self.remove(Kind::Secret, ns, name);
                self.secret_status
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(ns.clone(), name.clone()));
            }
        }
        gone
    }

    /// The Secret names followed now.
    #[must_use]
    pub fn followed_secrets(&self) -> BTreeSet<String> {
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keys whose data changed in Secret `name`'s latest change in `namespace` (empty when
    /// none is known: the first list, or a change while no watch ran).
    #[must_use]
    pub fn changed_keys(&self, namespace: &str, name: &str) -> Vec<String> {
        self.changed_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// True once every watcher has settled: listed once, or been refused. The view is then as
    /// complete as it will get, and writes may be planned from it.
    #[must_use]
    pub fn synced(&self) -> bool {
        self.lock_pending().is_empty()
    }

    /// Whether admission may answer from this view: every watcher started with the view has
    /// settled once. A refusal does not keep a replica unready: under `failurePolicy: Fail`, a
    /// Role that lacks a verb (it hits every replica alike) would otherwise leave the webhook
    /// with no endpoints and refuse every outpost write; it is logged, counted, and warned about
    /// on the writes it affects. Nor does a Secret that a reloaded policy names: a ConfigMap edit
    /// reaches every replica at once, and admission answers meanwhile (the reconciler plans only
    /// once it has listed).
    #[must_use]
    pub fn ready(&self) -> bool {
        self.settled_once.load(std::sync::atomic::Ordering::Relaxed) || self.synced()
    }

    /// `watch` has listed once or been refused.
    fn settle(&self, watch: &Watch) {
        let mut pending = self.lock_pending();
        pending.remove(watch);
        if pending.is_empty() {
            self.settled_once
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // The reconciler waits for the whole view before it plans, and may have looked
            // between a list's own signal and this; a refused watcher sends no other signal.
            self.changed.notify_one();
        }
    }

    /// The watchers that have not settled, for `/readyz`.
    #[must_use]
    pub fn unsettled(&self) -> Vec<String> {
        self.lock_pending()
            .iter()
            .map(|w| match &w.scope {
                Some(scope) => format!("{} ({scope}) in {}", w.kind, w.namespace),
                None => format!("{} in {}", w.kind, w.namespace),
            })
            .collect()
    }

    /// What the apiserver refused, as `verb resource in namespace`.
    #[must_use]
    pub fn forbidden(&self) -> Vec<String> {
        self.lock_forbidden()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Notes a 403; readiness stays false until [`Cache::allow`] clears it. True the first time,
    /// so the caller logs each refusal once rather than on every retry.
    pub fn refuse(&self, refusal: Refusal) -> bool {
        self.lock_forbidden().insert(refusal)
    }

    /// The apiserver allowed one of `verbs` on `resource` in `namespace` (within `scope`, when
    /// given): what it refused of those before is cleared.
    pub fn allow(&self, verbs: &[&str], resource: &str, scope: Option<&str>, namespace: &str) {
        self.lock_forbidden().retain(|r| {
            !(r.resource == resource
                && r.namespace == namespace
                && verbs.contains(&r.verb.as_str())
                && (scope.is_none() || r.scope.as_deref() == scope))
        });
    }

    /// Adds or replaces one outpost Deployment or Service, or a Secret, as a watch event does.
    /// Other kinds are ignored. The watchers feed the cache this way; so can a bench or a test.
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, namespace: &str, object: &K) {
        if let Some(kind) = Kind::of::<K>() {
            self.put(kind, namespace, object);
        }
    }

    /// A list of `K` in `namespace` is complete, as a watch's first list completes: what it did
    /// not show (`listed`, by name) is gone, and for Deployments the namespace is known from now
    /// on. The watchers do this; so can a bench or a test.
    pub fn list_done<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        scope: Option<&str>,
        listed: &BTreeSet<String>,
    ) {
        if let Some(kind) = Kind::of::<K>() {
            self.relisted(kind, namespace, scope, listed);
        }
    }

    /// The outpost Services and Deployments as the cache keeps them (what the rules read), as
    /// compact JSON text: cheap to copy, parsed by the caller one at a time.
    #[must_use]
    pub fn stored(&self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let read = |m: &Stored| {
            m.read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect()
        };
        (read(&self.services), read(&self.deployments))
    }

    /// The outpost Services and Deployments as the cache keeps them, parsed: all at once, so
    /// about ten times [`Cache::stored`] in memory.
    #[must_use]
    pub fn objects(&self) -> (Vec<Value>, Vec<Value>) {
        let parse = |texts: Vec<Arc<str>>| {
            texts
                .iter()
                .filter_map(|t| serde_json::from_str(t).ok())
                .collect()
        };
        let (services, deployments) = self.stored();
        (parse(services), parse(deployments))
    }

    /// How many outpost Deployments, Services and Secrets the cache holds.
    #[must_use]
    pub fn counts(&self) -> (usize, usize, usize) {
        let snapshot = self.read_snapshot();
        let services = self
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        (
            snapshot.deployment_count(),
            services,
            snapshot.secret_count(),
        )
    }

    fn read_snapshot(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<Watch>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_forbidden(&self) -> std::sync::MutexGuard<'_, BTreeSet<Refusal>> {
        self.forbidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One watcher's loop, to be spawned: list, then watch, re-listing with backoff.
    fn follow<K>(
        self: &Arc<Self>,
        api: Api<K>,
        config: watcher::Config,
        kind: Kind,
        namespace: &str,
    ) -> impl Future<Output = ()> + Send + 'static + use<K>
    where
        K: Resource
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Serialize
            + Send
            + Sync
            + 'static,
    {
        let watch = Watch {
            kind: kind.resource(),
            namespace: namespace.to_owned(),
            scope: config.field_selector.clone(),
        };
        self.lock_pending().insert(watch.clone());
        let cache = Arc::clone(self);
        let namespace = namespace.to_owned();
        let scope = config.field_selector.clone();
        async move {
            let mut synced = false;
            // The names a (re-)list has shown; what is not among them is gone.
            let mut listed = BTreeSet::new();
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(object)) => {
                        listed.insert(object.name_any());
                        cache.put(kind, &namespace, &object);
                    }
                    Ok(watcher::Event::InitDone) => {
                        cache.relisted(kind, &namespace, scope.as_deref(), &listed);
                        cache.allow(
                            &["list", "watch"],
                            kind.resource(),
                            scope.as_deref(),
                            &namespace,
                        );
                        if !synced {
                            synced = true;
                            cache.settle(&watch);
                            info!(resource = kind.resource(), %namespace, "Watch cache synced");
                        }
                    }
                    Ok(watcher::Event::Apply(object)) => cache.put(kind, &namespace, &object),
                    Ok(watcher::Event::Delete(object)) => {
                        cache.remove(kind, &namespace, &object.name_any());
                    }
                    Err(e) => {
                        if cache.failed(kind, &namespace, scope.as_deref(), &e) {
                            // Refused: settled for readiness; what it would show is unknown.
                            cache.settle(&watch);
                        }
                    }
                }
            }
        }
    }

    /// A (re-)list is complete: what one watcher holds but the list did not show is removed.
    /// `scope` is a Secret watcher's `metadata.name=` selector.
    fn relisted(
        &self,
        kind: Kind,
        namespace: &str,
        scope: Option<&str>,
        listed: &BTreeSet<String>,
    ) {
        let held: Vec<String> = match kind {
            Kind::Service => keys(&self.services, namespace),
            Kind::Deployment => keys(&self.deployments, namespace),
            // One watcher per Secret name: a list without it means the Secret is gone (deleted
            // while the watch was down), and its digests must go with it.
            Kind::Secret => scope
                .and_then(|s| s.strip_prefix("metadata.name="))
                .map(str::to_owned)
                .into_iter()
                .collect(),
        };
        for gone in held.iter().filter(|n| !listed.contains(*n)) {
            self.remove(kind, namespace, gone);
        }
        if kind == Kind::Deployment {
            self.deployments_listed
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(namespace.to_owned());
        }
        if kind == Kind::Secret
            && let Some(name) = scope.and_then(|s| s.strip_prefix("metadata.name="))
        {
            let status = if listed.contains(name) {
                SecretStatus::Present
            } else {
                SecretStatus::Missing
            };
            self.set_secret_status(namespace, name, status);
        }
        self.changed.notify_one();
    }

    fn set_secret_status(&self, namespace: &str, name: &str, status: SecretStatus) {
        self.secret_status
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((namespace.to_owned(), name.to_owned()), status);
    }

    fn put<K: Resource + Serialize>(&self, kind: Kind, namespace: &str, object: &K) {
        let Ok(value) = serde_json::to_value(object) else {
            return;
        };
        let name = object.name_any();
        let key = (namespace.to_owned(), name.clone());
        let mut snapshot = self
            .snapshot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match kind {
            Kind::Deployment => {
                match deployment_selector(&value) {
                    Some(labels) => snapshot.put_deployment(namespace, &name, labels),
                    None => snapshot.remove_deployment(namespace, &name),
                }
                drop(snapshot);
                write(&self.deployments).insert(key, kept(&value));
            }
            Kind::Service => {
                drop(snapshot);
                write(&self.services).insert(key, kept(&value));
            }
            Kind::Secret => {
                let digests = secret_digests(&value);
                if let Some(before) = snapshot.secret_data(namespace, &name) {
                    let changed: Vec<String> = digests
                        .iter()
                        .filter(|(k, d)| before.get(*k) != Some(*d))
                        .map(|(k, _)| k.clone())
                        .chain(before.keys().filter(|k| !digests.contains_key(*k)).cloned())
                        .collect();
                    if !changed.is_empty() {
                        self.changed_keys
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert((namespace.to_owned(), name.clone()), changed);
                    }
                }
                snapshot.put_secret(namespace, &name, digests);
                drop(snapshot);
                self.set_secret_status(namespace, &name, SecretStatus::Present);
            }
        }
        self.changed.notify_one();
    }

    fn remove(&self, kind: Kind, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        match kind {
            Kind::Deployment => {
                self.snapshot
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove_deployment(namespace, name);
                write(&self.deployments).remove(&key);
            }
            Kind::Service => {
                write(&self.services).remove(&key);
            }
            Kind::Secret => {
                self.snapshot
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove_secret(namespace, name);
                self.set_secret_status(namespace, name, SecretStatus::Missing);
            }
        }
        self.changed.notify_one();
    }

    /// A watch error. A 403 is logged once with the verb and resource that RBAC must allow (a
    /// refused Secret is then unreadable, which admission warns about); anything else is retried
    /// with backoff by the watcher. True when it was a 403.
    fn failed(&self, kind: Kind, namespace: &str, scope: Option<&str>, e: &watcher::Error) -> bool {
        let api = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            | watcher::Error::WatchError(s) => Some(s.as_ref()),
            _ => None,
        };
        if api.is_none_or(|s| s.code != 403) {
            warn!(resource = kind.resource(), %namespace, error = %e, "Watch failed; retrying");
            return false;
        }
        let verb = match e {
            watcher::Error::InitialListFailed(_) => "list",
            _ => "watch",
        };
        if kind == Kind::Secret
            && let Some(name) = scope.and_then(|s| s.strip_prefix("metadata.name="))
        {
            self.set_secret_status(namespace, name, SecretStatus::Unreadable);
            self.changed.notify_one();
        }
        let refusal = Refusal {
            verb: verb.into(),
            resource: kind.resource(),
            scope: scope.map(str::to_owned),
            namespace: namespace.to_owned(),
        };
        let what = refusal.to_string();
        if self.refuse(refusal) {
            warn!(
                forbidden = %what,
                "The apiserver refused a watch: RBAC must allow it. Retried with backoff; \
                 admission answers meanwhile and warns where it matters"
            );
        }
        true
    }
}

fn write(map: &Stored) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(String, String), Arc<str>>> {
    map.write().unwrap_or_else(PoisonError::into_inner)
}

fn keys(map: &Stored, namespace: &str) -> Vec<String> {
    map.read()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .filter(|(ns, _)| ns == namespace)
        .map(|(_, name)| name.clone())
        .collect()
}

/// What the cache keeps of an outpost object: the fields the rules read, as compact JSON.
fn kept(object: &Value) -> Arc<str> {
    Arc::from(serde_json::to_string(&prune(object, &READS)).unwrap_or_default())
}

/// `value` with only what `keep` names: the paths admission's parser builds
/// (`core::admission::prune`), taken from a tree rather than from the bytes. Every container
/// keeps what the outpost container would, a superset of what the rules read.
fn prune(value: &Value, keep: &Keep) -> Value {
    match (keep, value) {
        (Keep::Keys(keys), Value::Object(members)) => Value::Object(
            keys.iter()
                .filter_map(|(key, sub)| Some(((*key).to_owned(), prune(members.get(*key)?, sub))))
                .collect(),
        ),
        (Keep::Each(sub), Value::Array(items)) => {
            Value::Array(items.iter().map(|i| prune(i, sub)).collect())
        }
        (Keep::Containers, Value::Array(items)) => {
            Value::Array(items.iter().map(|i| prune(i, &CONTAINER_READS)).collect())
        }
        // All, Labels, and a shape the rules do not expect: kept as it is, so they see it.
        _ => value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mutate::{ObjectKind, mutate_in};
    use serde_json::json;

    fn deployment(name: &str, outpost: &str) -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "authentik",
                         "labels": {"app.kubernetes.io/managed-by": "goauthentik.io"}},
            "spec": {"selector": {"matchLabels": {
                "app.kubernetes.io/name": "authentik-outpost-proxy",
                "app.kubernetes.io/managed-by": "goauthentik.io",
                "goauthentik.io/outpost-name": outpost, "goauthentik.io/outpost-type": "proxy",
                "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"}},
                "template": {"spec": {"containers": []}}}
        }))
        .unwrap()
    }

    fn goauthentik(data: &Value) -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "goauthentik", "namespace": "authentik"},
            "data": data}))
        .unwrap()
    }

    fn outpost(name: &str) -> Outpost<'_> {
        Outpost {
            name,
            kind: "proxy",
            uuid: "0eecac0797c7443c892505f2f4fe3e47",
        }
    }

    #[test]
    fn a_namespace_whose_deployments_were_never_listed_is_unknown_not_empty() {
        let cache = Cache::default();
        // The Deployment watch was refused: nobody knows, and `auto` keeps every selector.
        assert_eq!(cache.standalone("authentik", &outpost("one")), None);
        cache.relisted(Kind::Deployment, "authentik", None, &BTreeSet::new());
        assert_eq!(cache.standalone("authentik", &outpost("one")), Some(false));
    }

    #[test]
    fn events_and_relists_keep_the_view_current() {
        let cache = Cache::default();
        cache.relisted(Kind::Deployment, "authentik", None, &BTreeSet::new());
        cache.put(Kind::Deployment, "authentik", &deployment("a", "one"));
        cache.put(Kind::Deployment, "authentik", &deployment("b", "two"));
        assert_eq!(cache.standalone("authentik", &outpost("one")), Some(true));
        assert_eq!(cache.standalone("other", &outpost("one")), None);
        cache.remove(Kind::Deployment, "authentik", "a");
        assert_eq!(cache.standalone("authentik", &outpost("one")), Some(false));
        // A re-list drops what is no longer there.
        cache.put(Kind::Deployment, "authentik", &deployment("c", "three"));
        cache.relisted(Kind::Deployment, "authentik", None, &["c".into()].into());
        assert_eq!(cache.standalone("authentik", &outpost("two")), Some(false));
        assert_eq!(cache.standalone("authentik", &outpost("three")), Some(true));
        assert_eq!(cache.counts(), (1, 0, 0));
        assert_eq!(cache.objects().1.len(), 1);
    }

    #[test]
    fn an_object_is_kept_as_what_the_rules_read_and_decides_the_same() {
        let policy = crate::core::policy::Policy::builtin().unwrap();
        let fixture = |name: &str| -> Value {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name);
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let deployment = fixture("public-proxy-deployment.create.json");
        let service = fixture("embedded-proxy-service.create.json");
        let view = Snapshot::of([&deployment], "authentik");
        for (kind, full) in [
            (ObjectKind::Deployment, &deployment),
            (ObjectKind::Service, &service),
        ] {
            let text = kept(full);
            let pruned: Value = serde_json::from_str(&text).unwrap();
            assert!(pruned.pointer("/metadata/managedFields").is_none());
            assert!(pruned.get("status").is_none());
            assert!(text.len() * 2 < full.to_string().len(), "{kind:?}");
            for view in [&view as &dyn View, &crate::core::cluster::Off] {
                assert_eq!(
                    mutate_in(&policy, view, "authentik", kind, &pruned),
                    mutate_in(&policy, view, "authentik", kind, full),
                    "{kind:?}"
                );
            }
        }
    }

    #[test]
    fn secrets_are_kept_as_digests_only() {
        let cache = Cache::default();
        let secret = goauthentik(&json!({"AUTHENTIK_POSTGRESQL__PASSWORD": "aHVudGVyMg=="}));
        cache.put(Kind::Secret, "authentik", &secret);
        let data = cache.secret("authentik", "goauthentik").unwrap();
        assert_eq!(
            data["AUTHENTIK_POSTGRESQL__PASSWORD"],
            crate::core::cluster::digest(b"hunter2")
        );
        assert!(!format!("{cache:?}").contains("hunter2"));
        assert!(!format!("{cache:?}").contains("aHVudGVyMg"));
    }

    #[test]
    fn a_secret_gone_from_a_relist_is_forgotten() {
        let cache = Cache::default();
        let secret = goauthentik(&json!({"K": "eA=="}));
        let scope = Some("metadata.name=goauthentik");
        cache.put(Kind::Secret, "authentik", &secret);
        cache.relisted(
            Kind::Secret,
            "authentik",
            scope,
            &["goauthentik".into()].into(),
        );
        assert_eq!(cache.counts(), (0, 0, 1));
        // Deleted while the watch was down: the next list is empty.
        cache.relisted(Kind::Secret, "authentik", scope, &BTreeSet::new());
        assert_eq!(cache.counts(), (0, 0, 0));
        assert_eq!(
            cache.secret("authentik", "goauthentik"),
            Some(BTreeMap::new())
        );
    }

    #[tokio::test]
    async fn secrets_follow_the_policy_and_readiness_waits_only_for_those_followed() {
        // A client nobody answers: this is the bookkeeping before any list returns, which a real
        // apiserver answers too fast to observe.
        let (mock, _apiserver) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(mock, "default");
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
        let (cache, watchers) = Cache::watching(&client, &["authentik".into()]);
        // Deployments and Services: neither has listed.
        assert_eq!(watchers.len(), 2);
        let tasks: Vec<_> = watchers.into_iter().map(tokio::spawn).collect();
        assert_eq!(cache.follow_secrets(&client, &names(&["a"])).len(), 1);
        assert!(cache.follow_secrets(&client, &names(&["a"])).is_empty());
        assert_eq!(cache.follow_secrets(&client, &names(&["a", "b"])).len(), 1);
        assert_eq!(cache.unsettled().len(), 4);
        assert!(!cache.ready());
        // The policy stops reading `b`: its watcher goes, and readiness no longer waits for it.
        cache.refuse(Refusal {
            verb: "list".into(),
            resource: "secrets",
            scope: Some("metadata.name=b".into()),
            namespace: "authentik".into(),
        });
        assert_eq!(cache.unfollow_secrets(&names(&["a"])), ["b"]);
        assert_eq!(cache.followed_secrets(), names(&["a"]));
        assert_eq!(cache.unsettled().len(), 3);
        assert!(cache.forbidden().is_empty(), "its refusal went with it");
        for t in tasks {
            t.abort();
        }
    }

    #[test]
    fn a_refused_secret_is_unreadable_and_a_refusal_never_takes_readiness() {
        let cache = Cache::default();
        let refused = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            kube::core::Status::failure("forbidden", "Forbidden").with_code(403),
        )));
        assert!(cache.failed(
            Kind::Secret,
            "authentik",
            Some("metadata.name=goauthentk"),
            &refused,
        ));
        assert_eq!(
            cache.secret_status("authentik", "goauthentk"),
            SecretStatus::Unreadable
        );
        assert_eq!(
            cache.forbidden(),
            ["list secrets (metadata.name=goauthentk) in authentik"]
        );
        assert!(
            cache.ready(),
            "a Role's typo must not empty the webhook's endpoints"
        );
        assert!(
            !cache.refuse(Refusal {
                verb: "list".into(),
                resource: "secrets",
                scope: Some("metadata.name=goauthentk".into()),
                namespace: "authentik".into(),
            }),
            "logged once"
        );
    }

    #[test]
    fn a_secret_is_present_missing_or_gone_as_its_watch_lists_it_and_changed_keys_are_named() {
        let cache = Cache::default();
        let scope = Some("metadata.name=goauthentik");
        assert_eq!(
            cache.secret_status("authentik", "goauthentik"),
            SecretStatus::Unknown
        );
        cache.relisted(Kind::Secret, "authentik", scope, &BTreeSet::new());
        assert_eq!(
            cache.secret_status("authentik", "goauthentik"),
            SecretStatus::Missing
        );
        cache.put(
            Kind::Secret,
            "authentik",
            &goauthentik(&json!({"A": "eA==", "B": "eQ=="})),
        );
        assert_eq!(
            cache.secret_status("authentik", "goauthentik"),
            SecretStatus::Present
        );
        assert!(cache.changed_keys("authentik", "goauthentik").is_empty());
        cache.put(
            Kind::Secret,
            "authentik",
            &goauthentik(&json!({"A": "eg==", "C": "eQ=="})),
        );
        assert_eq!(
            cache.changed_keys("authentik", "goauthentik"),
            ["A", "C", "B"]
        );
        cache.remove(Kind::Secret, "authentik", "goauthentik");
        assert_eq!(
            cache.secret_status("authentik", "goauthentik"),
            SecretStatus::Missing
        );
    }
}
