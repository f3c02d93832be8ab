//! The core: a policy and an object in, RFC 6902 operations and warnings out.
//!
//! Pure: no I/O, no clock, no randomness. It reads the object as raw JSON, because a typed round
//! trip through k8s-openapi would drop fields it does not know, and builds each operation from
//! what a rule knows, so every patch applies to the object it was made for:
//! parents are added before children, `replace` targets only members that exist, and nothing is
//! removed. The apiserver answers a patch that does not apply with HTTP 500 even under
//! `failurePolicy: Ignore`, so this matters more than minimality.
//!
//! Comparisons are "the policy's value is contained in the object's" ([`super::quantity`]).

use std::collections::{BTreeMap, HashMap};

use json_patch::{
    AddOperation, PatchOperation, ReplaceOperation,
    jsonptr::{PointerBuf, Token},
};
use kube::core::admission::Operation;
use serde_json::{Map, Value};

use super::{
    admission::prune::Keep,
    policy::{DeploymentFix, Keyed, Outpost, Policy, SelectorMode},
    quantity::{Quantity, covers},
};
use crate::k8s::{MANAGED_BY, MANAGED_BY_AUTHENTIK, OUTPOST_NAME, OUTPOST_TYPE, OUTPOST_UUID};

/// kubectl prints admission warnings verbatim; the apiserver truncates long ones.
pub const MAX_WARNING_CHARS: usize = 120;

/// The kinds of object the webhook fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Service,
    Deployment,
}

impl ObjectKind {
    /// The kind for an API group, version and kind, if it is one we fix.
    #[must_use]
    pub fn from_gvk(group: &str, version: &str, kind: &str) -> Option<Self> {
        match (group, version, kind) {
            ("", "v1", "Service") => Some(Self::Service),
            ("apps", "v1", "Deployment") => Some(Self::Deployment),
            _ => None,
        }
    }

    /// The kind as Kubernetes spells it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::Deployment => "Deployment",
        }
    }
}

/// The parts of an admission request the core looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub operation: &'a Operation,
    pub group: &'a str,
    pub version: &'a str,
    pub kind: &'a str,
    pub sub_resource: Option<&'a str>,
    pub object: Option<&'a Value>,
}

/// What the core decided about one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not an outpost object, or not an operation we act on.
    Skipped,
    /// An outpost object that is already right.
    Unchanged,
    /// An outpost object that needs the operations.
    Patched,
    /// An outpost object we cannot fix; the warnings say why.
    Unfixable,
}

impl Verdict {
    /// A stable lower-case name, used in logs and metric labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skipped => "skipped",
            Self::Unchanged => "unchanged",
            Self::Patched => "patched",
            Self::Unfixable => "unfixable",
        }
    }
}

/// The operations that fix an object, with the warnings to show the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub ops: Vec<PatchOperation>,
    pub warnings: Vec<String>,
}

