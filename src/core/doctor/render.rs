//! The report: text grouped by the registration, namespaces and outposts, or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Finding, Group, PolicySource, Severity};

/// The report as `doctor -o json` prints it.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Which policy the outposts were judged against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub summary: Summary,
    pub findings: &'a [Finding],
}

impl<'a> Report<'a> {
    #[must_use]
    pub fn new(findings: &'a [Finding], policy: Option<&PolicySource>) -> Self {
        Self {
            policy: policy.map(PolicySource::describe),
            summary: Summary::of(findings),
            findings,
        }
    }
}

/// How many findings of each severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Summary {
    #[must_use]
    pub fn of(findings: &[Finding]) -> Self {
        let count = |s| findings.iter().filter(|f| f.severity == s).count();
        Self {
            ok: count(Severity::Ok),
            warn: count(Severity::Warn),
            fail: count(Severity::Fail),
        }
    }
}

/// The text report: one line per finding, grouped by the registration, then each outpost.
#[must_use]
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    let mut group = None;
    for f in findings {
        if group != Some(&f.group) {
            let heading = match &f.group {
                Group::Registration => "registration".to_owned(),
                Group::Namespace(ns) => format!("namespace {ns}"),
                Group::Outpost { namespace, name } => {
                    format!("outpost {name} (namespace {namespace})")
                }
            };
            if group.is_some() {
                out.push('\n');
            }
            out.push_str(&heading);
            out.push('\n');
            group = Some(&f.group);
        }
        let _ = writeln!(
            out,
            "  {:<4}  {:<23}  {}: {}",
            f.severity.as_str(),
            f.check.id(),
            f.object,
            f.message
        );
    }
    let Summary { ok, warn, fail } = Summary::of(findings);
    let _ = writeln!(out, "\n{ok} ok, {warn} warn, {fail} fail");
    out
}
