//! The laws (docs/design.md), asserted on every input the fuzzers reach: the patch applies to the
//! whole object, a second mutation yields nothing, the answer is deterministic, and what the
//! server decides on the pruned object is what the core decides on the whole one.

use outpost_webhook::core::{
    laws,
    mutate::ObjectKind,
    policy::Policy,
};
use serde_json::Value;

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

/// Checks the laws for `object` (the whole object) as `kind`: the crate's one law checker.
pub fn check_object(policy: &Policy, kind: ObjectKind, object: &Value) {
    if let Err(e) = laws::check(policy, kind, object) {
        panic!("{e}");
    }
}
