//! The shell around the core: serves admission on TLS, health and metrics on plain HTTP, reloads
//! its files, and drains on shutdown.
//!
//! Does network and file I/O; imports nothing from `cmd`. [`http`] is the request surface,
//! [`listen`] the sockets, [`fair`] who may hold how many of them, [`app`] the shared state,
//! [`budget`] the memory bound, [`polled`] the file reloads, [`tls`] rustls, and [`metrics`]
//! what Prometheus scrapes.

pub mod app;
pub mod budget;
pub mod fair;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod polled;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls::ServerConfig;
use tracing::{info, warn};

pub use app::{App, Limits};
pub use budget::Budget;
pub use http::{health_router, router};
pub use listen::{Running, start, start_with};

use self::{
    polled::{PollError, Polled},
    tls::{ClientCa, ServingCert, TlsError},
};
use crate::{
    core::policy::{Policy, PolicyError},
    pki::{self, PkiError},
};

/// How the server is run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    /// How often certificate and policy files are polled.
    pub reload_interval: Duration,
    /// How long requests are still served after SIGTERM, with readiness failing.
    pub drain: Duration,
    /// How long in-flight requests may take to finish after the drain.
    pub shutdown_grace: Duration,
    /// How long a client may take to send its request headers.
    pub header_timeout: Duration,
    /// How long a client may take to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Admission connections open at once, in every state: the memory bound. At the limit the
    /// connection that has done the least gives way ([`fair`]).
    pub max_connections: usize,
    /// Admission connections one peer address may hold.
    pub max_connections_per_peer: usize,
    /// Admission connections of one peer address in their TLS handshake or with no request yet.
    pub max_pending_per_peer: usize,
    /// Connections the health port holds at once; a peer may hold a quarter of them, and an
    /// eighth may be pending.
    pub health_max_connections: usize,
    /// A connection with no request in flight for this long is closed (gracefully: HTTP/2 gets a
    /// GOAWAY). One that has not started a request is closed after `header_timeout`.
    pub idle_timeout: Duration,
    /// A connection is closed gracefully once this old, so no client holds one forever.
    pub max_connection_age: Duration,
}

/// The default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// The default `--max-connections-per-peer`: half the port, so one client never holds it all.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// The default `--max-pending-per-peer`: an apiserver opens a few connections at once; a flood
/// of silent or slow ones gives way oldest first past this.
pub const DEFAULT_MAX_PENDING_PER_PEER: usize = 32;
/// The default `--health-max-connections`: the kubelet's probes and Prometheus.
pub const DEFAULT_HEALTH_MAX_CONNECTIONS: usize = 32;

impl Settings {
    /// The admission port's connection limits.
    #[must_use]
    pub fn admission_limits(&self) -> fair::Limits {
        fair::Limits {
            max: self.max_connections,
            per_peer: self.max_connections_per_peer,
            pending_per_peer: self.max_pending_per_peer,
        }
    }

    /// The health port's own, smaller limits.
    #[must_use]
    pub fn health_limits(&self) -> fair::Limits {
        health_limits(self.health_max_connections)
    }
}

