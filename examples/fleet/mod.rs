//! A fleet of standalone outposts as the watch cache holds them, for the cluster-view bench
//! (`benches/core.rs`) and the memory example (`examples/cluster_rss.rs`).
//!
//! Outpost 0 is the `public` proxy outpost of `tests/fixtures` unchanged; outpost `i` is the same
//! objects with the name `public` replaced by `o<i>` and a UUID of its own. Each is stored as the
//! apiserver would hold it after this webhook admitted it (the built-in policy applied, with the
//! Secret `goauthentik` in view), with the uid, resourceVersion and status the apiserver adds.
//! No I/O but reading the fixtures.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::path::Path;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret, core::v1::Service};
use outpost_webhook::{
    cluster::Cache,
    core::{
        cluster::Snapshot,
        mutate::{ObjectKind, mutate_in},
        policy::Policy,
    },
};
use serde_json::{Value, json};

pub const NAMESPACE: &str = "authentik";
const UUID: &str = "6f2d8a41c3b94e7d8b5a0c9e1f3d7b26";

/// The outpost Deployments and Services, and the Secret the policy reads.
pub struct Fleet {
    pub deployments: Vec<Value>,
    pub services: Vec<Value>,
    pub secret: Value,
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

/// The `i`th outpost's copy of a fixture.
fn renamed(text: &str, i: usize) -> Value {
    let text = if i == 0 {
        text.to_owned()
    } else {
        text.replace(UUID, &format!("{i:032x}"))
            .replace("public", &format!("o{i:04}"))
    };
    let mut object: Value = serde_json::from_str(&text).unwrap();
    let meta = &mut object["metadata"];
    meta["uid"] = json!(format!("4f3c2b1a-0000-4000-8000-{i:012x}"));
    meta["resourceVersion"] = json!(format!("{}", 100_000 + i));
    meta["creationTimestamp"] = json!("2026-03-14T11:20:03Z");
    object
}

fn admitted(policy: &Policy, view: &Snapshot, kind: ObjectKind, mut object: Value) -> Value {
    let outcome = mutate_in(policy, view, NAMESPACE, kind, &object);
    json_patch::patch(&mut object, &outcome.ops).unwrap();
    object
}

/// `n` outposts, each a Deployment and a Service, stored as admitted by the built-in policy.
#[must_use]
pub fn fleet(n: usize) -> Fleet {
    let policy = Policy::builtin().unwrap();
    let data: serde_json::Map<String, Value> = ["HOST", "PORT", "USER", "PASSWORD", "NAME"]
        .iter()
        .map(|k| {
            (
                format!("AUTHENTIK_POSTGRESQL__{k}"),
                json!("c2VjcmV0LXZhbHVl"),
            )
        })
        .chain([("AUTHENTIK_SECRET_KEY".to_owned(), json!("a2V5LWtleS1rZXk="))])
        .collect();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "goauthentik", "namespace": NAMESPACE,
                     "uid": "4f3c2b1a-0000-4000-8000-ffffffffffff", "resourceVersion": "99"},
        "data": data});
    let (deployment, service) = (
        fixture("public-proxy-deployment.create.json"),
        fixture("public-proxy-service.create.json"),
    );
    let raw: Vec<Value> = (0..n).map(|i| renamed(&deployment, i)).collect();
    let view = Snapshot::of(raw.iter().chain([&secret]), NAMESPACE);
    let deployments = raw
        .into_iter()
        .map(|mut d| {
            d["metadata"]["generation"] = json!(3);
            d["status"] = json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": 2, "availableReplicas": 2, "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability.",
                 "lastUpdateTime": "2026-03-14T11:21:03Z", "lastTransitionTime": "2026-03-14T11:21:03Z"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": "ReplicaSet \"ak-outpost-public-7c9f8d6b5d\" has successfully progressed.",
                 "lastUpdateTime": "2026-03-14T11:21:03Z", "lastTransitionTime": "2026-03-14T11:20:03Z"}]});
            admitted(&policy, &view, ObjectKind::Deployment, d)
        })
        .collect();
    let services = (0..n)
        .map(|i| admitted(&policy, &view, ObjectKind::Service, renamed(&service, i)))
        .collect();
    Fleet {
        deployments,
        services,
        secret,
    }
}

/// A cache holding `fleet`, filled as the watchers fill it (typed objects from the list).
#[must_use]
pub fn cache(fleet: &Fleet) -> Cache {
    let cache = Cache::default();
    let mut names = std::collections::BTreeSet::new();
    for d in &fleet.deployments {
        let d: Deployment = serde_json::from_value(d.clone()).unwrap();
        names.insert(d.metadata.name.clone().unwrap_or_default());
        cache.apply::<Deployment>(NAMESPACE, &d);
    }
    cache.list_done::<Deployment>(NAMESPACE, None, &names);
    for s in &fleet.services {
        cache.apply::<Service>(NAMESPACE, &serde_json::from_value(s.clone()).unwrap());
    }
    cache.apply::<Secret>(
        NAMESPACE,
        &serde_json::from_value(fleet.secret.clone()).unwrap(),
    );
    cache
}
