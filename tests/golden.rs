//! Golden cases: `tests/golden/<case>/review.json` in; `patch.json`, `patched.json` and
//! `warnings.json` are what the webhook must answer. A case may carry `policy.yaml` (often a
//! link to a shipped policy); otherwise the built-in policy applies.
//!
//! Regenerate the expected files with `UPDATE_GOLDEN=1 cargo test --test golden`, then review the
//! diff. CI never regenerates: a missing or different file fails.
//!
//! Every case is also checked against the laws (docs/design.md) by the crate's one checker,
//! `core::laws`: the answer is read as the apiserver reads it, the patch applies, the result reads
//! as the typed Kubernetes object, mutating the result yields no operations, and the answer is
//! byte-for-byte deterministic.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::{
    fs,
    path::{Path, PathBuf},
};

use outpost_webhook::core::{
    admission,
    cluster::{Off, Snapshot, View},
    laws,
    mutate::ObjectKind,
    policy::Policy,
};
use serde_json::{Value, json};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("review.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 20,
        "expected the golden cases under {}",
        root.display()
    );
    dirs
}

fn policy_for(case: &Path) -> Policy {
    let p = case.join("policy.yaml");
    if p.exists() {
        Policy::from_bytes(&p.display().to_string(), &fs::read(&p).unwrap()).unwrap()
    } else {
        Policy::builtin().unwrap()
    }
}

/// The answer's bytes, and what the apiserver makes of them.
struct Answered {
    applied: laws::Applied,
    bytes: Vec<u8>,
}

/// The cluster a case sees: the objects of its `cluster.json`, or no view at all.
fn view_for(case: &Path) -> Box<dyn View> {
    match fs::read_to_string(case.join("cluster.json")) {
        Ok(text) => {
            let objects: Vec<Value> = serde_json::from_str(&text).unwrap();
            Box::new(Snapshot::of(&objects, "authentik"))
        }
        Err(_) => Box::new(Off),
    }
}

fn answer(policy: &Policy, view: &dyn View, review: &Value) -> Answered {
    let body = serde_json::to_vec(review).unwrap();
    let (_, _, bytes) = admission::review_with(policy, view, &body).unwrap();
    let applied = laws::apply_response(review, &bytes).unwrap_or_else(|e| panic!("{e}"));
    Answered { applied, bytes }
}

fn check_file(case: &Path, name: &str, actual: &Value, failures: &mut Vec<String>) {
    let path = case.join(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "UPDATE_GOLDEN is for people, never for CI"
        );
        fs::write(&path, &text).unwrap();
        return;
    }
    match fs::read_to_string(&path) {
        Ok(expected) if expected == text => {}
        Ok(_) => failures.push(format!(
            "{} differs; got:\n{text}\n(re-run with UPDATE_GOLDEN=1 if the change is intended)",
            path.display()
        )),
        Err(_) => failures.push(format!(
            "{} is missing: run UPDATE_GOLDEN=1 cargo test --test golden",
            path.display()
        )),
    }
}

fn load(case: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(case.join("review.json")).unwrap()).unwrap()
}

