//! Command-line flags. Declarations only; `main` acts on them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::offline::Output;

/// A mutating admission webhook that fixes the Services and Deployments authentik's outpost
/// controller writes: the embedded outpost's selector, PostgreSQL credentials, pod labels,
/// replicas and a config checksum. One policy, every outpost, no hand-written JSON patches.
#[derive(Debug, Parser)]
#[command(name = "outpost-webhook", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fix one object offline: a Service, a Deployment or an AdmissionReview (YAML or JSON).
    ///
    /// Prints the patched object (or the patch, or the review response) on stdout and any
    /// warnings on stderr. Exits non-zero when the input cannot be read.
    Mutate {
        /// The input file; `-` or nothing reads stdin.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: Option<PathBuf>,
        /// The policy file; the built-in policy when not given.
        #[arg(long, value_name = "FILE", env = "OUTPOST_WEBHOOK_POLICY")]
        policy: Option<PathBuf>,
        /// What to print.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Object)]
        output: Output,
    },
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; exits non-zero with file, line and field on the first problem.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the built-in policy.
    Default,
}
