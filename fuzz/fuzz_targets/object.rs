//! Structure-aware: arbitrary JSON objects shaped like Services and Deployments, built from the
//! keys and values the rules care about, so the fuzzer spends its time on the interesting
//! shapes (absent, null, wrong-typed and duplicated members) rather than on JSON syntax.
#![no_main]

mod laws;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use outpost_webhook::core::mutate::ObjectKind;
use serde_json::{Map, Value};

const KEYS: &[&str] = &[
    "metadata",
    "labels",
    "annotations",
    "name",
    "spec",
    "template",
    "containers",
    "env",
    "value",
    "valueFrom",
    "secretKeyRef",
    "key",
    "volumes",
    "volumeMounts",
    "mountPath",
    "resources",
    "limits",
    "requests",
    "memory",
    "cpu",
    "readinessProbe",
    "httpGet",
    "path",
    "port",
    "strategy",
    "type",
    "rollingUpdate",
    "maxSurge",
    "maxUnavailable",
    "replicas",
    "selector",
    "matchLabels",
    "emptyDir",
    "medium",
    "sizeLimit",
    "ports",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "goauthentik.io/outpost-name",
    "goauthentik.io/outpost-type",
    "goauthentik.io/outpost-uuid",
    "outpost-webhook/config-checksum",
    "AUTHENTIK_POSTGRESQL__HOST",
    "a~b/c",
];

const STRINGS: &[&str] = &[
    "goauthentik.io",
    "proxy",
    "ldap",
    "radius",
    "rac",
    "server",
    "authentik",
    "authentik-outpost-proxy",
    "0eecac0797c7443c892505f2f4fe3e47",
    "goauthentik",
    "AUTHENTIK_POSTGRESQL__HOST",
    "AUTHENTIK_POSTGRESQL__PORT",
    "dshm",
    "/dev/shm",
    "Memory",
    "2Gi",
    "2048Mi",
    "128Mi",
    "100m",
    "0.1",
    "2560Mi",
    "RollingUpdate",
    "Recreate",
    "ExternalName",
    "/outpost.goauthentik.io/ping",
    "",
    "x",
];

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let choice = if depth == 0 {
        u.int_in_range(0..=4)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.int_in_range(-2i64..=5)?),
        3 | 4 => Value::from(*u.choose(STRINGS)?),
        5 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => {
            let n = u.int_in_range(0..=6)?;
            let mut m = Map::new();
            for _ in 0..n {
                m.insert((*u.choose(KEYS)?).to_owned(), value(u, depth - 1)?);
            }
            Value::Object(m)
        }
    })
}

/// An object with outpost labels (most of the time) and an arbitrary rest.
fn object(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut root = match value(u, 6)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    if u.ratio(7, 8)? {
        let mut labels = Map::new();
        for (k, v) in [
            ("app.kubernetes.io/managed-by", "goauthentik.io"),
            ("goauthentik.io/outpost-name", "o"),
            (
                "goauthentik.io/outpost-uuid",
                "0eecac0797c7443c892505f2f4fe3e47",
            ),
        ] {
            if u.ratio(15, 16)? {
                labels.insert(k.into(), v.into());
            }
        }
        labels.insert(
            "goauthentik.io/outpost-type".into(),
            (*u.choose(&["proxy", "ldap", "rac"])?).into(),
        );
        let meta = root
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(meta) = meta {
            meta.insert("labels".into(), Value::Object(labels));
        }
    }
    Ok(Value::Object(root))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(object) = object(&mut u) else { return };
    let kind = if u.arbitrary::<bool>().unwrap_or(false) {
        ObjectKind::Service
    } else {
        ObjectKind::Deployment
    };
    for policy in laws::policies() {
        laws::check_object(policy, kind, &object);
    }
});
