//! The `AdmissionReview` envelope of `admission.k8s.io/v1`: bytes in, bytes out. Pure.
//!
//! The request is read into a lean struct that keeps only what the core needs: `userInfo`,
//! `oldObject` and `options` are skipped unparsed, and `object` is pruned ([`prune`]). The
//! response is written by hand rather than through kube-core's `AdmissionResponse`, which
//! serialises `patch` as an array of numbers (kube-rs/kube#1781); the apiserver wants standard
//! base64.

mod json;
pub mod prune;

use base64::Engine as _;
use kube::core::{GroupVersionKind, admission::Operation};
use serde::Deserialize;

use crate::core::{
    cluster::{Off, View},
    mutate::{self, Outcome},
    policy::Policy,
    tree::Node,
};

/// The admission path, as registered in the MutatingWebhookConfiguration.
pub const MUTATE_PATH: &str = "/mutate";
/// The default admission port (TLS); the Service maps 443 to it.
pub const DEFAULT_PORT: u16 = 8443;
/// The default health and metrics port (plain HTTP).
pub const DEFAULT_HEALTH_PORT: u16 = 8080;
/// The registration's `timeoutSeconds`, and the request deadline when the apiserver sends no
/// `?timeout=`: past it the apiserver has given up on the call anyway.
pub const TIMEOUT_SECONDS: u64 = 5;

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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "'de: 'a"))]
struct Review<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    request: Option<Request<'a>>,
}

/// The part of `AdmissionReview.request` the webhook reads, borrowing from the body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "'de: 'a"))]
pub struct Request<'a> {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    /// The object, pruned to what the rules read: patches apply to the whole object the
    /// apiserver holds, but are computed from this.
    #[serde(default, deserialize_with = "prune::object")]
    pub object: Option<Node<'a>>,
    #[serde(default)]
    pub dry_run: bool,
    /// The object held more values in the fields the rules read than are built
    /// ([`prune::MAX_KEPT_VALUES`]); `object` is then `None`.
    #[serde(skip)]
    pub too_large: bool,
}

/// The envelope alone, read again when the object was too large to build: enough to answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    request: EnvelopeRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeRequest {
    uid: String,
    kind: GroupVersionKind,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    #[serde(default)]
    dry_run: bool,
}

