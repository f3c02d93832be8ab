//! The policy: what outpost-webhook fixes, and the per-outpost [`Effective`] form the core
//! consumes.
//!
//! Pure: no I/O. The file format is in [`file`], validation in `compile`, the config checksum in
//! `checksum`; the shell reads the bytes (`serve::polled`).
//!
//! Rules apply in order. A later rule overrides an earlier one field by field; the keyed lists
//! (`env` by name, `volumes` by name, `volumeMounts` by mountPath) and the label and annotation maps
//! merge entry by entry.

mod checksum;
mod compile;
mod file;

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use compile::unknown_field;

/// The built-in policy, used when no `--policy` is given.
pub const DEFAULT_POLICY_YAML: &str = include_str!("../../default-policy.yaml");

/// Why a policy was refused. Each message names the file, the line where known, and the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
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
    /// The outpost's own pod labels when a standalone Deployment runs them (the cluster view
    /// says so); otherwise the controller's selector, which picks the authentik server pods that
    /// serve an embedded outpost on a default install.
    Auto,
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

/// A Secret key the injected env or volumes read; `key: None` for a whole Secret mounted as a
/// volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretRef {
    pub name: String,
    pub key: Option<String>,
}

impl DeploymentFix {
    /// True when the policy injects nothing into a Deployment.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The Secret keys the injected env (`secretKeyRef`) and volumes (`secret`) read. Pods read
    /// them only when they start, so a change of their data must roll the pods.
    #[must_use]
    pub fn secret_refs(&self) -> BTreeSet<SecretRef> {
        let mut out = BTreeSet::new();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        for env in &self.env {
            let r = env
                .value
                .get("valueFrom")
                .and_then(|v| v.get("secretKeyRef"));
            if let (Some(name), Some(key)) = (
                text(r.and_then(|r| r.get("name"))),
                text(r.and_then(|r| r.get("key"))),
            ) {
                out.insert(SecretRef {
                    name,
                    key: Some(key),
                });
            }
        }
        for volume in &self.volumes {
            let Some(secret) = volume.value.get("secret") else {
                continue;
            };
            let Some(name) = text(secret.get("secretName")) else {
                continue;
            };
            match secret.get("items").and_then(Value::as_array) {
                Some(items) if !items.is_empty() => {
                    for key in items.iter().filter_map(|i| text(i.get("key"))) {
                        out.insert(SecretRef {
                            name: name.clone(),
                            key: Some(key),
                        });
                    }
                }
                _ => {
                    out.insert(SecretRef { name, key: None });
                }
            }
        }
        out
    }
}

