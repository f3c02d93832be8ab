//! The server's Prometheus metrics, kept with `prometheus-client` and exposed as `OpenMetrics` text.
//!
//! No I/O. Every label value is an enum, so a label can never be misspelt or dropped, and every
//! labelled series is looked up once at start: answering a request costs one atomic add per
//! counter (plus the histogram's uncontended lock), never a map lookup or an allocation.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Metric, Registry, Unit},
};

use crate::core::mutate::{ObjectKind, Verdict};

/// An enum used as a label value: its variants, each with the text Prometheus shows.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in the order they are exposed.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The label value.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label_values!(
    /// The object kind of a request: the two kinds fixed, or anything else.
    Kind { Service => "Service", Deployment => "Deployment", Other => "other" }
);

label_values!(
    /// The admission operation; `none` when the request could not be read.
    Operation { Create => "CREATE", Update => "UPDATE", Delete => "DELETE", Connect => "CONNECT", None => "none" }
);

label_values!(
    /// How a request ended.
    Outcome {
        Patched => "patched",
        Unchanged => "unchanged",
        Skipped => "skipped",
        // An outpost object that could not be fixed; allowed with warnings.
        Warned => "warned",
        // Not an AdmissionReview that could be read: answered 4xx.
        Rejected => "rejected",
    }
);

label_values!(
    /// Why a request was answered 4xx. Also the `reason` of the `Status` body.
    Reason {
        NotJson => "not_json",
        BadShape => "bad_shape",
        BadApiVersion => "bad_api_version",
        BadKind => "bad_kind",
        NoRequest => "no_request",
        BodyTooLarge => "body_too_large",
        UnsupportedMediaType => "unsupported_media_type",
        MethodNotAllowed => "method_not_allowed",
        NotFound => "not_found",
        BodyTimeout => "body_timeout",
        // The request bytes in flight were at --max-inflight-bytes until the deadline.
        Overloaded => "overloaded",
    }
);

label_values!(
    /// The port a connection came to.
    Port { Admission => "admission", Health => "health" }
);

label_values!(
    /// Which limit made a connection give way (see `fair`).
    ShedReason {
        PeerPending => "peer_pending",
        PeerConnections => "peer_connections",
        MaxConnections => "max_connections",
    }
);

label_values!(
    /// What a connection that gave way had done.
    ShedState {
        // In its TLS handshake.
        Handshake => "handshake",
        // Connected, no request sent yet.
        NoRequest => "no_request",
        // Between requests; closed gracefully.
        Idle => "idle",
        // The new connection itself: every one that could give way was busy.
        New => "new",
    }
);

label_values!(
    /// The files that are polled and reloaded.
    Reloaded { Certificate => "certificate", ClientCa => "client_ca", Policy => "policy" }
);

label_values!(
    /// Whether changed content was taken or refused.
    ReloadResult { Success => "success", Failure => "failure" }
);

impl From<Option<ObjectKind>> for Kind {
    fn from(kind: Option<ObjectKind>) -> Self {
        match kind {
            Some(ObjectKind::Service) => Self::Service,
            Some(ObjectKind::Deployment) => Self::Deployment,
            None => Self::Other,
        }
    }
}

impl From<&kube::core::admission::Operation> for Operation {
    fn from(op: &kube::core::admission::Operation) -> Self {
        use kube::core::admission::Operation as Op;
        match op {
            Op::Create => Self::Create,
            Op::Update => Self::Update,
            Op::Delete => Self::Delete,
            Op::Connect => Self::Connect,
        }
    }
}

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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    kind: Kind,
    operation: Operation,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: Reason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShedLabels {
    port: Port,
    reason: ShedReason,
    state: ShedState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    what: Reloaded,
    result: ReloadResult,
}

/// Latency buckets in seconds: the webhook answers in well under a millisecond, the apiserver
/// gives up at `timeoutSeconds` (5 s here).
const BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 5.0,
];

/// A counter per value of one label enum, in the enum's `ALL` order.
fn children<L: Copy, S: Clone + std::hash::Hash + Eq>(
    family: &Family<S, Counter>,
    all: &[L],
    labels: impl Fn(L) -> S,
) -> Vec<Counter> {
    all.iter()
        .map(|l| family.get_or_create_owned(&labels(*l)))
        .collect()
}

/// `connections_shed`: a counter per port, reason and state, in their `ALL` orders.
fn shed_counters(registry: &mut Registry) -> Vec<Counter> {
    let family = Family::<ShedLabels, Counter>::default();
    registry.register(
        "connections_shed",
        "Connections closed to keep within a connection limit, by port, the limit reached, and what the connection had done (new: the arriving one, refused)",
        family.clone(),
    );
    let mut counters = Vec::new();
    for port in Port::ALL {
        for reason in ShedReason::ALL {
            counters.extend(children(&family, ShedState::ALL, |state| ShedLabels {
                port: *port,
                reason: *reason,
                state,
            }));
        }
    }
    counters
}

