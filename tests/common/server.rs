//! The server in-process on 127.0.0.1:0, as the library starts it.

use std::{net::SocketAddr, time::Duration};

use outpost_webhook::{
    pki,
    serve::{self, CertSource, Config, Limits, Running, Settings},
};
use tempfile::TempDir;

use super::pki::{certs, temp_dir, write_secret_volume};

pub fn settings() -> Settings {
    Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        reload_interval: Duration::from_secs(3600),
        drain: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(5),
        header_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        max_connections: 64,
        max_connections_per_peer: 64,
        max_pending_per_peer: 32,
        health_max_connections: 32,
        idle_timeout: Duration::from_secs(30),
        max_connection_age: Duration::from_secs(300),
    }
}

pub fn limits() -> Limits {
    Limits {
        max_body_bytes: 6 * 1024 * 1024,
        default_timeout: Duration::from_secs(10),
        max_inflight_bytes: 32 << 20,
    }
}

/// A server on 127.0.0.1:0 with certificates in a Secret-volume layout.
pub struct TestServer {
    pub running: Running,
    pub ca_pem: String,
    pub dir: TempDir,
    /// Holds the policy file of [`TestServer::start_with_policy`].
    policy_dir: Option<TempDir>,
}

/// The built-in policy with `selector: outpost`: what a server without a cluster view needs to
/// rewrite the embedded outpost's selector.
pub fn outpost_selector_policy() -> String {
    outpost_webhook::core::policy::DEFAULT_POLICY_YAML
        .replace("selector: auto", "selector: outpost")
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_certs(certs(), adjust).await
    }

    /// A server whose certificate is `g`, in a Secret-volume layout under `self.dir`.
    pub async fn start_with_certs(g: pki::Generated, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = temp_dir("server");
        write_secret_volume(dir.path(), 1, &g.cert_pem, &g.key_pem);
        let mut config = Config {
            settings: settings(),
            certs: CertSource::Files {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
            },
            client_ca: None,
            policy: None,
            limits: limits(),
            cluster: outpost_webhook::cluster::Settings::off(),
        };
        adjust(&mut config);
        let (app, tls) = serve::prepare(&config).unwrap();
        let running = serve::start(config.settings, app, tls).await.unwrap();
        Self {
            running,
            ca_pem: g.ca_pem,
            dir,
            policy_dir: None,
        }
    }

    /// A server with the policy `yaml`, read from a file.
    pub async fn start_with_policy(yaml: &str) -> Self {
        let policy_dir = temp_dir("policy");
        let path = policy_dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut server = Self::start_with(|c| c.policy = Some(path)).await;
        server.policy_dir = Some(policy_dir);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }
}
