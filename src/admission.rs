//! An `AdmissionReview` of `admission.k8s.io/v1` in, an `AdmissionReview` out.
//!
//! Pure: bytes to bytes, no I/O. The request is read into a lean struct that keeps only what the
//! core needs (`userInfo`, `oldObject` and `options` are skipped unread). The response is written
//! by hand rather than through kube-core's `AdmissionResponse`, which serialises `patch` as an
//! array of numbers (kube-rs/kube#1781); the apiserver wants standard base64.

use base64::Engine as _;
use kube::core::{GroupVersionKind, admission::Operation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    mutate::{self, Outcome},
    policy::Policy,
};

/// The only AdmissionReview version the webhook speaks (`admissionReviewVersions: [v1]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The kind of both the request and the response document.
pub const KIND: &str = "AdmissionReview";

/// Why a body is not an AdmissionReview the webhook can answer. Each maps to HTTP 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is not an AdmissionReview: {0}")]
    Shape(String),
    #[error("apiVersion {0:?} is not supported; only admission.k8s.io/v1 is")]
    ApiVersion(String),
    #[error("kind {0:?} is not AdmissionReview")]
    Kind(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
}

impl ReviewError {
    /// A short stable name for logs and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::Shape(_) => "bad_shape",
            Self::ApiVersion(_) => "bad_api_version",
            Self::Kind(_) => "bad_kind",
            Self::NoRequest => "no_request",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    request: Option<Request>,
}

/// The part of `AdmissionReview.request` the webhook reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    #[serde(default)]
    pub object: Option<Value>,
    #[serde(default)]
    pub dry_run: bool,
}

impl Request {
    /// The view of this request the pure core takes.
    #[must_use]
    pub fn as_core(&self) -> mutate::Request<'_> {
        mutate::Request {
            operation: &self.operation,
            group: &self.kind.group,
            version: &self.kind.version,
            kind: &self.kind.kind,
            sub_resource: self.sub_resource.as_deref(),
            object: self.object.as_ref(),
        }
    }

    /// The operation as the apiserver spells it.
    #[must_use]
    pub fn operation_str(&self) -> &'static str {
        match self.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// Reads an AdmissionReview v1 and returns its request.
///
/// # Errors
/// When the body is not JSON, not an AdmissionReview, not v1, or has no request.
pub fn parse(body: &[u8]) -> Result<Request, ReviewError> {
    // JSON is UTF-8 (RFC 8259). serde_json checks only the strings it keeps, so check it all.
    let text =
        std::str::from_utf8(body).map_err(|e| ReviewError::NotJson(format!("not UTF-8: {e}")))?;
    let review: Review = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ReviewError::Shape(e.to_string())
        } else {
            ReviewError::NotJson(e.to_string())
        }
    })?;
    // serde would also read a struct from a JSON array; an AdmissionReview is an object.
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        return Err(ReviewError::Shape("expected a JSON object".into()));
    }
    match review.api_version.as_deref() {
        Some(API_VERSION) => {}
        other => {
            return Err(ReviewError::ApiVersion(
                other.unwrap_or_default().to_owned(),
            ));
        }
    }
    match review.kind.as_deref() {
        Some(KIND) => {}
        other => return Err(ReviewError::Kind(other.unwrap_or_default().to_owned())),
    }
    review.request.ok_or(ReviewError::NoRequest)
}

