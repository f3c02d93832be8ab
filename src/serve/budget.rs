//! The memory budget: how many request bytes may be held at once across every connection, and
//! the worst-case resident memory that follows from the limits.
//!
//! No I/O. A request reserves its bytes before a byte of its body is read and keeps them until
//! its answer is built, so the bytes held for bodies and what is parsed from them can never exceed
//! `--max-inflight-bytes`, however many connections or streams a client opens.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

/// A body this small or smaller (the apiserver's reviews of outpost objects are 10 to 50 KB) is
/// served from its own lane, so large bodies queued for the budget never delay it.
pub const SMALL_BODY: usize = 64 * 1024;
/// The part of the budget kept for small bodies.
pub const SMALL_LANE: usize = 4 << 20;
/// What a request holds per byte of its body: the body itself, and at most as many bytes again in
/// the strings parsed from it (every kept string is a distinct slice of the body).
pub const BYTES_PER_BODY_BYTE: usize = 2;
/// How many requests are parsed and answered at once. Parsing is synchronous, so this bounds the
/// node memory below however many worker threads the runtime has.
pub const PARSE_SLOTS: usize = 2;
/// The most one parse builds beyond its strings: `prune`'s cap of kept values, at about 700 bytes
/// each for a one-member JSON object (a `BTreeMap` leaf), plus the response.
pub const PARSE_RESERVE: usize = 2 << 20;
/// The default largest body: an UPDATE carries the object and its old version, each at most
/// etcd's default `--max-request-bytes` of 1.5 MiB, plus 64 KiB for the review's envelope
/// (`userInfo`, `options`, names).
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * (3 << 19) + (64 << 10);
/// The default budget: room for four largest bodies (at two bytes held per body byte) beside the
/// small lane.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 32 << 20;
/// Resident memory with no request in flight, measured (about 10 MiB in a release build, see
/// docs/reliability.md), with room for the allocator's slack.
pub const BASE_RSS: usize = 16 << 20;
/// The most one open connection holds outside the budget: the HTTP/2 connection window of unread
/// body data, the headers of its concurrent streams, hyper's HTTP/1 read buffer and rustls'
/// record buffers. See `listen`.
pub const PER_CONNECTION: usize = super::listen::PER_CONNECTION_BYTES;
/// The most one health connection holds: hyper's HTTP/1 buffer and the answer being written.
pub const HEALTH_PER_CONNECTION: usize = super::listen::HEALTH_PER_CONNECTION_BYTES;

/// Budget permits are KiB, so that one `acquire_many` (a `u32`) covers any body.
const UNIT: usize = 1024;

/// Why a budget is refused at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "--max-inflight-bytes {budget} cannot hold one largest body: it must be at least \
         {needed} ({BYTES_PER_BODY_BYTE} x --max-body-bytes {max_body} + {SMALL_LANE} for small bodies)"
    )]
    TooSmall {
        budget: usize,
        max_body: usize,
        needed: usize,
    },
}

/// The smallest budget that serves one largest body beside the small lane.
#[must_use]
pub fn minimum_budget(max_body: usize) -> usize {
    max_body
        .saturating_mul(BYTES_PER_BODY_BYTE)
        .saturating_add(SMALL_LANE)
}

/// Checks that `budget` can serve a body of `max_body`.
///
/// # Errors
/// When it cannot.
pub fn check(budget: usize, max_body: usize) -> Result<(), BudgetError> {
    let needed = minimum_budget(max_body);
    if budget < needed {
        return Err(BudgetError::TooSmall {
            budget,
            max_body,
            needed,
        });
    }
    Ok(())
}

/// The worst-case resident memory of a server with these limits, in bytes:
/// `BASE_RSS + connections x PER_CONNECTION + health connections x HEALTH_PER_CONNECTION +
/// max_inflight_bytes + PARSE_SLOTS x PARSE_RESERVE`, where each port's connections are its
/// limit and the idle ones shed and still closing ([`super::fair::Limits::worst_case`]).
#[must_use]
pub fn worst_case_rss(
    max_inflight_bytes: usize,
    max_connections: usize,
    health_max_connections: usize,
) -> usize {
    let admission = super::fair::Limits {
        max: max_connections,
        per_peer: max_connections,
        pending_per_peer: max_connections,
    };
    let health = super::health_limits(health_max_connections);
    BASE_RSS
        .saturating_add(admission.worst_case().saturating_mul(PER_CONNECTION))
        .saturating_add(health.worst_case().saturating_mul(HEALTH_PER_CONNECTION))
        .saturating_add(max_inflight_bytes)
        .saturating_add(PARSE_SLOTS * PARSE_RESERVE)
}

