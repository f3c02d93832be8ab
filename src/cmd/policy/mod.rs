//! `outpost-webhook policy`: check a policy file, print the built-in one, or import an outpost's
//! `kubernetes_json_patches`.
//!
//! Reads the named files and prints.

pub mod import;

use std::path::PathBuf;

use clap::Subcommand;

use super::{Error, load_policy};
use crate::core::policy::DEFAULT_POLICY_YAML;

/// The `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; exits non-zero with file, line and field on the first problem.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the built-in policy.
    Default,
    /// Turn an outpost's `kubernetes_json_patches` into a policy. Prints the policy on stdout and
    /// every operation it cannot express on stderr (and as comments in the policy).
    Import {
        /// The outpost record's `kubernetes_json_patches`, as JSON:
        /// {"deployment": [...], "service": [...]}.
        #[arg(long = "from-json-patches", value_name = "FILE")]
        from_json_patches: PathBuf,
    },
}

/// Runs a `policy` subcommand.
///
/// # Errors
/// When a file cannot be read or does not validate.
pub fn execute(command: &PolicyCommand) -> Result<(), Error> {
    match command {
        PolicyCommand::Check { file } => {
            let policy = load_policy(Some(file))?;
            println!("{}: ok, {} rule(s)", policy.source(), policy.rule_count());
        }
        PolicyCommand::Default => print!("{DEFAULT_POLICY_YAML}"),
        PolicyCommand::Import { from_json_patches } => {
            let path = from_json_patches.display().to_string();
            let text = std::fs::read_to_string(from_json_patches)
                .map_err(|source| Error::io(format!("cannot read {path}"), source))?;
            let patches: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    what: path.clone(),
                    source,
                })?;
            let imported = import::import(&patches, &path)?;
            for line in &imported.unsupported {
                eprintln!("not expressible: {line}");
            }
            eprintln!(
                "{} operation(s) expressed, {} not",
                imported.expressed,
                imported.unsupported.len()
            );
            print!("{}", imported.yaml);
        }
    }
    Ok(())
}