/// Runs the core on a request. A dry-run request gets exactly the same answer: the webhook has
/// no side effects (`sideEffects: None`).
#[must_use]
pub fn decide(policy: &Policy, request: &Request) -> Outcome {
    mutate::mutate(policy, &request.as_core())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'static str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

/// The AdmissionReview response for `uid`: always allowed (the webhook never denies a write), with
/// `patchType: JSONPatch` and the base64 patch only when there are operations.
#[must_use]
pub fn response(uid: &str, outcome: &Outcome) -> Vec<u8> {
    let patch = (!outcome.ops.is_empty()).then(|| {
        // Serialising a Vec of patch operations cannot fail: every key is a string.
        let json = serde_json::to_vec(&outcome.ops).unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(json)
    });
    let out = ReviewOut {
        api_version: API_VERSION,
        kind: KIND,
        response: ResponseOut {
            uid,
            allowed: true,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings: &outcome.warnings,
        },
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// A whole round trip: body in, the request that was read, the outcome, and the response body.
///
/// # Errors
/// As [`parse`].
pub fn review(policy: &Policy, body: &[u8]) -> Result<(Request, Outcome, Vec<u8>), ReviewError> {
    let request = parse(body)?;
    let outcome = decide(policy, &request);
    let bytes = response(&request.uid, &outcome);
    Ok((request, outcome, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn service_review() -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Service"},
                "resource": {"group": "", "version": "v1", "resource": "services"},
                "operation": "CREATE", "name": "ak-outpost-x", "namespace": "authentik",
                "userInfo": {"username": "someone"},
                "object": {"metadata": {"name": "ak-outpost-x", "labels": {
                    "app.kubernetes.io/managed-by": "goauthentik.io",
                    "goauthentik.io/outpost-name": "x", "goauthentik.io/outpost-type": "proxy",
                    "goauthentik.io/outpost-uuid": "6f2d8a41c3b94e7d8b5a0c9e1f3d7b26"}},
                    "spec": {"selector": {"app.kubernetes.io/name": "authentik"}}}
            }
        })
    }

    #[test]
    fn patch_goes_on_the_wire_as_standard_base64_with_uid_echoed() {
        let p = Policy::builtin().unwrap();
        let (_, outcome, bytes) = review(&p, &body(&service_review())).unwrap();
        let out: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["response"]["uid"], "u-1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let b64 = out["response"]["patch"]
            .as_str()
            .expect("patch must be a base64 string");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let ops: Vec<json_patch::PatchOperation> = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(ops, outcome.ops);
        assert!(out["response"].get("warnings").is_none());
    }

    #[test]
    fn no_operations_means_no_patch_fields() {
        let p = Policy::builtin().unwrap();
        let mut r = service_review();
        r["request"]["operation"] = json!("DELETE");
        let (_, _, bytes) = review(&p, &body(&r)).unwrap();
        let out: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(out["response"], json!({"uid": "u-1", "allowed": true}));
    }

    #[test]
    fn dry_run_gets_the_same_answer() {
        let p = Policy::builtin().unwrap();
        let mut r = service_review();
        let (_, _, wet) = review(&p, &body(&r)).unwrap();
        r["request"]["dryRun"] = json!(true);
        let (req, _, dry) = review(&p, &body(&r)).unwrap();
        assert!(req.dry_run);
        assert_eq!(wet, dry);
    }

    #[test]
    fn bad_bodies_are_classified() {
        assert!(matches!(parse(b"{"), Err(ReviewError::NotJson(_))));
        assert!(matches!(parse(b"\xff"), Err(ReviewError::NotJson(_))));
        assert!(matches!(parse(b""), Err(ReviewError::NotJson(_))));
        assert!(matches!(parse(b"[]"), Err(ReviewError::Shape(_))));
        let mut r = service_review();
        r["apiVersion"] = json!("admission.k8s.io/v1beta1");
        assert_eq!(
            parse(&body(&r)).unwrap_err(),
            ReviewError::ApiVersion("admission.k8s.io/v1beta1".into())
        );
        let mut r = service_review();
        r["kind"] = json!("ConversionReview");
        assert_eq!(
            parse(&body(&r)).unwrap_err(),
            ReviewError::Kind("ConversionReview".into())
        );
        let mut r = service_review();
        r.as_object_mut().unwrap().remove("request");
        assert_eq!(parse(&body(&r)).unwrap_err(), ReviewError::NoRequest);
        let mut r = service_review();
        r["request"]["operation"] = json!("PATCH");
        assert!(matches!(parse(&body(&r)), Err(ReviewError::Shape(_))));
    }
}
