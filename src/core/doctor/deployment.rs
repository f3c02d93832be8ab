//! An outpost Deployment: admission leaves it as stored, it carries the env, replicas and
//! checksums the policy in force injects, the Secrets its env reads exist, and it runs the
//! authentik server's version. A difference is a policy change when the Deployment's config
//! checksum says it was admitted under another policy, and a write past the webhook when not.

use serde_json::{Map, Value};

use super::{
    About, Check, Finding, Inputs, Severity,
    admission::{Drift, dry_run},
    in_namespace, labels_of, name_of, selected_pods,
};
use crate::{
    core::{
        cluster::{Snapshot, deployment_selector},
        mutate::{ObjectKind, identify_outpost, outpost_container, secret_checksum},
        policy::{DeploymentFix, Outpost, Policy},
        quantity::{Quantity, covers},
    },
    k8s::{EMBEDDED_SELECTOR, SECRET_CHECKSUM},
};

/// Every check of one outpost Deployment.
pub(super) fn check(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    namespace: &str,
    d: &Value,
) -> Vec<Finding> {
    let Some(outpost) = identify_outpost(d) else {
        return Vec::new();
    };
    let about = About::new("Deployment", namespace, d, &outpost);
    let name = name_of(d);
    let restart = format!(
        "run `kubectl -n {namespace} rollout restart deployment/{name}` (the write goes through \
         the webhook)"
    );
    let effective = policy.for_outpost(&outpost);
    let fix = &effective.deployment;
    let drift = drift(fix, d);
    // Replicas and strategy are outside the config checksum: a difference there is told apart
    // by who wrote the replicas.
    let outside = |replicas: bool| match drift {
        Drift::PolicyChanged { .. } => drift,
        _ if replicas && scaled(d) => Drift::Scaled,
        _ => Drift::Unchecksummed,
    };
    let mut out = dry_run(
        policy,
        inputs,
        view,
        &about,
        (ObjectKind::Deployment, namespace, name),
        d,
        |changed: &[String]| {
            if changed
                .iter()
                .all(|f| OUTSIDE_CHECKSUM.contains(&f.as_str()))
            {
                outside(changed.iter().any(|f| f == "spec.replicas"))
            } else {
                drift
            }
        },
        &restart,
    );
    let containers = d
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let container = containers.get(outpost_container(containers, outpost.kind));
    let env: Vec<&Value> = container
        .and_then(|c| c.get("env"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    out.extend(injected_env(fix, &about, &env, drift, &restart));

    out.extend(secret_refs(inputs, &about, namespace, container, &env));

    if let Some(want) = fix.replicas {
        let have = d.pointer("/spec/replicas").and_then(Value::as_i64);
        out.push(if have == Some(i64::from(want)) {
            about.say(
                Check::DeploymentReplicas,
                Severity::Ok,
                format!("replicas {want}, as the policy says"),
            )
        } else {
            let have = have.map_or_else(|| "unset".into(), |h| h.to_string());
            let (severity, message) = outside(true).judge(
                &format!("replicas {have}, the policy says {want}"),
                &restart,
            );
            about.say(Check::DeploymentReplicas, severity, message)
        });
    }

    out.extend(checksums(fix, view, &about, namespace, d, &restart));
    out.extend(version(inputs, &about, namespace, container));
    out.extend(logs(inputs, &about, namespace, &outpost, d));
    out
}

/// The Secrets and keys the outpost container's env reads exist. Names only, never values.
fn secret_refs(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    container: Option<&Value>,
    env: &[&Value],
) -> Vec<Finding> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut checked = 0usize;
    let keys = |secret: &str| {
        inputs
            .secrets
            .get(&(namespace.to_owned(), secret.to_owned()))
            .cloned()
    };
    for e in env {
        let Some(r) = e.pointer("/valueFrom/secretKeyRef") else {
            continue;
        };
        let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
        let (secret, key) = (text("name"), text("key"));
        let optional = r.get("optional").and_then(Value::as_bool) == Some(true);
        let var = e.get("name").and_then(Value::as_str).unwrap_or_default();
        checked += 1;
        let problem = match keys(secret) {
            None => continue, // not read: nothing can be said of it
            Some(None) => Some(format!("{var}: Secret {secret} does not exist")),
            Some(Some(data)) if !data.contains_key(key) => {
                Some(format!("{var}: Secret {secret} has no key {key}"))
            }
            Some(Some(_)) => None,
        };
        if let Some(p) = problem {
            if optional {
                warnings.push(p);
            } else {
                problems.push(p);
            }
        }
    }
    for from in container
        .and_then(|c| c.get("envFrom"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(secret) = from.pointer("/secretRef/name").and_then(Value::as_str) else {
            continue;
        };
        checked += 1;
        let optional = from.pointer("/secretRef/optional").and_then(Value::as_bool) == Some(true);
        if let Some(None) = keys(secret) {
            let p = format!("envFrom: Secret {secret} does not exist");
            if optional {
                warnings.push(p);
            } else {
                problems.push(p);
            }
        }
    }
    if checked == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if !problems.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Fail,
            format!(
                "{}: new pods cannot start (CreateContainerConfigError). Restore the key, or \
                 fix the policy's env",
                problems.join("; ")
            ),
        ));
    }
    if !warnings.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Warn,
            format!(
                "{} (optional, so pods start without it)",
                warnings.join("; ")
            ),
        ));
    }
    if out.is_empty() {
        out.push(about.say(
            Check::DeploymentSecretRefs,
            Severity::Ok,
            format!("the {checked} Secret reference(s) name Secrets and keys that exist"),
        ));
    }
    out
}

