//! `outpost-webhook policy import --from-json-patches`: turns an outpost's `kubernetes_json_patches` (the
//! per-outpost RFC 6902 patches authentik applies itself) into an outpost-webhook policy.
//!
//! Pure: JSON in, policy YAML and a list of what could not be expressed out.
//!
//! Each operation is read for what it means, not replayed: `add .../env/-` becomes an env entry
//! upserted by name (so it is never duplicated), a `replace /spec/selector` that hard-codes one
//! outpost's UUID becomes `selector: auto` (the outpost's pod labels, derived per outpost, wherever
//! a standalone Deployment runs the outpost, with the old selector recorded so that it is restored
//! when that Deployment goes; `outpost` would rewrite every outpost's selector, breaking a default
//! install, and record nothing), and a container index becomes "the outpost container".

use json_patch::jsonptr::Pointer;
use serde_json::{Map, Value, json};

use crate::{core::policy::Policy, k8s::SELECTOR_LABELS};

/// Why a patch set could not be imported at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Shape(String),
    #[error("the imported policy does not validate: {0}")]
    Invalid(String),
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// The imported policy and what was left out.
#[derive(Debug)]
pub struct Imported {
    /// The policy, as commented YAML ready for `--policy`.
    pub yaml: String,
    /// How many operations the policy expresses.
    pub expressed: usize,
    /// One line per operation it cannot express, with the reason.
    pub unsupported: Vec<String>,
}

#[derive(Default)]
struct Builder {
    deployment: Map<String, Value>,
    service: Map<String, Value>,
    expressed: usize,
    unsupported: Vec<String>,
    notes: Vec<String>,
}

/// Imports `patches`, a JSON object of `{"deployment": [ops], "service": [ops], ...}`; `source`
/// names it in the header comment.
///
/// # Errors
/// When `patches` is not such an object, or what it expresses does not validate as a policy.
pub fn import(patches: &Value, source: &str) -> Result<Imported, ImportError> {
    let sets = patches.as_object().ok_or_else(|| {
        ImportError::Shape(
            "expected a JSON object such as {\"deployment\": [...], \"service\": [...]}".into(),
        )
    })?;
    let mut b = Builder::default();
    for (kind, ops) in sets {
        let Some(ops) = ops.as_array() else {
            return Err(ImportError::Shape(format!(
                "{kind}: expected a list of operations"
            )));
        };
        for (i, op) in ops.iter().enumerate() {
            let at = format!("{kind}[{i}]");
            match b.op(kind, op) {
                Ok(()) => b.expressed += 1,
                Err(why) => {
                    let what = format!(
                        "{} {}",
                        op.get("op").and_then(Value::as_str).unwrap_or("?"),
                        op.get("path").and_then(Value::as_str).unwrap_or("?")
                    );
                    b.unsupported.push(format!("{at} {what}: {why}"));
                }
            }
        }
    }
    b.finish(source)
}

impl Builder {
    fn op(&mut self, kind: &str, op: &Value) -> Result<(), String> {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        if !matches!(name, "add" | "replace") {
            return Err(format!(
                "`{name}` has no policy equivalent: a policy adds and corrects, it never removes, tests, moves or copies"
            ));
        }
        let path = op.get("path").and_then(Value::as_str).ok_or("no path")?;
        let value = op.get("value").cloned().ok_or("no value")?;
        let pointer =
            Pointer::parse(path).map_err(|e| format!("the path is not a JSON pointer: {e}"))?;
        let tokens: Vec<String> = pointer.tokens().map(|t| t.decoded().into_owned()).collect();
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        match kind {
            "deployment" => self.deployment_op(&tokens, value),
            "service" => self.service_op(&tokens, &value),
            other => Err(format!(
                "outpost-webhook fixes Services and Deployments, not {other}"
            )),
        }
    }

