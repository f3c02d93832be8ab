//! `outpost-webhook mutate`: runs the core on objects or an AdmissionReview read from a file,
//! without a cluster: the documents given are the cluster.
//!
//! [`execute`] reads the file (or stdin) and the policy and prints; [`run`] is pure, bytes in,
//! bytes and warnings out.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use clap::Args;
use serde_json::{Value, json};

use super::{Error, load_policy};
use crate::core::{
    admission::{self, ReviewError},
    cluster::Snapshot,
    mutate::{ObjectKind, Outcome, Verdict, mutate_in},
    one_line,
    policy::Policy,
};

/// Flags of `mutate`.
#[derive(Debug, Args)]
pub struct MutateArgs {
    /// An input file; `-` or nothing reads stdin. Repeatable: the files are read as one stream,
    /// and together they are the cluster `selector: auto` looks at.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The policy file; the built-in policy when not given.
    #[arg(long, value_name = "FILE", env = "OUTPOST_WEBHOOK_POLICY")]
    pub policy: Option<PathBuf>,
    /// What to print.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Object)]
    pub output: Output,
}

/// Runs `mutate`: prints the result on stdout, warnings and a note on stderr.
///
/// # Errors
/// When the policy or input cannot be read, or the input is not an object it can fix.
pub fn execute(args: &MutateArgs) -> Result<(), Error> {
    let policy = load_policy(args.policy.as_deref())?;
    let result = if args.files.len() > 1 {
        // Each file parsed on its own (JSON files cannot be joined into one stream), an error
        // naming its file; together they are the cluster.
        let mut docs = Vec::new();
        let mut yaml = false;
        for file in &args.files {
            let input = read_input(Some(file))?;
            let (parsed, was_yaml) = parse(&input).map_err(|e| OfflineError::File {
                file: file.display().to_string(),
                message: e.to_string(),
            })?;
            if parsed
                .iter()
                .any(|d| d.get("kind").and_then(Value::as_str) == Some(admission::KIND))
            {
                return Err(OfflineError::File {
                    file: file.display().to_string(),
                    message: "an AdmissionReview is answered alone: give it as the only -f".into(),
                }
                .into());
            }
            docs.extend(parsed);
            yaml |= was_yaml;
        }
        run_docs(&policy, docs, yaml, args.output)?
    } else {
        let input = read_input(args.files.first().map(PathBuf::as_path))?;
        run(&policy, &input, args.output)?
    };
    let many = result.decided.len() > 1;
    for d in &result.decided {
        for w in &d.outcome.warnings {
            eprintln!("warning: {w}");
        }
        match note(&d.outcome) {
            Some(note) if many => eprintln!("{}: {note}", d.object),
            Some(note) => eprintln!("{note}"),
            None => {}
        }
    }
    std::io::stdout()
        .write_all(result.stdout.as_bytes())
        .map_err(|source| Error::io("cannot write to stdout", source))
}

fn read_input(file: Option<&Path>) -> Result<Vec<u8>, Error> {
    match file {
        Some(p) if p != Path::new("-") => std::fs::read(p)
            .map_err(|source| Error::io(format!("cannot read {}", p.display()), source)),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|source| Error::io("cannot read stdin", source))?;
            Ok(buf)
        }
    }
}

/// What `mutate` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// The patched objects, in the input's format (YAML or JSON).
    #[default]
    Object,
    /// The patched objects as YAML.
    Yaml,
    /// The patched objects as JSON.
    Json,
    /// The RFC 6902 patch, as JSON (one object: the operations; several: one entry each).
    Patch,
    /// The AdmissionReview the server would answer with, as JSON (one object only).
    Review,
}

/// Why an input could not be mutated.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("input is empty")]
    Empty,
    #[error("input is not valid JSON: {0}")]
    Json(String),
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("input is not valid YAML: {0}")]
    Yaml(String),
    #[error(
        "input is a {found}; expected a Service (v1), a Deployment (apps/v1) or an AdmissionReview"
    )]
    NotAnObject { found: String },
    #[error("input is an AdmissionReview but cannot be read")]
    Review(#[from] ReviewError),
    #[error("the patch does not apply to the object; this is a bug: {0}")]
    Apply(String),
    #[error("cannot write output: {0}")]
    Write(String),
    #[error("-o review answers one object or AdmissionReview; the input has {0}")]
    ReviewOfMany(usize),
}

