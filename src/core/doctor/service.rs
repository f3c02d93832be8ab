//! An outpost Service: admission leaves it as stored, it selects the right pods (never the
//! 6-key union, never the server pods beside a standalone Deployment), and they are ready.

use serde_json::Value;

use super::{
    About, Check, Finding, Inputs, Severity,
    admission::{Drift, dry_run},
    in_namespace, labels_of_at, name_of, pod_ready, ready_endpoints, selected_pods, show_labels,
};
use crate::{
    core::{
        cluster::{Labels, Snapshot, deployment_selector},
        mutate::{ObjectKind, identify_outpost, pod_selector},
        policy::Policy,
    },
    k8s::{EMBEDDED_SELECTOR, OUTPOST_NAME, OUTPOST_TYPE, OUTPOST_UUID},
};

/// Every check of one outpost Service.
pub(super) fn check(
    policy: &Policy,
    inputs: &Inputs,
    view: &Snapshot,
    namespace: &str,
    svc: &Value,
) -> Vec<Finding> {
    let Some(outpost) = identify_outpost(svc) else {
        return Vec::new();
    };
    let about = About::new("Service", namespace, svc, &outpost);
    let name = name_of(svc);
    let mut out = Vec::new();
    out.extend(dry_run(
        policy,
        inputs,
        view,
        &about,
        (ObjectKind::Service, namespace, name),
        svc,
        // A Service carries no config checksum: nothing tells a policy change from a write
        // past the webhook.
        |_: &[String]| Drift::PastWebhook,
        "re-save the outpost in authentik: its controller writes the Service again, through the \
         webhook",
    ));
    let selector = labels_of_at(svc, "/spec/selector");
    let embedded = EMBEDDED_SELECTOR
        .iter()
        .all(|(k, v)| selector.get(*k).map(String::as_str) == Some(*v));
    let has_outpost_keys = [OUTPOST_NAME, OUTPOST_TYPE, OUTPOST_UUID]
        .iter()
        .any(|k| selector.contains_key(*k));
    let wanted: Labels = pod_selector(&outpost)
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?.to_owned())))
        .collect();
    let standalone = in_namespace(&inputs.deployments, namespace)
        .find(|d| deployment_selector(d).as_ref() == Some(&wanted))
        .map(name_of);
    if embedded && has_outpost_keys {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Fail,
            format!(
                "the selector is the {}-key union of the controller's and the outpost's labels, \
                 which no pod carries: a controller PATCH got past the webhook. {}",
                selector.len(),
                "Re-save the outpost in authentik with the webhook running"
            ),
        ));
    } else if embedded && let Some(deployment) = standalone {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Fail,
            format!(
                "selects the authentik server pods while Deployment {deployment} runs the \
                 outpost: forward-auth reaches the wrong pods. Is the webhook's cluster view on \
                 (`serve --cluster`) and the policy's selector auto or outpost?"
            ),
        ));
    } else {
        out.push(about.say(
            Check::ServiceSelector,
            Severity::Ok,
            if embedded {
                "selects the authentik server pods, which serve the embedded outpost (no \
                 standalone Deployment runs it)"
                    .into()
            } else {
                format!("selects {}", show_labels(&selector))
            },
        ));
    }
    let selected: Vec<&Value> = selected_pods(&inputs.pods, namespace, &selector).collect();
    let ready_pods = selected.iter().filter(|p| pod_ready(p)).count();
    let endpoints = ready_endpoints(&inputs.endpoint_slices, namespace, name);
    let counts = format!(
        "selects {} pod(s), {ready_pods} ready; {endpoints} ready endpoint(s)",
        selected.len()
    );
    out.push(if ready_pods == 0 || endpoints == 0 {
        about.say(
            Check::ServiceEndpoints,
            Severity::Fail,
            format!(
                "{counts}: requests to the outpost fail and forward-auth falls back. Check the \
                 outpost's pods: `kubectl -n {namespace} get pods -l {}`",
                show_labels(&selector).replace(": ", "=").replace(", ", ",")
            ),
        )
    } else {
        about.say(Check::ServiceEndpoints, Severity::Ok, counts)
    });
    out
}
