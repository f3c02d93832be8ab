//! Counters, gauges and a latency histogram, rendered in the Prometheus text format.
//!
//! No I/O. Every label set is fixed and small, so each series is one atomic: recording costs a
//! few relaxed atomic adds and never allocates or locks on the request path.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use crate::mutate::{ObjectKind, Verdict};

/// How a request ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Patched,
    Unchanged,
    Skipped,
    /// An outpost object that could not be fixed; allowed with warnings.
    Warned,
    /// Not an `AdmissionReview` we could read: answered 4xx.
    Rejected,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Patched, "patched"),
    (Outcome::Unchanged, "unchanged"),
    (Outcome::Skipped, "skipped"),
    (Outcome::Warned, "warned"),
    (Outcome::Rejected, "rejected"),
];

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Patched => Self::Patched,
            Verdict::Unchanged => Self::Unchanged,
            Verdict::Skipped => Self::Skipped,
            Verdict::Unfixable => Self::Warned,
        }
    }
}

const KINDS: [&str; 3] = ["Service", "Deployment", "other"];
const OPERATIONS: [&str; 5] = ["CREATE", "UPDATE", "DELETE", "CONNECT", "none"];

/// The kind label: the two kinds we fix, or `other`.
#[must_use]
pub fn kind_index(kind: Option<ObjectKind>) -> usize {
    match kind {
        Some(ObjectKind::Service) => 0,
        Some(ObjectKind::Deployment) => 1,
        None => 2,
    }
}

/// The operation label; `none` when the request could not be read.
#[must_use]
pub fn operation_index(operation: Option<&str>) -> usize {
    OPERATIONS
        .iter()
        .position(|o| Some(*o) == operation)
        .unwrap_or(OPERATIONS.len() - 1)
}

/// Why a request was rejected, as the `reason` label of the bad-request counter.
pub const BAD_REQUEST_REASONS: [&str; 10] = [
    "not_json",
    "bad_shape",
    "bad_api_version",
    "bad_kind",
    "no_request",
    "body_too_large",
    "unsupported_media_type",
    "method_not_allowed",
    "not_found",
    "body_timeout",
];

/// Things that are reloaded from files.
#[derive(Debug, Clone, Copy)]
pub enum Reloaded {
    Certificate = 0,
    Policy = 1,
}

/// Latency buckets in seconds: the webhook answers in well under a millisecond, the apiserver
/// gives up at `timeoutSeconds` (5 s here).
const BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// All the process's metrics.
#[derive(Default)]
pub struct Metrics {
    requests: [[[AtomicU64; OUTCOMES.len()]; OPERATIONS.len()]; KINDS.len()],
    bad_requests: [AtomicU64; BAD_REQUEST_REASONS.len()],
    latency: Histogram,
    patch_operations: AtomicU64,
    warnings: AtomicU64,
    reloads: [[AtomicU64; 2]; 2],
    certificate_expiry: AtomicI64,
    connections_open: AtomicI64,
    connections_refused: AtomicU64,
    tls_handshake_failures: AtomicU64,
}