/// What the core decided about one input object.
#[derive(Debug)]
pub struct Decided {
    /// `Kind/namespace/name`, for messages.
    pub object: String,
    pub outcome: Outcome,
}

/// The result of one offline run.
#[derive(Debug)]
pub struct Mutated {
    /// What to print on stdout.
    pub stdout: String,
    /// What the core decided about each Service and Deployment, with warnings for stderr.
    pub decided: Vec<Decided>,
}

/// Runs the core on `input`, which is treated as the cluster: one or more Services and
/// Deployments (a YAML stream, a `kind: List`, or what `kubectl get svc,deploy -o yaml` prints),
/// with any Secrets they read, or one `AdmissionReview`; YAML or JSON. `selector: auto` rewrites
/// a Service only when its outpost's Deployment is among the inputs.
///
/// # Errors
/// When the input is empty, does not parse, or holds no object the webhook fixes.
pub fn run(policy: &Policy, input: &[u8], output: Output) -> Result<Mutated, OfflineError> {
    let (docs, yaml) = parse(input)?;
    run_docs(policy, docs, yaml, output)
}

/// The documents of one input, and whether it was YAML (else JSON).
fn parse(input: &[u8]) -> Result<(Vec<Value>, bool), OfflineError> {
    let first = input.iter().find(|b| !b.is_ascii_whitespace());
    let yaml = match first {
        None => return Err(OfflineError::Empty),
        Some(b'{' | b'[') => false,
        Some(_) => true,
    };
    let docs: Vec<Value> = if yaml {
        let text = std::str::from_utf8(input)
            .map_err(|e| OfflineError::Yaml(format!("not UTF-8: {e}")))?;
        serde_saphyr::from_multiple(text)
            .map_err(|e| OfflineError::Yaml(one_line(&e.to_string())))?
    } else {
        vec![serde_json::from_slice(input).map_err(|e| OfflineError::Json(e.to_string()))?]
    };
    Ok((docs, yaml))
}

/// As [`run`], on parsed documents.
fn run_docs(
    policy: &Policy,
    docs: Vec<Value>,
    yaml: bool,
    output: Output,
) -> Result<Mutated, OfflineError> {
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    if docs.is_empty() {
        return Err(OfflineError::Empty);
    }
    if let [doc] = docs.as_slice() {
        if doc.get("kind").and_then(Value::as_str) == Some(admission::KIND) {
            return run_review(policy, doc, output, yaml);
        }
        if output == Output::Review && kind_of(doc).is_some() {
            return run_review(policy, &review_for(doc), output, yaml);
        }
    }
    // A List (what `kubectl get -o yaml` prints) is unwrapped, and wrapped again on output.
    let list = match docs.as_slice() {
        [doc] if doc.get("items").is_some_and(Value::is_array) => Some(doc.clone()),
        _ => None,
    };
    let objects: Vec<Value> = match &list {
        Some(l) => l
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        None => docs,
    };
    let snapshot = Snapshot::of(&objects, "");
    let mut decided = Vec::new();
    let mut patched = Vec::with_capacity(objects.len());
    let mut ops_by_object = Vec::new();
    for object in objects {
        let Some(kind) = kind_of(&object) else {
            patched.push(object);
            continue;
        };
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let outcome = mutate_in(policy, &snapshot, namespace, kind, &object);
        let mut fixed = object;
        json_patch::patch(&mut fixed, &outcome.ops)
            .map_err(|e| OfflineError::Apply(e.to_string()))?;
        let name = describe(kind, &fixed);
        ops_by_object.push(json!({"object": name, "patch": outcome.ops}));
        decided.push(Decided {
            object: name,
            outcome,
        });
        patched.push(fixed);
    }
    if decided.is_empty() {
        let found = match patched.as_slice() {
            [one] => found(one),
            _ => format!("{} documents, none a Service or Deployment", patched.len()),
        };
        return Err(OfflineError::NotAnObject { found });
    }
    let stdout = match output {
        Output::Review => return Err(OfflineError::ReviewOfMany(patched.len())),
        Output::Patch => match decided.as_slice() {
            [one] => pretty(&one.outcome.ops)?,
            _ => pretty(&ops_by_object)?,
        },
        Output::Object | Output::Yaml | Output::Json => {
            let as_yaml = output == Output::Yaml || (output == Output::Object && yaml);
            let docs = match list {
                Some(mut l) => {
                    if let Some(items) = l.get_mut("items") {
                        *items = Value::Array(patched);
                    }
                    vec![l]
                }
                None => patched,
            };
            match (as_yaml, docs.as_slice()) {
                (true, _) => serde_saphyr::to_string_multiple(&docs)
                    .map_err(|e| OfflineError::Write(e.to_string()))?,
                (false, [one]) => pretty(one)?,
                (false, _) => pretty(&json!({"apiVersion": "v1", "kind": "List", "items": docs}))?,
            }
        }
    };
    Ok(Mutated { stdout, decided })
}

