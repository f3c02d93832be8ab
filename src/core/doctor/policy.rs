//! Which policy the webhook runs, so that the outposts are judged against it and not against
//! whatever policy the caller has: the registration's Service, the Deployment whose pods that
//! Service selects, that pod template's `serve --policy` file, the volume the file is in (a
//! ConfigMap, as `deploy/` and the Helm chart mount it) and the key it is. `cluster::inspect`
//! reads the ConfigMap this names.

use serde_json::Value;

use super::{Check, Finding, Group, Inputs, Severity, labels_of_at, name_of, runs_pods_of};

/// `serve`'s variable for `--policy`.
const POLICY_ENV: &str = "OUTPOST_WEBHOOK_POLICY";

/// Where the webhook's policy is, as its pod template says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRef {
    /// Key `key` of ConfigMap `namespace/name`, which Deployment `namespace/deployment` mounts.
    ConfigMap {
        namespace: String,
        name: String,
        key: String,
        deployment: String,
    },
    /// Deployment `namespace/deployment` runs `serve` without `--policy`: the built-in policy.
    Builtin {
        namespace: String,
        deployment: String,
    },
}

/// Which policy doctor judged against, as the report says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// `--policy FILE`.
    Flag { path: String },
    /// The one the webhook runs.
    InForce(PolicyRef),
    /// The built-in policy, because the one in force could not be found (why).
    Fallback { why: String },
}

impl PolicySource {
    /// One line for the report: which policy, and from where.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Flag { path } => format!("--policy {path}"),
            Self::InForce(PolicyRef::ConfigMap {
                namespace,
                name,
                key,
                deployment,
            }) => format!(
                "key {key} of ConfigMap {namespace}/{name}, which the webhook's Deployment \
                 {namespace}/{deployment} mounts"
            ),
            Self::InForce(PolicyRef::Builtin {
                namespace,
                deployment,
            }) => format!(
                "the built-in policy, which the webhook's Deployment {namespace}/{deployment} \
                 runs (no --policy)"
            ),
            Self::Fallback { .. } => "the built-in policy".into(),
        }
    }
}

/// The report's line on the policy.
pub(super) fn finding(source: &PolicySource) -> Finding {
    let (severity, object, message) = match source {
        PolicySource::Flag { path } => (
            Severity::Ok,
            path.clone(),
            format!("judged against --policy {path}"),
        ),
        PolicySource::InForce(PolicyRef::ConfigMap {
            namespace,
            name,
            key,
            deployment,
        }) => (
            Severity::Ok,
            format!("ConfigMap/{namespace}/{name}"),
            format!(
                "judged against the policy the webhook runs: key {key}, which its Deployment \
                 {namespace}/{deployment} mounts"
            ),
        ),
        PolicySource::InForce(PolicyRef::Builtin {
            namespace,
            deployment,
        }) => (
            Severity::Ok,
            format!("Deployment/{namespace}/{deployment}"),
            "judged against the built-in policy, which the webhook's Deployment runs (no \
             --policy)"
                .into(),
        ),
        PolicySource::Fallback { why } => (
            Severity::Warn,
            "built-in policy".into(),
            format!(
                "judged against the built-in policy, as the policy in force was not found \
                 ({why}): pass the webhook's policy with --policy FILE"
            ),
        ),
    };
    Finding {
        check: Check::PolicySource,
        severity,
        object,
        message,
        group: Group::Registration,
    }
}

