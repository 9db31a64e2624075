//! Prometheus metrics (prometheus-client) and the `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
            registry,
            solve_duration,
            clusters,
            expired_clusters,
            stale_inputs,
            stale_services,
            generation,
            watchers,
            reports,
            rejected,
        }
    }

    /// The metrics in the Prometheus text format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
///
/// # Errors
/// An I/O error of the HTTP server.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
