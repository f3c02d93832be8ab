//! The reconciler's decisions: given the stored outpost objects and the cluster view, which
//! writes bring them to what the webhook wants. Pure: the shell lists the objects and sends
//! the writes.
//!
//! Level-triggered: the plan compares what is stored with what is wanted, so a resync, a re-list
//! or a new leader plans nothing for objects that are already right, and a write that failed is
//! planned again on the next pass.

use json_patch::{AddOperation, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use serde_json::Value;

use super::{
    cluster::View,
    mutate::{ObjectKind, identify_outpost, mutate_in, secret_checksum},
    policy::Policy,
};
use crate::k8s::SECRET_CHECKSUM;

/// Why a write is made: the `reason` label of the reconcile metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A Service's selector follows whether a standalone Deployment runs its outpost.
    SelectorFollowsPods,
    /// The data of a Secret key an outpost Deployment reads changed: its pods roll.
    SecretChanged,
}

impl Reason {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelectorFollowsPods => "selector_follows_pods",
            Self::SecretChanged => "secret_changed",
        }
    }
}

/// One write: a JSON patch for one object. Sent through the apiserver, so admission (this same
/// webhook) sees it and decides the final object.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    pub ops: Vec<PatchOperation>,
    pub reason: Reason,
}

/// The writes that bring `services` and `deployments` (as stored) to what the policy wants,
/// given `view`. Objects that are not outposts, or are right, plan nothing.
#[must_use]
pub fn plan(
    policy: &Policy,
    view: &dyn View,
    services: &[Value],
    deployments: &[Value],
) -> Vec<Write> {
    let mut writes = Vec::new();
    for service in services {
        let (namespace, name) = names(service);
        let outcome = mutate_in(policy, view, namespace, ObjectKind::Service, service);
        let selector_ops: Vec<PatchOperation> =
            outcome.ops.into_iter().filter(touches_selector).collect();
        if !selector_ops.is_empty() {
            writes.push(Write {
                kind: ObjectKind::Service,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                ops: selector_ops,
                reason: Reason::SelectorFollowsPods,
            });
        }
    }
    for deployment in deployments {
        let Some(outpost) = identify_outpost(deployment) else {
            continue;
        };
        let (namespace, name) = names(deployment);
        let fix = &policy.for_outpost(&outpost).deployment;
        if fix.checksum.is_none() {
            continue;
        }
        let Some(wanted) = secret_checksum(fix, view, namespace) else {
            continue;
        };
        let template = deployment.pointer("/spec/template");
        let annotations = template
            .and_then(|t| t.pointer("/metadata/annotations"))
            .and_then(Value::as_object);
        let stored = annotations
            .and_then(|a| a.get(SECRET_CHECKSUM))
            .and_then(Value::as_str);
        if stored == Some(wanted.as_str()) || template.is_none() {
            continue;
        }
        writes.push(Write {
            kind: ObjectKind::Deployment,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ops: annotate(template, annotations.is_some(), stored.is_some(), wanted),
            reason: Reason::SecretChanged,
        });
    }
    writes
}

/// Sets the Secret checksum on the pod template, parents first.
fn annotate(
    template: Option<&Value>,
    has_annotations: bool,
    has_key: bool,
    wanted: String,
) -> Vec<PatchOperation> {
    let at = |tokens: &[&str]| PointerBuf::from_tokens(tokens.iter().copied());
    let meta = ["spec", "template", "metadata"];
    let value = Value::String(wanted);
    if has_key {
        return vec![PatchOperation::Replace(ReplaceOperation {
            path: at(&[&meta[..], &["annotations", SECRET_CHECKSUM]].concat()),
            value,
        })];
    }
    if has_annotations {
        return vec![PatchOperation::Add(AddOperation {
            path: at(&[&meta[..], &["annotations", SECRET_CHECKSUM]].concat()),
            value,
        })];
    }
    let map = serde_json::json!({ SECRET_CHECKSUM: value });
    if template
        .and_then(|t| t.get("metadata"))
        .is_some_and(Value::is_object)
    {
        vec![PatchOperation::Add(AddOperation {
            path: at(&[&meta[..], &["annotations"]].concat()),
            value: map,
        })]
    } else {
        vec![PatchOperation::Add(AddOperation {
            path: at(&meta),
            value: serde_json::json!({ "annotations": map }),
        })]
    }
}

