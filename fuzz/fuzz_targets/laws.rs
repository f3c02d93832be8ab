//! The laws of DESIGN §3, asserted on every input the fuzzers reach: the patch applies to the
//! whole object, a second mutation yields nothing, the answer is deterministic, and what the
//! server decides on the pruned object is what the core decides on the whole one.

use outpost_webhook::{
    admission,
    mutate::{ObjectKind, mutate_object},
    policy::Policy,
};
use serde_json::{Value, json};

/// The built-in and the example policy, compiled once.
pub fn policies() -> &'static [Policy] {
    static POLICIES: std::sync::LazyLock<Vec<Policy>> = std::sync::LazyLock::new(|| {
        vec![
            Policy::builtin().unwrap(),
            Policy::from_yaml("example", include_str!("../../deploy/policy.example.yaml")).unwrap(),
        ]
    });
    &POLICIES
}

fn review_of(kind: ObjectKind, object: &Value) -> Vec<u8> {
    let (group, name) = match kind {
        ObjectKind::Service => ("", "Service"),
        ObjectKind::Deployment => ("apps", "Deployment"),
    };
    serde_json::to_vec(
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u", "operation": "CREATE", "object": object,
                    "kind": {"group": group, "version": "v1", "kind": name}}}),
    )
    .unwrap()
}

/// Checks the laws for `object` (the whole object) as `kind`.
pub fn check_object(policy: &Policy, kind: ObjectKind, object: &Value) {
    let outcome = mutate_object(policy, kind, object);
    assert_eq!(
        outcome,
        mutate_object(policy, kind, object),
        "not deterministic"
    );
    for w in &outcome.warnings {
        assert!(w.chars().count() <= 120);
    }
    // Through the server's path (pruned parse), the same decision.
    if let Ok((_, via_review, response)) = admission::review(policy, &review_of(kind, object)) {
        assert_eq!(via_review, outcome, "the pruned object decided differently");
        let _: Value = serde_json::from_slice(&response).unwrap();
    }
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &outcome.ops).expect("the patch must apply");
    let again = mutate_object(policy, kind, &patched);
    assert!(again.ops.is_empty(), "not idempotent: {:?}", again.ops);
}