impl Outcome {
    fn skipped() -> Self {
        Self {
            verdict: Verdict::Skipped,
            ops: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// What the rules read of the outpost container (see [`Keep::Containers`]).
pub const CONTAINER_READS: Keep = Keep::Keys(&[
    ("name", Keep::All),
    ("env", Keep::All),
    ("volumeMounts", Keep::All),
    ("resources", Keep::All),
    ("readinessProbe", Keep::All),
]);

/// What the Service and Deployment rules below read; [`prune`](crate::core::admission::prune)
/// builds only this. Change it with the rules. A member kept here is kept
/// whole wherever presence matters (a `replace` needs the member to exist), and list elements
/// are kept in place, so indices in the patch are those of the full object.
pub const READS: Keep = Keep::Keys(&[
    (
        "metadata",
        Keep::Keys(&[("name", Keep::All), ("labels", Keep::Labels)]),
    ),
    (
        "spec",
        Keep::Keys(&[
            ("type", Keep::All),
            ("selector", Keep::All),
            ("replicas", Keep::All),
            ("strategy", Keep::All),
            (
                "template",
                Keep::Keys(&[
                    (
                        "metadata",
                        Keep::Keys(&[("labels", Keep::All), ("annotations", Keep::All)]),
                    ),
                    (
                        "spec",
                        Keep::Keys(&[("containers", Keep::Containers), ("volumes", Keep::All)]),
                    ),
                ]),
            ),
        ]),
    ),
]);

/// Decides what to do with one admission request.
///
/// Only CREATE and UPDATE of a whole `v1` Service or `apps/v1` Deployment are looked at;
/// DELETE, CONNECT, subresources (`status`, `scale`) and every other kind pass untouched.
#[must_use]
pub fn mutate(policy: &Policy, req: &Request<'_>) -> Outcome {
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || req.sub_resource.is_some_and(|s| !s.is_empty())
    {
        return Outcome::skipped();
    }
    match (
        ObjectKind::from_gvk(req.group, req.version, req.kind),
        req.object,
    ) {
        (Some(kind), Some(object)) => mutate_object(policy, kind, object),
        _ => Outcome::skipped(),
    }
}

/// Decides what to do with one Service or Deployment.
#[must_use]
pub fn mutate_object(policy: &Policy, kind: ObjectKind, object: &Value) -> Outcome {
    let mut fixer = Fixer {
        ops: Vec::new(),
        warnings: Vec::new(),
        what: format!(
            "{}/{}",
            kind.as_str(),
            object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)")
        ),
    };
    let outpost = match identify(object) {
        Identity::NotOurs => return Outcome::skipped(),
        Identity::Incomplete(label) => {
            fixer.warn(&format!(
                "labels lack {label}; cannot tell which outpost this is"
            ));
            return fixer.finish();
        }
        Identity::Outpost(o) => o,
    };
    let effective = policy.for_outpost(&outpost);
    match kind {
        ObjectKind::Service => fixer.service(effective.selector, object, &outpost),
        ObjectKind::Deployment => fixer.deployment(&effective.deployment, object, &outpost),
    }
    fixer.finish()
}

enum Identity<'a> {
    NotOurs,
    Incomplete(&'static str),
    Outpost(Outpost<'a>),
}

/// An outpost object carries authentik's managed-by label and all three outpost labels.
fn identify(object: &Value) -> Identity<'_> {
    let labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object);
    let label = |key: &str| {
        labels
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    if label(MANAGED_BY) != Some(MANAGED_BY_AUTHENTIK) {
        return Identity::NotOurs;
    }
    match (
        label(OUTPOST_NAME),
        label(OUTPOST_TYPE),
        label(OUTPOST_UUID),
    ) {
        (Some(name), Some(kind), Some(uuid)) => Identity::Outpost(Outpost { name, kind, uuid }),
        (None, _, _) => Identity::Incomplete(OUTPOST_NAME),
        (_, None, _) => Identity::Incomplete(OUTPOST_TYPE),
        (_, _, None) => Identity::Incomplete(OUTPOST_UUID),
    }
}

/// The labels on an outpost's pods, as authentik's controller writes them into the Deployment's
/// `spec.selector.matchLabels`. The Service must select exactly these.
#[must_use]
pub fn pod_selector(outpost: &Outpost<'_>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "app.kubernetes.io/name".into(),
        format!("authentik-outpost-{}", outpost.kind).into(),
    );
    m.insert(MANAGED_BY.into(), MANAGED_BY_AUTHENTIK.into());
    m.insert(OUTPOST_NAME.into(), outpost.name.into());
    m.insert(OUTPOST_TYPE.into(), outpost.kind.into());
    m.insert(OUTPOST_UUID.into(), outpost.uuid.into());
    m
}

struct Fixer {
    ops: Vec<PatchOperation>,
    warnings: Vec<String>,
    what: String,
}

impl Fixer {
    fn finish(self) -> Outcome {
        let verdict = match (self.ops.is_empty(), self.warnings.is_empty()) {
            (false, _) => Verdict::Patched,
            (true, true) => Verdict::Unchanged,
            (true, false) => Verdict::Unfixable,
        };
        Outcome {
            verdict,
            ops: self.ops,
            warnings: self.warnings,
        }
    }