/// The env the policy injects is there, as the policy says it.
fn injected_env(
    fix: &DeploymentFix,
    about: &About,
    env: &[&Value],
    drift: Drift<'_>,
    restart: &str,
) -> Option<Finding> {
    if fix.env.is_empty() {
        return None;
    }
    let env_named = |n: &str| {
        env.iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(n))
    };
    let missing: Vec<&str> = fix
        .env
        .iter()
        .filter(|k| env_named(&k.key).is_none())
        .map(|k| k.key.as_str())
        .collect();
    let different: Vec<&str> = fix
        .env
        .iter()
        // As admission compares: the stored entry may carry what the apiserver defaults
        // (`fieldRef.apiVersion`, say) beside what the policy says.
        .filter(|k| env_named(&k.key).is_some_and(|e| !covers(*e, &k.value, Quantity::No)))
        .map(|k| k.key.as_str())
        .collect();
    if missing.is_empty() && different.is_empty() {
        return Some(about.say(
            Check::DeploymentEnv,
            Severity::Ok,
            format!("the {} injected env var(s) are present", fix.env.len()),
        ));
    }
    let mut what = Vec::new();
    if !missing.is_empty() {
        what.push(format!("missing {}", missing.join(", ")));
    }
    if !different.is_empty() {
        what.push(format!("not as the policy says: {}", different.join(", ")));
    }
    let (severity, message) = drift.judge(&format!("injected env {}", what.join("; ")), restart);
    Some(about.say(Check::DeploymentEnv, severity, message))
}

/// The fields admission sets on a Deployment that the config checksum (of the pod template) does
/// not cover, as `changed_fields` names them.
const OUTSIDE_CHECKSUM: [&str; 2] = ["spec.replicas", "spec.strategy"];

/// Whether the replicas were last written through the scale subresource: the apiserver records
/// the subresource of each manager's writes in `managedFields`.
fn scaled(d: &Value) -> bool {
    d.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|m| {
            m.get("subresource").and_then(Value::as_str) == Some("scale")
                && m.pointer("/fieldsV1/f:spec/f:replicas").is_some()
        })
}

/// What the Deployment's config checksum says of a difference admission would make: the
/// checksum is written by admission alone, so one that is not the policy's in force means the
/// Deployment was last admitted under another policy.
fn drift<'a>(fix: &'a DeploymentFix, d: &Value) -> Drift<'a> {
    let Some(checksum) = &fix.checksum else {
        return Drift::PastWebhook;
    };
    match template_annotation(d, &checksum.annotation) {
        Some(stored) if stored != checksum.value => Drift::PolicyChanged {
            annotation: &checksum.annotation,
        },
        _ => Drift::PastWebhook,
    }
}

fn template_annotation<'a>(d: &'a Value, key: &str) -> Option<&'a str> {
    d.pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

