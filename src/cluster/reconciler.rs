//! The reconciler: on every change the cache sees (and on a resync timer), the Lease holder plans
//! the writes that bring outpost objects to what the webhook wants and sends them through the
//! apiserver, so admission (this same webhook) shapes the final object. Also holds the Lease
//! ([`hold_lease`]) that says which replica that is.
//!
//! Network I/O: JSON patches with field manager `outpost-webhook`. It writes only outpost objects,
//! never finalizers, owner references, a Deployment's `spec.selector` or any ports (the plan's
//! operations are the core's, which never touch those). Writing stops at once when leadership is
//! lost. Rolls are rate-limited: at most one Deployment write per `roll_interval`. A write the
//! apiserver refuses (403) is logged once and keeps readiness false until one succeeds.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    LEASE_DURATION, LEASE_NAME,
    cache::{Cache, Refusal},
    metrics::Metrics,
};
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
/// true. `policy` returns the policy in force (it may be reloaded meanwhile); a Secret that a
/// reloaded policy names is followed from the next pass on.
pub async fn run(
    clients: super::Clients,
    cache: Arc<Cache>,
    policy: impl Fn() -> Arc<Policy>,
    mut leader: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    pace: Pace,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut last_roll: Option<Instant> = None;
    // Watchers of Secrets named after start. Dropping the set (this loop ending or being
    // aborted) stops them.
    let mut secret_watchers = JoinSet::new();
    // False once the Lease task is gone: its receiver then answers at once, every time.
    let mut lease_alive = true;
    loop {
        let wait = if failures == 0 {
            pace.resync
        } else {
            backoff(failures, pace.max_backoff)
        };
        // After a failed pass only the backoff (or a change of leadership) ends the wait: a busy
        // cache must not turn retries of a refused write into a hot loop.
        tokio::select! {
            () = cache.changed.notified(), if failures == 0 => {}
            changed = leader.changed(), if lease_alive => lease_alive = changed.is_ok(),
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
        let policy = policy();
        for watcher in cache.follow_secrets(&clients.watch, &policy.secret_names()) {
            secret_watchers.spawn(watcher);
        }
        // Marked seen, so a change this pass already reads does not wake another pass.
        let leading = lease_alive && *leader.borrow_and_update();
        metrics.leader(leading);
        // Synced, not ready: a refused write keeps readiness false, and must still be retried.
        if !leading || !cache.synced() {
            continue;
        }
        let (services, deployments) = cache.stored();
        let mut failed = false;
        // One object at a time: the cache keeps compact text, and 1,000 outposts parsed at once
        // would be ten times its size.
        let planned = |text: &Arc<str>, service: bool| {
            let Ok(object) = serde_json::from_str(text) else {
                return Vec::new();
            };
            let one = std::slice::from_ref(&object);
            if service {
                plan(&policy, cache.as_ref(), one, &[])
            } else {
                plan(&policy, cache.as_ref(), &[], one)
            }
        };
        let writes = services
            .iter()
            .flat_map(|s| planned(s, true))
            .chain(deployments.iter().flat_map(|d| planned(d, false)));
        for write in writes {
            if write.kind == ObjectKind::Deployment {
                if let Some(last) = last_roll {
                    tokio::time::sleep_until(last + pace.roll_interval).await;
                }
                last_roll = Some(Instant::now());
            }
            // Leadership is checked before each write: a lost Lease stops writing at once.
            if !lease_alive || !*leader.borrow() {
                break;
            }
            let result = send(&clients.requests, &write).await;
            metrics.write(write.kind, write.reason, result.is_ok());
            if let Err(e) = &result {
                failed = true;
                refused_write(&cache, &write, e);
            } else {
                cache.allow(&["patch"], resource(write.kind), None, &write.namespace);
                info!(
                    kind = write.kind.as_str(),
                    namespace = %write.namespace,
                    name = %write.name,
                    reason = write.reason.as_str(),
                    "Reconciled"
                );
            }
        }
        // The backoff doubles over passes that keep failing, and resets after one that does not.
        failures = if failed {
            failures.saturating_add(1)
        } else {
            0
        };
        debug!(failures, "Reconcile pass done");
    }
}

/// Logs a failed write. A 403 is recorded in the cache (readiness false) and logged once, not on
/// every retry.
fn refused_write(cache: &Cache, write: &Write, e: &kube::Error) {
    let Some(status) = forbidden(e) else {
        warn!(
            kind = write.kind.as_str(),
            namespace = %write.namespace,
            name = %write.name,
            reason = write.reason.as_str(),
            error = %e,
            "A reconcile write failed; it is planned again after a backoff"
        );
        return;
    };
    let refusal = Refusal {
        verb: "patch".into(),
        resource: resource(write.kind),
        scope: None,
        namespace: write.namespace.clone(),
    };
    let what = refusal.to_string();
    if cache.refuse(refusal) {
        // Another admission webhook's denial is a 403 as well; the message tells them apart.
        warn!(
            forbidden = %what,
            name = %write.name,
            answer = %status.message,
            "The apiserver refused a reconcile write: RBAC must allow it. Retried with backoff; \
             readiness stays false until a write succeeds"
        );
    } else {
        debug!(forbidden = %what, name = %write.name, "A reconcile write is still refused");
    }
}

/// The API resource a write goes to, as RBAC names it.
fn resource(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Service => "services",
        ObjectKind::Deployment => "deployments",
    }
}

