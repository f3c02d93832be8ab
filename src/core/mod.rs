//! The pure core: a policy and an object in, RFC 6902 operations and warnings out.
//!
//! No I/O, no clock, no randomness; nothing here imports `serve` or `cmd`. [`admission`] reads and
//! writes the `AdmissionReview` envelope, [`mutate`] decides, [`cluster`] is what it may know of the
//! cluster, [`lease`] decides leader election, [`doctor`] checks a cluster's snapshot, [`policy`] says what to fix,
//! [`quantity`] compares values as the apiserver stores them, [`tree`] is what the rules read an
//! object through, and [`laws`] checks the laws every
//! answer obeys (used by the golden, property and fuzz tests).

pub mod admission;
pub mod cluster;
pub mod doctor;
pub mod laws;
pub mod lease;
pub mod mutate;
pub mod policy;
pub mod quantity;
pub mod reconcile;
pub mod selftls;
pub mod tree;

/// Folds a parser's multi-line message onto one line, for logs, `kubectl` and `file:line:` errors.
#[must_use]
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