impl Metrics {
    /// Counts one answered admission request.
    pub fn request(&self, kind: usize, operation: usize, outcome: Outcome, elapsed: Duration) {
        let o = OUTCOMES
            .iter()
            .position(|(x, _)| *x == outcome)
            .unwrap_or(0);
        if let Some(c) = self
            .requests
            .get(kind)
            .and_then(|k| k.get(operation))
            .and_then(|op| op.get(o))
        {
            c.fetch_add(1, Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency.count.fetch_add(1, Relaxed);
        self.latency.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// Counts a rejected request by reason (one of [`BAD_REQUEST_REASONS`]).
    pub fn bad_request(&self, reason: &str, elapsed: Duration) {
        if let Some(i) = BAD_REQUEST_REASONS.iter().position(|r| *r == reason)
            && let Some(c) = self.bad_requests.get(i)
        {
            c.fetch_add(1, Relaxed);
        }
        self.request(
            kind_index(None),
            operation_index(None),
            Outcome::Rejected,
            elapsed,
        );
    }

    /// Counts the operations and warnings of one answer.
    pub fn answered(&self, ops: usize, warnings: usize) {
        self.patch_operations
            .fetch_add(u64::try_from(ops).unwrap_or(u64::MAX), Relaxed);
        self.warnings
            .fetch_add(u64::try_from(warnings).unwrap_or(u64::MAX), Relaxed);
    }

    /// Counts a reload attempt that found changed content.
    pub fn reload(&self, what: Reloaded, ok: bool) {
        if let Some(c) = self
            .reloads
            .get(what as usize)
            .and_then(|r| r.get(usize::from(!ok)))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A reload count, for tests and logs: `(successes, failures)`.
    #[must_use]
    pub fn reloads(&self, what: Reloaded) -> (u64, u64) {
        self.reloads.get(what as usize).map_or((0, 0), |r| {
            (
                r.first().map_or(0, |c| c.load(Relaxed)),
                r.get(1).map_or(0, |c| c.load(Relaxed)),
            )
        })
    }

    /// Sets the serving certificate's `notAfter`, in Unix seconds.
    pub fn certificate_expiry(&self, unix_seconds: i64) {
        self.certificate_expiry.store(unix_seconds, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(8 * 1024);
        self.render_requests(&mut s);
        self.render_latency(&mut s);
        self.render_rest(&mut s);
        s
    }

    fn render_requests(&self, w: &mut String) {
        let name = "outpost_webhook_admission_requests_total";
        header(
            w,
            name,
            "counter",
            "Admission requests answered, by object kind, operation and outcome.",
        );
        for (k, kind) in KINDS.iter().enumerate() {
            for (o, op) in OPERATIONS.iter().enumerate() {
                for (i, (_, outcome)) in OUTCOMES.iter().enumerate() {
                    let c = self
                        .requests
                        .get(k)
                        .and_then(|x| x.get(o))
                        .and_then(|x| x.get(i));
                    let v = c.map_or(0, |c| c.load(Relaxed));
                    if v > 0 {
                        let _ = writeln!(
                            w,
                            "{name}{{kind=\"{kind}\",operation=\"{op}\",outcome=\"{outcome}\"}} {v}"
                        );
                    }
                }
            }
        }
        let name = "outpost_webhook_bad_requests_total";
        header(
            w,
            name,
            "counter",
            "Requests answered with a 4xx, by reason.",
        );
        for (reason, c) in BAD_REQUEST_REASONS.iter().zip(&self.bad_requests) {
            let _ = writeln!(w, "{name}{{reason=\"{reason}\"}} {}", c.load(Relaxed));
        }
    }

    fn render_latency(&self, w: &mut String) {
        let name = "outpost_webhook_admission_duration_seconds";
        header(
            w,
            name,
            "histogram",
            "Time from request headers to response, in seconds.",
        );
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency.buckets) {
            let _ = writeln!(
                w,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.latency.count.load(Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let sum = self.latency.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(w, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(w, "{name}_sum {sum}");
        let _ = writeln!(w, "{name}_count {count}");
    }

    fn render_rest(&self, w: &mut String) {
        counter(
            w,
            "outpost_webhook_patch_operations_total",
            "JSON patch operations sent.",
            self.patch_operations.load(Relaxed),
        );
        counter(
            w,
            "outpost_webhook_warnings_total",
            "Warnings sent to the apiserver.",
            self.warnings.load(Relaxed),
        );
        let name = "outpost_webhook_reloads_total";
        header(
            w,
            name,
            "counter",
            "Reloads of changed certificate or policy files, by result. A failure keeps the old one.",
        );
        for (what, label) in [
            (Reloaded::Certificate, "certificate"),
            (Reloaded::Policy, "policy"),
        ] {
            let (ok, failed) = self.reloads(what);
            let _ = writeln!(w, "{name}{{what=\"{label}\",result=\"success\"}} {ok}");
            let _ = writeln!(w, "{name}{{what=\"{label}\",result=\"failure\"}} {failed}");
        }
        let name = "outpost_webhook_certificate_expiry_timestamp_seconds";
        header(
            w,
            name,
            "gauge",
            "notAfter of the serving certificate, in Unix seconds.",
        );
        let _ = writeln!(w, "{name} {}", self.certificate_expiry.load(Relaxed));
        let name = "outpost_webhook_connections_open";
        header(w, name, "gauge", "TLS connections open now.");
        let _ = writeln!(w, "{name} {}", self.connections_open.load(Relaxed));
        counter(
            w,
            "outpost_webhook_connections_refused_total",
            "Connections closed at once because --max-connections were open.",
            self.connections_refused.load(Relaxed),
        );
        counter(
            w,
            "outpost_webhook_tls_handshake_failures_total",
            "Connections whose TLS handshake failed or timed out.",
            self.tls_handshake_failures.load(Relaxed),
        );
    }
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(w: &mut String, name: &str, help: &str, value: u64) {
    header(w, name, "counter", help);
    let _ = writeln!(w, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_reloads() {
        let m = Metrics::default();
        m.request(
            kind_index(Some(ObjectKind::Deployment)),
            operation_index(Some("CREATE")),
            Outcome::Patched,
            Duration::from_micros(300),
        );
        m.bad_request("not_json", Duration::from_micros(10));
        m.answered(7, 1);
        m.reload(Reloaded::Policy, false);
        m.certificate_expiry(1_900_000_000);
        let text = m.render();
        for line in [
            "outpost_webhook_admission_requests_total{kind=\"Deployment\",operation=\"CREATE\",outcome=\"patched\"} 1",
            "outpost_webhook_admission_requests_total{kind=\"other\",operation=\"none\",outcome=\"rejected\"} 1",
            "outpost_webhook_bad_requests_total{reason=\"not_json\"} 1",
            "outpost_webhook_admission_duration_seconds_bucket{le=\"0.00025\"} 1",
            "outpost_webhook_admission_duration_seconds_bucket{le=\"0.0005\"} 2",
            "outpost_webhook_admission_duration_seconds_count 2",
            "outpost_webhook_patch_operations_total 7",
            "outpost_webhook_reloads_total{what=\"policy\",result=\"failure\"} 1",
            "outpost_webhook_certificate_expiry_timestamp_seconds 1900000000",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
