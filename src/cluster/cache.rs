//! The watch cache: outpost Deployments and Services (label
//! `app.kubernetes.io/managed-by=goauthentik.io`) and the Secrets the policy reads (by name, with a
//! `metadata.name` field selector, so RBAC can name them), in each watched namespace.
//!
//! Network I/O: kube-runtime watchers, list then watch, re-listing with backoff when a watch
//! breaks. Admission reads only this cache, never the API, and keeps answering from the last view
//! when the apiserver goes away.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret, core::v1::Service};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Serialize;
use serde_json::Value;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    core::{
        cluster::{Snapshot, View, deployment_selector, secret_digests},
        policy::Outpost,
    },
    k8s::{MANAGED_BY, MANAGED_BY_AUTHENTIK},
};

/// What the watchers have seen, and whether they have all listed once.
#[derive(Debug, Default)]
pub struct Cache {
    snapshot: RwLock<Snapshot>,
    services: RwLock<BTreeMap<(String, String), Value>>,
    deployments: RwLock<BTreeMap<(String, String), Value>>,
    /// Watchers that have not finished their first list.
    unsynced: AtomicUsize,
    /// `verb resource in namespace` that the apiserver refused (403).
    forbidden: Mutex<BTreeSet<String>>,
    /// Woken on every change, for the reconciler.
    pub changed: Notify,
}

impl View for Cache {
    fn standalone(&self, namespace: &str, outpost: &Outpost<'_>) -> Option<bool> {
        self.read_snapshot().standalone(namespace, outpost)
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, [u8; 32]>> {
        self.read_snapshot().secret(namespace, name)
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
    fn resource(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::Service => "services",
            Self::Secret => "secrets",
        }
    }
}

impl Cache {
    /// Starts a watcher per kind and namespace, and one per Secret name and namespace.
    #[must_use]
    pub fn spawn(
        client: &Client,
        namespaces: &[String],
        secrets: &BTreeSet<String>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let cache = Arc::new(Self::default());
        let outposts =
            watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_AUTHENTIK}"));
        let mut tasks = Vec::new();
        for ns in namespaces {
            tasks.push(cache.follow(
                Api::<Deployment>::namespaced(client.clone(), ns),
                outposts.clone(),
                Kind::Deployment,
                ns,
            ));
            tasks.push(cache.follow(
                Api::<Service>::namespaced(client.clone(), ns),
                outposts.clone(),
                Kind::Service,
                ns,
            ));
            for name in secrets {
                let by_name = watcher::Config::default().fields(&format!("metadata.name={name}"));
                tasks.push(cache.follow(
                    Api::<Secret>::namespaced(client.clone(), ns),
                    by_name,
                    Kind::Secret,
                    ns,
                ));
            }
        }
        (cache, tasks)
    }