    fn service_op(&mut self, tokens: &[&str], value: &Value) -> Result<(), String> {
        match tokens {
            ["spec", "selector"] => {
                let name = value.get("app.kubernetes.io/name").and_then(Value::as_str);
                if name.is_some_and(|n| n.starts_with("authentik-outpost-")) {
                    if let Some(uuid) = value
                        .get("goauthentik.io/outpost-uuid")
                        .and_then(Value::as_str)
                    {
                        self.notes.push(format!(
                            "The selector hard-coded outpost UUID {uuid}; `selector: auto` derives it from each Service's labels where a standalone Deployment runs the outpost."
                        ));
                    }
                    self.service.insert("selector".into(), "auto".into());
                    Ok(())
                } else {
                    Err("a selector other than the outpost's own pod labels".into())
                }
            }
            _ => Err("only the selector of an outpost Service is fixed".into()),
        }
    }

    fn deployment_op(&mut self, tokens: &[&str], value: Value) -> Result<(), String> {
        match tokens {
            ["spec", "replicas"] => {
                let n = value.as_i64().ok_or("replicas must be a number")?;
                self.deployment.insert("replicas".into(), n.into());
                Ok(())
            }
            ["spec", "strategy"] => {
                self.set("strategy", value);
                Ok(())
            }
            [
                "spec",
                "template",
                "metadata",
                map @ ("labels" | "annotations"),
                rest @ ..,
            ] => self.pod_map(map, rest, value),
            ["spec", "template", "spec", "volumes", rest @ ..] => self.list("volumes", rest, value),
            ["spec", "template", "spec", "containers", index, rest @ ..] => {
                if *index != "0" {
                    self.notes.push(format!(
                        "An operation on containers/{index} now applies to the outpost container (the one named after the outpost type, else the first)."
                    ));
                }
                match rest {
                    ["env", more @ ..] => self.list("env", more, value),
                    ["volumeMounts", more @ ..] => self.list("volumeMounts", more, value),
                    [field @ ("resources" | "readinessProbe")] => {
                        self.set(field, value);
                        Ok(())
                    }
                    _ => Err("this container field has no policy equivalent".into()),
                }
            }
            _ => Err("this Deployment field has no policy equivalent".into()),
        }
    }

    fn set(&mut self, field: &str, value: Value) {
        self.deployment.insert(field.into(), value);
    }

    fn pod_map(&mut self, map: &str, rest: &[&str], value: Value) -> Result<(), String> {
        let field = if map == "labels" {
            "podLabels"
        } else {
            "podAnnotations"
        };
        let entries: Vec<(String, Value)> = match rest {
            [] => value
                .as_object()
                .ok_or("expected a map")?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            [key] => vec![((*key).to_owned(), value)],
            _ => return Err("expected a label or annotation key".into()),
        };
        for (key, value) in entries {
            if map == "labels" && SELECTOR_LABELS.contains(&key.as_str()) {
                return Err(format!("{key} is in the Deployment's immutable selector"));
            }
            if !value.is_string() {
                return Err(format!("{key}: the value must be a string"));
            }
            let slot = self
                .deployment
                .entry(field)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(m) = slot.as_object_mut() {
                m.insert(key, value);
            }
        }
        Ok(())
    }

    /// `add .../list` with an array, or `add .../list/-` (or `/N`) with one entry: entries are
    /// upserted by key, so a later one with the same key replaces an earlier one.
    fn list(&mut self, field: &str, rest: &[&str], value: Value) -> Result<(), String> {
        let items = match rest {
            [] => value.as_array().cloned().ok_or("expected a list")?,
            [_] => vec![value],
            _ => return Err("a field inside a list entry has no policy equivalent".into()),
        };
        let key = if field == "volumeMounts" {
            "mountPath"
        } else {
            "name"
        };
        let slot = self
            .deployment
            .entry(field)
            .or_insert_with(|| Value::Array(Vec::new()));
        let Some(list) = slot.as_array_mut() else {
            return Err("internal: not a list".into());
        };
        for item in items {
            let k = item.get(key).cloned();
            if k.is_none() {
                return Err(format!("an entry without `{key}`"));
            }
            list.retain(|e| e.get(key) != k.as_ref());
            list.push(item);
        }
        Ok(())
    }

