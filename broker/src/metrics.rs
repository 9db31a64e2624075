//! The broker's Prometheus metrics (prometheus-client). They are served, with `/live` and
//! `/ready`, by `ballast_runtime::AdminServer` (see `server.rs`).
//!
//! `ballast_broker_weight{service,source,destination}` mirrors the published generation: one
//! series per weight the agents are sent (services x importing sources x destinations), so
//! its cardinality is that of the weights table. `ballast_broker_published_entries{status}`
//! counts the (service, source) entries of that generation by status (`optimal`,
//! `degraded`, `stale`). The Grafana dashboard (`helm/ballast-broker/dashboards/`) reads
//! these with the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use ballast_types::WeightsStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of one published weight.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct WeightLabels {
    pub service: String,
    pub source: String,
    pub destination: String,
}

/// Labels of the published entries' count.
/// The flag that sets a limit (`--max-nodes-per-cluster`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct FlagLabels {
    pub flag: String,
}

/// Labels of measured egress: service, source cluster, destination cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct EgressLabels {
    pub service: String,
    pub src: String,
    pub dst: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Seconds per solver round (all services).
    pub solve_duration: Histogram,
    /// Registered clusters taken into account (not expired).
    pub clusters: Gauge,
    /// Registered clusters left out because they were not heard from within the expiry.
    pub expired_clusters: Gauge,
    /// Inputs (capacity or RTT pairs) currently older than the stale-after age.
    pub stale_inputs: Gauge,
    /// Services currently served with their previous (stale-flagged) weights.
    pub stale_services: Gauge,
    /// Services re-solved whose weights stayed within `--publish-threshold` of the published
    /// ones and were not re-published (publication hysteresis).
    pub held_services: Counter,
    /// The latest published weights generation.
    pub generation: Gauge,
    /// Open WatchWeights streams.
    pub watchers: Gauge,
    /// 1 while this replica leads (holds the lease), else 0.
    pub leader: Gauge,
    /// The term this replica leads, or the highest it saw.
    pub term: Gauge,
    /// Times this replica became leader or stepped down.
    pub leader_changes: Counter,
    /// Publishes refused because this replica no longer held the lease under its term.
    pub fenced_publishes: Counter,
    /// Report messages accepted.
    pub reports: Counter,
    /// Acks written to the store (in batches, [`crate::engine::Engine::flush_acks`]).
    pub acks_flushed: Counter,
    /// Requests rejected as invalid or not permitted.
    pub rejected: Counter,
    /// Connections closed at once: the total or per-peer connection cap was reached.
    pub connections_refused: Counter,
    /// Registers and reports refused by a bound on stored state, by its flag.
    pub limit_refusals: Family<FlagLabels, Counter>,
    /// Accepts that failed for want of file descriptors (the listener then backs off).
    pub accept_fd_exhausted: Counter,
    /// 1 while this process waits, as a hot standby, for the database lock.
    pub standby: Gauge,
    /// The published weights: (service, source, destination) -> weight.
    pub weight: Family<WeightLabels, Gauge<f64, AtomicU64>>,
    /// The published (service, source) entries by status.
    pub published_entries: Family<StatusLabels, Gauge>,
    /// Payload bytes the agents measured, by (service, src, dst), both directions: integrated
    /// from the byte rates of the reports this replica accepted over the time between a
    /// node's reports (at most two report intervals).
    pub egress_bytes: Family<EgressLabels, Counter<f64, AtomicU64>>,
    /// What those bytes cost in egress (USD), each direction at its price.
    pub egress_usd: Family<EgressLabels, Counter<f64, AtomicU64>>,
    /// The weight series last set, so a new generation removes only what it no longer has
    /// (a scrape never sees the family half-filled).
    weight_series: Mutex<BTreeSet<WeightLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `ballast_broker` prefix.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ballast_broker");
        let solve_duration = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        let clusters = Gauge::default();
        let expired_clusters = Gauge::default();
        let stale_inputs = Gauge::default();
        let stale_services = Gauge::default();
        let held_services = Counter::default();
        let generation = Gauge::default();
        let watchers = Gauge::default();
        let leader = Gauge::default();
        let term = Gauge::default();
        let leader_changes = Counter::default();
        let fenced_publishes = Counter::default();
        registry.register(
            "leader",
            "1 while this replica leads (holds the leader lease and publishes), else 0",
            leader.clone(),
        );
        registry.register(
            "term",
            "The leader term this replica leads, or the highest it saw",
            term.clone(),
        );
        registry.register(
            "leader_changes",
            "Times this replica became leader or stepped down",
            leader_changes.clone(),
        );
        registry.register(
            "fenced_publishes",
            "Publishes refused because this replica no longer held the lease under its term",
            fenced_publishes.clone(),
        );
        let reports = Counter::default();
        let acks_flushed = Counter::default();
        let rejected = Counter::default();
        let connections_refused = Counter::default();
        let limit_refusals = Family::<FlagLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Registers and reports refused by a bound on stored state (nodes or imports per cluster, services), by the flag that sets it",
            limit_refusals.clone(),
        );
        let accept_fd_exhausted = Counter::default();
        let standby = Gauge::default();
        registry.register(
            "standby",
            "1 while this process waits, as a hot standby, for the database lock held by another broker process",
            standby.clone(),
        );
        registry.register(
            "connections_refused",
            "gRPC connections closed at once because the total or per-peer cap was reached",
            connections_refused.clone(),
        );
        registry.register(
            "accept_fd_exhausted",
            "gRPC accepts that failed for want of file descriptors (the listener backs off)",
            accept_fd_exhausted.clone(),
        );
        let weight = Family::<WeightLabels, Gauge<f64, AtomicU64>>::default();
        let published_entries = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "solve_duration_seconds",
            "Duration of one solver round (all services)",
            solve_duration.clone(),
        );
        registry.register(
            "clusters",
            "Registered clusters taken into account (not expired)",
            clusters.clone(),
        );
        registry.register(
            "expired_clusters",
            "Registered clusters left out: not heard from within the cluster expiry",
            expired_clusters.clone(),
        );
        registry.register(
            "stale_inputs",
            "Inputs (capacity, RTT pairs) older than the stale-after age",
            stale_inputs.clone(),
        );
        registry.register(
            "stale_services",
            "Services kept on their previous weights because of stale inputs",
            stale_services.clone(),
        );
        registry.register(
            "held_services",
            "Services re-solved within --publish-threshold of their published weights, not re-published",
            held_services.clone(),
        );
        registry.register(
            "generation",
            "Latest published weights generation",
            generation.clone(),
        );
        registry.register("watchers", "Open WatchWeights streams", watchers.clone());
        registry.register("reports", "Report messages accepted", reports.clone());
        registry.register(
            "acks_flushed",
            "Acks written to the store (coalesced per agent and service, in batches)",
            acks_flushed.clone(),
        );
        registry.register(
            "rejected_requests",
            "Requests rejected as invalid or not permitted",
            rejected.clone(),
        );
        registry.register(
            "weight",
            "Published weight of a destination for a (service, source cluster)",
            weight.clone(),
        );
        registry.register(
            "published_entries",
            "(service, source) entries of the published generation, by status",
            published_entries.clone(),
        );
        let egress_bytes = Family::<EgressLabels, Counter<f64, AtomicU64>>::default();
        let egress_usd = Family::<EgressLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "egress_bytes",
            "Payload bytes measured by the agents per (service, source, destination), both \
             directions, as reported to this replica",
            egress_bytes.clone(),
        );
        registry.register(
            "egress_usd",
            "Egress cost (USD) of those bytes, each direction at its price",
            egress_usd.clone(),
        );
        let m = Self {
            registry: Arc::new(registry),
            egress_bytes,
            egress_usd,
            solve_duration,
            clusters,
            expired_clusters,
            stale_inputs,
            stale_services,
            held_services,
            generation,
            watchers,
            leader,
            term,
            leader_changes,
            fenced_publishes,
            reports,
            acks_flushed,
            rejected,
            connections_refused,
            limit_refusals,
            accept_fd_exhausted,
            standby,
            weight,
            published_entries,
            weight_series: Mutex::new(BTreeSet::new()),
        };
        m.observe_published(std::iter::empty());
        m
    }

    /// Mirrors a published generation: every weight, and the entries per status (each
    /// status present, 0 when none). Weights no longer published disappear.
    pub fn observe_published<'a, I>(&self, entries: I)
    where
        I: IntoIterator<Item = ((&'a str, &'a str), WeightsStatus, &'a BTreeMap<String, f64>)>,
    {
        let mut by_status: BTreeMap<&'static str, i64> =
            WeightsStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut series = BTreeSet::new();
        for ((service, source), status, weights) in entries {
            *by_status.entry(status.as_str()).or_insert(0) += 1;
            for (destination, w) in weights {
                let labels = WeightLabels {
                    service: service.to_owned(),
                    source: source.to_owned(),
                    destination: destination.clone(),
                };
                self.weight.get_or_create(&labels).set(*w);
                series.insert(labels);
            }
        }
        let mut last = self
            .weight_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for gone in last.difference(&series) {
            self.weight.remove(gone);
        }
        *last = series;
        for (status, n) in by_status {
            self.published_entries
                .get_or_create(&StatusLabels {
                    status: status.to_owned(),
                })
                .set(n);
        }
    }

    /// Counts one refusal by the limit `flag` sets.
    pub fn count_limit_refusal(&self, flag: &str) {
        self.limit_refusals
            .get_or_create(&FlagLabels {
                flag: flag.to_owned(),
            })
            .inc();
    }

    /// The registry every metric is in (what the admin server exposes).
    #[must_use]
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The metrics in the Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        ballast_runtime::encode_metrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn published_weights_and_statuses_are_mirrored_and_withdrawn() {
        let m = Metrics::new();
        let text = m.render();
        // every status is there from the start, at 0; no weight yet
        for s in ["optimal", "degraded", "stale"] {
            assert!(
                text.contains(&format!(
                    "ballast_broker_published_entries{{status=\"{s}\"}} 0"
                )),
                "{text}"
            );
        }
        // prometheus-client writes a labelled family (HELP and TYPE too) only once it has a
        // sample: no weight published, no ballast_broker_weight at all
        assert!(!text.contains("ballast_broker_weight"), "{text}");
        let (a, b) = (
            weights(&[("c2", 0.75), ("c3", 0.25)]),
            weights(&[("c1", 1.0)]),
        );
        m.observe_published([
            (("ns/web", "c1"), WeightsStatus::Optimal, &a),
            (("ns/db", "c2"), WeightsStatus::Degraded, &b),
        ]);
        let text = m.render();
        for line in [
            "ballast_broker_weight{service=\"ns/web\",source=\"c1\",destination=\"c2\"} 0.75",
            "ballast_broker_weight{service=\"ns/web\",source=\"c1\",destination=\"c3\"} 0.25",
            "ballast_broker_weight{service=\"ns/db\",source=\"c2\",destination=\"c1\"} 1.0",
            "ballast_broker_published_entries{status=\"optimal\"} 1",
            "ballast_broker_published_entries{status=\"degraded\"} 1",
            "ballast_broker_published_entries{status=\"stale\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // the next generation drops ns/db: its series go, the others stay
        m.observe_published([(("ns/web", "c1"), WeightsStatus::Stale, &a)]);
        let text = m.render();
        assert!(!text.contains("service=\"ns/db\""), "{text}");
        assert!(text.contains("destination=\"c3\"} 0.25"), "{text}");
        assert!(
            text.contains("ballast_broker_published_entries{status=\"stale\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ballast_broker_published_entries{status=\"degraded\"} 0"),
            "{text}"
        );
    }
}