/// A metric of one series, registered under `name`.
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

fn index<L: PartialEq>(all: &[L], value: &L) -> usize {
    all.iter().position(|v| v == value).unwrap_or_default()
}

/// All the process's metrics, and the registry that exposes them.
pub struct Metrics {
    /// Behind a lock only so the cluster view can add its metrics after start; scrapes take it.
    registry: std::sync::Mutex<Registry>,
    /// Indexed by kind, operation, outcome (each in its `ALL` order).
    requests: Vec<Counter>,
    bad_requests: Vec<Counter>,
    latency: Histogram,
    patch_operations: Counter,
    warnings: Counter,
    /// Indexed by what, then result.
    reloads: Vec<Counter>,
    certificate_expiry: Gauge,
    connections_open: Gauge,
    connections_refused: Counter,
    /// Indexed by port, reason, state (each in its `ALL` order).
    connections_shed: Vec<Counter>,
    tls_handshake_failures: Counter,
    panics: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("outpost_webhook");
        let requests_family = Family::<RequestLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission requests answered, by object kind, operation and outcome",
            requests_family.clone(),
        );
        let mut requests = Vec::new();
        for kind in Kind::ALL {
            for operation in Operation::ALL {
                requests.extend(children(&requests_family, Outcome::ALL, |outcome| {
                    RequestLabels {
                        kind: *kind,
                        operation: *operation,
                        outcome,
                    }
                }));
            }
        }
        let reasons = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "bad_requests",
            "Requests answered with a 4xx, by reason",
            reasons.clone(),
        );
        let bad_requests = children(&reasons, Reason::ALL, |reason| ReasonLabels { reason });
        let latency = Histogram::new(BUCKETS);
        registry.register_with_unit(
            "admission_duration",
            "Time from request headers to response",
            Unit::Seconds,
            latency.clone(),
        );
        let patch_operations: Counter = registered(
            &mut registry,
            "patch_operations",
            "JSON patch operations sent",
        );
        let warnings: Counter =
            registered(&mut registry, "warnings", "Warnings sent to the apiserver");
        let reload_family = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "Reloads of changed certificate, client CA or policy files, by result; a failure keeps the old one",
            reload_family.clone(),
        );
        let mut reloads = Vec::new();
        for what in Reloaded::ALL {
            reloads.extend(children(&reload_family, ReloadResult::ALL, |result| {
                ReloadLabels {
                    what: *what,
                    result,
                }
            }));
        }
        let certificate_expiry: Gauge = registered(
            &mut registry,
            "certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate, in Unix seconds",
        );
        let connections_open: Gauge = registered(
            &mut registry,
            "connections_open",
            "TLS connections open now",
        );
        let connections_refused: Counter = registered(
            &mut registry,
            "connections_refused",
            "Admission connections closed at accept because a connection limit was reached and every connection that could give way was busy",
        );
        let connections_shed = shed_counters(&mut registry);
        let tls_handshake_failures: Counter = registered(
            &mut registry,
            "tls_handshake_failures",
            "Connections whose TLS handshake failed or timed out",
        );
        let panics: Counter = registered(
            &mut registry,
            "panics",
            "Admission request handlers and connection tasks that panicked; a handler's request is answered 500",
        );
        Self {
            registry: std::sync::Mutex::new(registry),
            requests,
            bad_requests,
            latency,
            patch_operations,
            warnings,
            reloads,
            certificate_expiry,
            connections_open,
            connections_refused,
            connections_shed,
            tls_handshake_failures,
            panics,
        }
    }
}

