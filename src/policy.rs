//! The policy: what outpost-webhook fixes, read from YAML, validated, and compiled into the
//! per-outpost [`Effective`] form the pure core consumes.
//!
//! Pure apart from [`Policy::load`], which reads one file.
//!
//! Rules apply in order. A later rule overrides an earlier one field by field; the keyed lists
//! (`env` by name, `volumes` by name, `volumeMounts` by mountPath) and the label and annotation maps
//! merge entry by entry. Kubernetes objects embedded in the policy (env vars, volumes, probes...) are
//! checked against their k8s-openapi types, so a misspelt field is an error rather than a patch the
//! apiserver silently prunes.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    path::Path,
    sync::Arc,
};

use k8s_openapi::api::{
    apps::v1::DeploymentStrategy,
    core::v1::{EnvVar, Probe, ResourceRequirements, Volume, VolumeMount},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

/// The built-in policy, used when no `--policy` is given.
pub const DEFAULT_POLICY_YAML: &str = include_str!("default-policy.yaml");

/// Pod labels that authentik's controller puts in a Deployment's immutable `spec.selector`.
/// A policy must not set them: a template that stops matching its selector is rejected (422).
pub const SELECTOR_LABELS: [&str; 5] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/managed-by",
    "goauthentik.io/outpost-name",
    "goauthentik.io/outpost-type",
    "goauthentik.io/outpost-uuid",
];

/// Why a policy was refused. Each message names the file, the line where known, and the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        file: String,
        line: u64,
        field: String,
        message: String,
    },
}

/// The identity of one outpost, read from the labels authentik's controller writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outpost<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub uuid: &'a str,
}

/// What to do with an outpost Service's selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectorMode {
    /// Leave the selector as the controller wrote it.
    #[default]
    Keep,
    /// Replace it with the outpost's own pod labels when it is anything else.
    Outpost,
}

/// A list entry the policy upserts, with the key it is matched on (env/volume name, mountPath).
#[derive(Debug, Clone, PartialEq)]
pub struct Keyed {
    pub key: String,
    pub value: Value,
}

/// The config checksum put on the pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub annotation: String,
    pub value: String,
}

/// Everything the policy wants on one outpost's Deployment, after merging the matching rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentFix {
    pub replicas: Option<i32>,
    pub strategy: Option<Value>,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    pub env: Vec<Keyed>,
    pub volumes: Vec<Keyed>,
    pub volume_mounts: Vec<Keyed>,
    pub resources: Option<Value>,
    pub readiness_probe: Option<Value>,
    pub checksum: Option<Checksum>,
}

impl DeploymentFix {
    /// True when the policy injects nothing into a Deployment.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The merged policy for one outpost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effective {
    pub selector: SelectorMode,
    pub deployment: DeploymentFix,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    source: String,
    rules: Vec<Rule>,
    /// When every rule matches every outpost, the merge is the same for all of them: done once.
    shared: Option<Arc<Effective>>,
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: Matcher,
    selector: Option<SelectorMode>,
    deployment: RuleDeployment,
}

#[derive(Debug, Clone, Default)]
struct Matcher {
    names: Option<Vec<String>>,
    types: Option<Vec<String>>,
    uuids: Option<Vec<String>>,
}

impl Matcher {
    fn is_all(&self) -> bool {
        self.names.is_none() && self.types.is_none() && self.uuids.is_none()
    }

    fn matches(&self, outpost: &Outpost<'_>) -> bool {
        let within = |list: &Option<Vec<String>>, value: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|v| v == value))
        };
        within(&self.names, outpost.name)
            && within(&self.types, outpost.kind)
            && self
                .uuids
                .as_ref()
                .is_none_or(|l| l.iter().any(|u| *u == normalize_uuid(outpost.uuid)))
    }
}

#[derive(Debug, Clone, Default)]
struct RuleDeployment {
    replicas: Option<i32>,
    strategy: Option<Value>,
    pod_labels: BTreeMap<String, String>,
    pod_annotations: BTreeMap<String, String>,
    env: Vec<Keyed>,
    volumes: Vec<Keyed>,
    volume_mounts: Vec<Keyed>,
    resources: Option<Value>,
    readiness_probe: Option<Value>,
    checksum_annotation: Option<String>,
}