/// Where the policy the webhook runs is, from what `inputs` holds of the registration, its
/// Service and the Deployments beside it.
///
/// # Errors
/// Why it cannot be told, in words for the report.
pub fn locate_policy(inputs: &Inputs) -> Result<PolicyRef, String> {
    let registration = inputs
        .registration
        .as_ref()
        .ok_or_else(|| format!("no registration {}", inputs.registration_name))?;
    let client = registration
        .get("webhooks")
        .and_then(Value::as_array)
        .and_then(|w| w.first())
        .and_then(|w| w.get("clientConfig"))
        .ok_or("the registration has no webhook")?;
    let Some(reference) = client.get("service") else {
        let url = client
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        return Err(format!(
            "the registration calls the URL {url}, not a Service"
        ));
    };
    let text = |k: &str| reference.get(k).and_then(Value::as_str).unwrap_or_default();
    let (namespace, service) = (text("namespace"), text("name"));
    let svc = inputs.webhook_service.as_ref().ok_or_else(|| {
        format!("the registration's Service {namespace}/{service} does not exist")
    })?;
    let deployments = inputs
        .webhook_deployments
        .as_deref()
        .ok_or_else(|| format!("the Deployments in namespace {namespace} were not read"))?;
    let selector = labels_of_at(svc, "/spec/selector");
    let runs: Vec<&Value> = runs_pods_of(deployments, namespace, &selector).collect();
    let d = match runs.as_slice() {
        [d] => *d,
        [] => {
            return Err(format!(
                "Service {namespace}/{service} selects no Deployment's pods"
            ));
        }
        several => {
            return Err(format!(
                "Service {namespace}/{service} selects the pods of {} Deployments ({})",
                several.len(),
                several
                    .iter()
                    .map(|d| name_of(d))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    };
    let deployment = name_of(d).to_owned();
    let spec = d.pointer("/spec/template/spec");
    let containers: Vec<&Value> = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let container = match containers.as_slice() {
        [only] => *only,
        several => several
            .iter()
            .copied()
            .find(|c| command_line(c).contains(&"serve"))
            .ok_or_else(|| {
                format!("no container of Deployment {namespace}/{deployment} runs `serve`")
            })?,
    };
    let Some(path) = policy_flag(container)? else {
        return Ok(PolicyRef::Builtin {
            namespace: namespace.to_owned(),
            deployment,
        });
    };
    let (volume, within) = mounted_at(container, &path)
        .ok_or_else(|| format!("--policy {path} is in no volume of {namespace}/{deployment}"))?;
    let volume = spec
        .and_then(|s| s.get("volumes"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(volume.as_str()))
        .ok_or_else(|| format!("volume {volume} of {namespace}/{deployment} is not declared"))?;
    let (name, key) = configmap_key(volume, &within).ok_or_else(|| {
        format!(
            "--policy {path} is in volume {}, which is not a ConfigMap key",
            name_of_volume(volume)
        )
    })?;
    Ok(PolicyRef::ConfigMap {
        namespace: namespace.to_owned(),
        name,
        key,
        deployment,
    })
}

fn name_of_volume(volume: &Value) -> &str {
    volume
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A container's command and args, in order.
fn command_line(container: &Value) -> Vec<&str> {
    ["command", "args"]
        .iter()
        .filter_map(|k| container.get(*k).and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The file `serve --policy` reads: the flag (`--policy=F` or `--policy F`), else the variable.
fn policy_flag(container: &Value) -> Result<Option<String>, String> {
    let line = command_line(container);
    let mut words = line.iter();
    while let Some(word) = words.next() {
        if let Some(path) = word.strip_prefix("--policy=") {
            return Ok(Some(path.to_owned()));
        }
        if *word == "--policy" {
            return Ok(words.next().map(|p| (*p).to_owned()));
        }
    }
    let env = container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(POLICY_ENV));
    match env {
        None => Ok(None),
        Some(e) => match e.get("value").and_then(Value::as_str) {
            Some(path) => Ok(Some(path.to_owned())),
            None => Err(format!("{POLICY_ENV} is set from a reference")),
        },
    }
}

/// The volume `path` is in (the deepest mount holding it), and its path within that volume.
fn mounted_at(container: &Value, path: &str) -> Option<(String, String)> {
    let mounts = container.get("volumeMounts").and_then(Value::as_array)?;
    let (mount, rest) = mounts
        .iter()
        .filter_map(|m| {
            let at = m
                .get("mountPath")
                .and_then(Value::as_str)?
                .trim_end_matches('/');
            let rest = if path == at {
                ""
            } else {
                path.strip_prefix(at)?.strip_prefix('/')?
            };
            Some((m, at.len(), rest))
        })
        .max_by_key(|(_, depth, _)| *depth)
        .map(|(m, _, rest)| (m, rest))?;
    let sub = mount
        .get("subPath")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim_matches('/');
    let within = match (sub.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_owned(),
        (false, true) => sub.to_owned(),
        (false, false) => format!("{sub}/{rest}"),
    };
    let volume = mount.get("name").and_then(Value::as_str)?.to_owned();
    (!within.is_empty()).then_some((volume, within))
}

/// The ConfigMap and key a `configMap` volume (or a projected volume's ConfigMap source) shows at
/// `within`: the item whose path it is, or with no items, the key of that name.
fn configmap_key(volume: &Value, within: &str) -> Option<(String, String)> {
    let sources: Vec<&Value> = match volume.get("configMap") {
        Some(c) => vec![c],
        None => volume
            .pointer("/projected/sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.get("configMap"))
            .collect(),
    };
    sources.into_iter().find_map(|c| {
        let name = c.get("name").and_then(Value::as_str)?.to_owned();
        match c.get("items").and_then(Value::as_array) {
            Some(items) => items
                .iter()
                .find(|i| i.get("path").and_then(Value::as_str) == Some(within))
                .and_then(|i| i.get("key").and_then(Value::as_str))
                .map(|key| (name, key.to_owned())),
            None => (!within.contains('/')).then(|| (name, within.to_owned())),
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn inputs(deployment: Value) -> Inputs {
        Inputs {
            registration_name: "r".into(),
            registration: Some(json!({"webhooks": [{"clientConfig": {"service": {
                "namespace": "wh", "name": "outpost-webhook"}}}]})),
            webhook_service: Some(
                json!({"metadata": {"namespace": "wh", "name": "outpost-webhook"},
                "spec": {"selector": {"app": "wh"}}}),
            ),
            webhook_deployments: Some(vec![
                deployment,
                json!({"metadata": {"namespace": "wh", "name": "other"},
                       "spec": {"template": {"metadata": {"labels": {"app": "other"}}}}}),
            ]),
            ..Inputs::default()
        }
    }

    fn deployment(container: &Value, volumes: &Value) -> Value {
        json!({"metadata": {"namespace": "wh", "name": "outpost-webhook"},
               "spec": {"template": {"metadata": {"labels": {"app": "wh", "pod": "x"}},
                                     "spec": {"containers": [container], "volumes": volumes}}}})
    }

    fn config_map(name: &str, key: &str) -> PolicyRef {
        PolicyRef::ConfigMap {
            namespace: "wh".into(),
            name: name.into(),
            key: key.into(),
            deployment: "outpost-webhook".into(),
        }
    }

    #[test]
    fn the_policy_is_the_configmap_key_the_selected_deployment_mounts() {
        // As deploy/ and the chart render it.
        let d = deployment(
            &json!({"name": "webhook", "args": ["serve", "--policy=/policy/policy.yaml"],
                    "volumeMounts": [{"name": "tls", "mountPath": "/tls"},
                                     {"name": "policy", "mountPath": "/policy/"}]}),
            &json!([{"name": "tls", "secret": {"secretName": "t"}},
                     {"name": "policy", "configMap": {"name": "outpost-webhook-policy-5h8k"}}]),
        );
        assert_eq!(
            locate_policy(&inputs(d)),
            Ok(config_map("outpost-webhook-policy-5h8k", "policy.yaml"))
        );
    }

    #[test]
    fn items_sub_paths_projections_and_the_variable_are_followed() {
        let with = |container: Value, volumes: Value| {
            locate_policy(&inputs(deployment(&container, &volumes)))
        };
        assert_eq!(
            with(
                json!({"command": ["/outpost-webhook"], "args": ["serve", "--policy", "/etc/ow/p.yaml"],
                       "volumeMounts": [{"name": "v", "mountPath": "/etc/ow"}]}),
                json!([{"name": "v", "configMap": {"name": "cm",
                        "items": [{"key": "policy.yaml", "path": "p.yaml"}]}}])
            ),
            Ok(config_map("cm", "policy.yaml"))
        );
        assert_eq!(
            with(
                json!({"args": ["serve"], "env": [{"name": POLICY_ENV, "value": "/p.yaml"}],
                       "volumeMounts": [{"name": "v", "mountPath": "/p.yaml", "subPath": "rules"}]}),
                json!([{"name": "v", "projected": {"sources": [
                    {"secret": {"name": "s"}}, {"configMap": {"name": "cm"}}]}}])
            ),
            Ok(config_map("cm", "rules"))
        );
        assert_eq!(
            with(json!({"args": ["serve"]}), json!([])),
            Ok(PolicyRef::Builtin {
                namespace: "wh".into(),
                deployment: "outpost-webhook".into()
            })
        );
        let secret = with(
            json!({"args": ["serve", "--policy=/p/policy.yaml"],
                   "volumeMounts": [{"name": "v", "mountPath": "/p"}]}),
            json!([{"name": "v", "secret": {"secretName": "s"}}]),
        );
        assert_eq!(
            secret,
            Err("--policy /p/policy.yaml is in volume v, which is not a ConfigMap key".into())
        );
    }

    #[test]
    fn a_url_registration_or_no_selected_deployment_says_why() {
        let mut i = inputs(json!({}));
        i.webhook_deployments = Some(Vec::new());
        assert_eq!(
            locate_policy(&i),
            Err("Service wh/outpost-webhook selects no Deployment's pods".into())
        );
        i.registration = Some(json!({"webhooks": [{"clientConfig": {
            "url": "https://127.0.0.1:8443/mutate"}}]}));
        assert_eq!(
            locate_policy(&i),
            Err(
                "the registration calls the URL https://127.0.0.1:8443/mutate, not a Service"
                    .into()
            )
        );
    }
}
