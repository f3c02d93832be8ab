//! The commands: one module per subcommand, and [`run`], which dispatches to them.
//!
//! Each command reads its files, prints its result, and returns a typed error; `main` prints the
//! chain of causes once.

pub mod certs;
pub mod doctor;
pub mod mutate;
pub mod policy;
pub mod serve;
pub mod webhook_config;

use std::{path::Path, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    core::policy::{Policy, PolicyError},
    duration::parse_go_duration,
    serve::{
        ServeError,
        polled::{self, PollError},
    },
};

/// `0.1.0 (commit 0123456789ab)`: the package version and the commit build.rs found (`-dirty`
/// when the tree had changes, `unknown` when built without git).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OUTPOST_WEBHOOK_COMMIT"),
    ")"
);

/// A mutating admission webhook that fixes the Services and Deployments authentik's outpost
/// controller writes: the embedded outpost's selector, PostgreSQL credentials, pod labels,
/// replicas and a config checksum. One policy, every outpost, no hand-written JSON patches.
#[derive(Debug, Parser)]
#[command(name = "outpost-webhook", version = VERSION, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Each subcommand's `display_name` is set: clap would otherwise print `serve -V` as
// `outpost-webhook-serve 0.1.0`, a program that does not exist.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve admission on TLS and health, readiness and metrics on plain HTTP.
    ///
    /// With no --tls-cert/--tls-key it generates a development CA and certificate for
    /// localhost and 127.0.0.1 and writes the CA bundle to --dev-ca-out. Certificate and policy
    /// files are polled and reloaded when their content changes; a bad new file is refused and
    /// the old one stays in force. On SIGTERM or SIGINT, /readyz fails at once, requests are
    /// served for --drain-seconds, then idle connections close and in-flight requests finish.
    #[command(display_name = "outpost-webhook")]
    Serve(Box<serve::ServeArgs>),
    /// Write a CA and a serving certificate for the webhook's Service: ca.crt, ca.key, tls.crt,
    /// tls.key; or, with --ca-cert and --ca-key, a new tls.crt and tls.key from an existing CA.
    ///
    /// Existing files are kept unless --force is given.
    #[command(display_name = "outpost-webhook")]
    Certs(certs::CertsArgs),
    /// Fix one object offline: a Service, a Deployment or an AdmissionReview (YAML or JSON).
    ///
    /// Prints the patched object (or the patch, or the review response) on stdout and any
    /// warnings on stderr. Exits non-zero when the input cannot be read.
    #[command(display_name = "outpost-webhook")]
    Mutate(mutate::MutateArgs),
    /// Print the MutatingWebhookConfiguration (deploy/base/webhook.yaml) with a CA bundle and a
    /// client config, for `kubectl apply -f -`.
    #[command(display_name = "outpost-webhook")]
    WebhookConfig(webhook_config::WebhookConfigArgs),
    /// Work with policy files.
    #[command(subcommand, display_name = "outpost-webhook")]
    Policy(policy::PolicyCommand),
    /// Check a live cluster, as the operator's upgrade checklist does: the registration, each
    /// outpost Service's pods and endpoints, each outpost Deployment's env, Secrets, replicas,
    /// checksums and version.
    ///
    /// Read-only, through the caller's kubeconfig; the only write it sends is a dry-run PATCH
    /// that changes nothing, to see what admission makes of each outpost object. Secret values
    /// are never printed. Exits 0 when nothing failed (warnings allowed), 1 when a check failed,
    /// 2 when it cannot run (no cluster, or a permission it lacks: it names the verb and
    /// resource).
    #[command(display_name = "outpost-webhook")]
    Doctor(doctor::DoctorArgs),
}

/// Why a command failed. Each variant keeps one source; `main` prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Policy(#[from] PollError<PolicyError>),
    #[error(transparent)]
    BuiltinPolicy(#[from] PolicyError),
    #[error(transparent)]
    Mutate(#[from] mutate::OfflineError),
    #[error(transparent)]
    Import(#[from] policy::import::ImportError),
    #[error(transparent)]
    WebhookConfig(#[from] webhook_config::WebhookConfigError),
    #[error(transparent)]
    Certs(#[from] certs::CertsError),
    #[error(transparent)]
    Doctor(#[from] doctor::DoctorError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--strict: {count} operation(s) could not be expressed in the policy")]
    Dropped { count: usize },
    #[error("{what} is not JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The process's exit code: 2 when `doctor` could not run, else 1.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Doctor(e) => e.exit_code(),
            _ => 1,
        }
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Runs the command the flags name.
///
/// # Errors
/// The command's error.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Serve(args) => serve::execute(*args),
        Command::Mutate(args) => mutate::execute(&args),
        Command::Policy(command) => policy::execute(&command),
        Command::WebhookConfig(args) => webhook_config::execute(args),
        Command::Certs(args) => Ok(certs::execute(&args)?),
        Command::Doctor(args) => doctor::execute(&args),
    }
}

/// The policy file, read as `serve` reads it; the built-in policy when none is named.
fn load_policy(path: Option<&Path>) -> Result<Policy, Error> {
    Ok(match path {
        Some(p) => polled::load(&[p.to_owned()])?,
        None => Policy::builtin()?,
    })
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 10s, 500ms or 1m"))
}
