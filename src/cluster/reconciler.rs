//! The reconciler: on every change the cache sees (and on a resync timer), the Lease holder plans
//! the writes that bring outpost objects to what the webhook wants and sends them through the
//! apiserver, so admission (this same webhook) shapes the final object.
//!
//! Network I/O: JSON patches with field manager `outpost-webhook`. It writes only outpost objects,
//! never finalizers, owner references, a Deployment's `spec.selector` or any ports (the plan's
//! operations are the core's, which never touch those). Writing stops at once when leadership is
//! lost. Rolls are rate-limited: at most one Deployment write per `roll_interval`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{cache::Cache, metrics::Metrics};
use crate::core::{
    mutate::ObjectKind,
    policy::Policy,
    reconcile::{Reason, Write, plan},
};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "outpost-webhook";

/// How the reconciler paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// A full pass even without a change: level-triggered, so a missed event is caught here.
    pub resync: Duration,
    /// The least time between two Deployment writes (each rolls an outpost's pods).
    pub roll_interval: Duration,
    /// The longest wait after failed writes (backoff doubles from one second up to this).
    pub max_backoff: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(60),
            roll_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Sends one write: a JSON patch of the object, as field manager [`FIELD_MANAGER`].
///
/// # Errors
/// What the apiserver answered, when it refused the write.
pub async fn send(client: &Client, write: &Write) -> Result<(), kube::Error> {
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch: Patch<()> = Patch::Json(json_patch::Patch(write.ops.clone()));
    match write.kind {
        ObjectKind::Service => Api::<Service>::namespaced(client.clone(), &write.namespace)
            .patch(&write.name, &params, &patch)
            .await
            .map(drop),
        ObjectKind::Deployment => Api::<Deployment>::namespaced(client.clone(), &write.namespace)
            .patch(&write.name, &params, &patch)
            .await
            .map(drop),
    }
}

/// Runs until `stop` turns true: plans on every change and resync, and writes while `leader` is
/// true. `policy` returns the policy in force (it may be reloaded meanwhile).
pub async fn run(
    client: Client,
    cache: Arc<Cache>,
    policy: impl Fn() -> Arc<Policy>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    pace: Pace,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut last_roll: Option<Instant> = None;
    loop {
        let wait = if failures == 0 {
            pace.resync
        } else {
            backoff(failures, pace.max_backoff)
        };
        tokio::select! {
            () = cache.changed.notified() => {}
            _ = leader.changed() => {}
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let leading = *leader.borrow();
        metrics.leader(leading);
        if !leading || !cache.ready() {
            continue;
        }
        let (services, deployments) = cache.objects();
        let writes = plan(&policy(), cache.as_ref(), &services, &deployments);
        failures = 0;
        for write in writes {
            // Leadership is checked before each write: a lost Lease stops writing at once.
            if !*leader.borrow() {
                break;
            }
            if write.kind == ObjectKind::Deployment {
                if let Some(last) = last_roll {
                    let next = last + pace.roll_interval;
                    tokio::time::sleep_until(next.into()).await;
                }
                last_roll = Some(Instant::now());
            }
            let result = send(&client, &write).await;
            metrics.write(write.kind, write.reason, result.is_ok());
            match result {
                Ok(()) => info!(
                    kind = write.kind.as_str(),
                    namespace = %write.namespace,
                    name = %write.name,
                    reason = write.reason.as_str(),
                    "Reconciled"
                ),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    warn!(
                        kind = write.kind.as_str(),
                        namespace = %write.namespace,
                        name = %write.name,
                        reason = write.reason.as_str(),
                        error = %e,
                        "A reconcile write failed; it is planned again after a backoff"
                    );
                }
            }
        }
        debug!(failures, "Reconcile pass done");
    }
}

/// One second, doubled per failure, capped.
fn backoff(failures: u32, max: Duration) -> Duration {
    Duration::from_secs(1u64 << failures.min(16)).min(max)
}

/// Every reason, for metrics.
pub const REASONS: [Reason; 2] = [Reason::SelectorFollowsPods, Reason::SecretChanged];

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use json_patch::{PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
    use kube::client::Body;
    use serde_json::{Value, json};

    fn write(kind: ObjectKind) -> Write {
        Write {
            kind,
            namespace: "authentik".into(),
            name: "ak-outpost-o".into(),
            ops: vec![PatchOperation::Replace(ReplaceOperation {
                path: PointerBuf::from_tokens(["spec", "selector"]),
                value: json!({"app.kubernetes.io/name": "authentik-outpost-proxy"}),
            })],
            reason: Reason::SelectorFollowsPods,
        }
    }

    /// A mock apiserver behind `kube::Client`: each request is checked, then answered.
    async fn serve_once(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        path: &'static str,
        object: Value,
    ) {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method(), http::Method::PATCH);
        assert_eq!(request.uri().path(), path);
        assert!(
            request
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "fieldManager=outpost-webhook")),
            "{:?}",
            request.uri()
        );
        assert_eq!(
            request.headers()["content-type"],
            "application/json-patch+json"
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let ops: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            ops,
            json!([{"op": "replace", "path": "/spec/selector",
                    "value": {"app.kubernetes.io/name": "authentik-outpost-proxy"}}])
        );
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&object).unwrap()))
                .unwrap(),
        );
    }

    #[tokio::test]
    async fn a_service_write_is_one_json_patch_by_the_field_manager() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "default");
        let server = tokio::spawn(serve_once(
            handle,
            "/api/v1/namespaces/authentik/services/ak-outpost-o",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ak-outpost-o"}}),
        ));
        send(&client, &write(ObjectKind::Service)).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_deployment_write_goes_to_the_apps_group() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "default");
        let server = tokio::spawn(serve_once(
            handle,
            "/apis/apps/v1/namespaces/authentik/deployments/ak-outpost-o",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ak-outpost-o"}}),
        ));
        let mut w = write(ObjectKind::Deployment);
        w.reason = Reason::SecretChanged;
        send(&client, &w).await.unwrap();
        server.await.unwrap();
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max), Duration::from_secs(2));
        assert_eq!(backoff(3, max), Duration::from_secs(8));
        assert_eq!(backoff(40, max), max);
    }
}