impl Request<'_> {
    /// The view of this request the pure core takes.
    #[must_use]
    pub fn as_core(&self) -> mutate::Request<'_, Node<'_>> {
        mutate::Request {
            operation: &self.operation,
            group: &self.kind.group,
            version: &self.kind.version,
            kind: &self.kind.kind,
            sub_resource: self.sub_resource.as_deref(),
            namespace: self.namespace.as_deref(),
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
pub fn parse(body: &[u8]) -> Result<Request<'_>, ReviewError> {
    // JSON is UTF-8 (RFC 8259). serde_json checks only the strings it keeps, so check it all.
    let text =
        std::str::from_utf8(body).map_err(|e| ReviewError::NotJson(format!("not UTF-8: {e}")))?;
    let review: Review = match serde_json::from_str(text) {
        Ok(review) => review,
        // Too large to build is not malformed: answer it (allowed, unpatched), or the apiserver
        // would refuse the write. The second read skips the object without building it.
        // A custom error's message comes first; serde's own messages start with theirs (and
        // may quote the input), so `starts_with` is not fooled by a string in the body.
        Err(e) if e.is_data() && e.to_string().starts_with(prune::TOO_MANY_VALUES) => {
            let envelope: Envelope =
                serde_json::from_str(text).map_err(|e| ReviewError::Shape(e.to_string()))?;
            let r = envelope.request;
            Review {
                api_version: envelope.api_version,
                kind: envelope.kind,
                request: Some(Request {
                    uid: r.uid,
                    kind: r.kind,
                    sub_resource: r.sub_resource,
                    name: r.name,
                    namespace: r.namespace,
                    operation: r.operation,
                    object: None,
                    dry_run: r.dry_run,
                    too_large: true,
                }),
            }
        }
        Err(e) if e.is_data() => return Err(ReviewError::Shape(e.to_string())),
        Err(e) => return Err(ReviewError::NotJson(e.to_string())),
    };
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

/// Runs the core on a request, given what `view` knows of the cluster. A dry-run request gets
/// exactly the same answer: the webhook has no side effects (`sideEffects: None`).
#[must_use]
pub fn decide(policy: &Policy, view: &dyn View, request: &Request<'_>) -> Outcome {
    if request.too_large {
        return Outcome {
            verdict: mutate::Verdict::Unfixable,
            ops: Vec::new(),
            warnings: vec![format!(
                "not fixed: the object has over {} values in the fields outpost-webhook reads",
                prune::MAX_KEPT_VALUES
            )],
        };
    }
    mutate::mutate(policy, view, &request.as_core())
}

/// The AdmissionReview response for `uid`: always allowed (the webhook never denies a write), with
/// `patchType: JSONPatch` and the base64 patch only when there are operations.
///
/// Written straight into one buffer: the base64 text needs no escaping, so it is encoded in place
/// rather than built as a string and scanned again by a serializer.
#[must_use]
pub fn response(uid: &str, outcome: &Outcome) -> Vec<u8> {
    let patch = (!outcome.ops.is_empty()).then(|| {
        let mut json = Vec::with_capacity(1024);
        json::write_ops(&mut json, &outcome.ops);
        json
    });
    let encoded = patch
        .as_ref()
        .and_then(|json| base64::encoded_len(json.len(), true))
        .unwrap_or(0);
    let mut out = Vec::with_capacity(192 + uid.len() + encoded);
    out.extend_from_slice(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#,
    );
    // Serialising a string or a list of strings cannot fail.
    let _ = serde_json::to_writer(&mut out, uid);
    out.extend_from_slice(br#","allowed":true"#);
    if let Some(json) = patch {
        out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
        let start = out.len();
        out.resize(start + encoded, 0);
        if let Some(tail) = out.get_mut(start..) {
            let _ = base64::engine::general_purpose::STANDARD.encode_slice(&json, tail);
        }
        out.push(b'"');
    }
    if !outcome.warnings.is_empty() {
        out.extend_from_slice(br#","warnings":"#);
        let _ = serde_json::to_writer(&mut out, &outcome.warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

/// A whole round trip with no view of the cluster: body in, the request that was read, the
/// outcome, and the response body.
///
/// # Errors
/// As [`parse`].
pub fn review<'b>(
    policy: &Policy,
    body: &'b [u8],
) -> Result<(Request<'b>, Outcome, Vec<u8>), ReviewError> {
    review_with(policy, &Off, body)
}

/// As [`review`], given what `view` knows of the cluster.
///
/// # Errors
/// As [`parse`].
pub fn review_with<'b>(
    policy: &Policy,
    view: &dyn View,
    body: &'b [u8],
) -> Result<(Request<'b>, Outcome, Vec<u8>), ReviewError> {
    let request = parse(body)?;
    let outcome = decide(policy, view, &request);
    let bytes = response(&request.uid, &outcome);
    Ok((request, outcome, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tree::Json as _;
    use serde_json::{Value, json};

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
        let p = Policy::from_yaml("p", "rules: [{service: {selector: outpost}}]").unwrap();
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

    /// A review written in the apiserver's field order (metadata before spec, a container's name
    /// first), which `serde_json`'s sorted maps cannot produce.
    fn ordered_review(labels_first: bool, outpost_type: &str) -> String {
        let meta = format!(
            r#""metadata":{{"name":"d","labels":{{"app.kubernetes.io/managed-by":"goauthentik.io","goauthentik.io/outpost-name":"o","goauthentik.io/outpost-type":"{outpost_type}","goauthentik.io/outpost-uuid":"0eecac0797c7443c892505f2f4fe3e47"}}}}"#
        );
        let spec = r#""spec":{"template":{"spec":{"containers":[
            {"name":"sidecar","image":"s","env":[{"name":"X","value":"1"}],"resources":{"limits":{"cpu":"1"}}},
            {"name":"proxy","image":"p","env":[{"name":"AUTHENTIK_POSTGRESQL__HOST","value":"wrong"}],"ports":[{"containerPort":9000}]},
            {"name":"other","image":"o","env":[{"name":"Y","value":"2"}]}]}}}"#;
        let (a, b) = if labels_first {
            (meta.as_str(), spec)
        } else {
            (spec, meta.as_str())
        };
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"apps","version":"v1","kind":"Deployment"}},"operation":"CREATE","object":{{"kind":"Deployment",{a},{b}}}}}}}"#
        )
    }

    fn containers(body: &str) -> Value {
        parse(body.as_bytes()).unwrap().object.unwrap().to_value()["spec"]["template"]["spec"]
            ["containers"]
            .clone()
    }

    #[test]
    fn pruning_keeps_only_the_names_of_containers_that_cannot_be_the_outpost_container() {
        let body = ordered_review(true, "proxy");
        let c = containers(&body);
        // The first container might be the outpost container (if none were named after the
        // type), so it is kept; `other` cannot be, so only its name is.
        assert_eq!(c[0]["env"], json!([{"name": "X", "value": "1"}]));
        assert_eq!(c[1]["env"][0]["value"], "wrong");
        assert!(c[1].get("ports").is_none() && c[1].get("image").is_none());
        assert_eq!(c[2], json!({"name": "other"}));
        // And the decision is the one made on the whole object.
        let p = Policy::builtin().unwrap();
        let whole: Value = serde_json::from_str(&body).unwrap();
        let full = mutate::mutate_object(
            &p,
            mutate::ObjectKind::Deployment,
            &whole["request"]["object"],
        );
        assert_eq!(decide(&p, &Off, &parse(body.as_bytes()).unwrap()), full);
    }

    #[test]
    fn pruning_keeps_every_container_when_the_type_is_not_known_first() {
        let c = containers(&ordered_review(false, "proxy"));
        assert_eq!(c[2]["env"], json!([{"name": "Y", "value": "2"}]));
        // No container named after the type: the first is the outpost container and is kept.
        let c = containers(&ordered_review(true, "ldap"));
        assert_eq!(c[0]["env"], json!([{"name": "X", "value": "1"}]));
        assert_eq!(c[2], json!({"name": "other"}));
    }

    #[test]
    fn duplicate_members_the_rules_read_are_refused() {
        let body = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"apps","version":"v1","kind":"Deployment"},"operation":"CREATE","object":{"metadata":{"name":"a"},"metadata":{"name":"b"}}}}"#;
        let e = parse(body.as_bytes()).unwrap_err();
        assert!(
            matches!(&e, ReviewError::Shape(m) if m.contains("duplicate key `metadata`")),
            "{e}"
        );
        // Members it does not read may repeat, as serde_json allows.
        let ok = body.replace(r#""metadata":{"name":"b"}"#, r#""status":{},"status":{}"#);
        assert!(parse(ok.as_bytes()).is_ok());
        // A container's name decides what of it is kept: written twice, the fields before the
        // second would be gone where serde_json keeps them.
        let twice = body.replace(
            r#""metadata":{"name":"a"},"metadata":{"name":"b"}"#,
            r#""metadata":{"labels":{"goauthentik.io/outpost-type":"proxy"}},"spec":{"template":{"spec":{"containers":[{"name":"a"},{"name":"b","env":[],"name":"proxy"}]}}}"#,
        );
        let e = parse(twice.as_bytes()).unwrap_err();
        assert!(
            matches!(&e, ReviewError::Shape(m) if m.contains("duplicate key `name` in a container")),
            "{e}"
        );
    }

    #[test]
    fn a_kept_array_past_the_cap_is_answered_unbuilt_and_one_within_it_is_read() {
        let with_env = |n: usize| {
            let env: Vec<Value> = (0..n)
                .map(|i| json!({"name": format!("V{i}"), "value": "x"}))
                .collect();
            let mut r = service_review();
            r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
            r["request"]["object"]["spec"] =
                json!({"template": {"spec": {"containers": [{"name": "proxy", "env": env}]}}});
            body(&r)
        };
        // An outpost container with 100 env entries is read whole.
        let small = with_env(100);
        let request = parse(&small).unwrap();
        let kept =
            &request.object.unwrap().to_value()["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(kept.as_array().unwrap().len(), 100);
        // 100,000 entries (a 4 MB array) are not built: the review is answered, allowed and
        // unpatched, with a warning, so the write goes through.
        let policy = Policy::builtin().unwrap();
        let large = with_env(100_000);
        let (request, outcome, answer) = review(&policy, &large).unwrap();
        assert!(request.too_large && request.object.is_none());
        assert_eq!(request.uid, service_review()["request"]["uid"]);
        assert_eq!(outcome.verdict, mutate::Verdict::Unfixable);
        assert!(outcome.ops.is_empty());
        assert!(outcome.warnings[0].len() <= 120, "{}", outcome.warnings[0]);
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        // So are as many labels.
        let mut r = service_review();
        let labels: serde_json::Map<String, Value> =
            (0..5000).map(|i| (format!("k{i}"), json!("v"))).collect();
        r["request"]["object"]["metadata"]["labels"] = Value::Object(labels);
        assert!(parse(&body(&r)).unwrap().too_large);
        // A wrong apiVersion beside a large object is still refused.
        let mut r = serde_json::from_slice::<Value>(&with_env(100_000)).unwrap();
        r["apiVersion"] = json!("admission.k8s.io/v1beta1");
        assert!(matches!(parse(&body(&r)), Err(ReviewError::ApiVersion(_))));
        // The cap's message quoted in a body does not pass for the cap.
        let mut r = service_review();
        r["request"]["operation"] = json!(prune::TOO_MANY_VALUES);
        let e = parse(&body(&r)).unwrap_err();
        assert!(
            matches!(&e, ReviewError::Shape(m) if m.contains(prune::TOO_MANY_VALUES)),
            "{e}"
        );
        // A malformed envelope beside a large object is still a bad request.
        let mut r = serde_json::from_slice::<Value>(&with_env(100_000)).unwrap();
        r["request"]["operation"] = json!("EXPLODE");
        assert!(matches!(parse(&body(&r)), Err(ReviewError::Shape(_))));
    }

    #[test]
    fn repeated_keys_and_escapes_in_what_is_kept_are_read_as_serde_json_reads_them() {
        // Not what the apiserver writes, but what a body may hold: a label written twice (the
        // last counts), escapes in keys and values (the only strings copied), an env entry
        // written twice in one object.
        let body = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"apps","version":"v1","kind":"Deployment"},"operation":"CREATE","object":{"metadata":{"name":"d","labels":{"app.kubernetes.io/managed-by":"goauthentik.io","goauthentik.io/outpost-name":"first","goauthentik.io/outpost-name":"o\u0031","goauthentik.io/outpost-type":"pro\u0078y","goauthentik.io/outpost-uuid":"0eecac0797c7443c892505f2f4fe3e47","goauthentik.io\/extra":"a\"b"}},"spec":{"replicas":1,"template":{"metadata":{"labels":{"app.kubernetes.io/component":"wrong","app.kubernetes.io/component":"server"}},"spec":{"containers":[{"name":"proxy","env":[{"name":"AUTHENTIK_POSTGRESQL__HOST","value":"a","value":"b"}]}]}}}}}}"#;
        let whole: Value = serde_json::from_str(body).unwrap();
        let object = &whole["request"]["object"];
        assert_eq!(
            object["metadata"]["labels"]["goauthentik.io/outpost-name"],
            "o1"
        );
        let p = Policy::builtin().unwrap();
        let request = parse(body.as_bytes()).unwrap();
        assert_eq!(
            request.object.as_ref().unwrap().to_value()["metadata"],
            object["metadata"]
        );
        let via_node = decide(&p, &Off, &request);
        assert_eq!(
            via_node,
            mutate::mutate_object(&p, mutate::ObjectKind::Deployment, object)
        );
        assert_eq!(via_node.verdict, mutate::Verdict::Patched);
        // The label's last value is the right one: nothing to patch there.
        let ops = serde_json::to_string(&via_node.ops).unwrap();
        assert!(!ops.contains("component"), "{ops}");
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
