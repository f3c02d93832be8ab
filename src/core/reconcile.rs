//! The reconciler's decisions: given the stored outpost objects and the cluster view, which
//! writes bring them to what the webhook wants. Pure: the shell lists the objects and sends
//! the writes.
//!
//! Level-triggered: the plan compares what is stored with what is wanted, so a resync, a re-list
//! or a new leader plans nothing for objects that are already right, and a write that failed is
//! planned again on the next pass.

use json_patch::{PatchOperation, TestOperation, jsonptr::PointerBuf};
use serde_json::Value;

use super::{
    cluster::{View, secret_problems},
    mutate::{ObjectKind, identify_outpost, mutate_in, secret_checksum},
    policy::Policy,
};
use crate::k8s::{OUTPOST_UUID, SECRET_CHECKSUM};

/// Why a write is made: the `reason` label of the reconcile metric, and the Event's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A Service's selector is pointed at the pods of the standalone Deployment that runs its
    /// outpost.
    SelectorFollowsPods,
    /// A Service's recorded selector is restored: no standalone Deployment runs its outpost now.
    SelectorRestored,
    /// The data of a Secret key an outpost Deployment reads changed (or was never checksummed):
    /// its pods roll.
    SecretChanged,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 3] = [
        Self::SelectorFollowsPods,
        Self::SelectorRestored,
        Self::SecretChanged,
    ];

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelectorFollowsPods => "selector_follows_pods",
            Self::SelectorRestored => "selector_restored",
            Self::SecretChanged => "secret_changed",
        }
    }

    /// The Event reason, as `kubectl describe` shows it.
    #[must_use]
    pub fn event_reason(self) -> &'static str {
        match self {
            Self::SelectorFollowsPods => "SelectorFollowsOutpostPods",
            Self::SelectorRestored => "SelectorRestored",
            Self::SecretChanged => "SecretChanged",
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

/// An outpost Deployment whose Secrets changed but which is not rolled, and why: its pods would
/// not start with what the view knows of the Secrets it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBack {
    pub namespace: String,
    pub name: String,
    pub problems: Vec<String>,
}

/// What a reconcile pass does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub held_back: Vec<HeldBack>,
}

