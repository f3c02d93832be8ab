//! `outpost-webhook mutate`: runs the core on an object or an AdmissionReview read from a file,
//! without a cluster.
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
    mutate::{ObjectKind, Outcome, Verdict},
    one_line,
    policy::Policy,
};

/// Flags of `mutate`.
#[derive(Debug, Args)]
pub struct MutateArgs {
    /// The input file; `-` or nothing reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
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
    let input = read_input(args.file.as_deref())?;
    let result = run(&policy, &input, args.output)?;
    for w in &result.outcome.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(note) = note(&result.outcome) {
        eprintln!("{note}");
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
    /// The patched object, in the input's format (YAML or JSON).
    #[default]
    Object,
    /// The RFC 6902 patch, as JSON.
    Patch,
    /// The AdmissionReview the server would answer with, as JSON.
    Review,
}

/// Why an input could not be mutated.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("input is empty")]
    Empty,
    #[error("input is not valid JSON: {0}")]
    Json(String),
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
}

/// The result of one offline run.
#[derive(Debug)]
pub struct Mutated {
    /// What to print on stdout.
    pub stdout: String,
    /// What the core decided, with warnings for stderr.
    pub outcome: Outcome,
}

/// Runs the core on `input`: a Service, a Deployment, or an `AdmissionReview`, in YAML or JSON.
///
/// # Errors
/// When the input is empty, does not parse, or is none of the accepted kinds.
pub fn run(policy: &Policy, input: &[u8], output: Output) -> Result<Mutated, OfflineError> {
    let first = input.iter().find(|b| !b.is_ascii_whitespace());
    let yaml = match first {
        None => return Err(OfflineError::Empty),
        Some(b'{') => false,
        Some(_) => true,
    };
    let doc: Value = if yaml {
        serde_saphyr::from_slice(input).map_err(|e| OfflineError::Yaml(one_line(&e.to_string())))?
    } else {
        serde_json::from_slice(input).map_err(|e| OfflineError::Json(e.to_string()))?
    };

    // The request holds the object pruned to what the rules read; the patch is applied to the
    // whole one, as the apiserver does.
    let (request, whole) = if doc.get("kind").and_then(Value::as_str) == Some(admission::KIND) {
        let bytes = serde_json::to_vec(&doc).map_err(|e| OfflineError::Json(e.to_string()))?;
        let whole = doc
            .pointer("/request/object")
            .cloned()
            .unwrap_or(Value::Null);
        (admission::parse(&bytes)?, whole)
    } else {
        (synthesize(&doc)?, doc)
    };
    let uid = request.uid.clone();

    let outcome = admission::decide(policy, &request);
    let stdout = match output {
        Output::Patch => pretty(&outcome.ops)?,
        Output::Review => {
            let bytes = admission::response(&uid, &outcome);
            let v: Value =
                serde_json::from_slice(&bytes).map_err(|e| OfflineError::Write(e.to_string()))?;
            pretty(&v)?
        }
        Output::Object => {
            let mut object = whole;
            json_patch::patch(&mut object, &outcome.ops)
                .map_err(|e| OfflineError::Apply(e.to_string()))?;
            if yaml {
                serde_saphyr::to_string(&object).map_err(|e| OfflineError::Write(e.to_string()))?
            } else {
                pretty(&object)?
            }
        }
    };
    Ok(Mutated { stdout, outcome })
}

/// Wraps a bare object into the CREATE request the apiserver would send for it.
fn synthesize(object: &Value) -> Result<admission::Request, OfflineError> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    if ObjectKind::from_gvk(group, version, kind).is_none() {
        let found = if kind.is_empty() {
            "document without apiVersion/kind".to_owned()
        } else {
            format!("{kind} ({api_version})")
        };
        return Err(OfflineError::NotAnObject { found });
    }
    let review = json!({
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
    });
    let bytes = serde_json::to_vec(&review).map_err(|e| OfflineError::Json(e.to_string()))?;
    Ok(admission::parse(&bytes)?)
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
";

    #[test]
    fn yaml_in_yaml_out_with_the_selector_fixed() {
        let p = Policy::builtin().unwrap();
        let out = run(&p, SERVICE_YAML.as_bytes(), Output::Object).unwrap();
        let v: Value = serde_saphyr::from_str(&out.stdout).unwrap();
        assert_eq!(
            v["spec"]["selector"]["app.kubernetes.io/name"],
            "authentik-outpost-ldap"
        );
        assert_eq!(v["spec"]["selector"].as_object().unwrap().len(), 5);
    }

    #[test]
    fn patch_and_review_outputs_are_json() {
        let p = Policy::builtin().unwrap();
        let patch = run(&p, SERVICE_YAML.as_bytes(), Output::Patch).unwrap();
        let ops: Value = serde_json::from_str(&patch.stdout).unwrap();
        assert_eq!(ops[0]["op"], "replace");
        assert_eq!(ops[0]["path"], "/spec/selector");
        let review = run(&p, SERVICE_YAML.as_bytes(), Output::Review).unwrap();
        let r: Value = serde_json::from_str(&review.stdout).unwrap();
        assert_eq!(r["response"]["patchType"], "JSONPatch");
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
        assert!(
            e("{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1beta1\"}")
                .contains("v1beta1")
        );
    }
}
