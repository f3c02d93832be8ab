//! Command-line flags. Declarations only; `main` acts on them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    logging::LogFormat,
    offline::Output,
    server::{self, parse_go_duration},
};

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
    /// Serve admission on TLS and health, readiness and metrics on plain HTTP.
    ///
    /// With no --tls-cert/--tls-key it generates a development CA and certificate for
    /// localhost and 127.0.0.1 and writes the CA bundle to --dev-ca-out. Certificate and policy
    /// files are polled and reloaded when their content changes; a bad new file is refused and
    /// the old one stays in force. On SIGTERM or SIGINT, /readyz fails at once, requests are
    /// served for --drain-seconds, then idle connections close and in-flight requests finish.
    Serve(Box<ServeArgs>),
    /// Write a CA and a serving certificate for the webhook's Service: ca.crt, tls.crt, tls.key.
    Certs {
        /// The webhook's Service name.
        #[arg(long, default_value = "outpost-webhook")]
        service: String,
        /// The webhook's namespace.
        #[arg(long, default_value = "outpost-webhook")]
        namespace: String,
        /// The directory to write to (created if missing). tls.key is written with mode 0600.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// An extra subject alternative name: a DNS name or an IP address (repeatable).
        #[arg(long = "san", value_name = "NAME|IP")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
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
    /// Print the MutatingWebhookConfiguration (deploy/base/webhook.yaml) with a CA bundle and a
    /// client config, for `kubectl apply -f -`.
    WebhookConfig {
        /// The CA bundle (PEM) the apiserver verifies the webhook with, e.g. `certs`' ca.crt.
        #[arg(long, value_name = "FILE")]
        ca_bundle: Option<PathBuf>,
        /// The webhook's Service.
        #[arg(long, default_value = "outpost-webhook", conflicts_with = "url")]
        service: String,
        /// The webhook's namespace.
        #[arg(long, default_value = "outpost-webhook", conflicts_with = "url")]
        namespace: String,
        /// Call the webhook at this `https://` URL instead of a Service (for a local apiserver:
        /// `https://127.0.0.1:8443/mutate`).
        #[arg(long)]
        url: Option<String>,
        /// The labels of the namespaces whose outposts are fixed: key=value[,key=value...].
        /// Default: kubernetes.io/metadata.name=authentik.
        #[arg(long, value_name = "SELECTOR")]
        namespace_selector: Option<String>,
        /// Fail (default: a write that skipped the webhook would store the broken selector) or
        /// Ignore.
        #[arg(long, value_parser = ["Fail", "Ignore"])]
        failure_policy: Option<String>,
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
    /// Turn an outpost's `kubernetes_json_patches` into a policy. Prints the policy on stdout and
    /// every operation it cannot express on stderr (and as comments in the policy).
    Import {
        /// The outpost record's `kubernetes_json_patches`, as JSON:
        /// {"deployment": [...], "service": [...]}.
        #[arg(long = "from-json-patches", value_name = "FILE")]
        from_json_patches: PathBuf,
    },
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where admission is served, on TLS.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], server::DEFAULT_PORT)), env = "OUTPOST_WEBHOOK_ADDR")]
    pub addr: SocketAddr,
    /// Where /healthz, /readyz and /metrics are served, on plain HTTP.
    #[arg(
        long,
        default_value = "0.0.0.0:8080",
        env = "OUTPOST_WEBHOOK_HEALTH_ADDR"
    )]
    pub health_addr: SocketAddr,
    /// The serving certificate chain (PEM, leaf first). Polled for changes.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        env = "OUTPOST_WEBHOOK_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The serving certificate's private key (PEM). Polled for changes.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "OUTPOST_WEBHOOK_TLS_KEY"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA bundle (PEM), for apiservers configured to
    /// present one.
    #[arg(long, value_name = "FILE", env = "OUTPOST_WEBHOOK_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Where the development CA bundle is written when no certificate is given.
    #[arg(long, value_name = "FILE", default_value_os_t = std::env::temp_dir().join("outpost-webhook-dev-ca.crt"))]
    pub dev_ca_out: PathBuf,
    /// The policy file; the built-in policy when not given. Polled for changes.
    #[arg(long, value_name = "FILE", env = "OUTPOST_WEBHOOK_POLICY")]
    pub policy: Option<PathBuf>,
    /// How often certificate and policy files are polled.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub reload_interval: Duration,
    /// Seconds to keep serving after SIGTERM while /readyz fails; match the preStop sleep.
    #[arg(long, default_value_t = 5)]
    pub drain_seconds: u64,
    /// How long in-flight requests may take to finish after the drain.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// The largest request body accepted (an UPDATE carries the object twice).
    #[arg(long, default_value_t = 6 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The request deadline when the apiserver sends no ?timeout= (the registration's
    /// timeoutSeconds).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub request_timeout: Duration,
    /// How long a client may take to send its request headers (slow clients are cut off).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub header_timeout: Duration,
    /// How long a client may take to finish the TLS handshake.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Open TLS connections beyond this are closed at once.
    #[arg(long, default_value_t = 1000)]
    pub max_connections: usize,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "OUTPOST_WEBHOOK_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug or trace. Object contents are never logged.
    #[arg(long, default_value = "info", env = "OUTPOST_WEBHOOK_LOG_LEVEL")]
    pub log_level: tracing::Level,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 10s, 500ms or 1m"))
}
