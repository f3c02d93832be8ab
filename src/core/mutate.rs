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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use json_patch::{
    AddOperation, PatchOperation, ReplaceOperation,
    jsonptr::{PointerBuf, Token},
};
use kube::core::admission::Operation;
use serde_json::{Map, Value};

use super::tree::{Json, Members};

use sha2::{Digest as _, Sha256};

use super::{
    admission::prune::Keep,
    cluster::{Off, View, secret_problems},
    policy::{DeploymentFix, Keyed, Outpost, Policy, SecretRef, SelectorMode},
    quantity::{Quantity, covers},
};
use crate::k8s::{
    EMBEDDED_SELECTOR, MANAGED_BY, MANAGED_BY_AUTHENTIK, ORIGINAL_SELECTOR, OUTPOST_NAME,
    OUTPOST_TYPE, OUTPOST_UUID, SECRET_CHECKSUM,
};

/// kubectl prints admission warnings verbatim; the apiserver truncates long ones.
pub const MAX_WARNING_CHARS: usize = 120;

/// The kinds of object the webhook fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
#[derive(Debug)]
pub struct Request<'a, J = Value> {
    pub operation: &'a Operation,
    pub group: &'a str,
    pub version: &'a str,
    pub kind: &'a str,
    pub sub_resource: Option<&'a str>,
    /// The request's namespace: an object being created may not name its own.
    pub namespace: Option<&'a str>,
    pub object: Option<&'a J>,
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
        Keep::Keys(&[
            ("name", Keep::All),
            ("namespace", Keep::All),
            ("labels", Keep::Labels),
            ("annotations", Keep::All),
        ]),
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
pub fn mutate<J: Json>(policy: &Policy, view: &dyn View, req: &Request<'_, J>) -> Outcome {
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || req.sub_resource.is_some_and(|s| !s.is_empty())
    {
        return Outcome::skipped();
    }
    match (
        ObjectKind::from_gvk(req.group, req.version, req.kind),
        req.object,
    ) {
        (Some(kind), Some(object)) => {
            let namespace = req.namespace.unwrap_or_else(|| namespace_of(object));
            mutate_in(policy, view, namespace, kind, object)
        }
        _ => Outcome::skipped(),
    }
}

/// Decides what to do with one Service or Deployment, with no view of the cluster.
#[must_use]
pub fn mutate_object(policy: &Policy, kind: ObjectKind, object: &Value) -> Outcome {
    mutate_in(policy, &Off, namespace_of(object), kind, object)
}

fn namespace_of<J: Json>(object: &J) -> &str {
    at(object, &["metadata", "namespace"])
        .and_then(J::as_str)
        .unwrap_or_default()
}

/// The member at `path` of nested objects. `Value::pointer` would parse and unescape a JSON
/// pointer, allocating for every token, on every review.
fn at<'v, J: Json>(value: &'v J, path: &[&str]) -> Option<&'v J> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// Decides what to do with one Service or Deployment in `namespace`, given what `view` knows of
/// the cluster.
#[must_use]
pub fn mutate_in<J: Json>(
    policy: &Policy,
    view: &dyn View,
    namespace: &str,
    kind: ObjectKind,
    object: &J,
) -> Outcome {
    let mut fixer = Fixer {
        ops: Vec::new(),
        warnings: Vec::new(),
        problems: 0,
        kind,
        name: at(object, &["metadata", "name"])
            .and_then(J::as_str)
            .unwrap_or("(unnamed)"),
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
        ObjectKind::Service => {
            let standalone = || view.standalone(namespace, &outpost);
            fixer.service(effective.selector, object, &outpost, standalone);
        }
        ObjectKind::Deployment => {
            let refs = &effective.secret_refs;
            let secrets = checksum_of(refs, view, namespace);
            fixer.deployment(&effective.deployment, object, &outpost, secrets.as_deref());
            // The fix is made all the same: a Secret created or a Role fixed later makes it
            // right. The warning says so on the write that needs it, where kubectl shows it.
            for problem in secret_problems(view, namespace, refs) {
                fixer.note(&problem);
            }
        }
    }
    fixer.finish()
}

