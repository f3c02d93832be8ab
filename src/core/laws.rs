//! The laws every answer obeys, checked in one place: the golden tests, the property tests and
//! the fuzz targets all call [`check`], and everything that reads an answer off the wire calls
//! [`apply_response`], as the apiserver would.
//!
//! Pure: no I/O. The laws (docs/design.md): the patch applies to the object it was made for; a
//! second mutation yields nothing (idempotent); the same input gives the same answer
//! (deterministic); only `add` and `replace`, never a Deployment's immutable `spec.selector` nor
//! any ports; warnings fit what kubectl prints; and the server, which reads a pruned object,
//! decides exactly what the core decides on the whole one.

use base64::Engine as _;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use serde_json::{Value, json};

use super::{
    admission,
    cluster::{Off, View},
    mutate::{MAX_WARNING_CHARS, ObjectKind, Outcome, Verdict, mutate_in},
    policy::Policy,
};

/// A law that does not hold, with what showed it.
#[derive(Debug, thiserror::Error)]
#[error("{law}: {detail}")]
pub struct Broken {
    pub law: &'static str,
    pub detail: String,
}

fn broken(law: &'static str, detail: impl Into<String>) -> Broken {
    Broken {
        law,
        detail: detail.into(),
    }
}

/// An object that obeys the laws: the core's outcome and the object once patched.
#[derive(Debug, Clone)]
pub struct Checked {
    pub outcome: Outcome,
    pub patched: Value,
}

/// Checks every law for the whole `object` as `kind` under `policy`.
///
/// # Errors
/// The first law that does not hold.
pub fn check(policy: &Policy, kind: ObjectKind, object: &Value) -> Result<Checked, Broken> {
    check_in(policy, &Off, kind, object)
}

/// As [`check`], given what `view` knows of the cluster; the namespace is the object's own.
///
/// # Errors
/// The first law that does not hold.
pub fn check_in(
    policy: &Policy,
    view: &dyn View,
    kind: ObjectKind,
    object: &Value,
) -> Result<Checked, Broken> {
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let decide = || mutate_in(policy, view, namespace, kind, object);
    let outcome = decide();
    if outcome != decide() {
        return Err(broken("deterministic", "two runs decided differently"));
    }
    let review = review_of(kind, object);
    let (_, via_review, _) = admission::review_with(policy, view, &review)
        .map_err(|e| broken("pruned parse", format!("the review was refused: {e}")))?;
    if via_review != outcome {
        return Err(broken(
            "pruned parse",
            format!("the server decided {via_review:?}, the core {outcome:?}"),
        ));
    }
    if outcome.ops.is_empty() == (outcome.verdict == Verdict::Patched) {
        return Err(broken(
            "verdict",
            format!(
                "{:?} with {} operation(s)",
                outcome.verdict,
                outcome.ops.len()
            ),
        ));
    }
    if let Some(w) = outcome
        .warnings
        .iter()
        .find(|w| w.chars().count() > MAX_WARNING_CHARS)
    {
        return Err(broken("warning length", w.clone()));
    }
    let ops = serde_json::to_value(&outcome.ops).map_err(|e| broken("serialise", e.to_string()))?;
    for op in ops.as_array().into_iter().flatten() {
        if op["op"] != "add" && op["op"] != "replace" {
            return Err(broken("only add and replace", op.to_string()));
        }
        let path = op["path"].as_str().unwrap_or_default();
        if path.contains("/ports") {
            return Err(broken("ports are never touched", path));
        }
        if kind == ObjectKind::Deployment && path.starts_with("/spec/selector") {
            return Err(broken("a Deployment's selector is immutable", path));
        }
    }
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &outcome.ops)
        .map_err(|e| broken("the patch applies", format!("{e}: {ops}")))?;
    // The apiserver sends only objects that read as their type; each of those must still read
    // as it once patched. A fuzzer's object that never did (`metadata: false`) says nothing.
    if typed(kind, object).is_ok() {
        typed(kind, &patched)?;
    }
    if kind == ObjectKind::Deployment
        && patched.pointer("/spec/selector") != object.pointer("/spec/selector")
    {
        return Err(broken("a Deployment's selector is immutable", "it changed"));
    }
    let again = mutate_in(policy, view, namespace, kind, &patched);
    if !again.ops.is_empty() {
        return Err(broken(
            "idempotent",
            format!("a second mutation wants {:?} after {ops}", again.ops),
        ));
    }
    Ok(Checked { outcome, patched })
}