/// The apiserver's answer when it was 403 Forbidden.
fn forbidden(e: &kube::Error) -> Option<&kube::core::Status> {
    match e {
        kube::Error::Api(s) if s.code == 403 => Some(s),
        _ => None,
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across a caller's await.
    let _ = stop.wait_for(|s| *s).await;
}

/// The verbs the Lease needs, named when the apiserver's message does not say which it refused.
const LEASE_VERBS: &str = "get, create, patch";

/// Seconds before the Lease expires at which its holder renews it.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Holds the Lease [`LEASE_NAME`] in `namespace` as `identity` until `stop` turns true; the
/// receiver says whether this replica holds it now (false until it does).
///
/// Nothing waits for it: building the Lease manager reads the Lease (and creates it when
/// missing), so an apiserver that is down or a Lease that is forbidden must not hold up
/// admission. Any error turns the receiver false at once, so writing stops, and the manager is
/// built again after a backoff (one second doubling up to `max_backoff`). A 403 is recorded in
/// `cache` (readiness false) and logged once. On stop the Lease is released, so another replica
/// takes over at once rather than after the lease duration.
#[must_use]
pub fn hold_lease(
    client: Client,
    namespace: String,
    identity: String,
    cache: Arc<Cache>,
    max_backoff: Duration,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (leader, receiver) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let held = lead(
                &client,
                &namespace,
                &identity,
                &cache,
                &leader,
                &mut failures,
                &mut stop,
            );
            let result = held.await;
            leader.send_replace(false);
            let Err(e) = result else { return };
            failures = failures.saturating_add(1);
            let wait = backoff(failures, max_backoff);
            refused_lease(&cache, &namespace, &e, wait);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stopped(&mut stop) => return,
            }
        }
    });
    (receiver, task)
}

/// Builds the Lease manager and follows it until an error, or `stop` (then `Ok`).
async fn lead(
    client: &Client,
    namespace: &str,
    identity: &str,
    cache: &Cache,
    leader: &watch::Sender<bool>,
    failures: &mut u32,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), LeaseManagerError> {
    let build = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_DURATION.as_secs())
        .with_grace(LEASE_GRACE_SECONDS)
        .with_field_manager(FIELD_MANAGER)
        .build();
    let manager = tokio::select! {
        manager = build => manager?,
        () = stopped(stop) => return Ok(()),
    };
    // Building read the Lease, and created it if it was missing.
    cache.allow(&["get", "create"], "leases", None, namespace);
    loop {
        tokio::select! {
            leading = manager.changed() => {
                let leading = leading?;
                cache.allow(&["get", "create", "patch", LEASE_VERBS], "leases", None, namespace);
                *failures = 0;
                leader.send_replace(leading);
                if leading {
                    info!(%identity, "This replica holds the reconciler's Lease: it writes");
                } else {
                    info!(%identity, "This replica lost the reconciler's Lease: it stops writing");
                }
            }
            () = stopped(stop) => {
                leader.send_replace(false);
                if let Err(e) = manager.release().await {
                    debug!(error = %e, "The Lease could not be released; it expires instead");
                }
                return Ok(());
            }
        }
    }
}

