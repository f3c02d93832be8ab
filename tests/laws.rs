//! Property tests of the laws (docs/design.md, `core::laws`) over generated outpost Services and Deployments:
//! random presence or absence of maps, env lists, containers and volumes, with names that
//! collide with the policy's and values that are wrong.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use outpost_webhook::core::{laws, mutate::ObjectKind, policy::Policy};
use proptest::{collection::vec, option, prelude::*};
use serde_json::{Map, Value, json};

fn policies() -> Vec<Policy> {
    let example = include_str!("../deploy/policy.example.yaml");
    vec![
        Policy::builtin().unwrap(),
        Policy::from_yaml("deploy/policy.example.yaml", example).unwrap(),
    ]
}

/// A map that is absent, null, empty or populated.
fn maybe_map(
    entries: impl Strategy<Value = Map<String, Value>>,
) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        entries.prop_map(|m| Some(Value::Object(m))),
    ]
}

fn string_map(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Map<String, Value>> {
    vec(
        (prop::sample::select(keys), prop::sample::select(values)),
        0..4,
    )
    .prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| (k.to_owned(), Value::from(v)))
            .collect()
    })
}

fn labels() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(&["proxy", "ldap", "radius", "rac"][..]),
    )
        .prop_map(|(managed, name, kind, uuid, t)| {
            let mut m = Map::new();
            m.insert("app.kubernetes.io/instance".into(), "o".into());
            if managed {
                m.insert(
                    "app.kubernetes.io/managed-by".into(),
                    "goauthentik.io".into(),
                );
            }
            if name {
                m.insert("goauthentik.io/outpost-name".into(), "o".into());
            }
            if kind {
                m.insert("goauthentik.io/outpost-type".into(), t.into());
            }
            if uuid {
                m.insert(
                    "goauthentik.io/outpost-uuid".into(),
                    "0eecac0797c7443c892505f2f4fe3e47".into(),
                );
            }
            Value::Object(m)
        })
}

const ENV_NAMES: &[&str] = &[
    "AUTHENTIK_HOST",
    "AUTHENTIK_POSTGRESQL__HOST",
    "AUTHENTIK_POSTGRESQL__PORT",
    "AUTHENTIK_POSTGRESQL__PASSWORD",
    "OTHER",
];

fn env_entry() -> impl Strategy<Value = Value> {
    (prop::sample::select(ENV_NAMES), 0..3u8).prop_map(|(name, form)| match form {
        0 => json!({"name": name, "value": "literal"}),
        1 => json!({"name": name, "valueFrom": {"secretKeyRef": {"name": "goauthentik", "key": name}}}),
        _ => json!({"name": name, "valueFrom": {"secretKeyRef": {"name": "elsewhere", "key": "k"}}}),
    })
}

fn maybe_list(item: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        vec(item, 0..6).prop_map(|v| Some(Value::Array(v)))
    ]
}

fn container() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&["proxy", "ldap", "sidecar", "rac"][..]),
        maybe_list(env_entry()),
        maybe_list(
            (prop::sample::select(&["dshm", "tmp"][..]), prop::sample::select(&["/dev/shm", "/tmp"][..]))
                .prop_map(|(n, p)| json!({"name": n, "mountPath": p})),
        ),
        option::of(prop_oneof![
            Just(json!({})),
            Just(json!({"limits": {"memory": "2560Mi"}, "requests": {"cpu": "0.1", "memory": "128Mi"}})),
            Just(json!({"limits": {"memory": "1Gi", "cpu": "1"}})),
        ]),
        option::of(prop_oneof![
            Just(json!({"httpGet": {"path": "/outpost.goauthentik.io/ping", "port": 9000, "scheme": "HTTP"},
                "initialDelaySeconds": 3, "periodSeconds": 3, "failureThreshold": 2, "timeoutSeconds": 1})),
            Just(json!({"tcpSocket": {"port": 3389}})),
        ]),
    )
        .prop_map(|(name, env, mounts, resources, probe)| {
            let mut c = Map::new();
            c.insert("name".into(), name.into());
            c.insert("image".into(), "ghcr.io/goauthentik/proxy:2026.2.4".into());
            for (k, v) in [("env", env), ("volumeMounts", mounts), ("resources", resources), ("readinessProbe", probe)] {
                if let Some(v) = v {
                    c.insert(k.into(), v);
                }
            }
            Value::Object(c)
        })
}

