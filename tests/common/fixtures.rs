//! Reviews to send: the golden cases and the shared fixtures.

use std::path::Path;

use serde_json::Value;

/// Every golden case's review, for driving the server with realistic traffic.
pub fn golden_reviews() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("review.json").is_file() && !p.join("policy.yaml").exists())
        .map(|p| {
            let text = std::fs::read_to_string(p.join("review.json")).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One golden case's review, by name.
pub fn golden_review(name: &str) -> Value {
    golden_reviews()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
        .1
}

/// The objects of the shared fixtures (`tests/fixtures`, copied from `../shared/fixtures`), by
/// file name; the whole-review fixture contributes its `request.object`.
pub fn fixture_objects() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains("kubernetes-json-patches"))
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let object = if v["kind"] == "AdmissionReview" {
                v["request"]["object"].clone()
            } else {
                v
            };
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                object,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The review the apiserver sends for `operation` on `object` (with `old` on UPDATE).
pub fn review_for(uid: &str, operation: &str, object: &Value, old: Option<&Value>) -> Value {
    let kind = object["kind"].as_str().unwrap();
    let (group, resource) = if kind == "Deployment" {
        ("apps", "deployments")
    } else {
        ("", "services")
    };
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": resource},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:authentik:authentik"},
            "object": object,
            "oldObject": old,
            "dryRun": false,
        }
    })
}
