//! Validation: the file's shape to compiled rules, with `file:line: field: message` errors. Pure.
//!
//! Kubernetes objects embedded in the policy (env vars, volumes, probes...) are checked against
//! their k8s-openapi types, so a misspelt field is an error rather than a patch the apiserver
//! silently prunes.

use std::collections::HashSet;

use k8s_openapi::api::{
    apps::v1::DeploymentStrategy,
    core::v1::{EnvVar, Probe, ResourceRequirements, Volume, VolumeMount},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use serde_saphyr::Spanned;

use super::{
    Keyed, Matcher, PolicyError, Rule, RuleDeployment,
    file::{FileDeployment, FileRule, Objects},
    normalize_uuid,
};
use crate::{
    core::one_line,
    core::quantity::valid_non_negative_quantity,
    k8s::{OUTPOST_TYPES, SELECTOR_LABELS, valid_label_value, valid_qualified_name},
};

/// Where validation is: file, line and field path, for error messages.
pub(super) struct Cx<'a> {
    pub(super) file: &'a str,
    pub(super) line: u64,
    pub(super) path: String,
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

pub(super) fn rule(cx: &mut Cx<'_>, rule: FileRule) -> Result<Rule, PolicyError> {
    let m = rule.matcher.unwrap_or_default();
    let matcher = Matcher {
        names: compile_match_list(cx, "match.names", m.names, |s| {
            (!valid_label_value(s) || s.is_empty())
                .then(|| format!("{s:?} is not a valid outpost name (a label value)"))
        })?,
        types: compile_match_list(cx, "match.types", m.types, |s| {
            (!OUTPOST_TYPES.contains(&s)).then(|| {
                format!(
                    "{s:?} is not an authentik outpost type; valid: {}",
                    OUTPOST_TYPES.join(", ")
                )
            })
        })?,
        uuids: compile_match_list(cx, "match.uuids", m.uuids, |s| {
            let n = normalize_uuid(s);
            (n.len() != 32 || !n.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| format!("{s:?} is not a UUID"))
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
    problem: impl Fn(&str) -> Option<String>,
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
        .map(|(i, s)| match problem(&s.value) {
            None => Ok(s.value),
            Some(message) => Err(cx
                .at(s.referenced.line(), format!("{}.{field}[{i}]", cx.path))
                .err("", message)),
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
    out.env = compile_keyed::<EnvVar>(cx, "deployment.env", d.env, "name", |e| {
        check_env(e).map(String::from)
    })?;
    out.volumes = compile_keyed::<Volume>(cx, "deployment.volumes", d.volumes, "name", |v| {
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
            && !crate::k8s::valid_subdomain(name)
        {
            return Some(
                "secret.secretName: must be a Secret name (lowercase letters, digits, '-' and '.')"
                    .to_owned(),
            );
        }
        let size = v.empty_dir.as_ref()?.size_limit.as_ref()?;
        (!valid_non_negative_quantity(&size.0))
            .then(|| quantity_problem("emptyDir.sizeLimit", &size.0))
    })?;
    out.volume_mounts = compile_keyed::<VolumeMount>(
        cx,
        "deployment.volumeMounts",
        d.volume_mounts,
        "mountPath",
        |m| {
            m.name
                .is_empty()
                .then(|| "name: must not be empty".to_owned())
        },
    )?;
    let resources_line = d.resources.as_ref().map(|r| r.referenced.line());
    out.resources = compile_one::<ResourceRequirements>(cx, "deployment.resources", d.resources)?;
    if let (Some(line), Some(resources)) = (resources_line, &out.resources) {
        check_resources(
            &cx.at(line, format!("{}.deployment.resources", cx.path)),
            resources,
        )?;
    }
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

/// The apiserver refuses a request or limit that is not a non-negative quantity, so a policy
/// that sets one would fail every admission it patches.
fn check_resources(cx: &Cx<'_>, resources: &Value) -> Result<(), PolicyError> {
    for list in ["limits", "requests"] {
        let Some(map) = resources.get(list).and_then(Value::as_object) else {
            continue;
        };
        for (name, value) in map {
            let ok = match value {
                Value::String(q) => valid_non_negative_quantity(q),
                Value::Number(n) => n.as_f64().is_some_and(|f| f >= 0.0),
                _ => false,
            };
            if !ok {
                let shown = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                return Err(cx.err(&format!("{list}.{name}"), quantity_problem("", &shown)));
            }
        }
    }
    Ok(())
}

/// The message for a value that is not a non-negative Kubernetes quantity; `field`, when not
/// empty, is put first.
fn quantity_problem(field: &str, value: &str) -> String {
    let prefix = if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    };
    format!(
        "{prefix}{value:?} is not a non-negative Kubernetes quantity (e.g. 500m, 2Gi, 1e3, 128974848)"
    )
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
        // The cache watches the Secret by `metadata.name=<name>`: a name no Secret can have
        // would make that watch fail forever.
        if !crate::k8s::valid_subdomain(&r.name) {
            return Some(
                "valueFrom.secretKeyRef.name: must be a Secret name (lowercase letters, digits, \
                 '-' and '.')",
            );
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
    extra: impl Fn(&T) -> Option<String>,
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
