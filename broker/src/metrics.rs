//! The broker's Prometheus metrics (prometheus-client). They are served, with `/live` and
//! `/ready`, by `ballast_runtime::AdminServer` (see `server.rs`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    /// The latest published weights generation.
    pub generation: Gauge,
    /// Open WatchWeights streams.
    pub watchers: Gauge,
    /// Report messages accepted.
    pub reports: Counter,
    /// Requests rejected as invalid or not permitted.
    pub rejected: Counter,
    /// Connections closed at once: the total or per-peer connection cap was reached.
    pub connections_refused: Counter,
    /// Accepts that failed for want of file descriptors (the listener then backs off).
    pub accept_fd_exhausted: Counter,
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
        let generation = Gauge::default();
        let watchers = Gauge::default();
        let reports = Counter::default();
        let rejected = Counter::default();
        let connections_refused = Counter::default();
        let accept_fd_exhausted = Counter::default();
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
            "generation",
            "Latest published weights generation",
            generation.clone(),
        );
        registry.register("watchers", "Open WatchWeights streams", watchers.clone());
        registry.register("reports", "Report messages accepted", reports.clone());
        registry.register(
            "rejected_requests",
            "Requests rejected as invalid or not permitted",
            rejected.clone(),
        );
        Self {
            registry: Arc::new(registry),
            solve_duration,
            clusters,
            expired_clusters,
            stale_inputs,
            stale_services,
            generation,
            watchers,
            reports,
            rejected,
            connections_refused,
            accept_fd_exhausted,
        }
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
