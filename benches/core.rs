//! The pure path of one admission request: body bytes -> AdmissionReview -> mutate -> response
//! bytes, on reviews shaped like the ones authentik's controller causes, and on Deployments
//! padded to 100 KB and 1 MB to show how the cost grows with size. The `cluster-view` group
//! takes the same path with the watch cache as the view (`serve --cluster`): off, holding one
//! outpost, and holding 1,000 (a Deployment and a Service each, and the Secret they read).
//!
//! `cargo bench --bench core`. Nothing in `cargo test` depends on these timings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../examples/fleet/mod.rs"]
mod fleet;

use std::{hint::black_box, path::Path};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outpost_webhook::core::{
    admission,
    cluster::{Off, View},
    policy::Policy,
};
use serde_json::Value;

fn golden(case: &str, file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A Deployment CREATE of about `target` bytes, written in the apiserver's field order
/// (metadata before spec, a container's name first) and grown in equal parts the ways large
/// objects grow: long annotations, many env vars in the outpost container, and sidecar
/// containers with env of their own.
fn padded(target: usize) -> Vec<u8> {
    let third = target / 3;
    let env_entry = |i: usize| {
        format!(
            r#"{{"name":"PADDING_VARIABLE_{i:05}","value":"{}"}}"#,
            "x".repeat(40)
        )
    };
    let sidecar_env: Vec<String> = (0..20).map(env_entry).collect();
    let sidecar_env = sidecar_env.join(",");

    let mut annotations = Vec::new();
    let mut size = 0;
    while size < third {
        let a = format!(
            r#""example.com/note-{}":"{}""#,
            annotations.len(),
            "y".repeat(2000)
        );
        size += a.len();
        annotations.push(a);
    }
    let mut env = vec![r#"{"name":"AUTHENTIK_HOST","valueFrom":{"secretKeyRef":{"name":"ak-outpost-o","key":"authentik_host"}}}"#.to_owned()];
    size = 0;
    while size < third {
        let e = env_entry(env.len());
        size += e.len();
        env.push(e);
    }
    let mut sidecars = Vec::new();
    size = 0;
    while size < third {
        let c = format!(
            r#"{{"name":"sidecar-{}","image":"busybox:1.36","args":["sleep","infinity"],"env":[{sidecar_env}],"resources":{{}}}}"#,
            sidecars.len()
        );
        size += c.len();
        sidecars.push(c);
    }
    let labels = r#""app.kubernetes.io/managed-by":"goauthentik.io","app.kubernetes.io/name":"authentik-outpost-proxy","goauthentik.io/outpost-name":"o","goauthentik.io/outpost-type":"proxy","goauthentik.io/outpost-uuid":"0eecac0797c7443c892505f2f4fe3e47""#;
    format!(
        r#"{{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{{"uid":"u","kind":{{"group":"apps","version":"v1","kind":"Deployment"}},"resource":{{"group":"apps","version":"v1","resource":"deployments"}},"name":"ak-outpost-o","namespace":"authentik","operation":"CREATE","userInfo":{{"username":"system:serviceaccount:authentik:authentik"}},"object":{{"kind":"Deployment","apiVersion":"apps/v1","metadata":{{"name":"ak-outpost-o","namespace":"authentik","labels":{{{labels}}},"annotations":{{{annotations}}}}},"spec":{{"replicas":1,"selector":{{"matchLabels":{{{labels}}}}},"template":{{"metadata":{{"labels":{{{labels}}}}},"spec":{{"containers":[{{"name":"proxy","image":"ghcr.io/goauthentik/proxy:2026.2.4","ports":[{{"name":"http","containerPort":9000,"protocol":"TCP"}}],"env":[{env}],"resources":{{}}}},{sidecars}]}}}}}}}},"oldObject":null,"dryRun":false}}}}"#,
        annotations = annotations.join(","),
        env = env.join(","),
        sidecars = sidecars.join(","),
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let policy = Policy::builtin().unwrap();
    let fixed = {
        let mut review = golden("embedded-deployment-create", "review.json");
        review["request"]["object"] = golden("embedded-deployment-create", "patched.json");
        serde_json::to_vec(&review).unwrap()
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admissionreview-public-deployment-create.json");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "service-create",
            serde_json::to_vec(&golden("embedded-service-create", "review.json")).unwrap(),
        ),
        // The shared fixture byte for byte (pretty-printed, 12 KB): the body bench/load.sh posts.
        ("deployment-create", std::fs::read(fixture).unwrap()),
        ("deployment-already-fixed", fixed),
        ("deployment-100k", padded(100 * 1024)),
        ("deployment-1m", padded(1024 * 1024)),
    ];
    let mut group = c.benchmark_group("review");
    for (name, body) in &cases {
        // Every case is a real one. The Deployments that are not yet right are patched; with
        // the view off, `selector: auto` keeps the Service's selector (a warning). The 1 MB one
        // holds more values in its outpost container than the parser builds
        // (`prune::MAX_KEPT_VALUES`): it is answered unpatched, with a warning, and what is timed
        // is how soon.
        let (request, outcome, _) = admission::review(&policy, body).unwrap();
        assert_eq!(request.too_large, *name == "deployment-1m", "{name}");
        assert_eq!(
            outcome.ops.is_empty(),
            matches!(
                *name,
                "deployment-already-fixed" | "service-create" | "deployment-1m"
            ),
            "{name}"
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("{name}/{}B", body.len()), |b| {
            b.iter(|| admission::review(black_box(&policy), black_box(body)).is_ok());
        });
    }
    group.finish();
}

/// Admission with the cluster view: the embedded outpost's Service CREATE (the view is asked
/// whether a standalone Deployment runs it; none does, so the selector is kept) and the `public`
/// outpost's Deployment CREATE (the view gives the Secret data for its checksum).
fn cluster_view(c: &mut Criterion) {
    let policy = Policy::builtin().unwrap();
    let reviews: Vec<(&str, Vec<u8>)> = vec![
        (
            "service-create",
            serde_json::to_vec(&golden("embedded-service-create", "review.json")).unwrap(),
        ),
        (
            "deployment-create",
            std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/admissionreview-public-deployment-create.json"),
            )
            .unwrap(),
        ),
    ];
    let one = fleet::cache(&fleet::fleet(1));
    let thousand = fleet::cache(&fleet::fleet(1000));
    assert_eq!(thousand.counts(), (1000, 1000, 1));
    let views: [(&str, &dyn View); 3] =
        [("off", &Off), ("cache-1", &one), ("cache-1000", &thousand)];
    let mut group = c.benchmark_group("cluster-view");
    for (name, body) in &reviews {
        for (view_name, view) in views {
            // Each decides as admission would: a checksum only with a view, the same ops for
            // one outpost and for 1,000.
            let (_, outcome, _) = admission::review_with(&policy, view, body).unwrap();
            assert!(
                !outcome.ops.is_empty() || *name == "service-create",
                "{name}"
            );
            group.bench_function(format!("{name}/{view_name}"), |b| {
                b.iter(|| {
                    admission::review_with(black_box(&policy), view, black_box(body)).unwrap()
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = bench, cluster_view
}
criterion_main!(benches);
