//! Holds the reconciler's Lease, so that one replica at a time writes; the decisions are
//! `core::lease`'s.
//!
//! Network I/O: reads, creates and updates one `coordination.k8s.io/v1` Lease with the bounded
//! client (short timeouts, no retries), every [`RETRY_PERIOD`]. What it publishes is a [`Held`]
//! with a deadline, not a flag: a replica that can no longer reach the apiserver stops writing at
//! that deadline on its own clock, whether or not it has heard back, before another replica can
//! take over. On stop the Lease is released, so another replica takes over at once.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep},
};
use tracing::{debug, info, warn};

use super::{
    LEASE_NAME,
    cache::{Cache, Refusal},
    reconciler::{FIELD_MANAGER, backoff, forbidden, stopped},
};
use crate::core::lease::{Held, LEASE_DURATION, Observed, RETRY_PERIOD, Record, Step, decide};

/// Whether this replica holds the Lease now, and until when.
pub type Leadership = watch::Receiver<Option<Held>>;

/// True when `leadership` allows an action lasting up to `lasting` to start now.
#[must_use]
pub fn may_act(leadership: &Leadership, lasting: Duration) -> bool {
    leadership
        .borrow()
        .is_some_and(|h| h.allows(Instant::now().into_std(), lasting))
}

/// The verbs the Lease needs, named when the apiserver's message does not say which it refused.
const LEASE_VERBS: &str = "get, create, update";

/// Holds the Lease [`LEASE_NAME`] in `namespace` as `identity` until `stop` turns true.
///
/// Nothing waits for it: an apiserver that is down or a Lease that is forbidden must not hold up
/// admission. A 403 is recorded in `cache` and logged once; other failures are logged and tried
/// again. While it holds the Lease it tries every [`RETRY_PERIOD`]; otherwise refusals back off
/// (two seconds, doubling up to `max_backoff`).
#[must_use]
pub fn hold(
    client: Client,
    namespace: String,
    identity: String,
    cache: Arc<Cache>,
    max_backoff: Duration,
    mut stop: watch::Receiver<bool>,
) -> (Leadership, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let api = Api::<Lease>::namespaced(client, &namespace);
        let mut observed = Observed::default();
        let mut last: Option<Lease> = None;
        let mut failures: u32 = 0;
        loop {
            let held_before = *tx.borrow();
            match attempt(&api, &identity, &mut observed).await {
                Ok((held, lease)) => {
                    failures = 0;
                    cache.allow(
                        &["get", "create", "update", LEASE_VERBS],
                        "leases",
                        None,
                        &namespace,
                    );
                    match (held_before.is_some(), &held) {
                        (false, Some(_)) => {
                            info!(%identity, "This replica holds the reconciler's Lease: it writes");
                        }
                        (true, None) => {
                            info!(%identity, "This replica lost the reconciler's Lease: it stops writing");
                        }
                        _ => {}
                    }
                    last = lease;
                    publish(&tx, held);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    refused(&cache, &namespace, &e);
                    // What was held stays held until its deadline, and no longer: the reconciler
                    // checks the deadline before each write.
                    if held_before.is_some_and(|h| Instant::now().into_std() >= h.valid_until) {
                        warn!(%identity, "The reconciler's Lease ran out unrenewed: this replica stops writing");
                        tx.send_replace(None);
                    }
                }
            }
            let holding = tx.borrow().is_some();
            let wait = if holding || failures == 0 {
                RETRY_PERIOD
            } else {
                backoff(failures, max_backoff)
            };
            // Wake at the deadline too, so that a lease that runs out is published as lost.
            let deadline = (*tx.borrow()).map(|h| Instant::from_std(h.valid_until));
            tokio::select! {
                () = sleep(wait) => {}
                () = until(deadline) => {
                    tx.send_replace(None);
                    warn!(%identity, "The reconciler's Lease ran out unrenewed: this replica stops writing");
                }
                () = stopped(&mut stop) => {
                    if tx.send_replace(None).is_some() && let Some(lease) = last {
                        release(&api, &identity, lease).await;
                    }
                    return;
                }
            }
        }
    });
    (rx, task)
}

