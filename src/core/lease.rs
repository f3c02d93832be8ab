//! Leader election over a `coordination.k8s.io/v1` Lease, decided as client-go's
//! `leaderelection` decides it. Pure: the shell reads the Lease, asks [`decide`] what to do, and
//! sends the write; times are the caller's monotonic clock.
//!
//! Exclusivity comes from optimistic concurrency, not from timestamps: every write that takes or
//! renews the Lease is an update carrying the `resourceVersion` that was read, so of two replicas
//! racing for a free Lease the apiserver accepts one and answers the other 409 Conflict. Expiry
//! is judged on the local clock only, from when this replica last saw the record change, never
//! from `renewTime` (which another machine's clock wrote): a follower takes over only after the
//! record has stood still for the whole lease duration as it measured it. A leader, in turn,
//! trusts its lease only until [`Held::valid_until`]: the time its last successful write was
//! *sent* plus the renew deadline, which ends before any follower can have measured a full
//! lease duration from the moment that write landed.

use std::time::{Duration, Instant};

/// How long a Lease stands without renewal before another replica may take it.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a leader keeps writing after its last successful renewal was sent. Shorter than
/// [`LEASE_DURATION`] by more than a request's timeout, so that a write started just before the
/// deadline has ended before a follower can take over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the Lease is read and renewed (or tried for).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// The Lease as read: what the decision needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `spec.holderIdentity`; `None` or empty when released.
    pub holder: Option<String>,
    /// `metadata.resourceVersion`: any change of the Lease changes it.
    pub resource_version: String,
    /// `spec.leaseTransitions`.
    pub transitions: i32,
    /// `spec.leaseDurationSeconds`, as its holder declared it (client-go reads the same): how long
    /// the record must stand still before another may take it.
    pub duration: Duration,
}

/// What this replica remembers of the Lease between reads: the last record it saw and when it
/// first saw it, on its own clock.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    seen: Option<(String, Instant)>,
}

impl Observed {
    /// Notes `record` as read at `now`; returns how long it has stood unchanged as this replica
    /// has seen it.
    pub fn note(&mut self, record: &Record, now: Instant) -> Duration {
        match &self.seen {
            Some((version, since)) if *version == record.resource_version => {
                now.saturating_duration_since(*since)
            }
            _ => {
                self.seen = Some((record.resource_version.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// Forgets what was seen (the Lease is gone).
    pub fn forget(&mut self) {
        self.seen = None;
    }
}

/// What to do after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// There is no Lease: create it, holding it.
    Create,
    /// Update the Lease (with the `resourceVersion` read) to hold it: `transitions` is the new
    /// `leaseTransitions`, and `acquired` says whether this replica is taking it rather than
    /// renewing it.
    Hold { transitions: i32, acquired: bool },
    /// Another replica holds it, and it has not stood still for a lease duration: follow.
    Follow { holder: String },
}

/// Decides what `me` does with `record`, which has stood unchanged for `unchanged_for` as this
/// replica has seen it (`None`: no Lease exists). Another holder's Lease is taken once it has stood
/// still for the duration that holder declared.
#[must_use]
pub fn decide(me: &str, record: Option<&Record>, unchanged_for: Duration) -> Step {
    let Some(record) = record else {
        return Step::Create;
    };
    match record.holder.as_deref().filter(|h| !h.is_empty()) {
        Some(holder) if holder == me => Step::Hold {
            transitions: record.transitions,
            acquired: false,
        },
        Some(holder) if unchanged_for < record.duration => Step::Follow {
            holder: holder.to_owned(),
        },
        // Released, or its holder stopped renewing it a lease duration ago.
        _ => Step::Hold {
            transitions: record.transitions.saturating_add(1),
            acquired: true,
        },
    }
}

/// A Lease this replica holds: until when it may act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The last successful write to the Lease was sent at `sent`; the lease is trusted until
    /// `sent + RENEW_DEADLINE`.
    pub valid_until: Instant,
}

impl Held {
    /// The Lease held by a write sent at `sent` that succeeded.
    #[must_use]
    pub fn since(sent: Instant) -> Self {
        Self {
            valid_until: sent + RENEW_DEADLINE,
        }
    }

    /// Whether an action that may take up to `lasting` can start at `now` and end while the
    /// Lease is still this replica's.
    #[must_use]
    pub fn allows(&self, now: Instant, lasting: Duration) -> bool {
        now + lasting <= self.valid_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, version: &str) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            resource_version: version.into(),
            transitions: 3,
            duration: LEASE_DURATION,
        }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide("a", None, Duration::ZERO), Step::Create);
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        for holder in [None, Some("")] {
            assert_eq!(
                decide("a", Some(&record(holder, "1")), Duration::ZERO),
                Step::Hold {
                    transitions: 4,
                    acquired: true
                }
            );
        }
    }

    #[test]
    fn its_own_lease_is_renewed() {
        assert_eq!(
            decide("a", Some(&record(Some("a"), "1")), LEASE_DURATION * 9),
            Step::Hold {
                transitions: 3,
                acquired: false
            }
        );
    }

    #[test]
    fn another_holder_is_followed_until_its_record_stood_still_a_lease_duration() {
        let held = record(Some("b"), "1");
        assert_eq!(
            decide("a", Some(&held), Duration::from_millis(14_999)),
            Step::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide("a", Some(&held), LEASE_DURATION),
            Step::Hold {
                transitions: 4,
                acquired: true
            }
        );
    }

    #[test]
    fn the_duration_its_holder_declared_is_the_one_waited_for() {
        let mut long = record(Some("b"), "1");
        long.duration = Duration::from_secs(600);
        assert_eq!(
            decide("a", Some(&long), LEASE_DURATION * 2),
            Step::Follow { holder: "b".into() }
        );
        assert!(matches!(
            decide("a", Some(&long), Duration::from_secs(600)),
            Step::Hold { acquired: true, .. }
        ));
    }

    #[test]
    fn expiry_is_measured_from_when_the_record_last_changed_on_this_clock() {
        let start = Instant::now();
        let mut observed = Observed::default();
        let first = record(Some("b"), "1");
        assert_eq!(observed.note(&first, start), Duration::ZERO);
        assert_eq!(
            observed.note(&first, start + Duration::from_secs(7)),
            Duration::from_secs(7)
        );
        // A renewal (a new resourceVersion) starts the count again.
        let renewed = record(Some("b"), "2");
        let later = start + Duration::from_secs(12);
        assert_eq!(observed.note(&renewed, later), Duration::ZERO);
        assert_eq!(
            observed.note(&renewed, later + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        observed.forget();
        assert_eq!(observed.note(&renewed, later), Duration::ZERO);
    }

    #[test]
    fn a_leader_acts_only_while_the_action_ends_before_its_deadline() {
        let sent = Instant::now();
        let held = Held::since(sent);
        let request = Duration::from_secs(4);
        assert!(held.allows(sent, request));
        // RENEW_DEADLINE is 10 s: a 4 s request may start up to 6 s after the renewal was sent.
        assert!(held.allows(sent + Duration::from_secs(6), request));
        assert!(!held.allows(sent + Duration::from_millis(6_001), request));
        // A follower takes over a lease duration after it saw the last renewal land, which is
        // after it was sent: the leader's deadline comes first, with a request to spare.
        const { assert!(RENEW_DEADLINE.as_secs() + 4 < LEASE_DURATION.as_secs()) };
    }
}
