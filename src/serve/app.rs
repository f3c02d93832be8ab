//! The state every connection shares: the policy, certificate and client CA in force, the
//! metrics, the request limits, and whether the process is draining.
//!
//! Reads files only through [`Polled::reload_if_changed`], from [`App::reload`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tracing::{info, warn};

use super::{
    budget::{self, Budget},
    metrics::{Metrics, Reloaded},
    polled::{Parse, Polled},
    tls::{ClientCa, ServingCert},
};
use crate::core::policy::Policy;

/// Limits that apply to each admission request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest body accepted. An UPDATE carries the object and its old version, so this must
    /// hold two of the largest objects etcd stores (1.5 MiB each by default).
    pub max_body_bytes: usize,
    /// The deadline when the apiserver sends no `?timeout=`.
    pub default_timeout: Duration,
    /// The request bytes held at once across all connections (see [`Budget`]).
    pub max_inflight_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: budget::DEFAULT_MAX_BODY_BYTES,
            default_timeout: Duration::from_secs(crate::core::admission::TIMEOUT_SECONDS),
            max_inflight_bytes: budget::DEFAULT_MAX_INFLIGHT_BYTES,
        }
    }
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    pub policy: Polled<Policy>,
    pub certs: Arc<Polled<ServingCert>>,
    pub client_ca: Option<Arc<Polled<ClientCa>>>,
    pub metrics: Metrics,
    pub limits: Limits,
    /// The request bytes in flight, across all connections.
    pub budget: Budget,
    /// The cluster view, once started (`--cluster`); admission reads it, never the API.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cache>>,
    /// Self-managed TLS, once started (`--tls-secret`): readiness waits for it.
    pub self_tls: std::sync::OnceLock<(
        Arc<crate::cluster::selftls::Status>,
        crate::cluster::selftls::Settings,
    )>,
    draining: AtomicBool,
}

impl App {
    #[must_use]
    pub fn new(
        policy: Polled<Policy>,
        certs: Arc<Polled<ServingCert>>,
        client_ca: Option<Arc<Polled<ClientCa>>>,
        limits: Limits,
    ) -> Self {
        let app = Self {
            policy,
            certs,
            client_ca,
            metrics: Metrics::default(),
            limits,
            budget: Budget::new(limits.max_inflight_bytes, limits.max_body_bytes),
            cluster: std::sync::OnceLock::new(),
            self_tls: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
        };
        app.metrics
            .certificate_expiry(app.certs.current().not_after);
        app
    }

    /// Ready to take traffic: a certificate and a policy are loaded (they are from the start, or
    /// the process would not have started), the certificate has not expired, and the process is
    /// not draining.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why the process is not ready, for `/readyz`; `None` when it is.
    #[must_use]
    pub fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining".into());
        }
        if let Some((status, settings)) = self.self_tls.get()
            && let Some(why) = status.not_ready(settings)
        {
            return Some(why);
        }
        let not_after = self.certs.current().not_after;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        // 0 means notAfter could not be read; such a certificate was still accepted at load.
        if not_after != 0 && not_after < now {
            return Some(format!(
                "the serving certificate expired at {not_after} (Unix seconds); the apiserver \
                 refuses it. Renew the certificate Secret"
            ));
        }
        if let Some(cache) = self.cluster.get()
            && !cache.ready()
        {
            return Some(format!(
                "the cluster view has not listed yet: {}",
                cache.unsettled().join("; ")
            ));
        }
        None
    }

    /// What admission knows of the cluster: the watch cache, or nothing when the view is off.
    #[must_use]
    pub fn view(&self) -> &dyn crate::core::cluster::View {
        match self.cluster.get() {
            Some(cache) => cache.as_ref(),
            None => &crate::core::cluster::Off,
        }
    }

    /// Fails readiness, so endpoints drop this pod before it stops serving.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Re-reads the certificate, client CA and policy files, logging and counting what changed.
    pub fn reload(&self) {
        if self.reload_one(Reloaded::Certificate, &self.certs) {
            let not_after = self.certs.current().not_after;
            self.metrics.certificate_expiry(not_after);
            info!(not_after, "Reloaded the serving certificate");
        }
        if let Some(ca) = &self.client_ca
            && self.reload_one(Reloaded::ClientCa, ca)
        {
            info!("Reloaded the client CA bundle");
        }
        if self.reload_one(Reloaded::Policy, &self.policy) {
            info!(
                rules = self.policy.current().rule_count(),
                "Reloaded the policy"
            );
        }
    }

    /// Reloads one polled value; true when a new one is in force.
    fn reload_one<T: Parse>(&self, what: Reloaded, polled: &Polled<T>) -> bool {
        match polled.reload_if_changed() {
            Ok(changed) => {
                if changed {
                    self.metrics.reload(what, true);
                }
                changed
            }
            Err(e) => {
                self.metrics.reload(what, false);
                warn!(
                    what = what.as_str(),
                    error = %chain(&e),
                    "Refused changed content; the old one stays in force"
                );
                false
            }
        }
    }
}

/// An error and its causes on one line, each once: every error here keeps its cause as its source
/// rather than in its message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// One file: the policy YAML.
impl Parse for Policy {
    type Error = crate::core::policy::PolicyError;

    fn parse(files: &[super::polled::File<'_>]) -> Result<Self, Self::Error> {
        match files {
            [file] => Self::from_bytes(file.name, file.bytes),
            _ => Err(Self::Error::Syntax {
                file: "policy".into(),
                message: "exactly one policy file is read".into(),
            }),
        }
    }
}