    /// True once every watcher has listed once and none was refused.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.unsynced.load(Ordering::Relaxed) == 0 && self.lock_forbidden().is_empty()
    }

    /// What the apiserver refused, as `verb resource in namespace`.
    #[must_use]
    pub fn forbidden(&self) -> Vec<String> {
        self.lock_forbidden().iter().cloned().collect()
    }

    /// The outpost Services and Deployments as stored, for the reconciler.
    #[must_use]
    pub fn objects(&self) -> (Vec<Value>, Vec<Value>) {
        let read = |m: &RwLock<BTreeMap<(String, String), Value>>| {
            m.read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect()
        };
        (read(&self.services), read(&self.deployments))
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

    fn lock_forbidden(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.forbidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn follow<K>(
        self: &Arc<Self>,
        api: Api<K>,
        config: watcher::Config,
        kind: Kind,
        namespace: &str,
    ) -> JoinHandle<()>
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
        self.unsynced.fetch_add(1, Ordering::Relaxed);
        let cache = Arc::clone(self);
        let namespace = namespace.to_owned();
        let scope = config.field_selector.clone();
        tokio::spawn(async move {
            let mut synced = false;
            let mut buffer = Vec::new();
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => buffer.clear(),
                    Ok(watcher::Event::InitApply(object)) => buffer.push(object),
                    Ok(watcher::Event::InitDone) => {
                        cache.replace(kind, &namespace, &std::mem::take(&mut buffer));
                        if !synced {
                            synced = true;
                            cache.unsynced.fetch_sub(1, Ordering::Relaxed);
                            info!(resource = kind.resource(), %namespace, "Watch cache synced");
                        }
                        cache.allowed(kind, &namespace);
                    }
                    Ok(watcher::Event::Apply(object)) => cache.put(kind, &namespace, &object),
                    Ok(watcher::Event::Delete(object)) => {
                        cache.remove(kind, &namespace, &object.name_any());
                    }
                    Err(e) => cache.failed(kind, &namespace, scope.as_deref(), &e),
                }
            }
        })
    }

    /// Replaces what one watcher holds with a fresh list.
    fn replace<K: Resource + Serialize>(&self, kind: Kind, namespace: &str, objects: &[K]) {
        let names: BTreeSet<String> = objects.iter().map(kube::ResourceExt::name_any).collect();
        let held: Vec<String> = match kind {
            Kind::Service => keys(&self.services, namespace),
            Kind::Deployment => keys(&self.deployments, namespace),
            // One watcher per Secret name: what it lists is all there is of that name.
            Kind::Secret => Vec::new(),
        };
        for gone in held.iter().filter(|n| !names.contains(*n)) {
            self.remove(kind, namespace, gone);
        }
        for object in objects {
            self.put(kind, namespace, object);
        }
        self.changed.notify_one();
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
                write(&self.deployments).insert(key, value);
            }
            Kind::Service => {
                drop(snapshot);
                write(&self.services).insert(key, value);
            }
            Kind::Secret => snapshot.put_secret(namespace, &name, secret_digests(&value)),
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
            Kind::Secret => self
                .snapshot
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove_secret(namespace, name),
        }
        self.changed.notify_one();
    }

    /// A watch error. A 403 is logged once with the verb and resource that RBAC must allow, and
    /// keeps readiness false; anything else is retried with backoff by the watcher.
    fn failed(&self, kind: Kind, namespace: &str, scope: Option<&str>, e: &watcher::Error) {
        let api = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            | watcher::Error::WatchError(s) => Some(s.as_ref()),
            _ => None,
        };
        if api.is_some_and(|s| s.code == 403) {
            let verb = match e {
                watcher::Error::InitialListFailed(_) => "list",
                _ => "watch",
            };
            let what = match scope {
                Some(s) => format!("{verb} {} ({s}) in {namespace}", kind.resource()),
                None => format!("{verb} {} in {namespace}", kind.resource()),
            };
            if self.lock_forbidden().insert(what.clone()) {
                warn!(forbidden = %what, "The apiserver refused a watch: RBAC must allow it");
            }
        } else {
            warn!(resource = kind.resource(), %namespace, error = %e, "Watch failed; retrying");
        }
    }

    /// A watcher listed successfully: whatever it was refused before is allowed now.
    fn allowed(&self, kind: Kind, namespace: &str) {
        let suffix = format!(" in {namespace}");
        self.lock_forbidden()
            .retain(|w| !(w.contains(kind.resource()) && w.ends_with(&suffix)));
    }
}

fn write(
    map: &RwLock<BTreeMap<(String, String), Value>>,
) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(String, String), Value>> {
    map.write().unwrap_or_else(PoisonError::into_inner)
}

fn keys(map: &RwLock<BTreeMap<(String, String), Value>>, namespace: &str) -> Vec<String> {
    map.read()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .filter(|(ns, _)| ns == namespace)
        .map(|(_, name)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn outpost(name: &str) -> Outpost<'_> {
        Outpost {
            name,
            kind: "proxy",
            uuid: "0eecac0797c7443c892505f2f4fe3e47",
        }
    }

    #[test]
    fn events_and_relists_keep_the_view_current() {
        let cache = Cache::default();
        cache.put(Kind::Deployment, "authentik", &deployment("a", "one"));
        cache.put(Kind::Deployment, "authentik", &deployment("b", "two"));
        assert_eq!(cache.standalone("authentik", &outpost("one")), Some(true));
        assert_eq!(cache.standalone("other", &outpost("one")), Some(false));
        cache.remove(Kind::Deployment, "authentik", "a");
        assert_eq!(cache.standalone("authentik", &outpost("one")), Some(false));
        // A re-list drops what is no longer there.
        cache.replace(Kind::Deployment, "authentik", &[deployment("c", "three")]);
        assert_eq!(cache.standalone("authentik", &outpost("two")), Some(false));
        assert_eq!(cache.standalone("authentik", &outpost("three")), Some(true));
        assert_eq!(cache.counts(), (1, 0, 0));
        assert_eq!(cache.objects().1.len(), 1);
    }

    #[test]
    fn secrets_are_kept_as_digests_only() {
        let cache = Cache::default();
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "goauthentik", "namespace": "authentik"},
            "data": {"AUTHENTIK_POSTGRESQL__PASSWORD": "aHVudGVyMg=="}}))
        .unwrap();
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
    fn a_refused_watch_keeps_readiness_false_until_it_lists() {
        let cache = Cache::default();
        let refused = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(
            kube::core::Status::failure("forbidden", "Forbidden").with_code(403),
        )));
        cache.failed(
            Kind::Secret,
            "authentik",
            Some("metadata.name=goauthentik"),
            &refused,
        );
        assert!(!cache.ready());
        assert_eq!(
            cache.forbidden(),
            ["list secrets (metadata.name=goauthentik) in authentik"]
        );
        cache.allowed(Kind::Secret, "authentik");
        assert!(cache.ready());
    }
}