// ---- The file format. `deny_unknown_fields` makes a typo an error with its line. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    rules: Vec<Spanned<FileRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    #[serde(default, rename = "match")]
    matcher: Option<FileMatch>,
    #[serde(default)]
    service: Option<FileService>,
    #[serde(default)]
    deployment: Option<FileDeployment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileMatch {
    #[serde(default)]
    names: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    types: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    uuids: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    #[serde(default)]
    selector: Option<SelectorMode>,
}

type Objects = Option<Vec<Spanned<Value>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDeployment {
    #[serde(default)]
    replicas: Option<Spanned<i64>>,
    #[serde(default)]
    pod_labels: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pod_annotations: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    env: Objects,
    #[serde(default)]
    volumes: Objects,
    #[serde(default)]
    volume_mounts: Objects,
    #[serde(default)]
    resources: Option<Spanned<Value>>,
    #[serde(default)]
    readiness_probe: Option<Spanned<Value>>,
    #[serde(default)]
    strategy: Option<Spanned<Value>>,
    #[serde(default)]
    checksum_annotation: Option<Spanned<String>>,
}

impl Policy {
    /// The built-in policy.
    ///
    /// # Errors
    /// Only if the shipped YAML is broken, which the test suite rules out.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::from_yaml("built-in policy", DEFAULT_POLICY_YAML)
    }

    /// Reads and validates a policy file. The only I/O in this module.
    ///
    /// # Errors
    /// When the file cannot be read, is not YAML of the policy's shape, or fails validation.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_yaml(&file, &text)
    }

    /// Parses and validates policy text; `file` names it in error messages.
    ///
    /// # Errors
    /// When the text is not YAML of the policy's shape, or fails validation.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, PolicyError> {
        let root: FileRoot = serde_saphyr::from_str(text).map_err(|e| PolicyError::Syntax {
            file: file.to_owned(),
            message: one_line(&e.to_string()),
        })?;
        let mut rules = Vec::with_capacity(root.rules.len());
        for (i, rule) in root.rules.into_iter().enumerate() {
            let mut cx = Cx {
                file,
                line: rule.referenced.line(),
                path: format!("rules[{i}]"),
            };
            rules.push(compile_rule(&mut cx, rule.value)?);
        }
        let shared = rules
            .iter()
            .all(|r| r.matcher.is_all())
            .then(|| Arc::new(merge(rules.iter())));
        Ok(Self {
            source: file.to_owned(),
            rules,
            shared,
        })
    }

    /// Where this policy came from (a path, or "built-in policy").
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// How many rules it has.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The merged policy for one outpost.
    #[must_use]
    pub fn for_outpost(&self, outpost: &Outpost<'_>) -> Cow<'_, Effective> {
        match &self.shared {
            Some(shared) => Cow::Borrowed(shared),
            None => Cow::Owned(merge(
                self.rules.iter().filter(|r| r.matcher.matches(outpost)),
            )),
        }
    }
}

fn merge<'a>(rules: impl Iterator<Item = &'a Rule>) -> Effective {
    let mut out = Effective::default();
    let mut checksum_annotation = None;
    for rule in rules {
        if let Some(mode) = rule.selector {
            out.selector = mode;
        }
        let d = &rule.deployment;
        let o = &mut out.deployment;
        if d.replicas.is_some() {
            o.replicas = d.replicas;
        }
        for (slot, new) in [
            (&mut o.strategy, &d.strategy),
            (&mut o.resources, &d.resources),
            (&mut o.readiness_probe, &d.readiness_probe),
        ] {
            if new.is_some() {
                slot.clone_from(new);
            }
        }
        o.pod_labels.extend(d.pod_labels.clone());
        o.pod_annotations.extend(d.pod_annotations.clone());
        upsert_keyed(&mut o.env, &d.env);
        upsert_keyed(&mut o.volumes, &d.volumes);
        upsert_keyed(&mut o.volume_mounts, &d.volume_mounts);
        if d.checksum_annotation.is_some() {
            checksum_annotation.clone_from(&d.checksum_annotation);
        }
    }
    // An empty annotation name switches the checksum off (a later rule can undo an earlier one).
    if let Some(annotation) = checksum_annotation.filter(|a| !a.is_empty()) {
        let value = checksum(&out.deployment);
        out.deployment.checksum = Some(Checksum { annotation, value });
    }
    out
}

