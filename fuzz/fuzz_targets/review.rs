//! The whole request path: bytes -> AdmissionReview -> mutate -> response bytes.
#![no_main]

mod laws;

use libfuzzer_sys::fuzz_target;
use outpost_webhook::{admission, mutate::ObjectKind};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    for policy in laws::policies() {
        let Ok((request, outcome, response)) = admission::review(policy, data) else {
            continue;
        };
        // The answer is always a well-formed AdmissionReview echoing the uid.
        let answer: Value = serde_json::from_slice(&response).expect("response is JSON");
        assert_eq!(answer["response"]["uid"], Value::from(request.uid.as_str()));
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(
            answer["response"].get("patch").is_some(),
            !outcome.ops.is_empty()
        );
        // The laws, on the whole object as the apiserver holds it.
        let whole: Value = serde_json::from_slice(data).expect("accepted input is JSON");
        let Some(object) = whole.pointer("/request/object").filter(|o| !o.is_null()) else {
            continue;
        };
        let kind = ObjectKind::from_gvk(
            &request.kind.group,
            &request.kind.version,
            &request.kind.kind,
        );
        if let (Some(kind), true) = (
            kind,
            outcome.verdict != outpost_webhook::mutate::Verdict::Skipped,
        ) {
            laws::check_object(policy, kind, object);
        } else {
            let mut patched = object.clone();
            json_patch::patch(&mut patched, &outcome.ops).expect("the patch must apply");
        }
    }
});
