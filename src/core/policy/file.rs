//! The policy file format, as serde reads it. Pure.
//!
//! `deny_unknown_fields` makes a typo an error with its line; [`Spanned`] keeps the line of each
//! rule and list entry for the messages of [`super::compile`]. A shape error (an unknown field,
//! a wrong type) is reported as `file:line: field: message` like every other policy error:
//! serde-saphyr gives the line and the bare message, `serde_path_to_error` the field path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::{MessageFormatter as _, Spanned, UserMessageFormatter};

use super::{PolicyError, SelectorMode};
use crate::core::one_line;

/// Reads policy text into the file's shape; `file` names it in the error.
pub(super) fn parse(file: &str, text: &str) -> Result<FileRoot, PolicyError> {
    let mut path = None;
    let options = serde_saphyr::options! { with_snippet: false };
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(field_path(&e.path().to_string()));
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let e = e.without_snippet();
        let message = shorten(&one_line(&UserMessageFormatter.format_message(e)));
        match (e.location().map(|l| l.line()), path) {
            (Some(line), Some(field)) if line > 0 && !field.is_empty() => PolicyError::Invalid {
                file: file.to_owned(),
                line,
                field,
                message,
            },
            (Some(line), _) if line > 0 => PolicyError::Syntax {
                file: format!("{file}:{line}"),
                message,
            },
            _ => PolicyError::Syntax {
                file: file.to_owned(),
                message,
            },
        }
    })
}

/// serde's "unknown field `x`, expected one of ..." without the name the field path already
/// ends with.
fn shorten(message: &str) -> String {
    match message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, "))
    {
        Some((_, expected)) => format!("unknown field; {expected}"),
        None => message.to_owned(),
    }
}

/// `serde_path_to_error`'s path (`rules[0].value.deployment`, where `value` is [`Spanned`]'s
/// own field) as the policy's fields are named: `rules[0].deployment`. `.` for the root is
/// empty.
fn field_path(path: &str) -> String {
    if path == "." {
        return String::new();
    }
    path.split('.')
        .filter(|segment| *segment != "value")
        .collect::<Vec<_>>()
        .join(".")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoot {
    pub(super) rules: Vec<Spanned<FileRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRule {
    #[serde(default, rename = "match")]
    pub(super) matcher: Option<FileMatch>,
    #[serde(default)]
    pub(super) service: Option<FileService>,
    #[serde(default)]
    pub(super) deployment: Option<FileDeployment>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMatch {
    #[serde(default)]
    pub(super) names: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) types: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) uuids: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileService {
    #[serde(default)]
    pub(super) selector: Option<SelectorMode>,
}

pub(super) type Objects = Option<Vec<Spanned<Value>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct FileDeployment {
    #[serde(default)]
    pub(super) replicas: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) pod_labels: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub(super) pod_annotations: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub(super) env: Objects,
    #[serde(default)]
    pub(super) volumes: Objects,
    #[serde(default)]
    pub(super) volume_mounts: Objects,
    #[serde(default)]
    pub(super) resources: Option<Spanned<Value>>,
    #[serde(default)]
    pub(super) readiness_probe: Option<Spanned<Value>>,
    #[serde(default)]
    pub(super) strategy: Option<Spanned<Value>>,
    #[serde(default)]
    pub(super) checksum_annotation: Option<Spanned<String>>,
}