#[test]
fn every_golden_case_matches_and_obeys_the_laws() {
    let mut failures = Vec::new();
    for case in cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let policy = policy_for(&case);
        let view = view_for(&case);
        let review = load(&case);
        let first = answer(&policy, view.as_ref(), &review);
        let a = &first.applied;
        check_file(&case, "patch.json", &a.patch, &mut failures);
        check_file(&case, "patched.json", &a.patched, &mut failures);
        check_file(&case, "warnings.json", &a.warnings, &mut failures);

        // Deterministic to the byte, through the envelope.
        assert_eq!(
            first.bytes,
            answer(&policy, view.as_ref(), &review).bytes,
            "{name}"
        );

        // Every law, on the object the review carries.
        let request = &review["request"];
        let kind = ObjectKind::from_gvk(
            request["kind"]["group"].as_str().unwrap_or_default(),
            request["kind"]["version"].as_str().unwrap_or_default(),
            request["kind"]["kind"].as_str().unwrap_or_default(),
        );
        let whole_object = request["operation"] != "DELETE" && request["subResource"].is_null();
        if let (Some(kind), true, Some(object)) =
            (kind, whole_object, request["object"].as_object())
        {
            let checked =
                laws::check_in(&policy, view.as_ref(), kind, &Value::Object(object.clone()))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(checked.patched, a.patched, "{name}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn patched(case: &str) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case);
    answer(&policy_for(&dir), view_for(&dir).as_ref(), &load(&dir))
        .applied
        .patched
}

#[test]
fn controller_repatch_converges_to_what_create_stored() {
    assert_eq!(
        patched("embedded-deployment-update-controller-repatch"),
        patched("embedded-deployment-create")
    );
}

#[test]
fn union_selector_update_converges_to_what_create_stored() {
    assert_eq!(
        patched("embedded-service-update-union-selector")["spec"]["selector"],
        patched("embedded-service-create-standalone")["spec"]["selector"]
    );
}

#[test]
fn apiserver_defaults_do_not_trigger_a_repatch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/example-policy-deployment-update-apiserver-defaults");
    let a = answer(&policy_for(&dir), view_for(&dir).as_ref(), &load(&dir)).applied;
    // Only the controller's replica reset is undone; the defaulted probe is left alone.
    assert_eq!(
        a.patch,
        json!([{"op": "replace", "path": "/spec/replicas", "value": 2}])
    );
}

#[test]
fn the_shared_fixtures_obey_the_laws() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let policy = Policy::builtin().unwrap();
    // The fixtures are one cluster: the embedded outpost runs as its own Deployment there.
    let objects: Vec<Value> = common_objects(&dir);
    let view = Snapshot::of(&objects, "authentik");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.extension().is_none_or(|e| e != "json") || name.contains("kubernetes-json-patches")
        {
            continue;
        }
        let doc: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let review = if doc["kind"] == "AdmissionReview" {
            doc
        } else {
            let kind = doc["kind"].as_str().unwrap();
            let group = if kind == "Deployment" { "apps" } else { "" };
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": name, "operation": "CREATE", "object": doc,
                "kind": {"group": group, "version": "v1", "kind": kind}}})
        };
        let first = answer(&policy, &view, &review).applied;
        let kind = ObjectKind::from_gvk(
            review["request"]["kind"]["group"].as_str().unwrap(),
            "v1",
            review["request"]["kind"]["kind"].as_str().unwrap(),
        )
        .unwrap();
        laws::check_in(&policy, &view, kind, &review["request"]["object"])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name.starts_with("unrelated-") || name.starts_with("public-proxy-service") {
            assert_eq!(first.patch, json!([]), "{name} must be left alone");
        } else {
            assert_ne!(first.patch, json!([]), "{name} must be fixed");
        }
        seen += 1;
    }
    assert_eq!(seen, 7, "read {seen} fixtures from {}", dir.display());
}

/// The objects of the fixture files; a review contributes its object.
fn common_objects(dir: &Path) -> Vec<Value> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains("kubernetes-json-patches"))
        .map(|p| {
            let v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
            if v["kind"] == "AdmissionReview" {
                v["request"]["object"].clone()
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn the_fixture_copies_match_shared_when_it_is_beside_the_repository() {
    // CI checks out ../shared beside the repository; a user's clone may not have it.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let Ok(entries) = fs::read_dir(&shared) else {
        return;
    };
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for entry in entries {
        let path = entry.unwrap().path();
        let copy = ours.join(path.file_name().unwrap());
        if copy.exists() {
            assert_eq!(
                fs::read(&path).unwrap(),
                fs::read(&copy).unwrap(),
                "{} drifted",
                copy.display()
            );
        }
    }
}