/// One AdmissionReview, answered as the server would with no view of the cluster beyond it.
fn run_review(
    policy: &Policy,
    review: &Value,
    output: Output,
    yaml: bool,
) -> Result<Mutated, OfflineError> {
    let bytes = serde_json::to_vec(review).map_err(|e| OfflineError::Json(e.to_string()))?;
    let request = admission::parse(&bytes)?;
    // The request holds the object pruned to what the rules read; the patch is applied to the
    // whole one, as the apiserver does.
    let whole = review
        .pointer("/request/object")
        .cloned()
        .unwrap_or(Value::Null);
    let snapshot = Snapshot::of([&whole], request.namespace.as_deref().unwrap_or_default());
    let outcome = admission::decide(policy, &snapshot, &request);
    let stdout = match output {
        Output::Patch => pretty(&outcome.ops)?,
        Output::Review => {
            let bytes = admission::response(&request.uid, &outcome);
            let v: Value =
                serde_json::from_slice(&bytes).map_err(|e| OfflineError::Write(e.to_string()))?;
            pretty(&v)?
        }
        Output::Object | Output::Yaml | Output::Json => {
            let mut object = whole;
            json_patch::patch(&mut object, &outcome.ops)
                .map_err(|e| OfflineError::Apply(e.to_string()))?;
            if output == Output::Yaml || (output == Output::Object && yaml) {
                serde_saphyr::to_string(&object).map_err(|e| OfflineError::Write(e.to_string()))?
            } else {
                pretty(&object)?
            }
        }
    };
    let object = format!("{}/{}", request.kind.kind, request.name);
    Ok(Mutated {
        stdout,
        decided: vec![Decided { object, outcome }],
    })
}

fn kind_of(object: &Value) -> Option<ObjectKind> {
    let api_version = object.get("apiVersion").and_then(Value::as_str)?;
    let kind = object.get("kind").and_then(Value::as_str)?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ObjectKind::from_gvk(group, version, kind)
}

fn found(object: &Value) -> String {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    match object.get("kind").and_then(Value::as_str).unwrap_or("") {
        "" => "document without apiVersion/kind".to_owned(),
        kind => format!("{kind} ({api_version})"),
    }
}

fn describe(kind: ObjectKind, object: &Value) -> String {
    let field = |p: &str| object.pointer(p).and_then(Value::as_str).unwrap_or("");
    match field("/metadata/namespace") {
        "" => format!("{}/{}", kind.as_str(), field("/metadata/name")),
        ns => format!("{}/{ns}/{}", kind.as_str(), field("/metadata/name")),
    }
}