/// The pods run the policy in force and the current Secret data.
fn checksums(
    fix: &DeploymentFix,
    view: &Snapshot,
    about: &About,
    namespace: &str,
    d: &Value,
    restart: &str,
) -> Vec<Finding> {
    let Some(checksum) = &fix.checksum else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    let annotation = &checksum.annotation;
    match template_annotation(d, annotation) {
        Some(stored) if stored == checksum.value => {}
        Some(_) => stale.push(format!(
            "{annotation}: the policy changed since these pods were admitted. The next write \
             through the webhook applies the policy in force; to apply it now, {restart}"
        )),
        None => stale.push(format!(
            "no {annotation}: these pods were not admitted by the webhook. To admit them, \
             {restart}"
        )),
    }
    if let Some(want) = secret_checksum(fix, view, namespace)
        && template_annotation(d, SECRET_CHECKSUM) != Some(want.as_str())
    {
        stale.push(format!(
            "stale {SECRET_CHECKSUM}: the pods run old Secret data. The reconciler rolls them \
             when it runs; else {restart}"
        ));
    }
    vec![if stale.is_empty() {
        about.say(
            Check::DeploymentChecksum,
            Severity::Ok,
            "the pods' checksums match the policy in force and the Secret data".into(),
        )
    } else {
        about.say(Check::DeploymentChecksum, Severity::Warn, stale.join("; "))
    }]
}

/// The outpost's image tag against the authentik server's.
fn version(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    container: Option<&Value>,
) -> Vec<Finding> {
    let server = in_namespace(&inputs.deployments, namespace).find(|d| {
        let labels = labels_of(d);
        EMBEDDED_SELECTOR
            .iter()
            .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
    });
    let (Some(server), Some(container)) = (server, container) else {
        return Vec::new();
    };
    let server_image = server
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .and_then(|c| c.get(outpost_container(c, "server")))
        .and_then(|c| c.get("image"))
        .and_then(Value::as_str);
    let image = container.get("image").and_then(Value::as_str);
    let (Some(server_image), Some(image)) = (server_image, image) else {
        return Vec::new();
    };
    let (want, have) = (tag(server_image), tag(image));
    vec![if want == have {
        about.say(
            Check::DeploymentVersion,
            Severity::Ok,
            format!(
                "image {have}, as the authentik server ({})",
                name_of(server)
            ),
        )
    } else {
        about.say(
            Check::DeploymentVersion,
            Severity::Warn,
            format!(
                "image tag {have}, but the authentik server ({}) runs {want}: the controller \
                 never upgrades a standalone embedded outpost's Deployment. Set its image to \
                 the server's version",
                name_of(server)
            ),
        )
    }]
}

/// With `--logs`: the outpost mode and session backend each pod reported at start.
fn logs(
    inputs: &Inputs,
    about: &About,
    namespace: &str,
    outpost: &Outpost<'_>,
    d: &Value,
) -> Vec<Finding> {
    let (Some(logs), Some(selector)) = (&inputs.logs, deployment_selector(d)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for pod in selected_pods(&inputs.pods, namespace, &selector) {
        let pod_name = name_of(pod);
        let Some(log) = logs.get(&(namespace.to_owned(), pod_name.to_owned())) else {
            continue;
        };
        let pod_about = About {
            object: format!("Pod/{namespace}/{pod_name}"),
            group: about.group.clone(),
        };
        let events: Vec<Map<String, Value>> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Map<String, Value>>(l).ok())
            .collect();
        let event = |e: &Map<String, Value>| {
            e.get("event")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if let Some(mode) = events.iter().find(|e| event(e) == "Outpost mode") {
            let embedded = mode.get("embedded").and_then(Value::as_bool);
            out.push(pod_about.say(
                Check::PodOutpostMode,
                Severity::Ok,
                format!(
                    "outpost mode: embedded {}",
                    embedded.map_or_else(|| "unknown".into(), |b| b.to_string())
                ),
            ));
        }
        if outpost.kind != "proxy" {
            continue;
        }
        let backend = events
            .iter()
            .map(event)
            .find(|e| e.contains("session backend"));
        out.push(match backend {
            Some(e) if e.to_ascii_lowercase().contains("postgres") => {
                pod_about.say(Check::PodSessionBackend, Severity::Ok, e)
            }
            Some(e) => pod_about.say(
                Check::PodSessionBackend,
                Severity::Warn,
                format!(
                    "{e}: sessions live in the pod and are lost on restart. authentik uses \
                     PostgreSQL only for an embedded outpost (Outpost.managed \
                     goauthentik.io/outposts/embedded) with the database env injected"
                ),
            ),
            None => pod_about.say(
                Check::PodSessionBackend,
                Severity::Warn,
                "no session backend line at the start of the log (rotated away: the kubelet \
                 serves only the current file; or another log format)"
                    .into(),
            ),
        });
    }
    out
}

/// An image reference's tag (`latest` when it names none), without a digest.
pub(super) fn tag(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}