    fn warn(&mut self, problem: &str) {
        let mut full = format!("outpost-webhook: {}: {problem}", self.what);
        if let Some((cut, _)) = full.char_indices().nth(MAX_WARNING_CHARS) {
            full.truncate(cut);
        }
        self.warnings.push(full);
    }

    /// Sets `parent[key]`: `replace` when the member exists (even as null), `add` when it does not.
    fn set(&mut self, parent: &Map<String, Value>, at: &PointerBuf, key: &str, value: Value) {
        let path = at.with_trailing_token(key);
        self.ops.push(if parent.contains_key(key) {
            PatchOperation::Replace(ReplaceOperation { path, value })
        } else {
            PatchOperation::Add(AddOperation { path, value })
        });
    }

    /// Sets `parent[key]` unless what is there already contains `desired`.
    fn set_covering(
        &mut self,
        parent: &Map<String, Value>,
        at: &PointerBuf,
        key: &str,
        desired: &Value,
    ) {
        if !parent
            .get(key)
            .is_some_and(|actual| covers(actual, desired, Quantity::No))
        {
            self.set(parent, at, key, desired.clone());
        }
    }

    fn service(&mut self, mode: SelectorMode, object: &Value, outpost: &Outpost<'_>) {
        if mode == SelectorMode::Keep {
            return;
        }
        let Some(spec) = object.get("spec").and_then(Value::as_object) else {
            self.warn("has no spec; cannot set the selector");
            return;
        };
        // An ExternalName Service has no selector and no endpoints to fix.
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return;
        }
        // Replaced whole: the controller's strategic-merge PATCH can leave the union of the buggy
        // and the right keys, and a selector with `app.kubernetes.io/name: authentik` in it matches
        // no pod at all.
        let desired = Value::Object(pod_selector(outpost));
        if spec.get("selector") != Some(&desired) {
            self.set(spec, &ptr(&["spec"]), "selector", desired);
        }
    }

    fn deployment(&mut self, fix: &DeploymentFix, object: &Value, outpost: &Outpost<'_>) {
        if fix.is_empty() {
            return;
        }
        let Some(spec) = object.get("spec").and_then(Value::as_object) else {
            self.warn("has no spec");
            return;
        };
        let template = spec.get("template").and_then(Value::as_object);
        let pod = template
            .and_then(|t| t.get("spec"))
            .and_then(Value::as_object);
        let containers = pod
            .and_then(|p| p.get("containers"))
            .and_then(Value::as_array)
            .filter(|c| !c.is_empty());
        let (Some(template), Some(pod), Some(containers)) = (template, pod, containers) else {
            self.warn("has no containers in spec.template.spec");
            return;
        };
        // The outpost container is named after the outpost type; sidecars may come first.
        let index = containers
            .iter()
            .position(|c| c.get("name").and_then(Value::as_str) == Some(outpost.kind))
            .unwrap_or(0);
        let Some(container) = containers.get(index).and_then(Value::as_object) else {
            self.warn("its outpost container is not an object");
            return;
        };

        let spec_at = ptr(&["spec"]);
        if let Some(replicas) = fix.replicas
            && spec.get("replicas").and_then(Value::as_i64) != Some(i64::from(replicas))
        {
            self.set(spec, &spec_at, "replicas", replicas.into());
        }
        if let Some(strategy) = &fix.strategy {
            self.set_covering(spec, &spec_at, "strategy", strategy);
        }

        self.pod_metadata(fix, spec, template);

        let pod_at = ptr(&["spec", "template", "spec"]);
        self.upsert(pod, &pod_at, "volumes", "name", &fix.volumes);

        let container_at = pod_at
            .with_trailing_token("containers")
            .with_trailing_token(index);
        self.upsert(container, &container_at, "env", "name", &fix.env);
        self.upsert(
            container,
            &container_at,
            "volumeMounts",
            "mountPath",
            &fix.volume_mounts,
        );
        if let Some(resources) = &fix.resources {
            self.set_covering(container, &container_at, "resources", resources);
        }
        if let Some(probe) = &fix.readiness_probe {
            self.set_covering(container, &container_at, "readinessProbe", probe);
        }
    }