/// The CREATE review the apiserver would send for a bare object.
fn review_for(object: &Value) -> Value {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    json!({
        "apiVersion": admission::API_VERSION,
        "kind": admission::KIND,
        "request": {
            "uid": "00000000-0000-0000-0000-000000000000",
            "kind": {"group": group, "version": version, "kind": kind},
            "operation": "CREATE",
            "name": object.pointer("/metadata/name").cloned().unwrap_or(Value::Null),
            "namespace": object.pointer("/metadata/namespace").cloned().unwrap_or(Value::Null),
            "object": object,
        }
    })
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<String, OfflineError> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| OfflineError::Write(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

/// A one-line note for stderr when nothing was changed, so an empty diff is not a mystery.
#[must_use]
pub fn note(outcome: &Outcome) -> Option<&'static str> {
    match outcome.verdict {
        Verdict::Skipped => Some(
            "note: not an outpost object (needs app.kubernetes.io/managed-by: goauthentik.io); left unchanged",
        ),
        Verdict::Unchanged => Some("note: already right; no changes"),
        Verdict::Patched | Verdict::Unfixable => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE_YAML: &str = "apiVersion: v1
kind: Service
metadata:
  name: ak-outpost-x
  labels:
    app.kubernetes.io/managed-by: goauthentik.io
    goauthentik.io/outpost-name: x
    goauthentik.io/outpost-type: ldap
    goauthentik.io/outpost-uuid: 6f2d8a41c3b94e7d8b5a0c9e1f3d7b26
spec:
  selector:
    app.kubernetes.io/name: authentik
    app.kubernetes.io/component: server
";

    /// The standalone Deployment that runs outpost `x`.
    const DEPLOYMENT_YAML: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: ak-outpost-x
  labels:
    app.kubernetes.io/managed-by: goauthentik.io
    goauthentik.io/outpost-name: x
    goauthentik.io/outpost-type: ldap
    goauthentik.io/outpost-uuid: 6f2d8a41c3b94e7d8b5a0c9e1f3d7b26
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: authentik-outpost-ldap
      app.kubernetes.io/managed-by: goauthentik.io
      goauthentik.io/outpost-name: x
      goauthentik.io/outpost-type: ldap
      goauthentik.io/outpost-uuid: 6f2d8a41c3b94e7d8b5a0c9e1f3d7b26
  template:
    metadata:
      labels:
        app.kubernetes.io/name: authentik-outpost-ldap
    spec:
      containers:
        - name: ldap
          image: ghcr.io/goauthentik/ldap
";

    fn selector_name(v: &Value) -> &Value {
        &v["spec"]["selector"]["app.kubernetes.io/name"]
    }

    #[test]
    fn a_service_alone_keeps_the_server_selector_with_a_warning() {
        let p = Policy::builtin().unwrap();
        let out = run(&p, SERVICE_YAML.as_bytes(), Output::Object).unwrap();
        let v: Value = serde_saphyr::from_str(&out.stdout).unwrap();
        assert_eq!(selector_name(&v), "authentik");
        let warnings = &out.decided[0].outcome.warnings;
        assert!(
            warnings[0].contains("no Deployment runs outpost x"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_yaml_stream_with_the_outposts_deployment_rewrites_the_selector() {
        let p = Policy::builtin().unwrap();
        let stream = format!("{SERVICE_YAML}---\n{DEPLOYMENT_YAML}");
        let out = run(&p, stream.as_bytes(), Output::Yaml).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out.stdout).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(selector_name(&docs[0]), "authentik-outpost-ldap");
        assert_eq!(docs[0]["spec"]["selector"].as_object().unwrap().len(), 5);
        assert_eq!(docs[1]["spec"]["replicas"], 2);
    }

    #[test]
    fn a_list_as_kubectl_prints_it_comes_back_as_a_list_in_json() {
        let p = Policy::builtin().unwrap();
        let service: Value = serde_saphyr::from_str(SERVICE_YAML).unwrap();
        let deployment: Value = serde_saphyr::from_str(DEPLOYMENT_YAML).unwrap();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [service, deployment]});
        let out = run(&p, list.to_string().as_bytes(), Output::Object).unwrap();
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["kind"], "List");
        assert_eq!(selector_name(&v["items"][0]), "authentik-outpost-ldap");
        assert_eq!(out.decided.len(), 2);
    }

    #[test]
    fn patch_and_review_outputs_are_json() {
        let p = Policy::from_yaml("p", "rules: [{service: {selector: outpost}}]").unwrap();
        let patch = run(&p, SERVICE_YAML.as_bytes(), Output::Patch).unwrap();
        let ops: Value = serde_json::from_str(&patch.stdout).unwrap();
        assert_eq!(ops[0]["op"], "replace");
        assert_eq!(ops[0]["path"], "/spec/selector");
        let review = run(&p, SERVICE_YAML.as_bytes(), Output::Review).unwrap();
        let r: Value = serde_json::from_str(&review.stdout).unwrap();
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        let stream = format!("{SERVICE_YAML}---\n{DEPLOYMENT_YAML}");
        let e = run(&p, stream.as_bytes(), Output::Review).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-o review answers one object or AdmissionReview; the input has 2"
        );
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let p = Policy::builtin().unwrap();
        let e = |input: &str| {
            run(&p, input.as_bytes(), Output::Object)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e("  \n"), "input is empty");
        assert!(e("{\"a\":").starts_with("input is not valid JSON"));
        assert!(e("a: [").starts_with("input is not valid YAML"));
        assert_eq!(
            e("apiVersion: v1\nkind: ConfigMap\n"),
            "input is a ConfigMap (v1); expected a Service (v1), a Deployment (apps/v1) or an AdmissionReview"
        );
        let review = "{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1beta1\"}";
        let err = run(&p, review.as_bytes(), Output::Object).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input is an AdmissionReview but cannot be read"
        );
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("v1beta1"), "{cause}");
    }
}