/// The merged policy for one outpost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effective {
    pub selector: SelectorMode,
    pub deployment: DeploymentFix,
    /// `deployment.secret_refs()`, worked out once with the merge rather than on every review.
    pub secret_refs: BTreeSet<SecretRef>,
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
pub(crate) struct Rule {
    pub(crate) matcher: Matcher,
    pub(crate) selector: Option<SelectorMode>,
    pub(crate) deployment: RuleDeployment,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Matcher {
    pub(crate) names: Option<Vec<String>>,
    pub(crate) types: Option<Vec<String>>,
    pub(crate) uuids: Option<Vec<String>>,
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
pub(crate) struct RuleDeployment {
    pub(crate) replicas: Option<i32>,
    pub(crate) strategy: Option<Value>,
    pub(crate) pod_labels: BTreeMap<String, String>,
    pub(crate) pod_annotations: BTreeMap<String, String>,
    pub(crate) env: Vec<Keyed>,
    pub(crate) volumes: Vec<Keyed>,
    pub(crate) volume_mounts: Vec<Keyed>,
    pub(crate) resources: Option<Value>,
    pub(crate) readiness_probe: Option<Value>,
    pub(crate) checksum_annotation: Option<String>,
}

impl Policy {
    /// The built-in policy.
    ///
    /// # Errors
    /// Only if the shipped YAML is broken, which the test suite rules out.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::from_yaml("built-in policy", DEFAULT_POLICY_YAML)
    }

    /// Validates policy bytes read from `file`, which names it in error messages.
    ///
    /// # Errors
    /// When the bytes are not UTF-8, not YAML of the policy's shape, or fail validation.
    pub fn from_bytes(file: &str, bytes: &[u8]) -> Result<Self, PolicyError> {
        let text = std::str::from_utf8(bytes).map_err(|e| PolicyError::Syntax {
            file: file.to_owned(),
            message: format!("not UTF-8: {e}"),
        })?;
        Self::from_yaml(file, text)
    }

    /// Parses and validates policy text; `file` names it in error messages.
    ///
    /// # Errors
    /// When the text is not YAML of the policy's shape, or fails validation.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, PolicyError> {
        let root = file::parse(file, text)?;
        let mut rules = Vec::with_capacity(root.rules.len());
        for (i, rule) in root.rules.into_iter().enumerate() {
            let mut cx = compile::Cx {
                file,
                line: rule.referenced.line(),
                path: format!("rules[{i}]"),
            };
            rules.push(compile::rule(&mut cx, rule.value)?);
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

    /// Every Secret any rule's env or volumes read: what the watch cache follows.
    #[must_use]
    pub fn secret_names(&self) -> BTreeSet<String> {
        self.rules
            .iter()
            .flat_map(|r| {
                let fix = DeploymentFix {
                    env: r.deployment.env.clone(),
                    volumes: r.deployment.volumes.clone(),
                    ..DeploymentFix::default()
                };
                fix.secret_refs().into_iter().map(|s| s.name)
            })
            .collect()
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
        let value = checksum::of(&out.deployment);
        out.deployment.checksum = Some(Checksum { annotation, value });
    }
    out.secret_refs = out.deployment.secret_refs();
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

/// authentik writes outpost UUIDs as 32 hex digits; operators often paste the dashed form.
pub(crate) fn normalize_uuid(u: &str) -> String {
    u.chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
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
        assert_eq!(e.selector, SelectorMode::Auto);
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
    fn a_secret_name_no_secret_can_have_is_refused() {
        for name in ["'a,b'", "Goauthentik", "'-x'"] {
            let e = invalid(&format!(
                "rules: [{{deployment: {{env: [{{name: A, valueFrom: {{secretKeyRef: {{name: {name}, key: k}}}}}}]}}}}]"
            ));
            assert!(
                e.ends_with("valueFrom.secretKeyRef.name: must be a Secret name (lowercase letters, digits, '-' and '.')"),
                "{name}: {e}"
            );
        }
        let e =
            invalid("rules: [{deployment: {volumes: [{name: v, secret: {secretName: 'A_B'}}]}}]");
        assert!(
            e.contains("secret.secretName: must be a Secret name"),
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
    fn resource_quantities_follow_the_apiserver_grammar() {
        for ok in ["2Gi", "500m", "1e3", "0.5", "128974848"] {
            Policy::from_yaml(
                "p.yaml",
                &format!("rules: [{{deployment: {{resources: {{limits: {{memory: '{ok}'}}}}}}}}]"),
            )
            .unwrap();
        }
        let e = invalid("rules:\n- deployment:\n    resources:\n      limits: {memory: 2Gib}\n");
        assert_eq!(
            e,
            "p.yaml:4: rules[0].deployment.resources.limits.memory: \"2Gib\" is not a \
             non-negative Kubernetes quantity (e.g. 500m, 2Gi, 1e3, 128974848)"
        );
        let e = invalid("rules: [{deployment: {resources: {requests: {cpu: '-1'}}}}]");
        assert!(e.contains("resources.requests.cpu: \"-1\""), "{e}");
    }

    #[test]
    fn empty_dir_size_limit_must_be_a_quantity() {
        Policy::from_yaml(
            "p.yaml",
            "rules: [{deployment: {volumes: [{name: t, emptyDir: {sizeLimit: 64Mi}}]}}]",
        )
        .unwrap();
        let e =
            invalid("rules: [{deployment: {volumes: [{name: t, emptyDir: {sizeLimit: 64MB}}]}}]");
        assert!(
            e.ends_with(
                "rules[0].deployment.volumes[0]: emptyDir.sizeLimit: \"64MB\" is not a \
                 non-negative Kubernetes quantity (e.g. 500m, 2Gi, 1e3, 128974848)"
            ),
            "{e}"
        );
    }

    #[test]
    fn match_types_must_be_authentik_outpost_types() {
        Policy::from_yaml(
            "p.yaml",
            "rules: [{match: {types: [proxy, ldap, radius, rac]}}]",
        )
        .unwrap();
        let e = invalid("rules:\n- match:\n    types: [ldapp]\n");
        assert_eq!(
            e,
            "p.yaml:3: rules[0].match.types[0]: \"ldapp\" is not an authentik outpost type; \
             valid: proxy, ldap, radius, rac"
        );
    }

    #[test]
    fn yaml_syntax_errors_name_the_file_and_line() {
        let e = invalid("rules: [\n");
        assert!(e.starts_with("p.yaml:1: "), "{e}");
    }

    #[test]
    fn shape_errors_are_file_line_field_message_and_short() {
        let e =
            invalid("rules:\n  - match: {types: [proxy]}\n    deployment:\n      replicass: 2\n");
        assert_eq!(
            e,
            "p.yaml:4: rules[0].deployment.replicass: unknown field; expected one of replicas, \
             podLabels, podAnnotations, env, volumes, volumeMounts, resources, readinessProbe, \
             strategy, checksumAnnotation"
        );
        let e = invalid("rules:\n  - deployment: {}\n  - deployment:\n      env: {a: 1}\n");
        assert!(e.starts_with("p.yaml:4: rules[1].deployment.env: "), "{e}");
        assert!(!e.contains("<input>") && e.len() < 120, "{e}");
        let e = invalid("rules:\n  - service: {selector: outposts}\n");
        assert_eq!(
            e,
            "p.yaml:2: rules[0].service.selector: unknown variant `outposts`, expected one of \
             keep, outpost, auto"
        );
        let e = invalid("rule: []\n");
        assert!(
            e.starts_with("p.yaml:1: rule: unknown field; expected one of rules"),
            "{e}"
        );
    }
}
