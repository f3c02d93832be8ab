//! The reconciler: on every change the cache sees (and on a resync timer), the Lease holder plans
//! the writes that bring outpost objects to what the webhook wants, and sends them through the
//! apiserver, leaving an Event on each object it writes ([`events`](super::events)).
//!
//! Network I/O: for each planned write, a GET of the object and a JSON patch of it, field manager
//! `outpost-webhook`. The patch is the whole fix admission would make to that object as read,
//! after a `test` of its `resourceVersion`: the object ends right whether or not a registration
//! sends the write through the webhook (installed before its registration, the leader writes no
//! fragment such as a checksum without the env it belongs to), and a patch is never applied to a
//! version it was not computed for. It writes only outpost objects, never finalizers, owner
//! references, a Deployment's `spec.selector` or any ports (the operations are the core's, which
//! never touch those). A write starts only while the Lease is this replica's for longer than the
//! write can take. Rolls are rate-limited: at most one Deployment write per `roll_interval`.
//!
//! It also keeps the Secret watchers in step with the policy in force: a Secret a reloaded policy
//! names is followed, one it no longer names is dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::Value;
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinSet},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    REQUEST_TIMEOUT,
    cache::{Cache, Refusal},
    events::Events,
    lease::{Leadership, may_act},
    metrics::Metrics,
};
use crate::core::{
    mutate::ObjectKind,
    policy::Policy,
    reconcile::{HeldBack, Plan, Reason, Write, plan, service_reason, write_ops},
};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "outpost-webhook";

/// How often the reconciler checks whether the policy in force names other Secrets.
const POLICY_CHECK: Duration = Duration::from_secs(2);

/// How the reconciler paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// A full pass even without a change: level-triggered, so a missed event is caught here.
    pub resync: Duration,
    /// The least time between two Deployment writes (each rolls an outpost's pods).
    pub roll_interval: Duration,
    /// The longest wait after failed writes (the backoff starts at two seconds and doubles up to this).
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

/// The object a write went to, as the apiserver answered the patch: for its Event.
#[derive(Debug, Clone)]
pub struct Written {
    pub object: DynamicObject,
    /// Why, from what was sent: the cache may have changed since the plan.
    pub reason: Reason,
}

fn resource_of(kind: ObjectKind) -> ApiResource {
    match kind {
        ObjectKind::Service => ApiResource::erase::<Service>(&()),
        ObjectKind::Deployment => ApiResource::erase::<Deployment>(&()),
    }
}

/// Reads `write`'s object and sends the whole fix for it, as field manager [`FIELD_MANAGER`],
/// if `may_patch` still allows it once the object is read. `Ok(None)`: nothing was sent (the
/// object was already right when read, or the Lease ran short).
///
/// # Errors
/// What the apiserver answered, when it refused the read or the patch. A patch whose
/// `resourceVersion` test fails (the object changed since it was read) is refused too; the next
/// pass plans again.
pub async fn send(
    client: &Client,
    policy: &Policy,
    view: &(dyn crate::core::cluster::View + Sync),
    write: &Write,
    may_patch: impl Fn() -> bool,
) -> Result<Option<Written>, kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &write.namespace, &resource_of(write.kind));
    let object = api.get(&write.name).await?;
    let value = serde_json::to_value(&object).map_err(kube::Error::SerdeError)?;
    let ops = write_ops(policy, view, write.kind, write.reason, &value);
    if ops.is_empty() || !may_patch() {
        return Ok(None);
    }
    let reason = match write.kind {
        ObjectKind::Service => service_reason(&ops),
        ObjectKind::Deployment => write.reason,
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let object = api
        .patch(
            &write.name,
            &params,
            &Patch::<()>::Json(json_patch::Patch(ops)),
        )
        .await?;
    Ok(Some(Written { object, reason }))
}

/// The Secret watchers the reconciler owns, by Secret name.
#[derive(Default)]
struct SecretWatchers {
    tasks: JoinSet<()>,
    by_name: BTreeMap<String, Vec<AbortHandle>>,
}