impl Metrics {
    /// Counts one answered admission request.
    pub fn request(&self, kind: Kind, operation: Operation, outcome: Outcome, elapsed: Duration) {
        let i = (index(Kind::ALL, &kind) * Operation::ALL.len()
            + index(Operation::ALL, &operation))
            * Outcome::ALL.len()
            + index(Outcome::ALL, &outcome);
        if let Some(c) = self.requests.get(i) {
            c.inc();
        }
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Counts a request answered 4xx.
    pub fn bad_request(&self, reason: Reason, elapsed: Duration) {
        if let Some(c) = self.bad_requests.get(index(Reason::ALL, &reason)) {
            c.inc();
        }
        self.request(Kind::Other, Operation::None, Outcome::Rejected, elapsed);
    }

    /// Counts the operations and warnings of one answer.
    pub fn answered(&self, ops: usize, warnings: usize) {
        self.patch_operations
            .inc_by(u64::try_from(ops).unwrap_or(u64::MAX));
        self.warnings
            .inc_by(u64::try_from(warnings).unwrap_or(u64::MAX));
    }

    /// Counts a reload attempt that found changed content.
    pub fn reload(&self, what: Reloaded, ok: bool) {
        let result = if ok {
            ReloadResult::Success
        } else {
            ReloadResult::Failure
        };
        let i = index(Reloaded::ALL, &what) * ReloadResult::ALL.len()
            + index(ReloadResult::ALL, &result);
        if let Some(c) = self.reloads.get(i) {
            c.inc();
        }
    }

    /// A reload count, for tests and logs: `(successes, failures)`.
    #[must_use]
    pub fn reloads(&self, what: Reloaded) -> (u64, u64) {
        let at = index(Reloaded::ALL, &what) * ReloadResult::ALL.len();
        let get = |i: usize| self.reloads.get(i).map_or(0, Counter::get);
        (get(at), get(at + 1))
    }

    /// Sets the serving certificate's `notAfter`, in Unix seconds.
    pub fn certificate_expiry(&self, unix_seconds: i64) {
        self.certificate_expiry.set(unix_seconds);
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    /// TLS connections open now.
    #[must_use]
    pub fn connections_open(&self) -> i64 {
        self.connections_open.get()
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts a connection closed to keep within a limit.
    pub fn shed(&self, port: Port, reason: ShedReason, state: ShedState) {
        let i = (index(Port::ALL, &port) * ShedReason::ALL.len() + index(ShedReason::ALL, &reason))
            * ShedState::ALL.len()
            + index(ShedState::ALL, &state);
        if let Some(c) = self.connections_shed.get(i) {
            c.inc();
        }
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Counts a request handler or connection task that panicked.
    pub fn panicked(&self) {
        self.panics.inc();
    }

    /// Request handlers and connection tasks that panicked.
    #[must_use]
    pub fn panics(&self) -> u64 {
        self.panics.get()
    }

    /// Adds the cluster view's metrics: its cache state and the reconciler's.
    pub fn register_cluster(&self, cluster: &crate::cluster::Running) {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cluster
            .metrics
            .register(&mut registry, std::sync::Arc::clone(&cluster.cache));
        if let Some(tls) = &cluster.tls {
            registry.register_collector(Box::new(CaExpiry(std::sync::Arc::clone(tls))));
        }
    }

    /// The `OpenMetrics` text exposition, which Prometheus reads.
    #[must_use]
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = prometheus_client::encoding::text::encode(&mut s, &registry);
        s
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_reloads() {
        let m = Metrics::default();
        m.request(
            Kind::Deployment,
            Operation::Create,
            Outcome::Patched,
            Duration::from_micros(300),
        );
        m.bad_request(Reason::NotJson, Duration::from_micros(10));
        m.answered(7, 1);
        m.reload(Reloaded::Policy, false);
        m.reload(Reloaded::ClientCa, true);
        m.certificate_expiry(1_900_000_000);
        m.shed(Port::Health, ShedReason::PeerPending, ShedState::NoRequest);
        assert_eq!(m.reloads(Reloaded::Policy), (0, 1));
        assert_eq!(m.reloads(Reloaded::ClientCa), (1, 0));
        let text = m.render();
        for line in [
            "outpost_webhook_admission_requests_total{kind=\"Deployment\",operation=\"CREATE\",outcome=\"patched\"} 1",
            "outpost_webhook_admission_requests_total{kind=\"other\",operation=\"none\",outcome=\"rejected\"} 1",
            "outpost_webhook_admission_requests_total{kind=\"Service\",operation=\"UPDATE\",outcome=\"warned\"} 0",
            "outpost_webhook_bad_requests_total{reason=\"not_json\"} 1",
            "outpost_webhook_bad_requests_total{reason=\"body_timeout\"} 0",
            "outpost_webhook_admission_duration_seconds_bucket{le=\"0.00025\"} 1",
            "outpost_webhook_admission_duration_seconds_bucket{le=\"0.0005\"} 2",
            "outpost_webhook_admission_duration_seconds_count 2",
            "outpost_webhook_patch_operations_total 7",
            "outpost_webhook_warnings_total 1",
            "outpost_webhook_reloads_total{what=\"policy\",result=\"failure\"} 1",
            "outpost_webhook_reloads_total{what=\"client_ca\",result=\"success\"} 1",
            "outpost_webhook_certificate_expiry_timestamp_seconds 1900000000",
            "outpost_webhook_connections_open 0",
            "outpost_webhook_connections_refused_total 0",
            "outpost_webhook_tls_handshake_failures_total 0",
            "outpost_webhook_connections_shed_total{port=\"health\",reason=\"peer_pending\",state=\"no_request\"} 1",
            "outpost_webhook_connections_shed_total{port=\"admission\",reason=\"max_connections\",state=\"new\"} 0",
            "outpost_webhook_panics_total 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}

/// The self-managed CA's `notAfter`, read at each scrape; absent until the Secret is read.
#[derive(Debug)]
struct CaExpiry(std::sync::Arc<crate::cluster::selftls::Status>);

impl prometheus_client::collector::Collector for CaExpiry {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Some(not_after) = self.0.ca_not_after() else {
            return Ok(());
        };
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(not_after);
        let e = encoder.encode_descriptor(
            "ca_expiry_timestamp_seconds",
            "notAfter of the self-managed CA that signed the serving certificate, in Unix seconds",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(e)
    }
}