fn deployment() -> impl Strategy<Value = Value> {
    (
        labels(),
        maybe_map(string_map(&["app", "app.kubernetes.io/component", "example.com/x"], &["server", "a", "b"])),
        maybe_map(string_map(&["outpost-webhook/config-checksum", "kubectl.kubernetes.io/restartedAt"], &["old", "2026-01-01T00:00:00Z"])),
        any::<bool>(),
        vec(container(), 0..4),
        maybe_list(
            (prop::sample::select(&["dshm", "config"][..]), any::<bool>()).prop_map(|(n, mem)| {
                if mem {
                    json!({"name": n, "emptyDir": {"medium": "Memory", "sizeLimit": "2048Mi"}})
                } else {
                    json!({"name": n, "emptyDir": {}})
                }
            }),
        ),
        option::of(0..5i32),
        option::of(prop_oneof![
            Just(json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})),
            Just(json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})),
            Just(json!({"type": "Recreate"})),
        ]),
    )
        .prop_map(|(labels, pod_labels, pod_annotations, has_meta, containers, volumes, replicas, strategy)| {
            let mut pod = Map::new();
            pod.insert("containers".into(), Value::Array(containers));
            if let Some(v) = volumes {
                pod.insert("volumes".into(), v);
            }
            let mut template = Map::new();
            if has_meta {
                let mut meta = Map::new();
                if let Some(l) = pod_labels {
                    meta.insert("labels".into(), l);
                }
                if let Some(a) = pod_annotations {
                    meta.insert("annotations".into(), a);
                }
                template.insert("metadata".into(), Value::Object(meta));
            }
            template.insert("spec".into(), Value::Object(pod));
            let mut spec = Map::new();
            spec.insert("selector".into(), json!({"matchLabels": {"app": "server"}}));
            spec.insert("template".into(), Value::Object(template));
            if let Some(r) = replicas {
                spec.insert("replicas".into(), r.into());
            }
            if let Some(s) = strategy {
                spec.insert("strategy".into(), s);
            }
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels},
                   "spec": spec})
        })
}

fn service() -> impl Strategy<Value = Value> {
    (
        labels(),
        maybe_map(string_map(
            &[
                "app.kubernetes.io/name",
                "app.kubernetes.io/component",
                "goauthentik.io/outpost-uuid",
            ],
            &["authentik", "server", "authentik-outpost-proxy"],
        )),
        prop::sample::select(&["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"][..]),
    )
        .prop_map(|(labels, selector, kind)| {
            let mut spec = Map::new();
            spec.insert("type".into(), kind.into());
            spec.insert(
                "ports".into(),
                json!([{"name": "http", "port": 9000, "targetPort": 9000}]),
            );
            if let Some(s) = selector {
                spec.insert("selector".into(), s);
            }
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "ak-outpost-o", "labels": labels}, "spec": spec})
        })
}

/// The laws, for one object under one policy: the one checker the golden tests and the fuzz
/// targets use too.
fn check(policy: &Policy, kind: ObjectKind, object: &Value) -> Result<(), TestCaseError> {
    laws::check(policy, kind, object)
        .map(drop)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{object}")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn deployments_obey_the_laws(object in deployment()) {
        for policy in policies() {
            check(&policy, ObjectKind::Deployment, &object)?;
        }
    }

    #[test]
    fn services_obey_the_laws(object in service()) {
        for policy in policies() {
            check(&policy, ObjectKind::Service, &object)?;
        }
    }
}
