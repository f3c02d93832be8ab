//! The cluster view and the reconciler, beside the admission server in the same binary: a watch
//! cache that admission reads ([`cache`]), a `coordination.k8s.io/v1` Lease so that one replica
//! at a time writes ([`lease`]), the reconciler's writes ([`reconciler`]) and the Events it leaves
//! on what it writes ([`events`]).
//!
//! Network I/O to the apiserver; imports nothing from `serve` or `cmd`. The decisions are the
//! core's (`core::cluster`, `core::reconcile`).

pub mod cache;
pub mod events;
pub mod inspect;
pub mod lease;
pub mod metrics;
pub mod reconciler;
pub mod selftls;

use std::{sync::Arc, time::Duration};

use kube::{Client, Config};
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinHandle},
};
use tracing::info;

pub use cache::Cache;

/// When the cluster view is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// On only inside a cluster (in-cluster configuration). A laptop's kubeconfig is never used:
    /// a quick start must not run a reconciler that writes wherever that kubeconfig points.
    #[default]
    Auto,
    /// On, with kube's usual inference: in-cluster, else `KUBECONFIG`, else `~/.kube/config`.
    On,
    /// Off: admission decides without the cluster (`selector: auto` keeps selectors).
    Off,
}

/// Where and how the cluster view runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// The namespaces whose outposts are watched and reconciled.
    pub namespaces: Vec<String>,
    /// Where the reconciler's Lease lives (the webhook's own namespace).
    pub lease_namespace: String,
    /// This replica's name in the Lease: `$POD_NAME`, else `hostname-pid`.
    pub identity: String,
    pub pace: reconciler::Pace,
    /// Self-managed TLS (`--tls-secret`), when on.
    pub tls: Option<selftls::Settings>,
}

impl Settings {
    /// The view off: admission decides without the cluster.
    #[must_use]
    pub fn off() -> Self {
        Self {
            mode: Mode::Off,
            namespaces: vec!["authentik".into()],
            lease_namespace: "outpost-webhook".into(),
            identity: identity(),
            pace: reconciler::Pace::default(),
            tls: None,
        }
    }
}

/// Why the cluster view could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot configure a Kubernetes client from KUBECONFIG or ~/.kube/config")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The Lease's name in `lease_namespace`.
pub const LEASE_NAME: &str = "outpost-webhook";

/// This replica's Lease identity: the pod's name when the Deployment passes it, else
/// `hostname-pid`.
#[must_use]
pub fn identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "outpost-webhook".into(), |h| h.trim().to_owned());
    format!("{host}-{}", std::process::id())
}

/// The view's clients: one for watches, which stay open for up to a minute with nothing to read,
/// and one for the Lease, the writes and Events, with short timeouts and no retries, so that a
/// request to an apiserver that went away ends in seconds rather than leave a replica believing
/// it still leads (kube's default client retries 429, 503 and 504 up to 15 times).
#[derive(Clone)]
pub struct Clients {
    pub watch: Client,
    pub requests: Client,
}

/// How long one Lease or write request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a connection to the apiserver may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch read that waits longer than this has lost its connection: the apiserver ends each
/// watch after `cache::WATCH_TIMEOUT_SECONDS` and sends bookmarks meanwhile.
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(75);

/// The clients for `mode`, or `None` when the view is off.
///
/// # Errors
/// With `--cluster on`, when no configuration can be found or used.
pub async fn client(mode: Mode) -> Result<Option<Clients>, ClusterError> {
    let config = match mode {
        Mode::Off => return Ok(None),
        Mode::Auto => {
            let Ok(config) = Config::incluster() else {
                info!(
                    "Not running in a cluster: the cluster view is off and `selector: auto` keeps \
                     selectors. `--cluster on` uses KUBECONFIG or ~/.kube/config"
                );
                return Ok(None);
            };
            config
        }
        Mode::On => Config::infer().await.map_err(ClusterError::Infer)?,
    };
    let mut watch = config.clone();
    watch.read_timeout = Some(WATCH_READ_TIMEOUT);
    let mut bounded = config;
    bounded.connect_timeout = Some(CONNECT_TIMEOUT);
    bounded.read_timeout = Some(REQUEST_TIMEOUT);
    bounded.write_timeout = Some(REQUEST_TIMEOUT);
    bounded.default_retry = false;
    Ok(Some(Clients {
        watch: Client::try_from(watch).map_err(ClusterError::Client)?,
        requests: Client::try_from(bounded).map_err(ClusterError::Client)?,
    }))
}

/// The running cluster view: the cache admission reads, and its tasks.
#[derive(Debug)]
pub struct Running {
    pub cache: Arc<Cache>,
    pub metrics: Arc<metrics::Metrics>,
    /// Self-managed TLS, when on: readiness waits for it.
    pub tls: Option<Arc<selftls::Status>>,
    aborts: Vec<AbortHandle>,
    /// The Lease task, which releases the Lease on the stop signal and then ends.
    lease: Option<JoinHandle<()>>,
    /// Every other task; each runs until it is aborted.
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the watchers, the Lease and the reconciler at once.
    pub fn abort(&self) {
        for t in &self.aborts {
            t.abort();
        }
    }

    /// After the stop signal: waits at most `limit` for the Lease task to release the Lease (so
    /// that another replica takes over at once rather than after the Lease duration), then
    /// stops everything.
    pub async fn stop(mut self, limit: Duration) {
        if let Some(lease) = self.lease.take() {
            let _ = tokio::time::timeout(limit, lease).await;
        }
        self.abort();
    }

