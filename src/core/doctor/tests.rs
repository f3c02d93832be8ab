//! The report's pieces, checked alone.

use serde_json::json;

use super::{admission::changed_fields, deployment::tag, *};

#[test]
fn image_tags_ignore_registry_ports_and_digests() {
    assert_eq!(tag("ghcr.io/goauthentik/proxy:2026.2.4"), "2026.2.4");
    assert_eq!(tag("registry:5000/proxy"), "latest");
    assert_eq!(tag("registry:5000/proxy:1.2@sha256:abc"), "1.2");
    assert_eq!(tag("proxy"), "latest");
}

#[test]
fn an_endpoint_with_no_ready_condition_counts_as_ready() {
    let slices = [json!({"metadata": {"namespace": "a", "labels": {
            "kubernetes.io/service-name": "s"}},
        "endpoints": [{"addresses": ["10.0.0.1"]},
                      {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                      {"addresses": ["10.0.0.3"], "conditions": {"ready": true}}]})];
    assert_eq!(ready_endpoints(&slices, "a", "s"), 2);
    assert_eq!(ready_endpoints(&slices, "b", "s"), 0);
    assert_eq!(ready_endpoints(&slices, "a", "t"), 0);
}

#[test]
fn changed_fields_name_the_field_not_the_key() {
    let stored = json!({"metadata": {"labels": {"a": "1"}, "resourceVersion": "1"},
                        "spec": {"selector": {"x": "1"}, "template": {"spec": {
                            "containers": [{"env": []}]}}}});
    let mut returned = stored.clone();
    returned["metadata"]["resourceVersion"] = json!("2");
    assert!(changed_fields(&stored, &returned).is_empty());
    returned["spec"]["selector"]["y"] = json!("2");
    returned["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "E"}]);
    returned["metadata"]["annotations"] = json!({"k": "v"});
    assert_eq!(
        changed_fields(&stored, &returned),
        [
            "metadata.annotations",
            "spec.selector",
            "spec.template.spec.containers"
        ]
    );
}

#[test]
fn findings_serialize_with_stable_ids_the_policy_and_a_summary() {
    let f = Finding {
        check: Check::ServiceEndpoints,
        severity: Severity::Warn,
        object: "Service/a/b".into(),
        message: "m".into(),
        group: Group::Registration,
    };
    let findings = [f];
    let report = Report::new(
        &findings,
        Some(&PolicySource::Flag {
            path: "p.yaml".into(),
        }),
    );
    assert_eq!(
        serde_json::to_value(report).unwrap(),
        json!({"policy": "--policy p.yaml", "summary": {"ok": 0, "warn": 1, "fail": 0},
               "findings": [{"check": "service.endpoints", "severity": "warn",
                             "object": "Service/a/b", "message": "m"}]})
    );
}
