//! The registration: it exists, matches what `webhook-config` renders (after the apiserver's
//! defaults), selects the namespaces checked, carries a CA bundle that verifies the webhook, and
//! calls a Service that runs the webhook's pods.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

use super::{
    Check, EXPIRY_WARNING_DAYS, Finding, Group, Inputs, Severity, labels_of_at, ready_endpoints,
    runs_pods_of, show_labels,
};
use crate::pki::x509;

/// Every registration check.
pub(super) fn check(inputs: &Inputs) -> Vec<Finding> {
    let object = format!("MutatingWebhookConfiguration/{}", inputs.registration_name);
    let finding = |check, severity, message: String| Finding {
        check,
        severity,
        object: object.clone(),
        message,
        group: Group::Registration,
    };
    let Some(stored) = &inputs.registration else {
        return vec![finding(
            Check::RegistrationExists,
            Severity::Fail,
            "does not exist: no outpost write is fixed. Install it (README, Install), or \
             `outpost-webhook webhook-config --ca-bundle ca.crt | kubectl apply -f -`"
                .into(),
        )];
    };
    let mut out = vec![finding(
        Check::RegistrationExists,
        Severity::Ok,
        "exists".into(),
    )];
    let webhooks = |v: &Value| -> Vec<Value> {
        v.get("webhooks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let stored_hooks = webhooks(stored);
    for want in webhooks(&inputs.expected) {
        let name = want.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(have) = stored_hooks
            .iter()
            .find(|h| h.get("name").and_then(Value::as_str) == Some(name))
        else {
            out.push(finding(
                Check::RegistrationMatches,
                Severity::Fail,
                format!("has no webhook {name}: re-apply deploy/ or `webhook-config`"),
            ));
            continue;
        };
        out.push(matches(&finding, name, &want, have));
        out.extend(selects_namespaces(&finding, inputs, name, have));
        out.extend(ca_bundle(&finding, inputs.now, have));
        out.push(service_reference(&finding, inputs, have));
    }
    out
}

/// A webhook with the defaults the apiserver fills in on create (admissionregistration/v1) made
/// explicit: a registration applied without `matchPolicy` is stored with `Equivalent`, and means
/// the same as one that says so.
fn defaulted(webhook: &Value) -> Value {
    let mut webhook = webhook.clone();
    if let Some(w) = webhook.as_object_mut() {
        for (key, default) in [
            ("failurePolicy", json!("Fail")),
            ("matchPolicy", json!("Equivalent")),
            ("namespaceSelector", json!({})),
            ("objectSelector", json!({})),
            ("reinvocationPolicy", json!("Never")),
            ("timeoutSeconds", json!(10)),
        ] {
            if w.get(key).is_none_or(Value::is_null) {
                w.insert(key.into(), default);
            }
        }
        for rule in w
            .get_mut("rules")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            if rule.get("scope").is_none_or(Value::is_null) {
                rule.insert("scope".into(), json!("*"));
            }
        }
    }
    webhook
}

/// The stored webhook against the rendered one, field by field, `clientConfig` aside, each with
/// the apiserver's defaults.
fn matches(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    name: &str,
    want: &Value,
    have: &Value,
) -> Finding {
    let (want, have) = (&defaulted(want), &defaulted(have));
    let differ: Vec<String> = want
        .as_object()
        .into_iter()
        .flatten()
        // Which namespaces are the operator's choice: checked against each namespace instead.
        .filter(|(k, _)| !matches!(k.as_str(), "clientConfig" | "namespaceSelector"))
        .filter(|(k, v)| have.get(k.as_str()) != Some(*v))
        .map(|(k, v)| match (v, have.get(k.as_str())) {
            (Value::String(w), Some(Value::String(h))) => format!("{k} is {h}, want {w}"),
            (_, None) => format!("{k} is missing"),
            _ => format!("{k} differs"),
        })
        .collect();
    if differ.is_empty() {
        finding(
            Check::RegistrationMatches,
            Severity::Ok,
            format!(
                "webhook {name} matches `webhook-config`: rules, objectSelector, matchConditions, failurePolicy"
            ),
        )
    } else {
        finding(
            Check::RegistrationMatches,
            Severity::Fail,
            format!(
                "webhook {name} differs from `webhook-config`: {}. Re-apply deploy/ or \
                 `webhook-config`",
                differ.join("; ")
            ),
        )
    }
}

/// The webhook's `namespaceSelector` selects every checked namespace whose labels could be read:
/// in a namespace it skips, outpost writes go unfixed, and a dry run there proves nothing.
fn selects_namespaces(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    inputs: &Inputs,
    name: &str,
    webhook: &Value,
) -> Vec<Finding> {
    let selector = webhook.get("namespaceSelector");
    inputs
        .namespaces
        .iter()
        .filter_map(|ns| Some((ns, inputs.namespace_labels.get(ns)?)))
        .map(|(ns, labels)| {
            if label_selector_matches(selector, labels) {
                finding(
                    Check::RegistrationNamespaces,
                    Severity::Ok,
                    format!("webhook {name} sees namespace {ns}"),
                )
            } else {
                finding(
                    Check::RegistrationNamespaces,
                    Severity::Fail,
                    format!(
                        "webhook {name}'s namespaceSelector does not select namespace {ns}: its \
                         outposts are never fixed. Set it (`webhook-config --namespace-selector`) \
                         to labels namespace {ns} has"
                    ),
                )
            }
        })
        .collect()
}

/// A Kubernetes `LabelSelector` (`matchLabels` and `matchExpressions`) against `labels`; an
/// absent or empty selector selects everything, as the apiserver reads it.
fn label_selector_matches(selector: Option<&Value>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let match_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let have = labels.get(key).map(String::as_str);
            match e.get("operator").and_then(Value::as_str) {
                Some("In") => have.is_some_and(|h| values.contains(&h)),
                Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
                Some("Exists") => have.is_some(),
                Some("DoesNotExist") => have.is_none(),
                _ => false,
            }
        });
    match_labels && expressions
}

