//! The binary as a user runs it: the shipped examples, policy checks, and bad input.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

use base64::Engine as _;
use serde_json::Value;

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-webhook"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn readme_main_command_fixes_the_shipped_service_example() {
    // Alone, the Service is a default install's: its selector is kept, and the user is told why.
    let out = run(
        &["mutate", "-f", "examples/embedded-outpost-service.yaml"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_saphyr::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spec"]["selector"]["app.kubernetes.io/name"], "authentik");
    assert!(
        text(&out.stderr).contains("selector kept: no Deployment runs outpost"),
        "{}",
        text(&out.stderr)
    );
    // With the standalone Deployment beside it, the Service selects the outpost's pods.
    let out = run(
        &[
            "mutate",
            "-f",
            "examples/embedded-outpost-service.yaml",
            "-f",
            "examples/embedded-outpost-deployment.yaml",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text(&out.stdout)).unwrap();
    assert_eq!(
        docs[0]["spec"]["selector"]["app.kubernetes.io/name"],
        "authentik-outpost-proxy"
    );
    assert_eq!(docs[1]["spec"]["replicas"], 2);
}

#[test]
fn deployment_example_gets_the_example_policy() {
    let out = run(
        &[
            "mutate",
            "--policy",
            "deploy/policy.example.yaml",
            "-f",
            "examples/embedded-outpost-deployment.yaml",
            "-o",
            "patch",
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ops: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
    for want in [
        "/spec/replicas",
        "/spec/strategy",
        "/spec/template/spec/volumes",
        "/spec/template/spec/containers/0/volumeMounts",
        "/spec/template/spec/containers/0/readinessProbe",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
}

#[test]
fn review_from_stdin_answers_with_the_review_response() {
    let body = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/admissionreview-embedded-service.json"),
    )
    .unwrap();
    // The review alone is all the cluster there is: the selector is kept, with a warning.
    let out = run(&["mutate", "-o", "review"], &body);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none(), "{v}");
    assert!(
        v["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("selector kept")
    );
}

#[test]
fn warnings_go_to_stderr() {
    let input = br#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s","labels":{"app.kubernetes.io/managed-by":"goauthentik.io"}},"spec":{}}"#;
    let out = run(&["mutate"], input);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("warning: outpost-webhook: Service/s: labels lack"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_input_exits_non_zero_naming_the_problem() {
    let out = run(&["mutate"], b"{not json");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with("error: input is not valid JSON"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["mutate", "-f", "/nonexistent/x.yaml"], b"");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot read /nonexistent/x.yaml"));
}

#[test]
fn policy_check_accepts_the_example_and_names_file_line_and_field_of_a_bad_one() {
    let out = run(&["policy", "check", "deploy/policy.example.yaml"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "deploy/policy.example.yaml: ok, 2 rule(s)\n\
         reads Secret(s) goauthentik: the webhook's Role must allow get, list and watch on each, \
         by name, in every watched namespace (deploy/watch/rbac.yaml; the chart derives it from its \
         policy value)\n"
    );

    let dir = std::env::temp_dir().join(format!("ow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - deployment:\n      replicas: -2\n").unwrap();
    let out = run(&["policy", "check", bad.to_str().unwrap()], b"");
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {}:3: rules[0].deployment.replicas: must be between 0 and 2147483647\n",
            bad.display()
        )
    );
}

#[test]
fn policy_default_prints_a_policy_that_checks() {
    let out = run(&["policy", "default"], b"");
    assert!(out.status.success());
    let p = outpost_webhook::core::policy::Policy::from_yaml("stdout", &text(&out.stdout)).unwrap();
    assert_eq!(p.rule_count(), 1);
}

#[test]
fn policy_import_of_the_operators_patches_does_what_they_did() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let patches_file = fixtures.join("embedded-outpost-kubernetes-json-patches.json");
    let out = run(
        &[
            "policy",
            "import",
            "--from-json-patches",
            patches_file.to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("12 operation(s) expressed, 0 not"));
    let policy =
        outpost_webhook::core::policy::Policy::from_yaml("imported", &text(&out.stdout)).unwrap();

    let patches: Value =
        serde_json::from_str(&std::fs::read_to_string(&patches_file).unwrap()).unwrap();
    for (kind, fixture) in [
        ("deployment", "embedded-proxy-deployment.create.json"),
        ("service", "embedded-proxy-service.create.json"),
    ] {
        let object: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(fixture)).unwrap())
                .unwrap();
        // What authentik did with the hand-written patches...
        let mut by_hand = object.clone();
        let ops: json_patch::Patch = serde_json::from_value(patches[kind].clone()).unwrap();
        json_patch::patch(&mut by_hand, &ops).unwrap();
        // ...and what the webhook does with the imported policy.
        let object_kind = if kind == "service" {
            outpost_webhook::core::mutate::ObjectKind::Service
        } else {
            outpost_webhook::core::mutate::ObjectKind::Deployment
        };
        // The operator patched the selector because a standalone Deployment runs the outpost:
        // with it in view, `selector: auto` rewrites the selector as they did.
        let deployment: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join("embedded-proxy-deployment.create.json"))
                .unwrap(),
        )
        .unwrap();
        let view = outpost_webhook::core::cluster::Snapshot::of([&deployment], "authentik");
        let outcome = outpost_webhook::core::mutate::mutate_in(
            &policy,
            &view,
            "authentik",
            object_kind,
            &object,
        );
        let mut by_webhook = object.clone();
        json_patch::patch(&mut by_webhook, &outcome.ops).unwrap();
        if kind == "service" {
            // The one addition: the selector it replaced, to restore.
            let annotations = by_webhook["metadata"].as_object_mut().unwrap();
            assert!(annotations.remove("annotations").is_some());
        }
        if kind == "deployment" {
            // The one addition: the config checksum.
            let annotations = by_webhook["spec"]["template"]["metadata"]
                .as_object_mut()
                .unwrap();
            assert!(annotations.remove("annotations").is_some());
        }
        assert_eq!(by_webhook, by_hand, "{kind}");
    }
}

#[test]
fn webhook_config_renders_the_registration_with_a_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = outpost_webhook::pki::generate(&["x".into()], 1)
        .unwrap()
        .ca_pem;
    std::fs::write(dir.path().join("ca.crt"), &ca).unwrap();
    let out = run(
        &[
            "webhook-config",
            "--ca-bundle",
            dir.path().join("ca.crt").to_str().unwrap(),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_saphyr::from_slice(&out.stdout).unwrap();
    let bundle = v["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(bundle)
        .unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap().trim(), ca.trim());
    assert_eq!(
        v["webhooks"][0]["clientConfig"]["service"]["path"],
        "/mutate"
    );
    // The default namespace is where deploy/ runs the webhook: no warning.
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn webhook_config_warns_when_the_service_namespace_is_the_outposts() {
    // `--namespace` names where the webhook's Service is; the namespace the selector picks for
    // outposts there is the usual slip. The registration is still printed as asked.
    for args in [
        &["webhook-config", "--namespace", "authentik"][..],
        &[
            "webhook-config",
            "--namespace",
            "identity",
            "--namespace-selector",
            "kubernetes.io/metadata.name=identity",
        ][..],
    ] {
        let out = run(args, b"");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("warning: --namespace ") && stderr.contains("webhook's own Service"),
            "{stderr}"
        );
        let v: Value = serde_saphyr::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["webhooks"][0]["clientConfig"]["service"]["namespace"],
            args[2]
        );
    }
}

#[test]
fn mutate_takes_several_json_files_as_one_cluster_and_names_a_bad_one() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = std::env::temp_dir().join(format!("ow-cli-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for name in [
        "embedded-proxy-service.create.json",
        "embedded-proxy-deployment.create.json",
    ] {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(name)).unwrap()).unwrap();
        let object = if v["kind"] == "AdmissionReview" {
            v["request"]["object"].clone()
        } else {
            v
        };
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&object).unwrap()).unwrap();
        files.push(path.display().to_string());
    }
    let out = run(
        &["mutate", "-f", &files[0], "-f", &files[1], "-o", "json"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let service = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "Service")
        .unwrap();
    // The Deployment in the other file runs the outpost: the Service selects its pods.
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        "authentik-outpost-proxy"
    );
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"a\":").unwrap();
    let out = run(
        &["mutate", "-f", &files[0], "-f", bad.to_str().unwrap()],
        b"",
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with(&format!(
            "error: {}: input is not valid JSON",
            bad.display()
        )),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// docs/operations.md's flag table is written from `serve --help`: every flag it prints has a
/// row, with the default it prints.
#[test]
fn every_serve_flag_and_default_is_in_the_operations_flag_table() {
    let help = text(&run(&["serve", "--help"], b"").stdout);
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let table: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `--")).collect();
    let mut flags = 0;
    for line in help.lines().map(str::trim_start) {
        let Some(flag) = line.strip_prefix("--") else {
            continue;
        };
        let name = flag.split([' ', '=', '<']).next().unwrap();
        if matches!(name, "help" | "version") {
            continue;
        }
        flags += 1;
        let row = table
            .iter()
            .find(|r| r.contains(&format!("`--{name}`")))
            .unwrap_or_else(|| panic!("--{name} has no row in docs/operations.md"));
        // The help's `[default: X]` is somewhere in its paragraph; the row carries the same X.
        let paragraph: String = help
            .split(&format!("--{name}"))
            .nth(1)
            .unwrap()
            .split("\n      --")
            .next()
            .unwrap()
            .to_owned();
        if let Some(default) = paragraph
            .split("[default: ")
            .nth(1)
            .and_then(|d| d.split(']').next())
            .filter(|d| !d.contains("outpost-webhook-dev"))
        {
            assert!(
                row.contains(&format!("`{default}`")),
                "--{name}: the help says [default: {default}], the table says {row}"
            );
        }
    }
    assert!(flags >= 20, "{help}");
}