/// Puts `held` in force; wakes the readers only when this replica starts or stops holding the
/// Lease. A renewal only moves the deadline, which readers read when they act: waking them every
/// `RETRY_PERIOD` would defeat the reconciler's backoff and resync.
fn publish(tx: &watch::Sender<Option<Held>>, held: Option<Held>) {
    tx.send_if_modified(|current| {
        let changed = current.is_some() != held.is_some();
        *current = held;
        changed
    });
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One read and, when the decision says so, one write. `Ok(Some)`: this replica holds the Lease
/// (and the Lease as written); `Ok(None)`: another does, or won the race.
async fn attempt(
    api: &Api<Lease>,
    identity: &str,
    observed: &mut Observed,
) -> Result<(Option<Held>, Option<Lease>), kube::Error> {
    let current = api.get_opt(LEASE_NAME).await?;
    let read = current.as_ref().map(record);
    let unchanged_for = if let Some(r) = &read {
        observed.note(r, Instant::now().into_std())
    } else {
        observed.forget();
        Duration::ZERO
    };
    let params = PostParams {
        field_manager: Some(field_manager(identity)),
        ..PostParams::default()
    };
    let now = Timestamp::now();
    let (sent, written) = match decide(identity, read.as_ref(), unchanged_for) {
        Step::Follow { holder } => {
            debug!(%holder, "Another replica holds the reconciler's Lease");
            return Ok((None, None));
        }
        Step::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(identity, now, now, 0)),
            };
            let sent = Instant::now();
            (sent, api.create(&params, &lease).await)
        }
        Step::Hold {
            transitions,
            acquired,
        } => {
            let Some(mut lease) = current else {
                return Ok((None, None));
            };
            let acquire = if acquired {
                now
            } else {
                lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.acquire_time.as_ref())
                    .map_or(now, |t| t.0)
            };
            // The resourceVersion read stays on the object: the update is refused (409) if the
            // Lease changed since, so two replicas can never both take it.
            lease.spec = Some(spec(identity, acquire, now, transitions));
            let sent = Instant::now();
            (sent, api.replace(LEASE_NAME, &params, &lease).await)
        }
    };
    match written {
        Ok(lease) => {
            observed.note(&record(&lease), Instant::now().into_std());
            Ok((Some(Held::since(sent.into_std())), Some(lease)))
        }
        // Another replica wrote first: it holds the Lease.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok((None, None)),
        Err(e) => Err(e),
    }
}

/// The field manager of this replica's Lease writes: one per identity, so `managedFields` names
/// the replica that last wrote it. (Exclusivity does not rest on it: every write carries the
/// resourceVersion read.) The apiserver allows 128 characters.
fn field_manager(identity: &str) -> String {
    let mut manager = format!("{FIELD_MANAGER}/{identity}");
    if let Some((cut, _)) = manager.char_indices().nth(128) {
        manager.truncate(cut);
    }
    manager
}

fn record(lease: &Lease) -> Record {
    let spec = lease.spec.as_ref();
    Record {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
        duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|d| u64::try_from(d).ok())
            .filter(|d| *d > 0)
            .map_or(LEASE_DURATION, Duration::from_secs),
    }
}

fn spec(identity: &str, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: i32::try_from(LEASE_DURATION.as_secs()).ok(),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(renewed)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Gives the Lease up, so another replica takes it at its next try rather than after the lease
/// duration. A failure only means the Lease expires instead.
async fn release(api: &Api<Lease>, identity: &str, mut lease: Lease) {
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }
    let params = PostParams {
        field_manager: Some(field_manager(identity)),
        ..PostParams::default()
    };
    match api.replace(LEASE_NAME, &params, &lease).await {
        Ok(_) => info!("Released the reconciler's Lease"),
        Err(e) => debug!(error = %e, "The Lease could not be released; it expires instead"),
    }
}

/// Logs a failed Lease request; a 403 is recorded in the cache and logged once.
fn refused(cache: &Cache, namespace: &str, e: &kube::Error) {
    let Some(status) = forbidden(e) else {
        warn!(error = %e, "The reconciler's Lease cannot be read or renewed; tried again");
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
    // The Lease is read, then created or updated: the latest refusal is the one in the way, and
    // an earlier one was allowed since.
    let earlier: Vec<&str> = ["get", "create", "update", LEASE_VERBS]
        .into_iter()
        .filter(|v| *v != verb)
        .collect();
    cache.allow(&earlier, "leases", None, namespace);
    if new {
        warn!(
            forbidden = %what,
            answer = %status.message,
            "The apiserver refused the reconciler's Lease: RBAC must allow it. Tried again with \
             backoff; this replica does not write meanwhile"
        );
    }
}

/// The verb in the apiserver's RBAC refusal: `... cannot get resource "leases" ...`.
#[must_use]
pub fn refused_verb(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once(" cannot ")?;
    let (verb, rest) = rest.split_once(' ')?;
    rest.starts_with("resource ").then_some(verb)
}