/// Logs a Lease error; a 403 is recorded in the cache and logged once.
fn refused_lease(cache: &Cache, namespace: &str, e: &LeaseManagerError, wait: Duration) {
    let status = match e {
        LeaseManagerError::KubeError(k) => forbidden(k),
        _ => None,
    };
    let Some(status) = status else {
        warn!(
            error = %e,
            retry_in = ?wait,
            "The reconciler's Lease cannot be held; this replica does not write until it is"
        );
        return;
    };
    let refusal = Refusal {
        verb: refused_verb(&status.message).unwrap_or(LEASE_VERBS).into(),
        resource: "leases",
        scope: Some(LEASE_NAME.into()),
        namespace: namespace.to_owned(),
    };
    let what = refusal.to_string();
    let verb = refusal.verb.clone();
    let new = cache.refuse(refusal);
    // The Lease is set up in one sequence (get, then create or patch): the latest refusal is the
    // one in the way, and an earlier one was allowed since.
    let earlier: Vec<&str> = ["get", "create", "patch", LEASE_VERBS]
        .into_iter()
        .filter(|v| *v != verb)
        .collect();
    cache.allow(&earlier, "leases", None, namespace);
    if new {
        warn!(
            forbidden = %what,
            answer = %status.message,
            "The apiserver refused the reconciler's Lease: RBAC must allow it. Retried with \
             backoff; readiness stays false until it is allowed"
        );
    }
}