fn upsert_keyed(into: &mut Vec<Keyed>, from: &[Keyed]) {
    for entry in from {
        match into.iter_mut().find(|e| e.key == entry.key) {
            Some(slot) => slot.value = entry.value.clone(),
            None => into.push(entry.clone()),
        }
    }
}

/// Hex SHA-256 of the canonical JSON of what the policy puts into the pod template.
///
/// Replicas and the rollout strategy are left out on purpose: changing them scales or changes how
/// the next rollout proceeds, and must not by itself restart every outpost pod.
fn checksum(fix: &DeploymentFix) -> String {
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

// ---- Validation ----

/// Where validation is: file, line and field path, for error messages.
struct Cx<'a> {
    file: &'a str,
    line: u64,
    path: String,
}

impl Cx<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_owned(),
            line: self.line,
            field: if field.is_empty() {
                self.path.clone()
            } else {
                format!("{}.{field}", self.path)
            },
            message: message.into(),
        }
    }

    fn at(&self, line: u64, path: impl Into<String>) -> Cx<'_> {
        Cx {
            file: self.file,
            line,
            path: path.into(),
        }
    }
}

fn compile_rule(cx: &mut Cx<'_>, rule: FileRule) -> Result<Rule, PolicyError> {
    let m = rule.matcher.unwrap_or_default();
    let matcher = Matcher {
        names: compile_match_list(cx, "match.names", m.names, |s| {
            valid_label_value(s) && !s.is_empty()
        })?,
        types: compile_match_list(cx, "match.types", m.types, |s| {
            valid_label_value(s) && !s.is_empty()
        })?,
        uuids: compile_match_list(cx, "match.uuids", m.uuids, |s| {
            let n = normalize_uuid(s);
            n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit())
        })?
        .map(|l| l.iter().map(|u| normalize_uuid(u)).collect()),
    };
    let deployment = match rule.deployment {
        Some(d) => compile_deployment(cx, d)?,
        None => RuleDeployment::default(),
    };
    Ok(Rule {
        matcher,
        selector: rule.service.and_then(|s| s.selector),
        deployment,
    })
}