    fn pod_metadata(
        &mut self,
        fix: &DeploymentFix,
        spec: &Map<String, Value>,
        template: &Map<String, Value>,
    ) {
        let selector = spec
            .get("selector")
            .and_then(|s| s.get("matchLabels"))
            .and_then(Value::as_object);
        let mut labels = BTreeMap::new();
        for (key, value) in &fix.pod_labels {
            // A template label that contradicts the immutable selector makes the Deployment invalid.
            match selector.and_then(|s| s.get(key)).and_then(Value::as_str) {
                Some(selected) if selected != value => self.warn(&format!(
                    "pod label {key} left as {selected}: spec.selector requires it"
                )),
                _ => {
                    labels.insert(key.as_str(), value.as_str());
                }
            }
        }
        let mut annotations: BTreeMap<&str, &str> = fix
            .pod_annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(c) = &fix.checksum {
            annotations.insert(&c.annotation, &c.value);
        }

        let template_at = ptr(&["spec", "template"]);
        match template.get("metadata") {
            Some(Value::Object(meta)) => {
                let meta_at = template_at.with_trailing_token("metadata");
                self.set_entries(meta, &meta_at, "labels", &labels);
                self.set_entries(meta, &meta_at, "annotations", &annotations);
            }
            Some(Value::Null) | None => {
                let mut meta = Map::new();
                for (key, entries) in [("labels", &labels), ("annotations", &annotations)] {
                    if !entries.is_empty() {
                        meta.insert(key.into(), string_map(entries));
                    }
                }
                if !meta.is_empty() {
                    self.set(template, &template_at, "metadata", Value::Object(meta));
                }
            }
            Some(_) => self.warn("spec.template.metadata is not an object"),
        }
    }

    /// Sets string entries of the map `parent[key]`, creating the map when it is absent.
    fn set_entries(
        &mut self,
        parent: &Map<String, Value>,
        at: &PointerBuf,
        key: &str,
        entries: &BTreeMap<&str, &str>,
    ) {
        if entries.is_empty() {
            return;
        }
        match parent.get(key) {
            Some(Value::Object(map)) => {
                let map_at = at.with_trailing_token(key);
                for (k, v) in entries {
                    if map.get(*k).and_then(Value::as_str) != Some(*v) {
                        self.set(map, &map_at, k, (*v).into());
                    }
                }
            }
            Some(Value::Null) | None => self.set(parent, at, key, string_map(entries)),
            Some(_) => self.warn(&format!("{key} is not a map")),
        }
    }

    /// Upserts policy entries into the list `parent[field]`, matching them on `key_field`.
    ///
    /// Linear in the list's length: one index is built, then each policy entry is looked up.
    /// Entries already right are left; wrong ones are replaced in place (every duplicate of the
    /// name, since the container runtime takes the last); missing ones are appended.
    fn upsert(
        &mut self,
        parent: &Map<String, Value>,
        at: &PointerBuf,
        field: &str,
        key_field: &str,
        desired: &[Keyed],
    ) {
        if desired.is_empty() {
            return;
        }
        let items = match parent.get(field) {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => {
                let all = desired.iter().map(|k| k.value.clone()).collect();
                self.set(parent, at, field, Value::Array(all));
                return;
            }
            Some(_) => {
                self.warn(&format!("{field} is not a list"));
                return;
            }
        };
        let mut index: HashMap<&str, Vec<usize>> = HashMap::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(key) = item.get(key_field).and_then(Value::as_str) {
                index.entry(key).or_default().push(i);
            }
        }
        let list_at = at.with_trailing_token(field);
        let mut missing = Vec::new();
        for want in desired {
            match index.get(want.key.as_str()) {
                Some(found) => {
                    for &i in found {
                        if !items
                            .get(i)
                            .is_some_and(|have| covers(have, &want.value, Quantity::No))
                        {
                            self.ops.push(PatchOperation::Replace(ReplaceOperation {
                                path: list_at.with_trailing_token(i),
                                value: want.value.clone(),
                            }));
                        }
                    }
                }
                None => missing.push(want),
            }
        }
        // Appends come after the in-place replaces, so no index above has moved.
        for want in missing {
            self.ops.push(PatchOperation::Add(AddOperation {
                path: list_at.with_trailing_token("-"),
                value: want.value.clone(),
            }));
        }
    }
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().map(|t| Token::new(*t)))
}