/// The verb in the apiserver's RBAC refusal: `... cannot get resource "leases" ...`.
fn refused_verb(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once(" cannot ")?;
    let (verb, rest) = rest.split_once(' ')?;
    rest.starts_with("resource ").then_some(verb)
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
    use crate::{
        core::{mutate::secret_checksum, policy::Outpost},
        k8s::SECRET_CHECKSUM,
    };
    use futures::FutureExt as _;
    use http::{Request, Response};
    use json_patch::{PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{Handle, SendResponse};

    type Mock = Handle<Request<Body>, Response<Body>>;

    /// Longer than any wait the loop makes; in paused time it passes at once when nothing is
    /// left to run, so a missing request fails the test instead of hanging it.
    const BOUND: Duration = Duration::from_secs(600);

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

    /// The next request to the mock apiserver, which must be a JSON patch of `path` by the
    /// field manager; its body, and the means to answer it.
    async fn next_patch(handle: &mut Mock, path: &str) -> (Value, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(BOUND, handle.next_request())
            .await
            .expect("a request in time")
            .expect("a request");
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
        (serde_json::from_slice(&body).unwrap(), send)
    }

    fn answer(send: SendResponse<Response<Body>>, code: u16, body: &Value) {
        send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    /// A 403 as the apiserver words it when RBAC lacks `verb`.
    fn forbidden_status(verb: &str, resource: &str, namespace: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{resource} \"x\" is forbidden: User \
                   \"system:serviceaccount:outpost-webhook:outpost-webhook\" cannot {verb} \
                   resource \"{resource}\" in API group \"\" in the namespace \"{namespace}\""),
               "reason": "Forbidden", "details": {"kind": resource}, "code": 403})
    }

    async fn serve_once(mut handle: Mock, path: &'static str, object: Value) {
        let (ops, send) = next_patch(&mut handle, path).await;
        assert_eq!(
            ops,
            json!([{"op": "replace", "path": "/spec/selector",
                    "value": {"app.kubernetes.io/name": "authentik-outpost-proxy"}}])
        );
        answer(send, 200, &object);
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

    const UUID: &str = "0eecac0797c7443c892505f2f4fe3e47";
    const SERVICE_PATH: &str = "/api/v1/namespaces/authentik/services/ak-outpost-o";

    fn labels() -> Value {
        json!({"app.kubernetes.io/managed-by": "goauthentik.io",
               "goauthentik.io/outpost-name": "o", "goauthentik.io/outpost-type": "proxy",
               "goauthentik.io/outpost-uuid": UUID})
    }

    /// The cache as the watchers would fill it: a standalone outpost Deployment whose Secret
    /// checksum is current, and its Service still selecting the authentik server pods.
    fn seeded(policy: &Policy) -> Arc<Cache> {
        let cache = Arc::new(Cache::default());
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels()},
            "spec": {"selector": {"app.kubernetes.io/name": "authentik",
                                  "app.kubernetes.io/component": "server"}}}))
        .unwrap();
        let outpost = Outpost {
            name: "o",
            kind: "proxy",
            uuid: UUID,
        };
        let checksum = secret_checksum(
            &policy.for_outpost(&outpost).deployment,
            &*cache,
            "authentik",
        );
        let mut pods = labels();
        pods["app.kubernetes.io/name"] = json!("authentik-outpost-proxy");
        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "ak-outpost-o", "namespace": "authentik", "labels": labels()},
            "spec": {"selector": {"matchLabels": pods},
                     "template": {"metadata": {"labels": pods,
                                               "annotations": {SECRET_CHECKSUM: checksum}},
                                  "spec": {"containers": [{"name": "proxy"}]}}}}))
        .unwrap();
        cache.apply("authentik", &deployment);
        cache.apply("authentik", &service);
        cache
    }

    /// The one write the seeded cache needs: the Service selects the outpost's pods, and the
    /// selector it had is recorded so that it can be restored.
    fn selector_write() -> Value {
        json!([
            {"op": "replace", "path": "/spec/selector", "value": {
                "app.kubernetes.io/name": "authentik-outpost-proxy",
                "app.kubernetes.io/managed-by": "goauthentik.io",
                "goauthentik.io/outpost-name": "o", "goauthentik.io/outpost-type": "proxy",
                "goauthentik.io/outpost-uuid": UUID}},
            {"op": "add", "path": "/metadata/annotations", "value": {
                "outpost-webhook/original-selector":
                    "{\"app.kubernetes.io/component\":\"server\",\"app.kubernetes.io/name\":\"authentik\"}"}}
        ])
    }

    /// `run` against a mock apiserver, with the cache seeded.
    struct Loop {
        cache: Arc<Cache>,
        leader: watch::Sender<bool>,
        stop: watch::Sender<bool>,
        apiserver: Mock,
        task: JoinHandle<()>,
    }

    impl Loop {
        fn start(leading: bool) -> Self {
            let (mock, apiserver) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let policy = Arc::new(Policy::builtin().unwrap());
            let cache = seeded(&policy);
            let (leader, leader_rx) = watch::channel(leading);
            let (stop, stop_rx) = watch::channel(false);
            let client = Client::new(mock, "default");
            let task = tokio::spawn(run(
                crate::cluster::Clients {
                    watch: client.clone(),
                    requests: client,
                },
                Arc::clone(&cache),
                move || Arc::clone(&policy),
                leader_rx,
                Arc::new(Metrics::default()),
                Pace::default(),
                stop_rx,
            ));
            Self {
                cache,
                leader,
                stop,
                apiserver,
                task,
            }
        }

        /// Stops the loop, and checks that it sent nothing more.
        async fn finish(mut self) {
            self.stop.send(true).unwrap();
            tokio::time::timeout(BOUND, self.task)
                .await
                .expect("the loop stops")
                .unwrap();
            // The loop held the only client: with it gone, the mock reports no request.
            let rest = tokio::time::timeout(BOUND, self.apiserver.next_request()).await;
            assert!(matches!(rest, Ok(None)), "an unexpected request");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_moves_the_service_to_its_pods_with_one_patch() {
        let mut l = Loop::start(true);
        let (ops, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        assert_eq!(ops, selector_write());
        answer(
            send,
            200,
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ak-outpost-o"}}),
        );
        l.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_without_the_lease_writes_nothing_until_it_gets_it() {
        let mut l = Loop::start(false);
        // Three resyncs pass (in paused time) with the cache wanting a write.
        tokio::time::sleep(Pace::default().resync * 3).await;
        assert!(l.apiserver.next_request().now_or_never().is_none());
        l.leader.send(true).unwrap();
        let (ops, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        assert_eq!(ops, selector_write());
        answer(send, 200, &json!({"apiVersion": "v1", "kind": "Service"}));
        l.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_write_keeps_readiness_false_until_a_write_succeeds() {
        let mut l = Loop::start(true);
        assert!(l.cache.ready());
        let (_, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        answer(
            send,
            403,
            &forbidden_status("patch", "services", "authentik"),
        );
        // Retried after a backoff: by then the refusal is recorded.
        let (ops, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        assert_eq!(ops, selector_write());
        assert_eq!(l.cache.forbidden(), ["patch services in authentik"]);
        assert!(!l.cache.ready());
        assert!(l.cache.synced());
        // Refused again: still one refusal (it is logged once).
        answer(
            send,
            403,
            &forbidden_status("patch", "services", "authentik"),
        );
        let (_, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        assert_eq!(l.cache.forbidden().len(), 1);
        answer(send, 200, &json!({"apiVersion": "v1", "kind": "Service"}));
        // The next pass (the resync; the mock does not change the cache) sees it cleared.
        let (_, send) = next_patch(&mut l.apiserver, SERVICE_PATH).await;
        assert!(l.cache.forbidden().is_empty());
        assert!(l.cache.ready());
        answer(send, 200, &json!({"apiVersion": "v1", "kind": "Service"}));
        l.finish().await;
    }

    const LEASE_PATH: &str =
        "/apis/coordination.k8s.io/v1/namespaces/outpost-webhook/leases/outpost-webhook";

    async fn next_request(
        handle: &mut Mock,
        method: http::Method,
        path: &str,
    ) -> SendResponse<Response<Body>> {
        let (request, send) = tokio::time::timeout(BOUND, handle.next_request())
            .await
            .expect("a request in time")
            .expect("a request");
        assert_eq!((request.method(), request.uri().path()), (&method, path));
        send
    }

    #[tokio::test(start_paused = true)]
    async fn a_forbidden_lease_is_retried_in_the_background_and_keeps_readiness_false() {
        let (mock, mut apiserver) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let cache = Arc::new(Cache::default());
        let (stop, stop_rx) = watch::channel(false);
        // Returns at once: nothing waits for the apiserver.
        let (leader, task) = hold_lease(
            Client::new(mock, "default"),
            "outpost-webhook".into(),
            "replica-a".into(),
            Arc::clone(&cache),
            Duration::from_secs(60),
            stop_rx,
        );
        assert!(!*leader.borrow());
        let send = next_request(&mut apiserver, http::Method::GET, LEASE_PATH).await;
        answer(
            send,
            403,
            &forbidden_status("get", "leases", "outpost-webhook"),
        );
        let send = next_request(&mut apiserver, http::Method::GET, LEASE_PATH).await;
        assert_eq!(
            cache.forbidden(),
            ["get leases (outpost-webhook) in outpost-webhook"]
        );
        assert!(!cache.ready());
        // Now get is allowed and the Lease missing, but create is refused.
        answer(
            send,
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}),
        );
        let send = next_request(
            &mut apiserver,
            http::Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/outpost-webhook/leases",
        )
        .await;
        answer(
            send,
            403,
            &forbidden_status("create", "leases", "outpost-webhook"),
        );
        let _pending = next_request(&mut apiserver, http::Method::GET, LEASE_PATH).await;
        assert_eq!(
            cache.forbidden(),
            ["create leases (outpost-webhook) in outpost-webhook"]
        );
        assert!(!*leader.borrow());
        stop.send(true).unwrap();
        tokio::time::timeout(BOUND, task)
            .await
            .expect("the Lease task stops")
            .unwrap();
    }

    #[test]
    fn the_refused_verb_is_read_from_the_apiserver_message() {
        let message = forbidden_status("create", "leases", "outpost-webhook");
        assert_eq!(
            refused_verb(message["message"].as_str().unwrap()),
            Some("create")
        );
        assert_eq!(
            refused_verb("admission webhook \"x\" denied the request"),
            None
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max), Duration::from_secs(2));
        assert_eq!(backoff(3, max), Duration::from_secs(8));
        assert_eq!(backoff(40, max), max);
    }
}
