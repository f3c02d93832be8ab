//! Issue 12's hardening, through the binary: `certs`, `webhook-config --ca-bundle`, `policy
//! check` and `policy import`, `--version`.
//!
//! Uses only the built binary, temporary directories and the library's public API.

// A failing test should panic with the value that failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use outpost_webhook::pki::{not_after, x509};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-webhook"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn run_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn stderr(o: &Output) -> String {
    text(&o.stderr)
}

fn stdout(o: &Output) -> String {
    text(&o.stdout)
}

fn certs(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["certs", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

/// Days from now until the first certificate in the PEM file expires.
fn days_left(pem_file: &Path) -> i64 {
    let der = x509::first_certificate(&fs::read(pem_file).unwrap()).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (not_after(&der).unwrap() - i64::try_from(now).unwrap()) / 86_400
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---- 1. certs ----

#[test]
fn certs_writes_ca_key_with_mode_0600_and_lists_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = certs(dir.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        listing(dir.path()),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    );
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(
            stdout(&o).contains(&format!("wrote {}", dir.path().join(name).display())),
            "{}",
            stdout(&o)
        );
    }
    for (name, mode) in [("ca.key", 0o600), ("tls.key", 0o600), ("ca.crt", 0o644)] {
        let m = fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{name}");
    }
    assert!(
        fs::read_to_string(dir.path().join("ca.key"))
            .unwrap()
            .contains("PRIVATE KEY")
    );
}

#[test]
fn certs_refuses_to_overwrite_existing_files_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(certs(dir.path(), &[]).status.success());
    let before = fs::read(dir.path().join("ca.key")).unwrap();
    let o = certs(dir.path(), &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already exists; pass --force to replace it"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(dir.path().join("ca.key")).unwrap(), before);
    let o = certs(dir.path(), &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(fs::read(dir.path().join("ca.key")).unwrap(), before);
}

#[test]
fn certs_ca_outlives_the_leaf_by_default() {
    let dir = tempfile::tempdir().unwrap();
    assert!(certs(dir.path(), &[]).status.success());
    assert!((3649..=3650).contains(&days_left(&dir.path().join("ca.crt"))));
    assert!((364..=365).contains(&days_left(&dir.path().join("tls.crt"))));
}

#[test]
fn certs_issues_a_new_leaf_from_an_existing_ca() {
    let ca_dir = tempfile::tempdir().unwrap();
    assert!(
        certs(ca_dir.path(), &["--ca-days", "100", "--days", "10"])
            .status
            .success()
    );
    let ca_crt = ca_dir.path().join("ca.crt");
    let ca_key = ca_dir.path().join("ca.key");
    let out = tempfile::tempdir().unwrap();
    let leaf_dir = out.path().join("leaf");
    let o = certs(
        &leaf_dir,
        &[
            "--ca-cert",
            ca_crt.to_str().unwrap(),
            "--ca-key",
            ca_key.to_str().unwrap(),
            "--days",
            "50",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(listing(&leaf_dir), ["tls.crt", "tls.key"]);
    assert!((49..=50).contains(&days_left(&leaf_dir.join("tls.crt"))));
    // The leaf may not outlive the CA it was signed by.
    let o = certs(
        &leaf_dir,
        &[
            "--ca-cert",
            ca_crt.to_str().unwrap(),
            "--ca-key",
            ca_key.to_str().unwrap(),
            "--days",
            "200",
            "--force",
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("after its CA"), "{}", stderr(&o));
    // A key that is not the CA's is refused, naming the files.
    let o = certs(
        &out.path().join("other"),
        &[
            "--ca-cert",
            ca_crt.to_str().unwrap(),
            "--ca-key",
            leaf_dir.join("tls.key").to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not belong to the CA certificate")
            && stderr(&o).contains("ca.crt"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn certs_validity_out_of_range_is_a_clear_error_not_a_panic() {
    for args in [
        &["--days", "0"][..],
        &["--days", "3000000"],
        &["--days", "3651"],
        &["--ca-days", "0"],
        &["--ca-days", "36501"],
        &["--ca-days", "10", "--days", "20"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = certs(dir.path(), args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
        assert!(
            e.contains("--days") || e.contains("--ca-days") || e.contains("after its CA"),
            "{args:?}: {e}"
        );
        assert!(listing(dir.path()).is_empty(), "{args:?} wrote files");
    }
}

// ---- 2. webhook-config --ca-bundle ----

fn webhook_config(bundles: &[&Path]) -> Output {
    let mut args = vec!["webhook-config".to_owned()];
    for b in bundles {
        args.push("--ca-bundle".into());
        args.push(b.to_str().unwrap().into());
    }
    bin().args(&args).output().unwrap()
}

#[test]
fn webhook_config_ca_bundle_refuses_keys_leaves_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    assert!(certs(dir.path(), &[]).status.success());
    let empty = dir.path().join("empty.pem");
    fs::write(&empty, "").unwrap();
    let key_and_cert = dir.path().join("mixed.pem");
    fs::write(
        &key_and_cert,
        fs::read_to_string(dir.path().join("ca.crt")).unwrap()
            + &fs::read_to_string(dir.path().join("ca.key")).unwrap(),
    )
    .unwrap();
    for (file, why) in [
        (empty.clone(), "has no PEM CERTIFICATE block"),
        (dir.path().join("tls.key"), "not a CERTIFICATE"),
        (key_and_cert, "block 2 is a PEM \"PRIVATE KEY\" block"),
        (dir.path().join("tls.crt"), "is not a CA certificate"),
    ] {
        let o = webhook_config(&[&dir.path().join("ca.crt"), &file]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{} accepted", file.display());
        assert!(
            e.contains(&format!("--ca-bundle {}: ", file.display())) && e.contains(why),
            "{e}"
        );
        assert!(stdout(&o).is_empty());
    }
}

#[test]
fn webhook_config_ca_bundle_is_repeatable_old_then_new() {
    use outpost_webhook::{
        cmd::webhook_config::{Options, render},
        pki::pem_certificate,
    };
    let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(certs(old.path(), &[]).status.success());
    assert!(certs(new.path(), &[]).status.success());
    let (old_ca, new_ca) = (old.path().join("ca.crt"), new.path().join("ca.crt"));
    let o = webhook_config(&[&old_ca, &new_ca]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pem = |p: &Path| pem_certificate(&x509::first_certificate(&fs::read(p).unwrap()).unwrap());
    let want = render(&Options::shipped(Some(
        (pem(&old_ca) + &pem(&new_ca)).into_bytes(),
    )))
    .unwrap();
    assert_eq!(stdout(&o), want);
    assert_ne!(stdout(&webhook_config(&[&new_ca, &old_ca])), want);
}

// ---- 3. policy check: quantities and outpost types ----

fn policy_check(yaml: &str) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    fs::write(&file, yaml).unwrap();
    let o = run(&["policy", "check", file.to_str().unwrap()]);
    (o, file.display().to_string())
}

#[test]
fn policy_check_refuses_bad_quantities_and_accepts_good_ones() {
    for good in ["2Gi", "500m", "1e3"] {
        let (o, _) = policy_check(&format!(
            "rules:\n- deployment:\n    resources:\n      limits: {{memory: '{good}'}}\n"
        ));
        assert!(o.status.success(), "{good}: {}", stderr(&o));
    }
    let (o, file) =
        policy_check("rules:\n- deployment:\n    resources:\n      limits: {memory: 2Gib}\n");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "{file}:4: rules[0].deployment.resources.limits.memory: \"2Gib\" is not a"
        )),
        "{}",
        stderr(&o)
    );
    let (o, file) = policy_check(
        "rules:\n- deployment:\n    volumes:\n    - name: tmp\n      emptyDir: {sizeLimit: 1GB}\n",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "{file}:4: rules[0].deployment.volumes[0]: emptyDir.sizeLimit: \"1GB\""
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn policy_check_refuses_unknown_outpost_types_listing_the_valid_ones() {
    let (o, file) = policy_check("rules:\n- match:\n    types: [ldapp]\n");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!(
            "{file}:3: rules[0].match.types[0]: \"ldapp\" is not an authentik outpost type; \
             valid: proxy, ldap, radius, rac"
        )),
        "{}",
        stderr(&o)
    );
    let (o, _) = policy_check("rules:\n- match:\n    types: [proxy, ldap, radius, rac]\n");
    assert!(o.status.success(), "{}", stderr(&o));
}

// ---- 4. policy shape errors: file:line: field: message ----

#[test]
fn policy_shape_errors_name_the_file_line_and_field_briefly() {
    let (o, file) =
        policy_check("rules:\n  - match: {types: [proxy]}\n    deployment:\n      replicass: 2\n");
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{file}:4: rules[0].deployment.replicass: unknown field; expected one of replicas,"
        )),
        "{e}"
    );
    assert!(
        !e.contains("<input>") && e.lines().count() == 1 && e.len() < 300,
        "{e}"
    );
    let (o, file) = policy_check("rules:\n  - deployment:\n      env: {a: 1}\n");
    assert!(
        stderr(&o).contains(&format!("{file}:3: rules[0].deployment.env: ")),
        "{}",
        stderr(&o)
    );
}

// ---- 5. policy import --strict and stdin ----

const PATCHES: &str = r#"{"deployment": [
  {"op": "add", "path": "/spec/replicas", "value": 2},
  {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true}
]}"#;

const EXPRESSIBLE: &str =
    r#"{"deployment": [{"op": "add", "path": "/spec/replicas", "value": 2}]}"#;

#[test]
fn policy_import_reads_standard_input() {
    let o = run_stdin(&["policy", "import", "-f", "-"], EXPRESSIBLE);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("replicas: 2"), "{}", stdout(&o));
    let o = run_stdin(
        &["policy", "import", "--from-json-patches", "-"],
        "not json",
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("standard input is not JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn policy_import_strict_exits_1_after_printing_what_was_dropped() {
    let o = run_stdin(&["policy", "import", "-f", "-"], PATCHES);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_stdin(&["policy", "import", "-f", "-", "--strict"], PATCHES);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("not expressible: ") && e.contains("hostNetwork"),
        "{e}"
    );
    assert!(
        e.contains("--strict: 1 operation(s) could not be expressed"),
        "{e}"
    );
    assert!(stdout(&o).contains("replicas: 2"), "{}", stdout(&o));
    let o = run_stdin(&["policy", "import", "-f", "-", "--strict"], EXPRESSIBLE);
    assert!(o.status.success(), "{}", stderr(&o));
}

// ---- 6. --version carries the commit ----

/// `outpost-webhook 0.1.0 (commit <12 hex>[-dirty])`, or `(commit unknown)` without git.
fn assert_version_line(out: &str) {
    let want = format!("outpost-webhook {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = out
        .strip_prefix(&want)
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{out:?} does not start with {want:?}"));
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        commit == "unknown" || (hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())),
        "{out:?}"
    );
}

#[test]
fn version_names_the_commit_and_subcommands_say_outpost_webhook() {
    let top = run(&["--version"]);
    assert!(top.status.success());
    assert_version_line(&stdout(&top));
    for args in [
        &["serve", "-V"][..],
        &["certs", "--version"],
        &["policy", "-V"],
        &["policy", "check", "-V"],
    ] {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), stdout(&top), "{args:?}");
    }
    // Built from a git checkout, the hash is HEAD's.
    if let Ok(git) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        && git.status.success()
    {
        let head = stdout(&git);
        assert!(
            stdout(&top).contains(head.trim()),
            "{} vs {head}",
            stdout(&top)
        );
    }
}

#[test]
fn huge_or_malformed_duration_flags_are_usage_errors_not_panics() {
    for flag in [
        "--reload-interval",
        "--shutdown-grace",
        "--request-timeout",
        "--header-timeout",
        "--handshake-timeout",
        "--idle-timeout",
        "--max-connection-age",
        "--roll-interval",
    ] {
        for value in [
            "18000000000000000000s18000000000000000000s",
            "1e400s",
            &"9".repeat(400),
            "-1s",
        ] {
            let o = run(&["serve", &format!("{flag}={value}")]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
            assert!(err.contains("is not a duration"), "{flag} {value}: {err}");
            assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        }
    }
}
