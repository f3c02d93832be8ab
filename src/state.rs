//! The live state the server shares between connections: the policy and certificate in force,
//! the metrics, and whether the process is draining.
//!
//! Reads the policy file ([`PolicyStore::reload_if_changed`]). Like certificates, policies are
//! polled and compared byte for byte, because a ConfigMap volume is updated by swapping a
//! `..data` symlink. A file that does not validate is refused and counted once; the last good
//! policy stays in force.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    metrics::{Metrics, Reloaded},
    policy::{Policy, PolicyError},
    tls::CertStore,
};

/// The policy in force, swappable while requests are served.
#[derive(Debug)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    last_seen: Mutex<Vec<u8>>,
}

impl PolicyStore {
    /// A fixed policy, never reloaded.
    #[must_use]
    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            current: RwLock::new(Arc::new(policy)),
            last_seen: Mutex::new(Vec::new()),
        }
    }

    /// Loads the policy file; it is re-read by [`Self::reload_if_changed`].
    ///
    /// # Errors
    /// When the file cannot be read or does not validate.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let (bytes, policy) = read_policy(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            current: RwLock::new(Arc::new(policy?)),
            last_seen: Mutex::new(bytes),
        })
    }

    /// The policy in force. Cheap: one read lock and a reference count.
    #[must_use]
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads the file and swaps the policy when its content changed and validates.
    ///
    /// # Errors
    /// When changed content cannot be read or does not validate; the old policy stays.
    pub fn reload_if_changed(&self) -> Result<bool, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let (bytes, policy) = read_policy(path)?;
        {
            let mut last = self
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *last == bytes {
                return Ok(false);
            }
            *last = bytes;
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy?);
        Ok(true)
    }
}

/// Reads the bytes (for change detection) and parses them (the result may be an error).
fn read_policy(path: &Path) -> Result<(Vec<u8>, Result<Policy, PolicyError>), PolicyError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
        file: file.clone(),
        source,
    })?;
    let policy = match std::str::from_utf8(&bytes) {
        Ok(text) => Policy::from_yaml(&file, text),
        Err(e) => Err(PolicyError::Syntax {
            file,
            message: format!("not UTF-8: {e}"),
        }),
    };
    Ok((bytes, policy))
}

/// Limits that apply to each admission request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest body accepted. An UPDATE carries the object and its old version, so this must
    /// hold two of the largest objects etcd stores (1.5 MiB each by default).
    pub max_body_bytes: usize,
    /// The deadline when the apiserver sends no `?timeout=`.
    pub default_timeout: Duration,
}

/// Everything a request handler needs.
pub struct App {
    pub policy: PolicyStore,
    pub certs: Arc<CertStore>,
    pub metrics: Metrics,
    pub limits: Limits,
    draining: AtomicBool,
}

impl App {
    #[must_use]
    pub fn new(policy: PolicyStore, certs: Arc<CertStore>, limits: Limits) -> Self {
        let app = Self {
            policy,
            certs,
            metrics: Metrics::default(),
            limits,
            draining: AtomicBool::new(false),
        };
        app.metrics.certificate_expiry(app.certs.not_after());
        app
    }

    /// Ready to take traffic: a certificate and a policy are loaded (they are from the start, or
    /// the process would not have started) and the process is not draining.
    #[must_use]
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Fails readiness, so endpoints drop this pod before it stops serving.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Re-reads the certificate and policy files, logging and counting what changed.
    pub fn reload(&self) {
        match self.certs.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                self.metrics.reload(Reloaded::Certificate, true);
                self.metrics.certificate_expiry(self.certs.not_after());
                info!(
                    not_after = self.certs.not_after(),
                    "Reloaded the serving certificate"
                );
            }
            Err(e) => {
                self.metrics.reload(Reloaded::Certificate, false);
                warn!(error = %e, "Refused a new certificate; the old one keeps serving");
            }
        }
        match self.policy.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                self.metrics.reload(Reloaded::Policy, true);
                info!(
                    rules = self.policy.current().rule_count(),
                    "Reloaded the policy"
                );
            }
            Err(e) => {
                self.metrics.reload(Reloaded::Policy, false);
                warn!(error = %e, "Refused a new policy; the old one stays in force");
            }
        }
    }
}
