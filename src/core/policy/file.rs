//! The policy file format, as serde reads it. Pure.
//!
//! `deny_unknown_fields` makes a typo an error with its line; [`Spanned`] keeps the line of each
//! rule and list entry for the messages of [`super::compile`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use super::{PolicyError, SelectorMode};
use crate::core::one_line;

/// Reads policy text into the file's shape; `file` names it in the error.
pub(super) fn parse(file: &str, text: &str) -> Result<FileRoot, PolicyError> {
    serde_saphyr::from_str(text).map_err(|e| PolicyError::Syntax {
        file: file.to_owned(),
        message: one_line(&e.to_string()),
    })
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