/// The CA bundle holds CA certificates only, none expired; a private key is a failure.
fn ca_bundle(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    now: i64,
    webhook: &Value,
) -> Vec<Finding> {
    let encoded = webhook
        .pointer("/clientConfig/caBundle")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if encoded.is_empty() {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle is empty: the apiserver cannot verify the webhook. With \
             cert-manager, check that cainjector runs; else `webhook-config --ca-bundle ca.crt`"
                .into(),
        )];
    }
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle is not base64".into(),
        )];
    };
    // Look for a key before anything else: saying which block is wrong is not enough when a
    // private key sits in a cluster-scoped object anyone with read access can see.
    if String::from_utf8_lossy(&pem).contains("PRIVATE KEY-----") {
        return vec![finding(
            Check::RegistrationCaBundle,
            Severity::Fail,
            "clientConfig.caBundle holds a PRIVATE KEY: treat the key as leaked, issue a new \
             certificate and set caBundle to the CA certificate only"
                .into(),
        )];
    }
    let ders = match x509::ca_bundle(&pem) {
        Ok(ders) => ders,
        Err(e) => {
            return vec![finding(
                Check::RegistrationCaBundle,
                Severity::Fail,
                format!("clientConfig.caBundle {e}"),
            )];
        }
    };
    let mut out = vec![finding(
        Check::RegistrationCaBundle,
        Severity::Ok,
        format!("caBundle holds {} CA certificate(s) and no key", ders.len()),
    )];
    for (i, der) in ders.iter().enumerate() {
        let Some(not_after) = x509::not_after(der) else {
            continue;
        };
        let days = (not_after - now).div_euclid(86_400);
        let (severity, message) = if not_after <= now {
            (
                Severity::Fail,
                format!(
                    "CA certificate {} expired {} day(s) ago: the apiserver refuses the webhook. \
                     Renew it (docs/operations.md, certificate renewal)",
                    i + 1,
                    -days
                ),
            )
        } else if days < EXPIRY_WARNING_DAYS {
            (
                Severity::Warn,
                format!(
                    "CA certificate {} expires in {days} day(s): renew it before then \
                     (docs/operations.md, certificate renewal)",
                    i + 1
                ),
            )
        } else {
            (
                Severity::Ok,
                format!("CA certificate {} expires in {days} days", i + 1),
            )
        };
        out.push(finding(Check::RegistrationCaExpiry, severity, message));
    }
    out
}