fn string_map(entries: &BTreeMap<&str, &str>) -> Value {
    Value::Object(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(yaml: &str) -> Policy {
        Policy::from_yaml("test", yaml).unwrap()
    }

    fn labels(kind: &str) -> Value {
        json!({
            "app.kubernetes.io/managed-by": "goauthentik.io",
            "goauthentik.io/outpost-name": "o",
            "goauthentik.io/outpost-type": kind,
            "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47",
        })
    }

    fn deployment(container: Value) -> Value {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "ak-outpost-o", "labels": labels("proxy")},
            "spec": {"template": {"spec": {}}}
        });
        d["spec"]["template"]["spec"]["containers"] = Value::Array(vec![container]);
        d
    }

    fn apply(object: &Value, outcome: &Outcome) -> Value {
        let mut out = object.clone();
        json_patch::patch(&mut out, &outcome.ops).unwrap();
        out
    }

    #[test]
    fn pointer_tokens_escape_slash_and_tilde() {
        assert_eq!(
            ptr(&["spec", "template", "metadata", "labels", "example.com/a~b"]).as_str(),
            "/spec/template/metadata/labels/example.com~1a~0b"
        );
    }

    #[test]
    fn delete_connect_and_subresources_are_skipped() {
        let p = Policy::builtin().unwrap();
        let obj = deployment(json!({"name": "proxy"}));
        for (op, sub) in [
            (Operation::Delete, None),
            (Operation::Connect, None),
            (Operation::Update, Some("scale")),
            (Operation::Update, Some("status")),
        ] {
            let req = Request {
                operation: &op,
                group: "apps",
                version: "v1",
                kind: "Deployment",
                sub_resource: sub,
                object: Some(&obj),
            };
            assert_eq!(mutate(&p, &req).verdict, Verdict::Skipped);
        }
        let req = Request {
            operation: &Operation::Create,
            group: "apps",
            version: "v1",
            kind: "Deployment",
            sub_resource: Some(""),
            object: Some(&obj),
        };
        assert_eq!(mutate(&p, &req).verdict, Verdict::Patched);
    }

    #[test]
    fn other_kinds_are_skipped() {
        let p = Policy::builtin().unwrap();
        let obj = deployment(json!({"name": "proxy"}));
        for (group, version, kind) in [
            ("apps", "v1", "StatefulSet"),
            ("", "v1", "Pod"),
            ("apps", "v1beta2", "Deployment"),
        ] {
            let req = Request {
                operation: &Operation::Create,
                group,
                version,
                kind,
                sub_resource: None,
                object: Some(&obj),
            };
            assert_eq!(mutate(&p, &req).verdict, Verdict::Skipped);
        }
    }

    #[test]
    fn outpost_object_missing_a_label_gets_a_warning_and_no_ops() {
        let p = Policy::builtin().unwrap();
        let mut obj = deployment(json!({"name": "proxy"}));
        obj["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove(OUTPOST_TYPE);
        let out = mutate_object(&p, ObjectKind::Deployment, &obj);
        assert_eq!(out.verdict, Verdict::Unfixable);
        assert!(out.ops.is_empty());
        assert_eq!(
            out.warnings,
            [
                "outpost-webhook: Deployment/ak-outpost-o: labels lack goauthentik.io/outpost-type; cannot tell which outpost this is"
            ]
        );
        assert!(out.warnings[0].chars().count() <= MAX_WARNING_CHARS);
    }

    #[test]
    fn deployment_without_containers_gets_a_warning() {
        let p = Policy::builtin().unwrap();
        let mut obj = deployment(json!({}));
        obj["spec"]["template"]["spec"]["containers"] = json!([]);
        let out = mutate_object(&p, ObjectKind::Deployment, &obj);
        assert_eq!(out.verdict, Verdict::Unfixable);
        assert!(out.warnings[0].contains("no containers"));
    }

    #[test]
    fn long_warnings_are_cut_at_120_characters() {
        let p = Policy::builtin().unwrap();
        let mut obj = deployment(json!({}));
        obj["metadata"]["name"] = json!("é".repeat(200));
        obj["spec"]["template"]["spec"]["containers"] = json!([]);
        let out = mutate_object(&p, ObjectKind::Deployment, &obj);
        assert_eq!(out.warnings[0].chars().count(), MAX_WARNING_CHARS);
    }

    #[test]
    fn env_is_upserted_by_name_duplicates_fixed_and_missing_appended() {
        let p = policy("rules: [{deployment: {env: [{name: A, value: a}, {name: B, value: b}]}}]");
        let obj = deployment(json!({"name": "proxy", "env": [
            {"name": "B", "value": "wrong"}, {"name": "X", "value": "x"}, {"name": "B", "value": "b"}
        ]}));
        let out = mutate_object(&p, ObjectKind::Deployment, &obj);
        let fixed = apply(&obj, &out);
        assert_eq!(
            fixed["spec"]["template"]["spec"]["containers"][0]["env"],
            json!([{"name": "B", "value": "b"}, {"name": "X", "value": "x"}, {"name": "B", "value": "b"}, {"name": "A", "value": "a"}])
        );
        assert!(
            mutate_object(&p, ObjectKind::Deployment, &fixed)
                .ops
                .is_empty()
        );
    }

    #[test]
    fn pod_label_that_contradicts_the_selector_is_left_with_a_warning() {
        let p = policy("rules: [{deployment: {podLabels: {tier: web, other: x}}}]");
        let mut obj = deployment(json!({"name": "proxy"}));
        obj["spec"]["selector"] = json!({"matchLabels": {"tier": "edge"}});
        obj["spec"]["template"]["metadata"] = json!({"labels": {"tier": "edge"}});
        let out = mutate_object(&p, ObjectKind::Deployment, &obj);
        let fixed = apply(&obj, &out);
        assert_eq!(
            fixed["spec"]["template"]["metadata"]["labels"],
            json!({"tier": "edge", "other": "x"})
        );
        assert_eq!(out.verdict, Verdict::Patched);
        assert!(
            out.warnings[0].contains("pod label tier left as edge"),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn selector_keep_leaves_the_service_alone() {
        let p = policy("rules: [{service: {selector: keep}}]");
        let svc =
            json!({"metadata": {"labels": labels("proxy")}, "spec": {"selector": {"a": "b"}}});
        assert_eq!(
            mutate_object(&p, ObjectKind::Service, &svc).verdict,
            Verdict::Unchanged
        );
    }

    #[test]
    fn external_name_services_have_no_selector_to_fix() {
        let p = Policy::builtin().unwrap();
        let svc = json!({"metadata": {"labels": labels("proxy")}, "spec": {"type": "ExternalName", "externalName": "x"}});
        assert_eq!(
            mutate_object(&p, ObjectKind::Service, &svc).verdict,
            Verdict::Unchanged
        );
    }

    #[test]
    fn a_policy_that_injects_nothing_into_deployments_leaves_them_alone() {
        let p = policy("rules: [{service: {selector: outpost}}]");
        let out = mutate_object(
            &p,
            ObjectKind::Deployment,
            &deployment(json!({"name": "proxy"})),
        );
        assert_eq!(out.verdict, Verdict::Unchanged);
    }

    #[test]
    fn non_list_env_is_reported_not_patched() {
        let p = policy("rules: [{deployment: {env: [{name: A, value: a}]}}]");
        let out = mutate_object(
            &p,
            ObjectKind::Deployment,
            &deployment(json!({"name": "proxy", "env": "nope"})),
        );
        assert_eq!(out.verdict, Verdict::Unfixable);
        assert!(out.warnings[0].contains("env is not a list"));
    }
}
