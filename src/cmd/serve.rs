//! `outpost-webhook serve`: flags into a [`Config`], a runtime, signal handling, and the server.
//!
//! Starts the runtime and waits for SIGTERM or SIGINT; everything else is in `serve`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::{Error, duration};
use crate::{
    cluster,
    core::admission::DEFAULT_PORT,
    logging::{self, LogFormat},
    serve::{self, CertSource, Config, Limits, Settings, budget},
};

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where admission is served, on TLS.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)), env = "OUTPOST_WEBHOOK_ADDR")]
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
    /// Self-managed TLS: keep a CA and the serving certificate in this Secret of the webhook's
    /// namespace (--lease-namespace), creating and renewing them, and keep the caBundle of
    /// --webhook-configuration current. Needs the cluster view. Instead of --tls-cert/--tls-key.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["tls_cert", "tls_key"],
        env = "OUTPOST_WEBHOOK_TLS_SECRET"
    )]
    pub tls_secret: Option<String>,
    /// With --tls-secret: the MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, value_name = "NAME", default_value = "outpost-webhook")]
    pub webhook_configuration: String,
    /// With --tls-secret: the webhook's Service; the certificate names NAME, NAME.NS,
    /// NAME.NS.svc and NAME.NS.svc.cluster.local.
    #[arg(long, value_name = "NAME", default_value = "outpost-webhook")]
    pub service: String,
    /// With --tls-secret: how long a new CA is valid; it is rolled with a third of it left.
    #[arg(long, default_value = "43800h", value_parser = duration)]
    pub tls_ca_validity: Duration,
    /// With --tls-secret: how long a serving certificate is valid; it is renewed at two thirds.
    #[arg(long, default_value = "8760h", value_parser = duration)]
    pub tls_cert_validity: Duration,
    /// Require client certificates signed by this CA bundle (PEM), for apiservers configured to
    /// present one.
    #[arg(long, value_name = "FILE", env = "OUTPOST_WEBHOOK_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Where the development CA bundle is written when no certificate is given: a new file, in a
    /// directory only this user can write to (created with mode 0700 when missing). A symlink
    /// there is refused, never followed.
    #[arg(long, value_name = "FILE", default_value_os_t = std::env::temp_dir().join("outpost-webhook-dev").join("ca.crt"))]
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
    /// The largest request body accepted: an UPDATE carries the object and its old version, each
    /// at most etcd's 1.5 MiB, plus 64 KiB of envelope.
    #[arg(long, default_value_t = budget::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// The request bytes held at once across all connections: each request reserves twice its
    /// body (the body and the strings parsed from it) before reading it, or waits.
    #[arg(long, default_value_t = budget::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
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
    /// Admission connections open at once, in every state (the memory bound: each may hold up to
    /// 256 KiB outside the request budget). At the limit the one that has done the least gives
    /// way: one with no request yet, oldest first, then one idle between requests of the peer
    /// holding the most. Only when all are busy is the new one closed.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Admission connections one client address may hold; past it, that client's own oldest
    /// pending (then idle) connection gives way. Keeps one client from locking the apiserver out.
    #[arg(long, value_name = "N", default_value_t = serve::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: usize,
    /// Admission connections of one client address still in the TLS handshake or with no request
    /// sent; past it, that client's oldest such connection is closed (silent sockets, slowloris).
    #[arg(long, value_name = "N", default_value_t = serve::DEFAULT_MAX_PENDING_PER_PEER)]
    pub max_pending_per_peer: usize,
    /// Connections the health port (/healthz, /readyz, /metrics) holds at once, with the same
    /// timeouts as admission; one client address may hold a quarter, an eighth pending.
    #[arg(long, value_name = "N", default_value_t = serve::DEFAULT_HEALTH_MAX_CONNECTIONS)]
    pub health_max_connections: usize,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// A connection is closed gracefully once this old.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub max_connection_age: Duration,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "OUTPOST_WEBHOOK_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug or trace. Object contents are never logged.
    #[arg(long, default_value = "info", env = "OUTPOST_WEBHOOK_LOG_LEVEL")]
    pub log_level: tracing::Level,
    /// The cluster view (watch cache, Lease, reconciler): `auto` is on only inside a cluster;
    /// `on` also uses KUBECONFIG or ~/.kube/config; `off` decides without the cluster.
    #[arg(long, value_enum, default_value_t = cluster::Mode::Auto, env = "OUTPOST_WEBHOOK_CLUSTER")]
    pub cluster: cluster::Mode,
    /// A namespace whose outposts are watched and reconciled (repeatable).
    #[arg(
        long = "watch-namespace",
        value_name = "NS",
        default_value = "authentik"
    )]
    pub watch_namespaces: Vec<String>,
    /// Where the reconciler's Lease lives: the webhook's own namespace.
    #[arg(
        long,
        value_name = "NS",
        default_value = "outpost-webhook",
        env = "POD_NAMESPACE"
    )]
    pub lease_namespace: String,
    /// The least time between two reconciler writes that roll an outpost's pods.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub roll_interval: Duration,
}

/// Runs `serve` until SIGTERM or SIGINT, then drains and returns.
///
/// # Errors
/// When the runtime, the signal handlers or the server cannot start.
pub fn execute(args: ServeArgs) -> Result<(), Error> {
    logging::init(args.log_format, args.log_level);
    let config = Config {
        settings: Settings {
            addr: args.addr,
            health_addr: args.health_addr,
            reload_interval: args.reload_interval,
            drain: Duration::from_secs(args.drain_seconds),
            shutdown_grace: args.shutdown_grace,
            header_timeout: args.header_timeout,
            handshake_timeout: args.handshake_timeout,
            max_connections: args.max_connections,
            max_connections_per_peer: args.max_connections_per_peer,
            max_pending_per_peer: args.max_pending_per_peer,
            health_max_connections: args.health_max_connections,
            idle_timeout: args.idle_timeout,
            max_connection_age: args.max_connection_age,
        },
        certs: match (args.tls_cert, args.tls_key, &args.tls_secret) {
            (Some(cert), Some(key), _) => CertSource::Files { cert, key },
            (_, _, Some(_)) => CertSource::SelfManaged,
            _ => CertSource::Development {
                ca_out: args.dev_ca_out,
            },
        },
        client_ca: args.client_ca,
        policy: args.policy,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            default_timeout: args.request_timeout,
            max_inflight_bytes: args.max_inflight_bytes,
        },
        cluster: cluster::Settings {
            mode: args.cluster,
            namespaces: args.watch_namespaces,
            lease_namespace: args.lease_namespace.clone(),
            identity: cluster::identity(),
            pace: cluster::reconciler::Pace {
                roll_interval: args.roll_interval,
                ..cluster::reconciler::Pace::default()
            },
            tls: args.tls_secret.map(|secret| cluster::selftls::Settings {
                secret,
                namespace: args.lease_namespace.clone(),
                registration: args.webhook_configuration,
                service: args.service,
                lifetimes: crate::core::selftls::Lifetimes {
                    ca_seconds: seconds(args.tls_ca_validity),
                    serving_seconds: seconds(args.tls_cert_validity),
                },
            }),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::io("cannot start the async runtime", source))?;
    runtime.block_on(async {
        let stop =
            signal().map_err(|source| Error::io("cannot install signal handlers", source))?;
        serve::run(config, stop).await?;
        Ok(())
    })
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or SIGINT (Ctrl-C).
fn signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