/// The Service the registration calls exists, selects the webhook's pods, and has ready
/// endpoints.
fn service_reference(
    finding: &impl Fn(Check, Severity, String) -> Finding,
    inputs: &Inputs,
    webhook: &Value,
) -> Finding {
    let Some(reference) = webhook.pointer("/clientConfig/service") else {
        let url = webhook
            .pointer("/clientConfig/url")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        return finding(
            Check::RegistrationService,
            Severity::Warn,
            format!("calls the URL {url}, not a Service: its reachability is not checked"),
        );
    };
    let text = |k: &str| reference.get(k).and_then(Value::as_str).unwrap_or_default();
    let (namespace, name) = (text("namespace"), text("name"));
    let fail = |message: String| finding(Check::RegistrationService, Severity::Fail, message);
    // `webhook-config --namespace` names where the webhook's Service is; the outposts' namespace
    // there is the usual slip.
    let misplaced = inputs.namespaces.iter().any(|n| n == namespace).then(|| {
        format!(
            " Namespace {namespace} is where outposts run, not the webhook: render the \
             registration with `webhook-config --namespace <the webhook's namespace>` \
             (outpost-webhook unless you moved it)"
        )
    });
    let Some(service) = &inputs.webhook_service else {
        return fail(format!(
            "calls Service {name} in namespace {namespace}, where no Service {name} exists: \
             every outpost write fails (failurePolicy Fail).{}",
            misplaced.unwrap_or_else(|| format!(
                " Install the webhook's Service in {namespace}, or point clientConfig.service at \
                 the namespace the webhook runs in"
            ))
        ));
    };
    let selector = labels_of_at(service, "/spec/selector");
    if let Some(deployments) = &inputs.webhook_deployments
        && !selector.is_empty()
        && runs_pods_of(deployments, namespace, &selector)
            .next()
            .is_none()
    {
        return fail(format!(
            "Service {namespace}/{name} selects no webhook pods: no Deployment in namespace \
             {namespace} runs pods labelled {}, so every outpost write fails (failurePolicy \
             Fail).{}",
            show_labels(&selector),
            misplaced.unwrap_or_else(|| " Point clientConfig.service at the webhook's own \
                                        Service"
                .into())
        ));
    }
    let ready = ready_endpoints(&inputs.endpoint_slices, namespace, name);
    if ready == 0 {
        fail(format!(
            "Service {namespace}/{name} has no ready endpoint: every outpost write fails \
             (failurePolicy Fail). Check `kubectl -n {namespace} get pods` for the webhook"
        ))
    } else {
        finding(
            Check::RegistrationService,
            Severity::Ok,
            format!("Service {namespace}/{name} has {ready} ready endpoint(s)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apiserver_defaults_compare_equal_to_what_they_default() {
        let rendered = json!({"name": "w", "matchPolicy": "Equivalent", "failurePolicy": "Fail",
            "rules": [{"operations": ["CREATE"], "scope": "*"}], "objectSelector": {}});
        let stored = json!({"name": "w", "timeoutSeconds": 10, "reinvocationPolicy": "Never",
            "namespaceSelector": {}, "rules": [{"operations": ["CREATE"]}]});
        assert_eq!(defaulted(&rendered), defaulted(&stored));
        let shorter = json!({"name": "w", "timeoutSeconds": 5});
        assert_ne!(defaulted(&shorter), defaulted(&stored));
    }

    #[test]
    fn label_selectors_read_as_the_apiserver_reads_them() {
        let labels: BTreeMap<String, String> = [(
            "kubernetes.io/metadata.name".to_owned(),
            "authentik".to_owned(),
        )]
        .into();
        assert!(label_selector_matches(None, &labels));
        assert!(label_selector_matches(Some(&json!({})), &labels));
        let by_name = |op: &str, values: &[&str]| {
            json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                                         "operator": op, "values": values}]})
        };
        assert!(label_selector_matches(
            Some(&by_name("In", &["authentik", "x"])),
            &labels
        ));
        assert!(!label_selector_matches(
            Some(&by_name("NotIn", &["authentik"])),
            &labels
        ));
        assert!(label_selector_matches(
            Some(&by_name("Exists", &[])),
            &labels
        ));
        assert!(!label_selector_matches(
            Some(&json!({"matchLabels": {"kubernetes.io/metadata.name": "identity"}})),
            &labels
        ));
    }
}