    fn finish(self, source: &str) -> Result<Imported, ImportError> {
        let mut rule = Map::new();
        rule.insert("match".into(), json!({}));
        if !self.service.is_empty() {
            rule.insert("service".into(), Value::Object(self.service));
        }
        let mut deployment = self.deployment;
        if !deployment.is_empty() {
            deployment.insert(
                "checksumAnnotation".into(),
                "outpost-webhook/config-checksum".into(),
            );
            rule.insert("deployment".into(), Value::Object(deployment));
        }
        let doc = json!({"rules": [Value::Object(rule)]});
        let body = serde_saphyr::to_string(&doc).map_err(|e| ImportError::Write(e.to_string()))?;
        Policy::from_yaml("imported policy", &body)
            .map_err(|e| ImportError::Invalid(e.to_string()))?;

        let mut yaml = format!(
            "# Imported from {source} by `outpost-webhook policy import`.\n\
             # It applies to every outpost (`match: {{}}`); narrow it with names, types or uuids.\n\
             # {} operation(s) expressed; {} could not be.\n",
            self.expressed,
            self.unsupported.len()
        );
        for line in self.notes.iter().chain(&self.unsupported) {
            yaml.push_str("#   ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        yaml.push_str(&body);
        Ok(Imported {
            yaml,
            expressed: self.expressed,
            unsupported: self.unsupported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_operations_are_listed_with_a_reason() {
        let patches = json!({
            "deployment": [
                {"op": "remove", "path": "/spec/template/spec/containers/0/livenessProbe"},
                {"op": "add", "path": "/spec/template/spec/containers/1/env/-", "value": {"name": "A", "value": "1"}},
                {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true},
                {"op": "add", "path": "/spec/template/metadata/labels/app.kubernetes.io~1name", "value": "x"},
                {"op": "test", "path": "/spec/replicas", "value": 1}
            ],
            "service": [{"op": "replace", "path": "/spec/selector", "value": {"app": "custom"}}],
            "ingress": [{"op": "add", "path": "/spec/tls", "value": []}]
        });
        let out = import(&patches, "test").unwrap();
        assert_eq!(out.expressed, 1);
        let joined = out.unsupported.join("\n");
        for want in [
            "deployment[0] remove /spec/template/spec/containers/0/livenessProbe: `remove` has no policy equivalent",
            "deployment[2] add /spec/template/spec/hostNetwork: this Deployment field has no policy equivalent",
            "deployment[3] add /spec/template/metadata/labels/app.kubernetes.io~1name: app.kubernetes.io/name is in the Deployment's immutable selector",
            "deployment[4] test /spec/replicas: `test` has no policy equivalent",
            "service[0] replace /spec/selector: a selector other than the outpost's own pod labels",
            "ingress[0] add /spec/tls: outpost-webhook fixes Services and Deployments, not ingress",
        ] {
            assert!(joined.contains(want), "missing {want:?} in\n{joined}");
        }
        assert!(
            out.yaml
                .contains("containers/1 now applies to the outpost container")
        );
        let policy = Policy::from_yaml("x", &out.yaml).unwrap();
        assert_eq!(policy.rule_count(), 1);
    }

    #[test]
    fn later_entries_with_the_same_name_replace_earlier_ones() {
        let patches = json!({"deployment": [
            {"op": "add", "path": "/spec/template/spec/containers/0/env", "value": [{"name": "A", "value": "1"}]},
            {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "A", "value": "2"}}
        ]});
        let out = import(&patches, "test").unwrap();
        let policy: Value = serde_saphyr::from_str(&out.yaml).unwrap();
        assert_eq!(
            policy["rules"][0]["deployment"]["env"],
            json!([{"name": "A", "value": "2"}])
        );
    }

    #[test]
    fn not_an_object_is_an_error() {
        assert!(import(&json!([]), "x").is_err());
        assert!(import(&json!({"deployment": {}}), "x").is_err());
    }
}