    /// Resolves when one of the tasks ends. Each runs until the stop signal, so before it this
    /// is a fault (a panic): a replica whose reconciler is gone but whose Lease task renews
    /// would hold the Lease and write nothing, and one whose watchers are gone would answer
    /// from a view that no longer moves. The caller stops the process, which releases the
    /// Lease; the kubelet restarts it, as client-go's informers crash a Go controller on a
    /// panic. Never resolves when there are no tasks.
    pub async fn ended(&mut self) -> TaskEnded {
        let (ended, lease_ended) = {
            let lease = &mut self.lease;
            tokio::select! {
                ended = first_ended(&mut self.tasks) => (ended, false),
                ended = async {
                    match lease.as_mut() {
                        Some(l) => outcome(l.await),
                        None => std::future::pending().await,
                    }
                } => (ended, true),
            }
        };
        if lease_ended {
            self.lease = None;
        }
        ended
    }
}

/// How a task of the cluster view ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskEnded {
    #[error("a task of the cluster view panicked: {0}")]
    Panicked(String),
    #[error("a task of the cluster view ended before the stop signal")]
    Returned,
}

/// The first of `tasks` to end, and how; it is taken out of `tasks` (a finished task is not
/// awaited twice).
async fn first_ended(tasks: &mut Vec<JoinHandle<()>>) -> TaskEnded {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (ended, index, _) = futures::future::select_all(tasks.iter_mut()).await;
    tasks.swap_remove(index);
    outcome(ended)
}

fn outcome(ended: Result<(), tokio::task::JoinError>) -> TaskEnded {
    match ended {
        Ok(()) => TaskEnded::Returned,
        Err(e) => TaskEnded::Panicked(e.try_into_panic().map_or_else(
            |e| e.to_string(),
            |panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            },
        )),
    }
}

/// Starts the watch cache, the Lease and the reconciler, all in the background: nothing here
/// waits for the apiserver, so admission starts even when it is down or refuses the Lease.
/// `policy` returns the policy in force; the Secrets it reads are followed as it changes.
pub fn start(
    clients: Clients,
    settings: &Settings,
    policy: impl Fn() -> Arc<crate::core::policy::Policy> + Clone + Send + Sync + 'static,
    install: Option<selftls::Install>,
    stop: watch::Receiver<bool>,
) -> Running {
    // Spawned last: every watcher readiness waits for, the Secrets' included, is known before
    // any can have listed.
    let (cache, watchers) = Cache::watching(&clients.watch, &settings.namespaces);
    let mut tasks = Vec::new();
    let (leadership, lease) = lease::hold(
        clients.requests.clone(),
        settings.lease_namespace.clone(),
        settings.identity.clone(),
        Arc::clone(&cache),
        settings.pace.max_backoff,
        stop.clone(),
    );
    let metrics = Arc::new(metrics::Metrics::new(leadership.clone()));
    let tls = match (&settings.tls, install) {
        (Some(tls), Some(install)) => {
            let (status, tls_tasks) = selftls::start(
                &clients.requests,
                &clients.watch,
                tls.clone(),
                install,
                leadership.clone(),
                stop.clone(),
            );
            tasks.extend(tls_tasks);
            Some(status)
        }
        _ => None,
    };
    let events = events::Events::new(clients.requests.clone(), &settings.identity, policy.clone());
    tasks.push(tokio::spawn(reconciler::run(
        reconciler::Reconciler {
            clients,
            cache: Arc::clone(&cache),
            policy,
            leadership,
            events,
            metrics: Arc::clone(&metrics),
            pace: settings.pace,
        },
        stop,
    )));
    tasks.extend(watchers.into_iter().map(tokio::spawn));
    info!(
        namespaces = ?settings.namespaces,
        lease = %format!("{}/{LEASE_NAME}", settings.lease_namespace),
        identity = %settings.identity,
        "Watching the cluster"
    );
    Running {
        cache,
        metrics,
        tls,
        aborts: tasks
            .iter()
            .chain([&lease])
            .map(JoinHandle::abort_handle)
            .collect(),
        lease: Some(lease),
        tasks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before any watcher can have listed, readiness already waits for the Secrets the policy
    /// reads, not only for the outpost watchers: admission must not answer from a view without
    /// them. (A client nobody answers: this is the bookkeeping before the first list, which a
    /// real apiserver answers too fast to observe.)
    #[tokio::test]
    async fn readiness_waits_for_the_policys_secrets_from_the_start() {
        let (mock, _apiserver) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(mock, "default");
        let policy = Arc::new(crate::core::policy::Policy::builtin().unwrap());
        let (_stop, stop) = watch::channel(false);
        let running = start(
            Clients {
                watch: client.clone(),
                requests: client,
            },
            &Settings::off(),
            move || Arc::clone(&policy),
            None,
            stop,
        );
        let unsettled = running.cache.unsettled();
        running.abort();
        assert_eq!(
            unsettled,
            [
                "deployments in authentik",
                "secrets (metadata.name=goauthentik) in authentik",
                "services in authentik"
            ]
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_reported_and_none_is_never() {
        let forever = || tokio::spawn(std::future::pending::<()>());
        let panics = tokio::spawn(async {
            tokio::task::yield_now().await;
            panic!("the reconciler met a bug");
        });
        let mut tasks = vec![forever(), panics, forever()];
        assert_eq!(
            first_ended(&mut tasks).await,
            TaskEnded::Panicked("the reconciler met a bug".into())
        );
        assert_eq!(tasks.len(), 2, "the ended task is taken out");
        tasks.push(tokio::spawn(async {}));
        assert_eq!(first_ended(&mut tasks).await, TaskEnded::Returned);
        let mut none = Vec::new();
        let none = tokio::time::timeout(Duration::from_millis(50), first_ended(&mut none));
        assert!(none.await.is_err());
        let running = tokio::time::timeout(Duration::from_millis(50), first_ended(&mut tasks));
        assert!(running.await.is_err());
        for t in tasks {
            t.abort();
        }
    }
}