fn touches_selector(op: &PatchOperation) -> bool {
    let path = match op {
        PatchOperation::Add(a) => &a.path,
        PatchOperation::Replace(r) => &r.path,
        _ => return false,
    };
    let path = path.as_str();
    path == "/spec/selector" || path.starts_with("/metadata/annotations")
}

fn names(object: &Value) -> (&str, &str) {
    let field = |p: &str| {
        object
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    (field("/metadata/namespace"), field("/metadata/name"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cluster::{Snapshot, digest};
    use serde_json::json;

    fn labels() -> Value {
        json!({"app.kubernetes.io/managed-by": "goauthentik.io",
               "goauthentik.io/outpost-name": "o", "goauthentik.io/outpost-type": "proxy",
               "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"})
    }

    fn service() -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels()},
               "spec": {"selector": {"app.kubernetes.io/name": "authentik",
                                     "app.kubernetes.io/component": "server"}}})
    }

    fn deployment() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels()},
               "spec": {"selector": {"matchLabels": {
                            "app.kubernetes.io/name": "authentik-outpost-proxy",
                            "app.kubernetes.io/managed-by": "goauthentik.io",
                            "goauthentik.io/outpost-name": "o", "goauthentik.io/outpost-type": "proxy",
                            "goauthentik.io/outpost-uuid": "0eecac0797c7443c892505f2f4fe3e47"}},
                        "template": {"metadata": {"labels": {}}, "spec": {"containers": [{"name": "proxy"}]}}}})
    }

    fn secret(value: &str, extra: &str) -> Value {
        let mut data = serde_json::Map::new();
        for k in ["HOST", "PORT", "USER", "PASSWORD", "NAME"] {
            data.insert(format!("AUTHENTIK_POSTGRESQL__{k}"), json!(value));
        }
        data.insert("UNREFERENCED".into(), json!(extra));
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "goauthentik", "namespace": "authentik"}, "data": data})
    }

    fn apply(object: &Value, write: &Write) -> Value {
        let mut out = object.clone();
        json_patch::patch(&mut out, &write.ops).unwrap();
        out
    }

    #[test]
    fn the_service_follows_a_standalone_deployment_and_back() {
        let p = Policy::builtin().unwrap();
        let with = Snapshot::of(&[deployment()], "");
        let writes = plan(&p, &with, &[service()], &[]);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].reason, Reason::SelectorFollowsPods);
        let moved = apply(&service(), &writes[0]);
        assert_eq!(
            moved["spec"]["selector"]["app.kubernetes.io/name"],
            "authentik-outpost-proxy"
        );
        assert!(plan(&p, &with, std::slice::from_ref(&moved), &[]).is_empty());

        let without = Snapshot::default();
        let back = plan(&p, &without, std::slice::from_ref(&moved), &[]);
        let restored = apply(&moved, &back[0]);
        assert_eq!(restored["spec"]["selector"], service()["spec"]["selector"]);
        assert!(plan(&p, &without, &[restored], &[]).is_empty());
        assert!(
            plan(&p, &without, &[service()], &[]).is_empty(),
            "a default install is left alone"
        );
    }

    #[test]
    fn a_referenced_key_change_rolls_once_and_an_unreferenced_one_never() {
        let p = Policy::builtin().unwrap();
        let one = Snapshot::of(&[secret("b25l", "eA==")], "");
        let first = plan(&p, &one, &[], &[deployment()]);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].reason, Reason::SecretChanged);
        let stored = apply(&deployment(), &first[0]);
        assert!(
            plan(&p, &one, &[], std::slice::from_ref(&stored)).is_empty(),
            "a resync rolls nothing"
        );
        let unreferenced = Snapshot::of(&[secret("b25l", "eQ==")], "");
        assert!(plan(&p, &unreferenced, &[], std::slice::from_ref(&stored)).is_empty());
        let two = Snapshot::of(&[secret("dHdv", "eA==")], "");
        let second = plan(&p, &two, &[], std::slice::from_ref(&stored));
        assert_eq!(second.len(), 1);
        assert!(matches!(second[0].ops[0], PatchOperation::Replace(_)));
        let rolled = apply(&stored, &second[0]);
        assert!(plan(&p, &two, &[], &[rolled]).is_empty());
        let _ = digest(b"");
    }
}