/// The object reads as the typed object the apiserver stores.
fn typed(kind: ObjectKind, object: &Value) -> Result<(), Broken> {
    let read = match kind {
        ObjectKind::Deployment => serde_json::from_value::<Deployment>(object.clone()).map(drop),
        ObjectKind::Service => serde_json::from_value::<Service>(object.clone()).map(drop),
    };
    read.map_err(|e| broken("typed", format!("not a {}: {e}", kind.as_str())))
}

/// The CREATE review the apiserver would send for `object`.
#[must_use]
pub fn review_of(kind: ObjectKind, object: &Value) -> Vec<u8> {
    let group = match kind {
        ObjectKind::Service => "",
        ObjectKind::Deployment => "apps",
    };
    let review = json!({"apiVersion": admission::API_VERSION, "kind": admission::KIND,
        "request": {"uid": "u", "operation": "CREATE", "object": object,
                    "kind": {"group": group, "version": "v1", "kind": kind.as_str()}}});
    serde_json::to_vec(&review).unwrap_or_default()
}

/// What the apiserver made of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The decoded patch (`[]` when none was sent).
    pub patch: Value,
    /// `request.object` with the patch applied.
    pub patched: Value,
    /// The warnings (`[]` when none were sent).
    pub warnings: Value,
}

/// Reads an answer as the apiserver does: the uid echoed, `allowed: true`, `patchType` exactly
/// when a patch is sent, a non-empty standard-base64 patch that applies to `request.object`.
///
/// # Errors
/// When the answer breaks the contract or the patch does not apply.
pub fn apply_response(review: &Value, answer: &[u8]) -> Result<Applied, Broken> {
    let law = "the answer";
    let answer: Value = serde_json::from_slice(answer).map_err(|e| broken(law, e.to_string()))?;
    let at = |v: &Value, p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
    if at(&answer, "/apiVersion") != admission::API_VERSION
        || at(&answer, "/kind") != admission::KIND
    {
        return Err(broken(law, "not an AdmissionReview v1"));
    }
    let response = at(&answer, "/response");
    if at(&response, "/uid") != at(review, "/request/uid") {
        return Err(broken(law, "the uid is not echoed"));
    }
    if at(&response, "/allowed") != true {
        return Err(broken(law, "not allowed: the webhook never denies"));
    }
    let patch = match (response.get("patch"), response.get("patchType")) {
        (None, None) => json!([]),
        (Some(Value::String(b64)), Some(t)) if t == "JSONPatch" => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| broken(law, format!("patch is not standard base64: {e}")))?;
            let ops: Value =
                serde_json::from_slice(&raw).map_err(|e| broken(law, e.to_string()))?;
            if ops.as_array().is_none_or(Vec::is_empty) {
                return Err(broken(law, "an empty patch must not be sent"));
            }
            ops
        }
        (p, t) => return Err(broken(law, format!("patch {p:?} with patchType {t:?}"))),
    };
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| broken(law, e.to_string()))?;
    let mut patched = at(review, "/request/object");
    json_patch::patch(&mut patched, &ops)
        .map_err(|e| broken("the patch applies", e.to_string()))?;
    Ok(Applied {
        patch,
        patched,
        warnings: response.get("warnings").cloned().unwrap_or(json!([])),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzzers build objects no apiserver sends; those are not held to the typed law, while
    /// every object that reads as its type still is (the golden and property tests).
    #[test]
    fn an_object_that_never_read_as_its_type_is_not_held_to_the_typed_law() {
        let policy = Policy::builtin().unwrap();
        for object in [json!({"metadata": false}), json!({"kind": "Servic+e"})] {
            assert!(typed(ObjectKind::Service, &object).is_err());
            check(&policy, ObjectKind::Service, &object).unwrap();
            check(&policy, ObjectKind::Deployment, &object).unwrap();
        }
    }

    /// The law is not skipped for what the apiserver really sends: the shared fixtures' objects
    /// read as their type, so their patched objects are held to it.
    #[test]
    fn the_objects_the_apiserver_sends_are_held_to_the_typed_law() {
        let review: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/admissionreview-public-deployment-create.json"
        ))
        .unwrap();
        typed(ObjectKind::Deployment, &review["request"]["object"]).unwrap();
        for (kind, object) in [
            (
                ObjectKind::Deployment,
                include_str!("../../tests/fixtures/embedded-proxy-deployment.create.json"),
            ),
            (
                ObjectKind::Service,
                include_str!("../../tests/fixtures/embedded-proxy-service.create.json"),
            ),
        ] {
            typed(kind, &serde_json::from_str(object).unwrap()).unwrap();
        }
    }
}
