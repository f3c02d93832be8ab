//! The config checksum: hex SHA-256 of the canonical JSON of what the policy puts into the pod
//! template. Pure.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{DeploymentFix, Keyed};

/// Hex SHA-256 of the canonical JSON of what the policy puts into the pod template.
///
/// Replicas and the rollout strategy are left out on purpose: changing them scales or changes how
/// the next rollout proceeds, and must not by itself restart every outpost pod.
pub(super) fn of(fix: &DeploymentFix) -> String {
    let keyed = |list: &[Keyed]| Value::Array(list.iter().map(|k| k.value.clone()).collect());
    let labels = |m: &BTreeMap<String, String>| {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    let mut doc = serde_json::Map::new();
    doc.insert("env".into(), keyed(&fix.env));
    doc.insert("volumes".into(), keyed(&fix.volumes));
    doc.insert("volumeMounts".into(), keyed(&fix.volume_mounts));
    doc.insert("podLabels".into(), labels(&fix.pod_labels));
    doc.insert("podAnnotations".into(), labels(&fix.pod_annotations));
    doc.insert(
        "resources".into(),
        fix.resources.clone().unwrap_or(Value::Null),
    );
    doc.insert(
        "readinessProbe".into(),
        fix.readiness_probe.clone().unwrap_or(Value::Null),
    );
    let mut canonical = String::new();
    write_canonical(&mut canonical, &Value::Object(doc));
    let digest = Sha256::digest(canonical.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// JSON with object keys sorted at every level, whatever map type `serde_json` was built with.
fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(out, v);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
