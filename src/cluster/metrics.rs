//! The cluster view's metrics: cache sync and object counts, leadership, and reconcile writes by
//! kind, reason and result. No I/O; registered into the server's registry.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use super::{cache::Cache, lease::Leadership};
use crate::core::{mutate::ObjectKind, reconcile::Reason};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WriteLabels {
    kind: &'static str,
    reason: &'static str,
    result: &'static str,
}

/// The metrics the cluster view keeps itself.
#[derive(Debug)]
pub struct Metrics {
    leadership: Leadership,
    writes: Family<WriteLabels, Counter>,
}

impl Metrics {
    /// Metrics that read whether this replica leads from `leadership` at each scrape.
    #[must_use]
    pub fn new(leadership: Leadership) -> Self {
        Self {
            leadership,
            writes: Family::default(),
        }
    }

    /// Counts one reconcile write.
    pub fn write(&self, kind: ObjectKind, reason: Reason, ok: bool) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.as_str(),
                reason: reason.as_str(),
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// Adds these metrics, and the cache's state read at each scrape, to `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry, cache: Arc<Cache>) {
        registry.register(
            "reconcile_writes",
            "Writes the reconciler made, by object kind, reason and result",
            self.writes.clone(),
        );
        registry.register_collector(Box::new(CacheState(cache, self.leadership.clone())));
    }
}

/// The cache's sync state and object counts, and the Lease, read when Prometheus scrapes.
#[derive(Debug)]
struct CacheState(Arc<Cache>, Leadership);

impl Collector for CacheState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (deployments, services, secrets) = self.0.counts();
        let gauge = |v: usize| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        // The Lease's deadline is judged now: a replica that stopped hearing from the apiserver
        // shows 0 from its deadline on, not from when its Lease task next wakes.
        let leading = crate::cluster::lease::may_act(&self.1, std::time::Duration::ZERO);
        for (name, help, value) in [
            (
                "cluster_leader",
                "1 while this replica holds the reconciler's Lease (and may write)",
                usize::from(leading),
            ),
            (
                "cluster_cache_synced",
                "1 once every watch has listed once or been refused",
                usize::from(self.0.ready()),
            ),
            (
                "cluster_forbidden",
                "Requests the apiserver refuses now (403): watches, writes, the Lease",
                self.0.forbidden().len(),
            ),
            (
                "cluster_cache_deployments",
                "Outpost Deployments in the watch cache",
                deployments,
            ),
            (
                "cluster_cache_services",
                "Outpost Services in the watch cache",
                services,
            ),
            (
                "cluster_cache_secrets",
                "Secrets the policy reads, in the watch cache",
                secrets,
            ),
        ] {
            let metric = gauge(value);
            let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(e)?;
        }
        Ok(())
    }
}
