//! The shell around the core: serves admission on TLS, health and metrics on plain HTTP, reloads
//! its files, and drains on shutdown.
//!
//! Does network and file I/O; imports nothing from `cmd`. [`http`] is the request surface,
//! [`listen`] the sockets, [`app`] the shared state, [`polled`] the file reloads, [`tls`] rustls,
//! and [`metrics`] what Prometheus scrapes.

pub mod app;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod polled;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls::ServerConfig;
use tracing::{info, warn};

pub use app::{App, Limits};
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
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, polled for changes (a Secret volume, or cert-manager's).
    Files { cert: PathBuf, key: PathBuf },
    /// A development CA and certificate for localhost, generated at start; the CA bundle is
    /// written to `ca_out` for clients.
    Development { ca_out: PathBuf },
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
    Tls(#[from] PollError<TlsError>),
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PollError<PolicyError>),
    #[error(transparent)]
    BuiltinPolicy(#[from] PolicyError),
    #[error(transparent)]
    Generate(#[from] PkiError),
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
    let certs = Arc::new(match &config.certs {
        CertSource::Files { cert, key } => Polled::open(vec![cert.clone(), key.clone()])?,
        CertSource::Development { ca_out } => Polled::fixed(development(ca_out)?),
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

/// A certificate for localhost signed by a new CA, whose bundle is written to `ca_out`.
fn development(ca_out: &std::path::Path) -> Result<ServingCert, ServeError> {
    let generated = pki::generate(&["localhost".into(), "127.0.0.1".into(), "::1".into()], 30)?;
    if let Some(dir) = ca_out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(ca_out, &generated.ca_pem).map_err(|source| ServeError::WriteCa {
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

/// Serves until `shutdown` resolves, then drains and stops. This is `outpost-webhook serve`.
///
/// # Errors
/// When the server cannot start.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let (app, tls) = prepare(&config)?;
    let running = start(config.settings, app, tls).await?;
    shutdown.await;
    running.shutdown();
    running.wait().await;
    Ok(())
}