/// The writes that bring `services` and `deployments` (as stored) to what the policy wants,
/// given `view`. Objects that are not outposts, or are right, plan nothing. A Deployment whose
/// Secrets are missing, unreadable or lack a key it reads is held back rather than rolled: its
/// new pods could not start.
#[must_use]
pub fn plan(policy: &Policy, view: &dyn View, services: &[Value], deployments: &[Value]) -> Plan {
    let mut out = Plan::default();
    for service in services {
        let (namespace, name) = names(service);
        let outcome = mutate_in(policy, view, namespace, ObjectKind::Service, service);
        let selector_ops: Vec<PatchOperation> =
            outcome.ops.into_iter().filter(touches_selector).collect();
        if !selector_ops.is_empty() {
            let reason = service_reason(&selector_ops);
            out.writes.push(Write {
                kind: ObjectKind::Service,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                ops: selector_ops,
                reason,
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
        let problems = secret_problems(view, namespace, &fix.secret_refs());
        if !problems.is_empty() {
            out.held_back.push(HeldBack {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                problems,
            });
            continue;
        }
        out.writes.push(Write {
            kind: ObjectKind::Deployment,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ops: checksum_ops(deployment, wanted),
            reason: Reason::SecretChanged,
        });
    }
    out
}

/// The operations a write for `reason` sends for `object`, read fresh from the apiserver: the
/// whole fix admission would make (so the object ends right even when no registration sends the
/// write through the webhook), and for [`Reason::SecretChanged`] the new Secret checksum, which
/// admission never changes once set; after a `test` of the `resourceVersion` read, so a patch
/// computed for one version is never applied to another (the apiserver refuses it and the next
/// pass plans again). Empty when the object needs nothing.
#[must_use]
pub fn write_ops(
    policy: &Policy,
    view: &dyn View,
    kind: ObjectKind,
    reason: Reason,
    object: &Value,
) -> Vec<PatchOperation> {
    let (namespace, _) = names(object);
    let outcome = mutate_in(policy, view, namespace, kind, object);
    let mut desired = object.clone();
    if json_patch::patch(&mut desired, &outcome.ops).is_err() {
        // The first law says this cannot happen; if it did, nothing is sent.
        return Vec::new();
    }
    if reason == Reason::SecretChanged
        && let Some(outpost) = identify_outpost(object)
    {
        let fix = &policy.for_outpost(&outpost).deployment;
        if fix.checksum.is_some()
            && let Some(wanted) = secret_checksum(fix, view, namespace)
            && let Some(annotations) = pod_annotations(&mut desired)
        {
            annotations.insert(SECRET_CHECKSUM.into(), Value::String(wanted));
        }
    }
    let ops = json_patch::diff(object, &desired).0;
    if ops.is_empty() {
        return ops;
    }
    let version = object
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    let mut out = vec![PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
        value: version,
    })];
    out.extend(ops);
    out
}

/// The operations that set the Secret checksum on a Deployment's pod template, parents first.
fn checksum_ops(deployment: &Value, wanted: String) -> Vec<PatchOperation> {
    let mut desired = deployment.clone();
    match pod_annotations(&mut desired) {
        Some(annotations) => {
            annotations.insert(SECRET_CHECKSUM.into(), Value::String(wanted));
            json_patch::diff(deployment, &desired).0
        }
        None => Vec::new(),
    }
}

/// The pod template's annotations, created empty where missing; `None` when a parent on the way
/// is not an object.
fn pod_annotations(object: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    let mut at = object;
    for key in ["spec", "template", "metadata", "annotations"] {
        let map = at.as_object_mut()?;
        let next = map
            .entry(key)
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if next.is_null() {
            *next = Value::Object(serde_json::Map::new());
        }
        at = next;
    }
    at.as_object_mut()
}

/// Why a Service write is made, from its operations: only a rewrite records the controller's
/// selector.
#[must_use]
pub fn service_reason(ops: &[PatchOperation]) -> Reason {
    if ops.iter().any(records_selector) {
        Reason::SelectorFollowsPods
    } else {
        Reason::SelectorRestored
    }
}

/// Whether an operation points a Service at an outpost's own pods: of the selectors written,
/// only the outpost's pod labels name its UUID.
fn records_selector(op: &PatchOperation) -> bool {
    let (path, value) = match op {
        PatchOperation::Add(a) => (&a.path, &a.value),
        PatchOperation::Replace(r) => (&r.path, &r.value),
        _ => return false,
    };
    match path.as_str() {
        "/spec/selector" => value.get(OUTPOST_UUID).is_some(),
        "/spec" => value
            .pointer("/selector")
            .and_then(|s| s.get(OUTPOST_UUID))
            .is_some(),
        p => p == format!("/spec/selector/{}", OUTPOST_UUID.replace('/', "~1")),
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
    use crate::core::cluster::{SecretStatus, Snapshot, digest};
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

    fn writes_of(
        p: &Policy,
        view: &dyn View,
        services: &[Value],
        deployments: &[Value],
    ) -> Vec<Write> {
        let planned = plan(p, view, services, deployments);
        assert!(planned.held_back.is_empty());
        planned.writes
    }

    /// A view that knows what a watch knows of each Secret: present with its data, or not.
    struct Watched(Snapshot, SecretStatus);

    impl View for Watched {
        fn standalone(
            &self,
            namespace: &str,
            outpost: &crate::core::policy::Outpost<'_>,
        ) -> Option<bool> {
            self.0.standalone(namespace, outpost)
        }
        fn secret(
            &self,
            namespace: &str,
            name: &str,
        ) -> Option<std::collections::BTreeMap<String, [u8; 32]>> {
            self.0.secret(namespace, name)
        }
        fn secret_status(&self, _: &str, _: &str) -> SecretStatus {
            self.1
        }
    }

    #[test]
    fn a_deployment_is_not_rolled_to_pods_that_could_not_start() {
        let p = Policy::builtin().unwrap();
        for (status, says) in [
            (
                SecretStatus::Missing,
                "Secret goauthentik not found in authentik",
            ),
            (
                SecretStatus::Unreadable,
                "cannot read Secret goauthentik in authentik",
            ),
        ] {
            let view = Watched(Snapshot::default(), status);
            let planned = plan(&p, &view, &[], &[deployment()]);
            assert!(planned.writes.is_empty(), "{status:?}");
            assert_eq!(planned.held_back.len(), 1);
            assert!(
                planned.held_back[0].problems[0].starts_with(says),
                "{:?}",
                planned.held_back
            );
        }
        // A key removed from the Secret: named, never its value.
        let mut without = secret("b25l", "eA==");
        without["data"]
            .as_object_mut()
            .unwrap()
            .remove("AUTHENTIK_POSTGRESQL__PASSWORD");
        let view = Watched(Snapshot::of(&[without], ""), SecretStatus::Present);
        let planned = plan(&p, &view, &[], &[deployment()]);
        assert!(planned.writes.is_empty());
        assert_eq!(
            planned.held_back[0].problems,
            [
                "Secret goauthentik has no key AUTHENTIK_POSTGRESQL__PASSWORD; pods reading it will not start"
            ]
        );
        // All there: rolled.
        let view = Watched(
            Snapshot::of(&[secret("b25l", "eA==")], ""),
            SecretStatus::Present,
        );
        assert_eq!(writes_of(&p, &view, &[], &[deployment()]).len(), 1);
    }

    #[test]
    fn a_write_tests_the_version_it_was_computed_for_and_carries_the_whole_fix() {
        let p = Policy::builtin().unwrap();
        let view = Snapshot::of(&[secret("b25l", "eA==")], "");
        let mut stored = deployment();
        stored["metadata"]["resourceVersion"] = json!("42");
        let ops = write_ops(
            &p,
            &view,
            ObjectKind::Deployment,
            Reason::SecretChanged,
            &stored,
        );
        assert_eq!(
            serde_json::to_value(&ops[0]).unwrap(),
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "42"})
        );
        let mut fixed = stored.clone();
        json_patch::patch(&mut fixed, &ops).unwrap();
        assert!(fixed["spec"]["template"]["spec"]["containers"][0]["env"].is_array());
        assert!(
            write_ops(
                &p,
                &view,
                ObjectKind::Deployment,
                Reason::SecretChanged,
                &fixed
            )
            .is_empty()
        );
        // The Secret changes: the write replaces the checksum, which admission never does.
        let changed = Snapshot::of(&[secret("dHdv", "eA==")], "");
        let roll = write_ops(
            &p,
            &changed,
            ObjectKind::Deployment,
            Reason::SecretChanged,
            &fixed,
        );
        assert_eq!(roll.len(), 2, "{roll:?}");
        assert!(matches!(&roll[1], PatchOperation::Replace(r)
            if r.path.as_str() == "/spec/template/metadata/annotations/outpost-webhook~1secret-checksum"));
        // Applied to a newer version, the patch is refused rather than applied.
        let mut newer = stored.clone();
        newer["metadata"]["resourceVersion"] = json!("43");
        assert!(json_patch::patch(&mut newer, &ops).is_err());
    }

    #[test]
    fn a_selector_rewrite_and_its_restore_are_told_apart() {
        let p = Policy::builtin().unwrap();
        let with = Snapshot::of(&[deployment()], "");
        let moved = writes_of(&p, &with, &[service()], &[]);
        assert_eq!(moved[0].reason, Reason::SelectorFollowsPods);
        let back = writes_of(
            &p,
            &Snapshot::default(),
            &[apply(&service(), &moved[0])],
            &[],
        );
        assert_eq!(back[0].reason, Reason::SelectorRestored);
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
        let writes = writes_of(&p, &with, &[service()], &[]);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].reason, Reason::SelectorFollowsPods);
        let moved = apply(&service(), &writes[0]);
        assert_eq!(
            moved["spec"]["selector"]["app.kubernetes.io/name"],
            "authentik-outpost-proxy"
        );
        assert!(writes_of(&p, &with, std::slice::from_ref(&moved), &[]).is_empty());

        let without = Snapshot::default();
        let back = writes_of(&p, &without, std::slice::from_ref(&moved), &[]);
        let restored = apply(&moved, &back[0]);
        assert_eq!(restored["spec"]["selector"], service()["spec"]["selector"]);
        assert!(writes_of(&p, &without, &[restored], &[]).is_empty());
        assert!(
            writes_of(&p, &without, &[service()], &[]).is_empty(),
            "a default install is left alone"
        );
    }

    #[test]
    fn a_referenced_key_change_rolls_once_and_an_unreferenced_one_never() {
        let p = Policy::builtin().unwrap();
        let one = Snapshot::of(&[secret("b25l", "eA==")], "");
        let first = writes_of(&p, &one, &[], &[deployment()]);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].reason, Reason::SecretChanged);
        let stored = apply(&deployment(), &first[0]);
        assert!(
            writes_of(&p, &one, &[], std::slice::from_ref(&stored)).is_empty(),
            "a resync rolls nothing"
        );
        let unreferenced = Snapshot::of(&[secret("b25l", "eQ==")], "");
        assert!(writes_of(&p, &unreferenced, &[], std::slice::from_ref(&stored)).is_empty());
        let two = Snapshot::of(&[secret("dHdv", "eA==")], "");
        let second = writes_of(&p, &two, &[], std::slice::from_ref(&stored));
        assert_eq!(second.len(), 1);
        assert!(matches!(second[0].ops[0], PatchOperation::Replace(_)));
        let rolled = apply(&stored, &second[0]);
        assert!(writes_of(&p, &two, &[], &[rolled]).is_empty());
        let _ = digest(b"");
    }
}