impl SecretWatchers {
    /// Follows exactly the Secrets `policy` reads.
    fn follow(&mut self, cache: &Arc<Cache>, client: &Client, policy: &Policy) {
        let names = policy.secret_names();
        for gone in cache.unfollow_secrets(&names) {
            for handle in self.by_name.remove(&gone).into_iter().flatten() {
                handle.abort();
            }
            info!(secret = %gone, "The policy no longer reads this Secret: stopped watching it");
        }
        for (name, watcher) in cache.follow_secrets(client, &names) {
            let handle = self.tasks.spawn(watcher);
            self.by_name.entry(name).or_default().push(handle);
        }
        // Reap watchers that ended (aborted above). One that panicked would stay pending in the
        // cache for good, and the reconciler would never plan again while holding the Lease:
        // its panic becomes the reconciler's, which stops the replica (`Running::ended`).
        while let Some(ended) = self.tasks.try_join_next() {
            if let Err(e) = ended
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// Everything [`run`] works with.
pub struct Reconciler<P> {
    pub clients: super::Clients,
    pub cache: Arc<Cache>,
    /// The policy in force (it may be reloaded meanwhile).
    pub policy: P,
    pub leadership: Leadership,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub pace: Pace,
}

/// The reconciler, to spawn: it runs until `stop` turns true, plans on every change and resync,
/// and writes while the Lease is this replica's. The Secrets the policy in force reads are
/// followed from this call on, before the returned future first runs: readiness waits for them
/// as for the other watchers.
pub fn run<P: Fn() -> Arc<Policy> + Send + Sync + 'static>(
    r: Reconciler<P>,
    stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let mut secrets = SecretWatchers::default();
    secrets.follow(&r.cache, &r.clients.watch, &(r.policy)());
    run_loop(r, secrets, stop)
}

async fn run_loop<P: Fn() -> Arc<Policy> + Sync>(
    r: Reconciler<P>,
    mut secrets: SecretWatchers,
    mut stop: watch::Receiver<bool>,
) {
    let Reconciler {
        clients,
        cache,
        policy,
        mut leadership,
        events,
        metrics,
        pace,
    } = r;
    let mut failures: u32 = 0;
    let mut last_roll: Option<Instant> = None;
    // Dropping the watchers (this loop ending or being aborted) stops them.
    // False once the Lease task is gone: its receiver then answers at once, every time.
    let mut lease_alive = true;
    // What was held back and already told, so a resync does not repeat it.
    let mut told: BTreeSet<(String, String, Vec<String>)> = BTreeSet::new();
    let mut check = tokio::time::interval(POLICY_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let wait = if failures == 0 {
            pace.resync
        } else {
            backoff(failures, pace.max_backoff)
        };
        let woken = wake(
            Wait {
                changes: (failures == 0).then_some(&cache.changed),
                leadership: lease_alive.then_some(&mut leadership),
                due: Instant::now() + wait,
                check: &mut check,
                policy_moved: &|| policy().secret_names() != cache.followed_secrets(),
            },
            &mut stop,
        )
        .await;
        match woken {
            Wake::Stop => return,
            Wake::LeaseTaskGone => lease_alive = false,
            Wake::Pass => {}
        }
        let policy = policy();
        secrets.follow(&cache, &clients.watch, &policy);
        leadership.borrow_and_update();
        if leadership.borrow().is_none() {
            // Not leading: the next change of leadership wakes the loop.
            continue;
        }
        if !cache.synced() {
            // Leading, but the view is incomplete: its last watcher to list wakes the loop.
            continue;
        }
        if !may_act(&leadership, REQUEST_TIMEOUT) {
            // Leading, but the Lease is being renewed: soon again.
            failures = failures.max(1);
            continue;
        }
        let Plan { writes, held_back } = plan_all(&policy, &cache);
        // Told once while it lasts; told again if it comes back after being resolved.
        let now_held: BTreeSet<(String, String, Vec<String>)> = held_back
            .iter()
            .map(|h| (h.namespace.clone(), h.name.clone(), h.problems.clone()))
            .collect();
        told.retain(|k| now_held.contains(k));
        for held in held_back {
            let key = (
                held.namespace.clone(),
                held.name.clone(),
                held.problems.clone(),
            );
            if told.insert(key) {
                hold_back(&clients.requests, &events, &held).await;
            }
        }
        let mut failed = false;
        for write in writes {
            if write.kind == ObjectKind::Deployment {
                if let Some(last) = last_roll {
                    tokio::time::sleep_until(last + pace.roll_interval).await;
                }
                last_roll = Some(Instant::now());
            }
            // The read and the patch each take up to REQUEST_TIMEOUT, and each must end while
            // the Lease is still this replica's: otherwise another may have taken it by then.
            let may_patch = || lease_alive && may_act(&leadership, REQUEST_TIMEOUT);
            if !may_patch() {
                failed = true;
                break;
            }
            let result = send(
                &clients.requests,
                &policy,
                cache.as_ref(),
                &write,
                may_patch,
            )
            .await;
            failed |= !recorded(&cache, &metrics, &events, &write, result).await;
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

/// What ends the reconciler's wait between passes.
struct Wait<'a> {
    /// The cache's change signal; `None` after a failed pass, when only the backoff (or a change
    /// of leadership) ends the wait: a busy cache must not turn retries of a refused write into
    /// a hot loop.
    changes: Option<&'a tokio::sync::Notify>,
    /// `None` once the Lease task is gone (its receiver would answer at once, every time).
    leadership: Option<&'a mut Leadership>,
    /// When the next pass is due (the resync or the backoff).
    due: Instant,
    /// The policy check, which ticks more often than any wait.
    check: &'a mut tokio::time::Interval,
    /// Whether the policy in force now names other Secrets than the watched ones.
    policy_moved: &'a (dyn Fn() -> bool + Sync),
}

/// Why the wait ended.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    Pass,
    /// The Lease task ended: pass once more, then wait without it.
    LeaseTaskGone,
    Stop,
}

/// Waits for a reason to pass. A policy check that finds nothing new does not restart the wait:
/// it ticks more often than any backoff, which would then never end.
async fn wake(w: Wait<'_>, stop: &mut watch::Receiver<bool>) -> Wake {
    let Wait {
        changes,
        mut leadership,
        due,
        check,
        policy_moved,
    } = w;
    loop {
        tokio::select! {
            () = async {
                match changes {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            } => return Wake::Pass,
            changed = async {
                match leadership.as_mut() {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                return if changed.is_ok() { Wake::Pass } else { Wake::LeaseTaskGone };
            }
            () = tokio::time::sleep_until(due) => return Wake::Pass,
            _ = check.tick() => {
                if policy_moved() {
                    return Wake::Pass;
                }
            }
            () = stopped(stop) => return Wake::Stop,
        }
    }
}

/// Counts, logs and leaves an Event for one write's result; false when it failed.
async fn recorded(
    cache: &Cache,
    metrics: &Metrics,
    events: &Events,
    write: &Write,
    result: Result<Option<Written>, kube::Error>,
) -> bool {
    match result {
        Ok(None) => true,
        Ok(Some(written)) => {
            metrics.write(write.kind, written.reason, true);
            cache.allow(
                &["get, patch"],
                resource(write.kind),
                None,
                &write.namespace,
            );
            info!(
                kind = write.kind.as_str(),
                namespace = %write.namespace,
                name = %write.name,
                reason = written.reason.as_str(),
                "Reconciled"
            );
            events
                .wrote(cache, written.reason, write, &written.object)
                .await;
            true
        }
        Err(e) => {
            metrics.write(write.kind, write.reason, false);
            refused_write(cache, write, &e);
            // A conflict (the object changed since it was read) is normal with a busy
            // controller and is planned again: not worth a Warning Event.
            if !matches!(&e, kube::Error::Api(s) if s.code == 409 || s.code == 422) {
                events.refused(write, &e).await;
            }
            false
        }
    }
}

/// The plan for every stored object, one object at a time: the cache keeps compact text, and
/// 1,000 outposts parsed at once would be ten times its size.
fn plan_all(policy: &Policy, cache: &Cache) -> Plan {
    let (services, deployments) = cache.stored();
    let mut out = Plan::default();
    for (text, service) in services
        .iter()
        .map(|s| (s, true))
        .chain(deployments.iter().map(|d| (d, false)))
    {
        let Ok(object) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        let one = std::slice::from_ref(&object);
        let p = if service {
            plan(policy, cache, one, &[])
        } else {
            plan(policy, cache, &[], one)
        };
        out.writes.extend(p.writes);
        out.held_back.extend(p.held_back);
    }
    out
}

/// Tells, once per distinct set of problems, that an outpost Deployment is not rolled.
async fn hold_back(client: &Client, events: &Events, held: &HeldBack) {
    warn!(
        namespace = %held.namespace,
        name = %held.name,
        problems = %held.problems.join("; "),
        "Not rolling an outpost whose new pods could not start; fix the Secret or the policy"
    );
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &held.namespace,
        &resource_of(ObjectKind::Deployment),
    );
    if let Ok(object) = api.get(&held.name).await {
        events.held_back(&object, &held.problems).await;
    }
}

/// Logs a failed write. A 403 is recorded in the cache and logged once, not on every retry.
fn refused_write(cache: &Cache, write: &Write, e: &kube::Error) {
    let Some(status) = forbidden(e) else {
        // 409/422: the object changed between the read and the patch (its resourceVersion test
        // failed), which a busy controller causes: planned again.
        let conflict = matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 422);
        if conflict {
            info!(
                kind = write.kind.as_str(),
                namespace = %write.namespace,
                name = %write.name,
                "The object changed while it was written; planned again"
            );
        } else {
            warn!(
                kind = write.kind.as_str(),
                namespace = %write.namespace,
                name = %write.name,
                reason = write.reason.as_str(),
                error = %e,
                "A reconcile write failed; it is planned again after a backoff"
            );
        }
        return;
    };
    let refusal = Refusal {
        verb: "get, patch".into(),
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
            "The apiserver refused a reconcile write: RBAC must allow it. Retried with backoff"
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
pub(super) fn forbidden(e: &kube::Error) -> Option<&kube::core::Status> {
    match e {
        kube::Error::Api(s) if s.code == 403 => Some(s),
        _ => None,
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across a caller's await.
    let _ = stop.wait_for(|s| *s).await;
}

/// Two seconds after the first failure, doubled per failure after it, capped.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    Duration::from_secs(1u64 << failures.min(16)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy check ticks every 2 s, as often as the first backoff: a tick that finds
    /// nothing new must not restart the wait, or the pass after a failure comes late or never.
    #[tokio::test(start_paused = true)]
    async fn a_policy_check_that_finds_nothing_does_not_restart_the_wait() {
        let mut check = tokio::time::interval(POLICY_CHECK);
        let (_keep, mut stop) = watch::channel(false);
        let (lease, mut leadership) = watch::channel(None);
        let notify = tokio::sync::Notify::new();
        // The check's ticks land just before the due time, again and again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let due = Instant::now() + Duration::from_secs(9);
        let woken = tokio::time::timeout(
            Duration::from_secs(60),
            wake(
                Wait {
                    changes: None,
                    leadership: Some(&mut leadership),
                    due,
                    check: &mut check,
                    policy_moved: &|| false,
                },
                &mut stop,
            ),
        )
        .await;
        assert_eq!(woken, Ok(Wake::Pass));
        assert_eq!(Instant::now(), due);
        // A change of the cache ends the wait at once, unless a failed pass turned it off.
        notify.notify_one();
        let woken = wait_a_minute(None, None, false, &mut check, &mut stop).await;
        assert_eq!(woken, (Wake::Pass, Duration::from_secs(60)), "turned off");
        let woken = wait_a_minute(Some(&notify), None, false, &mut check, &mut stop).await;
        assert_eq!(woken, (Wake::Pass, Duration::ZERO));
        // A policy that names other Secrets ends it at the next check.
        let woken = wait_a_minute(None, None, true, &mut check, &mut stop).await;
        assert!(woken.1 <= POLICY_CHECK, "{woken:?}");
        drop(lease);
        let woken = wait_a_minute(None, Some(&mut leadership), false, &mut check, &mut stop).await;
        assert_eq!(woken, (Wake::LeaseTaskGone, Duration::ZERO));
    }

    /// One wait due a minute from now (bounded at two): why it ended, and when.
    async fn wait_a_minute(
        changes: Option<&tokio::sync::Notify>,
        leadership: Option<&mut Leadership>,
        policy_moved: bool,
        check: &mut tokio::time::Interval,
        stop: &mut watch::Receiver<bool>,
    ) -> (Wake, Duration) {
        let start = Instant::now();
        let moved = move || policy_moved;
        let wait = Wait {
            changes,
            leadership,
            due: start + Duration::from_secs(60),
            check,
            policy_moved: &moved,
        };
        let woken = tokio::time::timeout(Duration::from_secs(120), wake(wait, stop))
            .await
            .unwrap();
        (woken, start.elapsed())
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max), Duration::from_secs(2));
        assert_eq!(backoff(3, max), Duration::from_secs(8));
        assert_eq!(backoff(40, max), max);
    }
}