fn compile_match_list(
    cx: &Cx<'_>,
    field: &str,
    list: Option<Vec<Spanned<String>>>,
    valid: impl Fn(&str) -> bool,
) -> Result<Option<Vec<String>>, PolicyError> {
    let Some(list) = list else { return Ok(None) };
    if list.is_empty() {
        return Err(cx.err(
            field,
            "an empty list matches nothing; leave the field out to match all",
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, s)| {
            if valid(&s.value) {
                Ok(s.value)
            } else {
                Err(cx
                    .at(s.referenced.line(), format!("{}.{field}[{i}]", cx.path))
                    .err("", format!("{:?} is not a valid value here", s.value)))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn compile_deployment(cx: &Cx<'_>, d: FileDeployment) -> Result<RuleDeployment, PolicyError> {
    let mut out = RuleDeployment::default();
    if let Some(r) = d.replicas {
        let c = cx.at(r.referenced.line(), cx.path.clone());
        out.replicas = Some(
            i32::try_from(r.value)
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| c.err("deployment.replicas", "must be between 0 and 2147483647"))?,
        );
    }
    if let Some(labels) = d.pod_labels {
        let c = cx.at(labels.referenced.line(), cx.path.clone());
        for (k, v) in &labels.value {
            let field = format!("deployment.podLabels[{k:?}]");
            check_qualified_name(&c, &field, k)?;
            if !valid_label_value(v) {
                return Err(c.err(&field, format!("{v:?} is not a valid label value")));
            }
            if SELECTOR_LABELS.contains(&k.as_str()) {
                return Err(c.err(
                    &field,
                    "authentik selects the outpost's pods by this label; changing it would \
                     orphan them from the Deployment's immutable selector",
                ));
            }
        }
        out.pod_labels = labels.value;
    }
    if let Some(annotations) = d.pod_annotations {
        let c = cx.at(annotations.referenced.line(), cx.path.clone());
        for k in annotations.value.keys() {
            check_qualified_name(&c, &format!("deployment.podAnnotations[{k:?}]"), k)?;
        }
        out.pod_annotations = annotations.value;
    }
    if let Some(a) = d.checksum_annotation {
        if !a.value.is_empty() {
            let c = cx.at(a.referenced.line(), cx.path.clone());
            check_qualified_name(&c, "deployment.checksumAnnotation", &a.value)?;
        }
        out.checksum_annotation = Some(a.value);
    }
    out.env = compile_keyed::<EnvVar>(cx, "deployment.env", d.env, "name", check_env)?;
    out.volumes = compile_keyed::<Volume>(cx, "deployment.volumes", d.volumes, "name", |_| None)?;
    out.volume_mounts = compile_keyed::<VolumeMount>(
        cx,
        "deployment.volumeMounts",
        d.volume_mounts,
        "mountPath",
        |m| m.name.is_empty().then_some("name: must not be empty"),
    )?;
    out.resources = compile_one::<ResourceRequirements>(cx, "deployment.resources", d.resources)?;
    out.readiness_probe = compile_one::<Probe>(cx, "deployment.readinessProbe", d.readiness_probe)?;
    out.strategy = compile_one::<DeploymentStrategy>(cx, "deployment.strategy", d.strategy)?;
    if let Some(s) = &out.strategy {
        let kind = s.get("type").and_then(Value::as_str);
        if !matches!(kind, None | Some("RollingUpdate" | "Recreate")) {
            return Err(cx.err(
                "deployment.strategy.type",
                "must be RollingUpdate or Recreate",
            ));
        }
        if kind == Some("Recreate") && s.get("rollingUpdate").is_some() {
            return Err(cx.err(
                "deployment.strategy.rollingUpdate",
                "may not be set when type is Recreate",
            ));
        }
    }
    Ok(out)
}

fn check_env(e: &EnvVar) -> Option<&'static str> {
    if e.value.is_some() && e.value_from.is_some() {
        return Some("value and valueFrom: only one may be set");
    }
    let from = e.value_from.as_ref()?;
    if let Some(r) = &from.secret_key_ref {
        if r.name.is_empty() {
            return Some("valueFrom.secretKeyRef.name: must not be empty");
        }
        if r.key.is_empty() {
            return Some("valueFrom.secretKeyRef.key: must not be empty");
        }
    }
    if let Some(r) = &from.config_map_key_ref {
        if r.name.is_empty() {
            return Some("valueFrom.configMapKeyRef.name: must not be empty");
        }
        if r.key.is_empty() {
            return Some("valueFrom.configMapKeyRef.key: must not be empty");
        }
    }
    None
}

/// Checks each entry against its Kubernetes type and the key it is upserted by.
fn compile_keyed<T: DeserializeOwned + Serialize>(
    cx: &Cx<'_>,
    field: &str,
    list: Objects,
    key_field: &str,
    extra: impl Fn(&T) -> Option<&'static str>,
) -> Result<Vec<Keyed>, PolicyError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, entry) in list.unwrap_or_default().into_iter().enumerate() {
        let c = cx.at(entry.referenced.line(), format!("{}.{field}[{i}]", cx.path));
        let typed: T = typed(&c, &entry.value)?;
        let key = entry
            .value
            .get(key_field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if key.is_empty() {
            return Err(c.err(key_field, "must not be empty"));
        }
        if let Some(problem) = extra(&typed) {
            return Err(c.err("", problem));
        }
        if !seen.insert(key.clone()) {
            return Err(c.err(key_field, format!("{key:?} appears twice in this list")));
        }
        out.push(Keyed {
            key,
            value: entry.value,
        });
    }
    Ok(out)
}

fn compile_one<T: DeserializeOwned + Serialize>(
    cx: &Cx<'_>,
    field: &str,
    value: Option<Spanned<Value>>,
) -> Result<Option<Value>, PolicyError> {
    let Some(v) = value else { return Ok(None) };
    let c = cx.at(v.referenced.line(), format!("{}.{field}", cx.path));
    typed::<T>(&c, &v.value)?;
    Ok(Some(v.value))
}

/// Deserializes into the k8s-openapi type, then checks that every field written survives the
/// round trip: k8s-openapi (like the apiserver) drops unknown fields silently.
fn typed<T: DeserializeOwned + Serialize>(cx: &Cx<'_>, value: &Value) -> Result<T, PolicyError> {
    if !value.is_object() {
        return Err(cx.err("", "must be a mapping"));
    }
    let typed: T =
        serde_json::from_value(value.clone()).map_err(|e| cx.err("", one_line(&e.to_string())))?;
    let back = serde_json::to_value(&typed).map_err(|e| cx.err("", e.to_string()))?;
    if let Some(unknown) = unknown_field(value, &back) {
        return Err(cx.err(&unknown, "unknown field"));
    }
    Ok(typed)
}

/// The first field (as a dotted path) that `written` has and `known` lacks: `known` is
/// `written` after a round trip through its k8s-openapi type, which drops unknown fields
/// silently, as the apiserver prunes them.
#[must_use]
pub fn unknown_field(written: &Value, known: &Value) -> Option<String> {
    first_unknown(written, known, "")
}

fn first_unknown(written: &Value, known: &Value, at: &str) -> Option<String> {
    match (written, known) {
        (Value::Object(w), Value::Object(k)) => w.iter().find_map(|(key, wv)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            match k.get(key) {
                None if !wv.is_null() => Some(path),
                None => None,
                Some(kv) => first_unknown(wv, kv, &path),
            }
        }),
        (Value::Array(w), Value::Array(k)) => w
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (wv, kv))| first_unknown(wv, kv, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn check_qualified_name(cx: &Cx<'_>, field: &str, key: &str) -> Result<(), PolicyError> {
    if valid_qualified_name(key) {
        Ok(())
    } else {
        Err(cx.err(
            field,
            "not a valid key: an optional DNS-subdomain prefix and '/', then 1-63 characters \
             [A-Za-z0-9-_.] starting and ending with an alphanumeric",
        ))
    }
}

/// A Kubernetes label or annotation key: `[prefix/]name`.
#[must_use]
pub fn valid_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A Kubernetes label value: empty, or 1-63 of `[A-Za-z0-9-_.]` with alphanumeric ends.
#[must_use]
pub fn valid_label_value(v: &str) -> bool {
    let alnum = |c: Option<u8>| c.is_some_and(|b| b.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && alnum(v.bytes().next())
            && alnum(v.bytes().last()))
}

/// authentik writes outpost UUIDs as 32 hex digits; operators often paste the dashed form.
fn normalize_uuid(u: &str) -> String {
    u.chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outpost<'a>(name: &'a str, kind: &'a str) -> Outpost<'a> {
        Outpost {
            name,
            kind,
            uuid: "0eecac0797c7443c892505f2f4fe3e47",
        }
    }

    fn invalid(yaml: &str) -> String {
        match Policy::from_yaml("p.yaml", yaml) {
            Ok(_) => panic!("policy should have been refused:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn builtin_policy_parses_and_does_what_operators_patch_by_hand() {
        let p = Policy::builtin().unwrap();
        let e = p.for_outpost(&outpost("authentik-embedded-outpost", "proxy"));
        assert_eq!(e.selector, SelectorMode::Outpost);
        assert_eq!(e.deployment.replicas, Some(2));
        assert_eq!(
            e.deployment.pod_labels.get("app.kubernetes.io/component"),
            Some(&"server".to_owned())
        );
        let names: Vec<&str> = e.deployment.env.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            names,
            [
                "AUTHENTIK_POSTGRESQL__HOST",
                "AUTHENTIK_POSTGRESQL__PORT",
                "AUTHENTIK_POSTGRESQL__USER",
                "AUTHENTIK_POSTGRESQL__PASSWORD",
                "AUTHENTIK_POSTGRESQL__NAME"
            ]
        );
        for k in &e.deployment.env {
            assert_eq!(
                k.value["valueFrom"]["secretKeyRef"],
                serde_json::json!({"name": "goauthentik", "key": k.key})
            );
        }
        let c = e.deployment.checksum.as_ref().unwrap();
        assert_eq!(c.annotation, "outpost-webhook/config-checksum");
        assert_eq!(c.value.len(), 64);
    }

    #[test]
    fn later_rules_override_field_by_field_and_merge_lists_by_key() {
        let p = Policy::from_yaml(
            "p.yaml",
            r"
rules:
  - deployment:
      replicas: 2
      env: [{name: A, value: '1'}, {name: B, value: '2'}]
      podLabels: {x: '1'}
  - match: {types: [ldap]}
    deployment:
      replicas: 3
      env: [{name: B, value: 'ldap'}, {name: C, value: '3'}]
      podLabels: {y: '2'}
",
        )
        .unwrap();
        let proxy = p.for_outpost(&outpost("a", "proxy"));
        assert_eq!(proxy.deployment.replicas, Some(2));
        assert_eq!(proxy.deployment.env.len(), 2);
        let ldap = p.for_outpost(&outpost("a", "ldap"));
        assert_eq!(ldap.deployment.replicas, Some(3));
        let env: Vec<(&str, &Value)> = ldap
            .deployment
            .env
            .iter()
            .map(|k| (k.key.as_str(), &k.value["value"]))
            .collect();
        assert_eq!(
            env,
            [
                ("A", &Value::from("1")),
                ("B", &Value::from("ldap")),
                ("C", &Value::from("3"))
            ]
        );
        assert_eq!(ldap.deployment.pod_labels.len(), 2);
        assert_eq!(ldap.selector, SelectorMode::Keep);
    }

    #[test]
    fn matches_by_name_type_and_uuid_with_or_without_dashes() {
        let p = Policy::from_yaml(
            "p.yaml",
            r"
rules:
  - match: {names: [other]}
    deployment: {replicas: 5}
  - match: {uuids: [0EECAC07-97c7-443c-8925-05f2f4fe3e47], types: [proxy]}
    deployment: {replicas: 4}
",
        )
        .unwrap();
        assert_eq!(
            p.for_outpost(&outpost("x", "proxy")).deployment.replicas,
            Some(4)
        );
        assert_eq!(
            p.for_outpost(&outpost("x", "ldap")).deployment.replicas,
            None
        );
        assert_eq!(
            p.for_outpost(&outpost("other", "ldap")).deployment.replicas,
            Some(5)
        );
    }

    #[test]
    fn checksum_ignores_key_order_and_replicas_but_follows_pod_template_content() {
        let a = "rules: [{deployment: {replicas: 1, checksumAnnotation: c/s, env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: k}}}]}}]";
        let b = "rules: [{deployment: {checksumAnnotation: c/s, replicas: 3, env: [{valueFrom: {secretKeyRef: {key: k, name: s}}, name: A}]}}]";
        let c = "rules: [{deployment: {checksumAnnotation: c/s, env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: k2}}}]}}]";
        let sum = |y: &str| {
            Policy::from_yaml("p", y)
                .unwrap()
                .for_outpost(&outpost("x", "proxy"))
                .deployment
                .checksum
                .clone()
                .unwrap()
                .value
        };
        assert_eq!(sum(a), sum(b));
        assert_ne!(sum(a), sum(c));
    }

    #[test]
    fn empty_checksum_annotation_switches_it_off() {
        let p = Policy::from_yaml(
            "p",
            "rules: [{deployment: {checksumAnnotation: a/b}}, {deployment: {checksumAnnotation: ''}}]",
        )
        .unwrap();
        assert!(
            p.for_outpost(&outpost("x", "proxy"))
                .deployment
                .checksum
                .is_none()
        );
    }

    #[test]
    fn unknown_policy_field_is_refused_with_its_name_and_line() {
        let e = invalid("rules:\n  - deployment:\n      replicas: 2\n      replica: 3\n");
        assert!(e.contains("replica"), "{e}");
        assert!(e.contains("p.yaml"), "{e}");
        assert!(e.contains('4'), "line 4 missing: {e}");
    }

    #[test]
    fn unknown_field_inside_a_kubernetes_object_is_refused_with_its_path_and_line() {
        let e = invalid(
            "rules:\n  - deployment:\n      env:\n        - name: A\n        - name: B\n          valueFrom: {secretKeyRef: {nmae: s, key: k}}\n",
        );
        assert_eq!(
            e,
            "p.yaml:5: rules[0].deployment.env[1].valueFrom.secretKeyRef.nmae: unknown field"
        );
    }

    #[test]
    fn env_entry_without_a_name_is_refused() {
        let e = invalid("rules: [{deployment: {env: [{value: x}]}}]");
        assert!(e.contains("rules[0].deployment.env[0]"), "{e}");
    }

    #[test]
    fn empty_secret_key_is_refused() {
        let e = invalid(
            "rules: [{deployment: {env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: ''}}}]}}]",
        );
        assert!(
            e.ends_with(
                "rules[0].deployment.env[0]: valueFrom.secretKeyRef.key: must not be empty"
            ),
            "{e}"
        );
    }

    #[test]
    fn negative_replicas_are_refused() {
        let e = invalid("rules:\n- deployment:\n    replicas: -1\n");
        assert_eq!(
            e,
            "p.yaml:3: rules[0].deployment.replicas: must be between 0 and 2147483647"
        );
    }

    #[test]
    fn duplicate_env_names_are_refused() {
        let e = invalid("rules: [{deployment: {env: [{name: A, value: x}, {name: A, value: z}]}}]");
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn selector_pod_labels_are_refused() {
        let e = invalid("rules: [{deployment: {podLabels: {app.kubernetes.io/name: x}}}]");
        assert!(e.contains("immutable selector"), "{e}");
    }

    #[test]
    fn invalid_label_keys_and_values_are_refused() {
        assert!(
            invalid("rules: [{deployment: {podLabels: {'bad key': x}}}]")
                .contains("not a valid key")
        );
        assert!(
            invalid("rules: [{deployment: {podLabels: {k: '-x'}}}]")
                .contains("not a valid label value")
        );
    }

    #[test]
    fn wrong_types_inside_kubernetes_objects_are_refused() {
        let e = invalid("rules: [{deployment: {resources: {limits: {memory: [1]}}}}]");
        assert!(e.contains("rules[0].deployment.resources"), "{e}");
        let e = invalid(
            "rules: [{deployment: {strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}}}]",
        );
        assert!(e.contains("Recreate"), "{e}");
    }

    #[test]
    fn bad_uuid_and_empty_match_lists_are_refused() {
        assert!(invalid("rules: [{match: {uuids: [xyz]}}]").contains("match.uuids[0]"));
        assert!(invalid("rules: [{match: {names: []}}]").contains("matches nothing"));
    }

    #[test]
    fn yaml_syntax_errors_name_the_file() {
        let e = invalid("rules: [\n");
        assert!(e.starts_with("p.yaml: "), "{e}");
    }

    #[test]
    fn qualified_names() {
        for ok in ["a", "app.kubernetes.io/component", "x.y/z_1", "A.b-c"] {
            assert!(valid_qualified_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "-a",
            "a b",
            "UP.case/x",
            "a/b/c",
            &"x".repeat(64),
        ] {
            assert!(!valid_qualified_name(bad), "{bad}");
        }
    }
}
