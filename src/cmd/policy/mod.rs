//! `outpost-webhook policy`: check a policy file, print the built-in one, or import an outpost's
//! `kubernetes_json_patches`.
//!
//! Reads the named files (or standard input) and prints.

pub mod import;

use std::{io::Read as _, path::PathBuf};

use clap::Subcommand;

use super::{Error, load_policy};
use crate::core::policy::DEFAULT_POLICY_YAML;

/// The `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    #[command(display_name = "outpost-webhook")]
    /// Validate a policy file; exits non-zero with file, line and field on the first problem.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the built-in policy.
    #[command(display_name = "outpost-webhook")]
    Default,
    #[command(display_name = "outpost-webhook")]
    /// Turn an outpost's `kubernetes_json_patches` into a policy. Prints the policy on stdout and
    /// every operation it cannot express on stderr (and as comments in the policy).
    Import {
        /// The outpost record's `kubernetes_json_patches`, as JSON:
        /// {"deployment": [...], "service": [...]}. `-` reads standard input.
        #[arg(short = 'f', long = "from-json-patches", value_name = "FILE")]
        from_json_patches: PathBuf,
        /// Exit 1 when any operation could not be expressed (after printing them all), so a
        /// script does not deploy a policy that silently does less than the patches did.
        #[arg(long)]
        strict: bool,
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
            // A Secret the webhook cannot read is no outage, but a warning on every outpost
            // write that needs it: say which ones RBAC must allow before it is deployed.
            let secrets = policy.secret_names();
            if !secrets.is_empty() {
                println!(
                    "reads Secret(s) {}: the webhook's Role must allow get, list and watch on \
                     each, by name, in every watched namespace (deploy/watch/rbac.yaml; the chart derives it \
                     from its policy value)",
                    secrets.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
        }
        PolicyCommand::Default => print!("{DEFAULT_POLICY_YAML}"),
        PolicyCommand::Import {
            from_json_patches,
            strict,
        } => {
            let stdin = from_json_patches.as_os_str() == "-";
            let path = if stdin {
                "standard input".to_owned()
            } else {
                from_json_patches.display().to_string()
            };
            let mut text = String::new();
            let read = if stdin {
                std::io::stdin().read_to_string(&mut text).map(drop)
            } else {
                std::fs::read_to_string(from_json_patches).map(|t| text = t)
            };
            read.map_err(|source| Error::io(format!("cannot read {path}"), source))?;
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
            if *strict && !imported.unsupported.is_empty() {
                return Err(Error::Dropped {
                    count: imported.unsupported.len(),
                });
            }
        }
    }
    Ok(())
}