/// The digest of the data of every Secret key a Deployment's injected env and volumes read, as
/// it goes into [`SECRET_CHECKSUM`]. `None` when the policy reads no Secret or the view is off.
#[must_use]
pub fn secret_checksum(fix: &DeploymentFix, view: &dyn View, namespace: &str) -> Option<String> {
    checksum_of(&fix.secret_refs(), view, namespace)
}

fn checksum_of(refs: &BTreeSet<SecretRef>, view: &dyn View, namespace: &str) -> Option<String> {
    if refs.is_empty() {
        return None;
    }
    let mut hash = Sha256::new();
    for r in refs {
        let data = view.secret(namespace, &r.name)?;
        hash.update(r.name.as_bytes());
        hash.update([0]);
        match &r.key {
            Some(key) => {
                hash.update(key.as_bytes());
                // A missing key hashes as nothing: it appearing later is a change too.
                hash.update(data.get(key).map_or([0; 32], |d| *d));
            }
            None => {
                for (key, d) in &data {
                    hash.update(key.as_bytes());
                    hash.update(d);
                }
            }
        }
        hash.update([0]);
    }
    Some(hex(&hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

enum Identity<'a> {
    NotOurs,
    Incomplete(&'static str),
    Outpost(Outpost<'a>),
}

/// The outpost an object belongs to, when it carries all of authentik's outpost labels.
#[must_use]
pub fn identify_outpost<J: Json>(object: &J) -> Option<Outpost<'_>> {
    match identify(object) {
        Identity::Outpost(o) => Some(o),
        _ => None,
    }
}

/// An outpost object carries authentik's managed-by label and all three outpost labels.
fn identify<J: Json>(object: &J) -> Identity<'_> {
    let labels = at(object, &["metadata", "labels"]).and_then(J::as_object);
    let label = |key: &str| {
        labels
            .and_then(|l| l.get(key))
            .and_then(J::as_str)
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

/// The index of the outpost container: the one named after the outpost type (sidecars may come
/// first), else the first.
#[must_use]
pub fn outpost_container<J: Json>(containers: &[J], kind: &str) -> usize {
    containers
        .iter()
        .position(|c| c.get("name").and_then(J::as_str) == Some(kind))
        .unwrap_or(0)
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

struct Fixer<'o> {
    ops: Vec<PatchOperation>,
    warnings: Vec<String>,
    /// How many warnings say the object could not be fixed (the rest explain a choice).
    problems: usize,
    /// What the object is, for warnings: written out only when there is one.
    kind: ObjectKind,
    name: &'o str,
}

impl Fixer<'_> {
    fn finish(self) -> Outcome {
        let verdict = match (self.ops.is_empty(), self.problems) {
            (false, _) => Verdict::Patched,
            (true, 0) => Verdict::Unchanged,
            (true, _) => Verdict::Unfixable,
        };
        Outcome {
            verdict,
            ops: self.ops,
            warnings: self.warnings,
        }
    }

    /// A warning that the object could not be fixed.
    fn warn(&mut self, problem: &str) {
        self.problems += 1;
        let text = format!(
            "outpost-webhook: {}/{}: {problem}",
            self.kind.as_str(),
            self.name
        );
        self.push(text);
    }

    /// A warning that explains a choice: the object is as it should be. It names the outpost
    /// itself, so it leaves out the object's name to stay within what kubectl shows.
    fn note(&mut self, text: &str) {
        self.push(format!("outpost-webhook: {text}"));
    }

    fn push(&mut self, mut full: String) {
        if let Some((cut, _)) = full.char_indices().nth(MAX_WARNING_CHARS) {
            full.truncate(cut);
        }
        self.warnings.push(full);
    }

    /// Sets `parent[key]`: `replace` when the member exists (even as null), `add` when it does not.
    fn set(&mut self, parent: &impl Members, at: &PointerBuf, key: &str, value: Value) {
        let path = at.with_trailing_token(key);
        self.ops.push(if parent.contains_key(key) {
            PatchOperation::Replace(ReplaceOperation { path, value })
        } else {
            PatchOperation::Add(AddOperation { path, value })
        });
    }

    /// Sets `parent[key]` unless what is there already contains `desired`.
    fn set_covering(&mut self, parent: &impl Members, at: &PointerBuf, key: &str, desired: &Value) {
        if !parent
            .get(key)
            .is_some_and(|actual| covers(actual, desired, Quantity::No))
        {
            self.set(parent, at, key, desired.clone());
        }
    }

    fn service<J: Json>(
        &mut self,
        mode: SelectorMode,
        object: &J,
        outpost: &Outpost<'_>,
        standalone: impl FnOnce() -> Option<bool>,
    ) {
        if mode == SelectorMode::Keep {
            return;
        }
        let Some(spec) = object.get("spec").and_then(J::as_object) else {
            self.warn("has no spec; cannot set the selector");
            return;
        };
        // An ExternalName Service has no selector and no endpoints to fix.
        if spec.get("type").and_then(J::as_str) == Some("ExternalName") {
            return;
        }
        let selector = spec.get("selector").and_then(J::as_object);
        let desired = pod_selector(outpost);
        // The controller's selector for an embedded outpost names the server pods; after one of
        // its strategic-merge PATCHes over a corrected selector, the union of both keeps it.
        let embedded = selector.is_some_and(|s| {
            EMBEDDED_SELECTOR
                .iter()
                .all(|(k, v)| s.get(k).and_then(J::as_str) == Some(*v))
        });
        let recorded = at(object, &["metadata", "annotations", ORIGINAL_SELECTOR])
            .and_then(J::as_str)
            .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok());
        let rewrite = match mode {
            SelectorMode::Keep => false,
            SelectorMode::Outpost => true,
            SelectorMode::Auto => match standalone() {
                Some(true) if embedded => true,
                Some(true) => false,
                Some(false) => {
                    // The standalone Deployment is gone: put back what was rewritten. Only the
                    // outpost's labels or the union are replaced, never a selector someone chose.
                    if let Some(original) =
                        recorded.filter(|r| !selector.is_some_and(|s| s.eq_map(r)))
                        && (embedded || selector.is_none_or(|s| s.eq_map(&desired)))
                    {
                        self.set(spec, &ptr(&["spec"]), "selector", Value::Object(original));
                    } else if embedded {
                        self.note(&format!(
                            "selector kept: no Deployment runs outpost {}; the server pods serve it",
                            outpost.name
                        ));
                    }
                    return;
                }
                None => {
                    if embedded {
                        self.note(&format!(
                            "selector kept for outpost {}: the cluster view is off (serve --cluster)",
                            outpost.name
                        ));
                    }
                    return;
                }
            },
        };
        if !rewrite || selector.is_some_and(|s| s.eq_map(&desired)) {
            return;
        }
        // Replaced whole: a selector with `app.kubernetes.io/name: authentik` in it matches no
        // outpost pod, whatever else it holds.
        self.set(spec, &ptr(&["spec"]), "selector", Value::Object(desired));
        // Only `auto` ever restores, so only `auto` records.
        if mode == SelectorMode::Auto && embedded && recorded.is_none() {
            self.record_selector(object, selector);
        }
    }

    /// Records what the controller wrote, less the outpost's own labels that a union adds, so
    /// that the selector can be restored exactly when the standalone Deployment goes away.
    fn record_selector<J: Json>(&mut self, object: &J, selector: Option<&J::Obj>) {
        // Inserted in the order written, so a key written twice keeps its last value.
        let mut original = Map::new();
        for (k, v) in selector.into_iter().flat_map(Members::entries) {
            if !matches!(k, MANAGED_BY | OUTPOST_NAME | OUTPOST_TYPE | OUTPOST_UUID) {
                original.insert(k.to_owned(), v.to_value());
            }
        }
        let text = Value::Object(original).to_string();
        let Some(metadata) = object.get("metadata").and_then(J::as_object) else {
            return;
        };
        let entries = BTreeMap::from([(ORIGINAL_SELECTOR, text.as_str())]);
        self.set_entries(metadata, &ptr(&["metadata"]), "annotations", &entries);
    }

    fn deployment<J: Json>(
        &mut self,
        fix: &DeploymentFix,
        object: &J,
        outpost: &Outpost<'_>,
        secrets: Option<&str>,
    ) {
        if fix.is_empty() {
            return;
        }
        let Some(spec) = object.get("spec").and_then(J::as_object) else {
            self.warn("has no spec");
            return;
        };
        let template = spec.get("template").and_then(J::as_object);
        let pod = template.and_then(|t| t.get("spec")).and_then(J::as_object);
        let containers = pod
            .and_then(|p| p.get("containers"))
            .and_then(J::as_array)
            .filter(|c| !c.is_empty());
        let (Some(template), Some(pod), Some(containers)) = (template, pod, containers) else {
            self.warn("has no containers in spec.template.spec");
            return;
        };
        let index = outpost_container(containers, outpost.kind);
        let Some(container) = containers.get(index).and_then(J::as_object) else {
            self.warn("its outpost container is not an object");
            return;
        };

        let spec_at = ptr(&["spec"]);
        if let Some(replicas) = fix.replicas
            && spec.get("replicas").and_then(J::as_i64) != Some(i64::from(replicas))
        {
            self.set(spec, &spec_at, "replicas", replicas.into());
        }
        if let Some(strategy) = &fix.strategy {
            self.set_covering(spec, &spec_at, "strategy", strategy);
        }

        self.pod_metadata(fix, spec, template, secrets);

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

    fn pod_metadata<O: Members>(
        &mut self,
        fix: &DeploymentFix,
        spec: &O,
        template: &O,
        secrets: Option<&str>,
    ) {
        let selector = spec
            .get("selector")
            .and_then(|s| s.get("matchLabels"))
            .and_then(O::Item::as_object);
        let mut labels = BTreeMap::new();
        for (key, value) in &fix.pod_labels {
            // A template label that contradicts the immutable selector makes the Deployment invalid.
            match selector.and_then(|s| s.get(key)).and_then(O::Item::as_str) {
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
            // The reconciler alone updates the Secret checksum, when the data changes: admission
            // only adds it where it is missing, so a replica whose cache lags never undoes it.
            let present = template
                .get("metadata")
                .and_then(|m| m.get("annotations"))
                .and_then(|a| a.get(SECRET_CHECKSUM))
                .is_some();
            if let Some(value) = secrets.filter(|_| !present) {
                annotations.insert(SECRET_CHECKSUM, value);
            }
        }

        let template_at = ptr(&["spec", "template"]);
        let meta = template.get("metadata");
        if let Some(meta) = meta.and_then(O::Item::as_object) {
            let meta_at = template_at.with_trailing_token("metadata");
            self.set_entries(meta, &meta_at, "labels", &labels);
            self.set_entries(meta, &meta_at, "annotations", &annotations);
        } else if meta.is_none_or(O::Item::is_null) {
            let mut meta = Map::new();
            for (key, entries) in [("labels", &labels), ("annotations", &annotations)] {
                if !entries.is_empty() {
                    meta.insert(key.into(), string_map(entries));
                }
            }
            if !meta.is_empty() {
                self.set(template, &template_at, "metadata", Value::Object(meta));
            }
        } else {
            self.warn("spec.template.metadata is not an object");
        }
    }

    /// Sets string entries of the map `parent[key]`, creating the map when it is absent.
    fn set_entries<O: Members>(
        &mut self,
        parent: &O,
        at: &PointerBuf,
        key: &str,
        entries: &BTreeMap<&str, &str>,
    ) {
        if entries.is_empty() {
            return;
        }
        let value = parent.get(key);
        if let Some(map) = value.and_then(O::Item::as_object) {
            let map_at = at.with_trailing_token(key);
            for (k, v) in entries {
                if map.get(k).and_then(O::Item::as_str) != Some(*v) {
                    self.set(map, &map_at, k, (*v).into());
                }
            }
        } else if value.is_none_or(O::Item::is_null) {
            self.set(parent, at, key, string_map(entries));
        } else {
            self.warn(&format!("{key} is not a map"));
        }
    }

    /// Upserts policy entries into the list `parent[field]`, matching them on `key_field`.
    ///
    /// Linear in the list's length: one index is built, then each policy entry is looked up.
    /// Entries already right are left; wrong ones are replaced in place (every duplicate of the
    /// name, since the container runtime takes the last); missing ones are appended.
    fn upsert<O: Members>(
        &mut self,
        parent: &O,
        at: &PointerBuf,
        field: &str,
        key_field: &str,
        desired: &[Keyed],
    ) {
        if desired.is_empty() {
            return;
        }
        let value = parent.get(field);
        let Some(items) = value.and_then(O::Item::as_array) else {
            if value.is_none_or(O::Item::is_null) {
                let all = desired.iter().map(|k| k.value.clone()).collect();
                self.set(parent, at, field, Value::Array(all));
            } else {
                self.warn(&format!("{field} is not a list"));
            }
            return;
        };
        // A short list (an outpost container's env, its mounts) is searched in place: hashing
        // every name and a list per name cost more than the comparisons. A long one is indexed
        // once, so the work stays linear in its length.
        let index: HashMap<&str, Vec<usize>> = if items.len() <= SCAN_UP_TO {
            HashMap::new()
        } else {
            let mut index: HashMap<&str, Vec<usize>> = HashMap::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(key) = key_of(item, key_field) {
                    index.entry(key).or_default().push(i);
                }
            }
            index
        };
        let list_at = at.with_trailing_token(field);
        let mut missing = Vec::new();
        for want in desired {
            let mut found = false;
            let mut check = |i: usize, have: &O::Item| {
                found = true;
                if !covers(have, &want.value, Quantity::No) {
                    self.ops.push(PatchOperation::Replace(ReplaceOperation {
                        path: list_at.with_trailing_token(i),
                        value: want.value.clone(),
                    }));
                }
            };
            if items.len() <= SCAN_UP_TO {
                for (i, have) in items.iter().enumerate() {
                    if key_of(have, key_field) == Some(want.key.as_str()) {
                        check(i, have);
                    }
                }
            } else if let Some(at) = index.get(want.key.as_str()) {
                for &i in at {
                    if let Some(have) = items.get(i) {
                        check(i, have);
                    }
                }
            }
            if !found {
                missing.push(want);
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

/// The string `item[field]`, the key a list entry is upserted by.
fn key_of<'v, J: Json>(item: &'v J, field: &str) -> Option<&'v str> {
    item.get(field).and_then(J::as_str)
}

/// Lists this long or shorter are searched in place by [`Fixer::upsert`]; longer ones indexed.
const SCAN_UP_TO: usize = 32;

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
    use crate::core::cluster::Snapshot;
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
                namespace: None,
                object: Some(&obj),
            };
            assert_eq!(mutate(&p, &Off, &req).verdict, Verdict::Skipped);
        }
        let req = Request {
            operation: &Operation::Create,
            group: "apps",
            version: "v1",
            kind: "Deployment",
            sub_resource: Some(""),
            namespace: None,
            object: Some(&obj),
        };
        assert_eq!(mutate(&p, &Off, &req).verdict, Verdict::Patched);
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
                namespace: None,
                object: Some(&obj),
            };
            assert_eq!(mutate(&p, &Off, &req).verdict, Verdict::Skipped);
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

    fn embedded_service() -> Value {
        json!({"metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels("proxy")},
               "spec": {"selector": {"app.kubernetes.io/name": "authentik",
                                     "app.kubernetes.io/component": "server"}}})
    }

    fn cluster(standalone: bool) -> Snapshot {
        let mut s = Snapshot::default();
        if standalone {
            let o = Outpost {
                name: "o",
                kind: "proxy",
                uuid: "0eecac0797c7443c892505f2f4fe3e47",
            };
            let labels = pod_selector(&o)
                .into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
                .collect();
            s.put_deployment("authentik", "ak-outpost-o", labels);
        }
        s
    }

    fn auto(view: &dyn View, svc: &Value) -> Outcome {
        mutate_in(
            &Policy::builtin().unwrap(),
            view,
            "authentik",
            ObjectKind::Service,
            svc,
        )
    }

    #[test]
    fn auto_keeps_the_server_selector_on_a_default_install_and_says_why() {
        let out = auto(&cluster(false), &embedded_service());
        assert_eq!((out.verdict, out.ops.len()), (Verdict::Unchanged, 0));
        assert_eq!(
            out.warnings,
            [
                "outpost-webhook: selector kept: no Deployment runs outpost o; the server pods serve it"
            ]
        );
        assert!(out.warnings[0].chars().count() <= MAX_WARNING_CHARS);
        let off = auto(&Off, &embedded_service());
        assert!(off.ops.is_empty());
        assert!(
            off.warnings[0].contains("cluster view is off"),
            "{:?}",
            off.warnings
        );
    }

    #[test]
    fn auto_points_the_service_at_a_standalone_deployment_and_records_the_original() {
        let view = cluster(true);
        let out = auto(&view, &embedded_service());
        let fixed = apply(&embedded_service(), &out);
        assert_eq!(
            fixed["spec"]["selector"]["app.kubernetes.io/name"],
            "authentik-outpost-proxy"
        );
        assert_eq!(fixed["spec"]["selector"].as_object().unwrap().len(), 5);
        let recorded = fixed["metadata"]["annotations"][ORIGINAL_SELECTOR]
            .as_str()
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(recorded).unwrap(),
            embedded_service()["spec"]["selector"]
        );
        assert!(auto(&view, &fixed).ops.is_empty());

        // The controller's next PATCH merges its pair back in: the union is fixed again, and
        // the record is not overwritten with the union.
        let mut union = fixed.clone();
        union["spec"]["selector"]["app.kubernetes.io/name"] = json!("authentik");
        union["spec"]["selector"]["app.kubernetes.io/component"] = json!("server");
        let again = apply(&union, &auto(&view, &union));
        assert_eq!(again, fixed);
    }

    #[test]
    fn auto_restores_the_recorded_selector_when_the_standalone_deployment_is_gone() {
        let fixed = {
            let svc = embedded_service();
            apply(&svc, &auto(&cluster(true), &svc))
        };
        let restored = apply(&fixed, &auto(&cluster(false), &fixed));
        assert_eq!(
            restored["spec"]["selector"],
            embedded_service()["spec"]["selector"]
        );
        assert!(auto(&cluster(false), &restored).ops.is_empty());
        // The union, after a controller PATCH, is restored too.
        let mut union = fixed.clone();
        union["spec"]["selector"]["app.kubernetes.io/name"] = json!("authentik");
        union["spec"]["selector"]["app.kubernetes.io/component"] = json!("server");
        let restored = apply(&union, &auto(&cluster(false), &union));
        assert_eq!(
            restored["spec"]["selector"],
            embedded_service()["spec"]["selector"]
        );
    }

    #[test]
    fn auto_never_rewrites_a_selector_without_the_controllers_embedded_pair() {
        let mut svc = embedded_service();
        svc["spec"]["selector"] = json!({"app": "mine"});
        for standalone in [true, false] {
            let out = auto(&cluster(standalone), &svc);
            assert_eq!((out.ops.len(), out.warnings.len()), (0, 0), "{standalone}");
        }
    }

    #[test]
    fn the_secret_checksum_is_added_once_and_never_replaced_by_admission() {
        let p = Policy::builtin().unwrap();
        let obj = deployment(json!({"name": "proxy"}));
        let mut view = Snapshot::default();
        let data = |v: &str| {
            ["HOST", "PORT", "USER", "PASSWORD", "NAME"]
                .iter()
                .map(|k| {
                    (
                        format!("AUTHENTIK_POSTGRESQL__{k}"),
                        crate::core::cluster::digest(v.as_bytes()),
                    )
                })
                .collect()
        };
        view.put_secret("", "goauthentik", data("one"));
        let first = apply(
            &obj,
            &mutate_in(&p, &view, "", ObjectKind::Deployment, &obj),
        );
        let sum = first["spec"]["template"]["metadata"]["annotations"][SECRET_CHECKSUM].clone();
        assert_eq!(sum.as_str().unwrap().len(), 64);
        // The data changes; a replica that sees it first must not undo what the reconciler wrote.
        view.put_secret("", "goauthentik", data("two"));
        assert!(
            mutate_in(&p, &view, "", ObjectKind::Deployment, &first)
                .ops
                .is_empty()
        );
        let fix = &p
            .for_outpost(&Outpost {
                name: "o",
                kind: "proxy",
                uuid: "u",
            })
            .deployment;
        assert_ne!(
            secret_checksum(fix, &view, "").unwrap(),
            sum.as_str().unwrap()
        );
        // An unreferenced key changes nothing.
        let mut other = data("two");
        other.insert("UNRELATED".into(), crate::core::cluster::digest(b"x"));
        let mut view2 = Snapshot::default();
        view2.put_secret("", "goauthentik", other);
        assert_eq!(
            secret_checksum(fix, &view, ""),
            secret_checksum(fix, &view2, "")
        );
        assert_eq!(secret_checksum(fix, &Off, ""), None);
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