/// The request bytes in flight across all connections.
#[derive(Debug)]
pub struct Budget {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    parse: Semaphore,
    max_body: usize,
}

/// Bytes reserved for one request; returned when dropped.
#[derive(Debug)]
pub struct Reserved {
    _permit: OwnedSemaphorePermit,
    /// The most body bytes this reservation covers.
    pub body_bytes: usize,
}

impl Budget {
    /// A budget of `total` bytes for bodies of at most `max_body`. A `total` too small for one
    /// largest body (see [`check`], which `prepare` applies) is raised to [`minimum_budget`].
    #[must_use]
    pub fn new(total: usize, max_body: usize) -> Self {
        let total = total.max(minimum_budget(max_body));
        Self {
            small: Arc::new(Semaphore::new(SMALL_LANE / UNIT)),
            large: Arc::new(Semaphore::new((total - SMALL_LANE) / UNIT)),
            parse: Semaphore::new(PARSE_SLOTS),
            max_body,
        }
    }

    /// Waits until the bytes for a body of `declared` bytes (or, when no length is declared, the
    /// largest body) are free, and reserves them. The caller bounds the wait by the request's
    /// deadline.
    pub async fn reserve(&self, declared: Option<usize>) -> Option<Reserved> {
        let body_bytes = declared.unwrap_or(self.max_body).min(self.max_body);
        let lane = if declared.is_some_and(|n| n <= SMALL_BODY) {
            &self.small
        } else {
            &self.large
        };
        let units = body_bytes
            .saturating_mul(BYTES_PER_BODY_BYTE)
            .div_ceil(UNIT)
            .max(1);
        let permit = Arc::clone(lane)
            .acquire_many_owned(u32::try_from(units).ok()?)
            .await
            .ok()?;
        Some(Reserved {
            _permit: permit,
            body_bytes,
        })
    }

    /// One of the [`PARSE_SLOTS`], held while a body is parsed and answered.
    pub async fn parse_slot(&self) -> Option<SemaphorePermit<'_>> {
        self.parse.acquire().await.ok()
    }

    /// Budget bytes free now, small and large lanes together.
    #[must_use]
    pub fn available(&self) -> usize {
        (self.small.available_permits() + self.large.available_permits()) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_body_limit_holds_an_update_of_two_largest_etcd_objects() {
        assert_eq!(DEFAULT_MAX_BODY_BYTES, 3 * 1024 * 1024 + 64 * 1024);
        check(DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_MAX_BODY_BYTES).unwrap();
        assert!(check(8 << 20, DEFAULT_MAX_BODY_BYTES).is_err());
    }

    #[tokio::test]
    async fn reservations_never_exceed_the_budget_and_small_bodies_have_their_own_lane() {
        let budget = Budget::new(minimum_budget(1 << 20), 1 << 20);
        let total = budget.available();
        let big = budget.reserve(None).await.unwrap();
        assert_eq!(big.body_bytes, 1 << 20);
        // The large lane is full: a second largest body waits.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            budget.reserve(Some(1 << 20)),
        )
        .await;
        assert!(waiting.is_err());
        // A small one does not.
        let small = budget.reserve(Some(12_000)).await.unwrap();
        assert!(budget.available() < total);
        drop((big, small));
        assert_eq!(budget.available(), total);
        // A declared length over the limit is capped at the limit.
        assert_eq!(
            budget.reserve(Some(64 << 20)).await.unwrap().body_bytes,
            1 << 20
        );
    }

    #[test]
    fn the_worst_case_grows_with_connections_and_budget() {
        let base = worst_case_rss(0, 8, 8);
        assert_eq!(
            base,
            BASE_RSS + PARSE_SLOTS * PARSE_RESERVE + 9 * PER_CONNECTION + 9 * HEALTH_PER_CONNECTION
        );
        // An eighth of each port's limit may still be closing after being shed as idle.
        assert_eq!(
            worst_case_rss(1 << 20, 16, 8) - base,
            (1 << 20) + 9 * PER_CONNECTION
        );
    }

    #[test]
    fn the_defaults_stay_within_96_mib() {
        let bound = worst_case_rss(
            DEFAULT_MAX_INFLIGHT_BYTES,
            crate::serve::DEFAULT_MAX_CONNECTIONS,
            crate::serve::DEFAULT_HEALTH_MAX_CONNECTIONS,
        );
        assert!(bound <= 96 << 20, "{}", bound >> 20);
    }
}
