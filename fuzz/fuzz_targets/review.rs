//! The whole request path: bytes -> AdmissionReview -> mutate -> response bytes.
#![no_main]

mod laws;

use libfuzzer_sys::fuzz_target;
use outpost_webhook::core::{
    admission,
    cluster::Off,
    laws::apply_response,
    mutate::{self, ObjectKind, Verdict},
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    for policy in laws::policies() {
        let Ok((request, outcome, response)) = admission::review(policy, data) else {
            continue;
        };
        // The answer, read as the apiserver reads it, applies to the whole object it was sent.
        let whole: Value = serde_json::from_slice(data).expect("accepted input is JSON");
        if let Err(e) = apply_response(&whole, &response) {
            panic!("{e}");
        }
        let Some(object) = whole.pointer("/request/object").filter(|o| !o.is_null()) else {
            continue;
        };
        // The tree read from the bytes (strings borrowed, a repeated key kept twice) decides
        // as the whole object read by serde_json does.
        if !request.too_large {
            let tree = request.as_core();
            let direct = mutate::mutate(
                policy,
                &Off,
                &mutate::Request {
                    operation: tree.operation,
                    group: tree.group,
                    version: tree.version,
                    kind: tree.kind,
                    sub_resource: tree.sub_resource,
                    namespace: tree.namespace,
                    object: Some(object),
                },
            );
            assert_eq!(outcome, direct, "the tree and the value decided differently");
        }
        let kind = ObjectKind::from_gvk(
            &request.kind.group,
            &request.kind.version,
            &request.kind.kind,
        );
        if let (Some(kind), true) = (kind, outcome.verdict != Verdict::Skipped) {
            laws::check_object(policy, kind, object);
        }
    }
});