/// The health port's limits for `--health-max-connections`.
#[must_use]
pub fn health_limits(max: usize) -> fair::Limits {
    fair::Limits {
        max,
        per_peer: (max / 4).max(1),
        pending_per_peer: (max / 8).max(1),
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, polled for changes (a Secret volume, or cert-manager's).
    Files { cert: PathBuf, key: PathBuf },
    /// A development CA and certificate for localhost, generated at start; the CA bundle is
    /// written to `ca_out` for clients.
    Development { ca_out: PathBuf },
    /// Self-managed: the cluster view's `selftls` keeps a CA and serving certificate in a Secret
    /// (`cluster.tls`) and hands each new certificate over. Until the first arrives the process
    /// serves a throwaway one and is not ready.
    SelfManaged,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub certs: CertSource,
    /// Verify client certificates against this CA bundle.
    pub client_ca: Option<PathBuf>,
    /// The policy file; the built-in policy when `None`.
    pub policy: Option<PathBuf>,
    pub limits: Limits,
    /// The cluster view: watch cache, Lease and reconciler.
    pub cluster: crate::cluster::Settings,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    ClusterTask(crate::cluster::TaskEnded),
    #[error(transparent)]
    Tls(#[from] PollError<TlsError>),
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PollError<PolicyError>),
    #[error(transparent)]
    BuiltinPolicy(#[from] PolicyError),
    #[error(transparent)]
    Generate(#[from] PkiError),
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
    #[error(
        "--tls-secret needs the cluster view: run it in a cluster (in-cluster configuration), or \
         with --cluster on"
    )]
    SelfTlsWithoutCluster,
    #[error(
        "--tls-cert-validity ({cert} s) must be at most a third of --tls-ca-validity ({ca} s): the \
         CA is rolled with a third of its life left, and a certificate must fit in that"
    )]
    SelfTlsLifetimes { cert: i64, ca: i64 },
    #[error("cannot write the development CA bundle to {path}")]
    WriteCa {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the certificate, client CA and policy and builds the shared state. Fails (and the
/// process exits) when one is unusable at start: there is no old one to keep.
///
/// # Errors
/// When the certificate, client CA or policy cannot be loaded.
pub fn prepare(config: &Config) -> Result<(Arc<App>, Arc<ServerConfig>), ServeError> {
    budget::check(
        config.limits.max_inflight_bytes,
        config.limits.max_body_bytes,
    )?;
    let certs = Arc::new(match &config.certs {
        CertSource::Files { cert, key } => Polled::open(vec![cert.clone(), key.clone()])?,
        CertSource::Development { ca_out } => Polled::fixed(development(ca_out)?),
        CertSource::SelfManaged => Polled::fixed(placeholder()?),
    });
    let client_ca = match &config.client_ca {
        Some(path) => Some(Arc::new(Polled::<ClientCa>::open(vec![path.clone()])?)),
        None => None,
    };
    let tls = tls::server_config(Arc::clone(&certs), client_ca.clone())?;
    let policy = match &config.policy {
        Some(path) => Polled::open(vec![path.clone()])?,
        None => Polled::fixed(Policy::builtin()?),
    };
    info!(
        policy = policy.current().source(),
        rules = policy.current().rule_count(),
        certificate_not_after = certs.current().not_after,
        client_verification = client_ca.is_some(),
        "Loaded"
    );
    let app = App::new(policy, certs, client_ca, config.limits);
    Ok((Arc::new(app), tls))
}

/// What self-managed TLS serves before its Secret is read: a certificate no client trusts, for a
/// replica that is not ready yet.
fn placeholder() -> Result<ServingCert, ServeError> {
    let generated = pki::generate(&["outpost-webhook.invalid".into()], 1)?;
    Ok(ServingCert::from_pem(
        generated.cert_pem.as_bytes(),
        generated.key_pem.as_bytes(),
        "placeholder certificate",
        "placeholder key",
    )?)
}

/// A certificate for localhost signed by a new CA, whose bundle is written to `ca_out`.
fn development(ca_out: &std::path::Path) -> Result<ServingCert, ServeError> {
    let generated = pki::generate(&["localhost".into(), "127.0.0.1".into(), "::1".into()], 30)?;
    write_private(ca_out, generated.ca_pem.as_bytes()).map_err(|source| ServeError::WriteCa {
        path: ca_out.display().to_string(),
        source,
    })?;
    warn!(
        ca_bundle = %ca_out.display(),
        "No --tls-cert/--tls-key: serving a generated certificate for localhost and \
         127.0.0.1, signed by the CA in ca_bundle. For development only"
    );
    Ok(ServingCert::from_pem(
        generated.cert_pem.as_bytes(),
        generated.key_pem.as_bytes(),
        "development certificate",
        "development key",
    )?)
}

/// Writes `bytes` to a new file at `path`, in a directory only this user can write to, never
/// following a symlink: clients trust what is written here, so nobody else may choose or swap it.
///
/// A missing directory is created with mode 0700. An existing directory must not be a symlink or
/// writable by group or others (so not `/tmp` itself). An existing regular file is replaced; a
/// symlink (or anything else) at `path` is refused. The file is opened with `O_CREAT|O_EXCL`
/// (`create_new`), which fails on a symlink rather than following it, even one planted between
/// the check and the open.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{
        io::{Error, ErrorKind, Write as _},
        os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| std::path::Path::new("."));
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?,
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(Error::other(format!(
                "{} is not a directory (a symlink is not followed)",
                dir.display()
            )));
        }
        Ok(m) if m.permissions().mode() & 0o022 != 0 => {
            return Err(Error::other(format!(
                "{} is writable by others; give a path in a private directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a symlink or other non-file is in the way; it is not followed",
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Serves until `shutdown` resolves, then drains and stops. This is `outpost-webhook serve`.
///
/// # Errors
/// When the server cannot start.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let (app, tls) = prepare(&config)?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut cluster = start_cluster(&config.cluster, &app, stop_rx).await?;
    let running = start(config.settings, app, tls).await?;
    let fault = tokio::select! {
        () = shutdown => None,
        ended = async {
            match cluster.as_mut() {
                Some(c) => c.ended().await,
                None => std::future::pending().await,
            }
        } => Some(ended),
    };
    if let Some(ended) = &fault {
        // Stopping releases the Lease, so another replica takes over at once; the kubelet
        // restarts this one.
        tracing::error!(error = %ended, "The cluster view failed: this replica stops");
    }
    let _ = stop.send(true);
    running.shutdown();
    running.wait().await;
    if let Some(cluster) = cluster {
        // The Lease is released with one request of at most REQUEST_TIMEOUT.
        cluster
            .stop(crate::cluster::REQUEST_TIMEOUT + std::time::Duration::from_secs(1))
            .await;
    }
    fault.map_or(Ok(()), |ended| Err(ServeError::ClusterTask(ended)))
}

/// Starts the cluster view when `settings.mode` and the environment say so, and hands its cache
/// to admission. Readiness waits for its first list. Nothing here calls the apiserver: the
/// watches and the Lease start in the background, so admission serves even while the apiserver
/// is unreachable or refuses them.
async fn start_cluster(
    settings: &crate::cluster::Settings,
    app: &Arc<App>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<crate::cluster::Running>, ServeError> {
    if let Some(tls) = &settings.tls
        && tls.lifetimes.serving_seconds > tls.lifetimes.ca_seconds / 3
    {
        return Err(ServeError::SelfTlsLifetimes {
            cert: tls.lifetimes.serving_seconds,
            ca: tls.lifetimes.ca_seconds,
        });
    }
    let Some(clients) = crate::cluster::client(settings.mode).await? else {
        if settings.tls.is_some() {
            return Err(ServeError::SelfTlsWithoutCluster);
        }
        return Ok(None);
    };
    let policy_app = Arc::clone(app);
    let install_app = Arc::clone(app);
    let install: crate::cluster::selftls::Install = Box::new(move |cert, key| {
        let metrics = &install_app.metrics;
        let serving = ServingCert::from_pem(cert, key, "Secret tls.crt", "Secret tls.key")
            .map_err(|e| {
                metrics.reload(metrics::Reloaded::Certificate, false);
                e.to_string()
            })?;
        metrics.certificate_expiry(serving.not_after);
        metrics.reload(metrics::Reloaded::Certificate, true);
        install_app.certs.set(serving);
        Ok(())
    });
    let running = crate::cluster::start(
        clients,
        settings,
        move || policy_app.policy.current(),
        settings.tls.is_some().then_some(install),
        stop,
    );
    app.metrics.register_cluster(&running);
    let _ = app.cluster.set(Arc::clone(&running.cache));
    if let (Some(status), Some(tls)) = (&running.tls, &settings.tls) {
        let _ = app.self_tls.set((Arc::clone(status), tls.clone()));
    }
    Ok(Some(running))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_development_ca_is_written_in_a_private_directory_and_never_through_a_symlink() {
        let root = std::env::temp_dir().join(format!("ow-devca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let path = root.join("private").join("ca.crt");
        write_private(&path, b"one").unwrap();
        let mode = std::fs::metadata(root.join("private"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // A second start replaces its own file.
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // A symlink at the path is refused, and its target is untouched.
        let victim = root.join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(write_private(&path, b"evil").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        // A directory others can write to (as /tmp) is refused.
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(write_private(&open.join("ca.crt"), b"x").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
