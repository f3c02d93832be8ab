//! `outpost-webhook doctor`: the operator's upgrade checklist, run against the live cluster
//! through the caller's kubeconfig, judging the outposts against the policy the webhook runs
//! (found in the cluster) unless `--policy` names one.
//!
//! Network I/O through `cluster::inspect` (reads, and dry-run patches that change nothing); the
//! checks are `core::doctor`'s; this module parses flags, renders the expected registration,
//! prints the findings and picks the exit code.

use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use super::{
    Error, load_policy,
    webhook_config::{Options, WebhookConfigError, render},
};
use crate::{
    cluster::inspect::{self, Gathered, InspectError, Scope},
    core::doctor::{self, Report},
};

/// Flags of `doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A namespace whose outposts are checked (repeatable).
    #[arg(
        long = "namespace",
        short = 'n',
        value_name = "NS",
        default_value = "authentik"
    )]
    pub namespaces: Vec<String>,
    /// The MutatingWebhookConfiguration's name.
    #[arg(long, value_name = "NAME", default_value = "outpost-webhook")]
    pub registration: String,
    /// The policy to judge the outposts against. Default: the one the webhook runs, the
    /// ConfigMap key its Deployment mounts (found from the registration's Service); the built-in
    /// policy when that cannot be found, which the report says.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// The kubeconfig context (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
    /// Also read the start of each outpost pod's log: the outpost mode and session backend.
    #[arg(long)]
    pub logs: bool,
    /// `text` (one line per finding, grouped by outpost) or `json`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How findings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Why `doctor` did not report a healthy cluster.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// Exit 1.
    #[error("{count} check(s) failed")]
    Failed { count: usize },
    /// Exit 2: no cluster, or no permission.
    #[error(
        "doctor cannot run: no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)"
    )]
    Config(#[source] kube::config::KubeconfigError),
    #[error(
        "doctor cannot run: no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("doctor cannot run: cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("doctor cannot run against {url}")]
    Inspect {
        url: String,
        #[source]
        source: InspectError,
    },
    #[error("doctor cannot run: the policy")]
    Policy(#[source] Box<Error>),
    #[error("doctor cannot run: cannot start a runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Expected(#[from] WebhookConfigError),
}

impl DoctorError {
    /// 1 when checks failed, 2 when doctor could not run.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Failed { .. } => 1,
            _ => 2,
        }
    }
}

/// Runs `doctor`: prints the findings.
///
/// # Errors
/// [`DoctorError::Failed`] when a check failed; the others when it could not run.
pub fn execute(args: &DoctorArgs) -> Result<(), Error> {
    let policy = args
        .policy
        .as_deref()
        .map(|p| load_policy(Some(p)))
        .transpose()
        .map_err(|e| DoctorError::Policy(Box::new(e)))?;
    let expected = expected_registration()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DoctorError::Runtime)?;
    let scope = Scope {
        namespaces: args.namespaces.clone(),
        registration: args.registration.clone(),
        policy,
        logs: args.logs,
    };
    let gathered = runtime.block_on(async {
        let (client, url) = client(args.context.as_deref()).await?;
        inspect::gather(&client, &scope)
            .await
            .map_err(|source| DoctorError::Inspect { url, source })
    })?;
    let Gathered { mut inputs, policy } = gathered;
    inputs.expected = expected;
    inputs.now = now();
    let findings = doctor::check(&policy, &inputs);
    match args.output {
        Output::Text => print!("{}", doctor::render_text(&findings)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&Report::new(&findings, inputs.policy_source.as_ref()))
                .unwrap_or_default()
        ),
    }
    match doctor::exit_code(&findings) {
        0 => Ok(()),
        _ => Err(DoctorError::Failed {
            count: findings
                .iter()
                .filter(|f| f.severity == doctor::Severity::Fail)
                .count(),
        }
        .into()),
    }
}

/// A client from kube's usual inference (or the named context), with timeouts short enough that
/// an unreachable apiserver is reported within seconds.
async fn client(context: Option<&str>) -> Result<(kube::Client, String), DoctorError> {
    let mut config = match context {
        Some(context) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
            context: Some(context.to_owned()),
            ..kube::config::KubeConfigOptions::default()
        })
        .await
        .map_err(DoctorError::Config)?,
        None => kube::Config::infer().await.map_err(DoctorError::Infer)?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(DoctorError::Client)?;
    Ok((client, url))
}

/// What `webhook-config` renders (its `namespaceSelector` is checked against each namespace's
/// labels, not compared).
fn expected_registration() -> Result<serde_json::Value, DoctorError> {
    let yaml = render(&Options::shipped(None))?;
    Ok(serde_saphyr::from_str(&yaml).map_err(|e| WebhookConfigError::Write(e.to_string()))?)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
