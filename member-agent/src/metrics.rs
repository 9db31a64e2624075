//! Prometheus metrics (prometheus-client). The registry is served on `/metrics` by
//! `ballast_runtime::AdminServer` (with `/live` and `/ready`), like every ballast binary's.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `ballast_agent_peer_rtt_seconds` | peer | smoothed RTT to the peer's gateway (absent while unreachable) |
//! | `ballast_agent_peer_reachable` | peer | 1 reachable, 0 unreachable |
//! | `ballast_agent_peer_loss_ratio` | peer | lost share of the recent probes |
//! | `ballast_agent_probe_failures_total` | peer | failed probes |
//! | `ballast_agent_service_rps` | service, destination | connects per second from this cluster |
//! | `ballast_agent_service_bytes_sent_per_second` | service, destination | payload bytes per second this node's steered sockets sent there |
//! | `ballast_agent_service_bytes_received_per_second` | service, destination | payload bytes per second they received from there |
//! | `ballast_agent_service_capacity_rps` | service | local capacity |
//! | `ballast_agent_installed_generation` | service | weights generation installed |
//! | `ballast_agent_updates_refused_total` | service | weights updates refused (unknown service, bad weights, data plane) |
//! | `ballast_agent_update_lag_seconds` | — | broker publication → installed, histogram |
//! | `ballast_agent_discovery_failures_total` | — | failed discovery refreshes |
//! | `ballast_agent_probe_targets` | source | peers probed, by where their gateway came from (`broker`, `configuration`) |
//! | `ballast_agent_services_without_vip` | — | ServiceImports not steered for want of a VIP (no `spec.ips`) |
//! | `ballast_agent_broker_replica` | address | 1 for the broker replica the session is on, 0 for the other known ones |
//! | `ballast_agent_broker_failovers_total` | — | sessions re-established on another broker replica than the last one |
//! | `ballast_agent_sockets_destroyed_total` | — | established steered connections closed because their backend failed (unready endpoint, unreachable cluster) |
//! | `ballast_agent_socket_destroy_failures_total` | — | failed attempts at closing them (no `SOCK_DESTROY` in the kernel, no permission) |

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::probe::{PeerTable, Reachability};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrerequisiteLabels {
    pub prerequisite: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    pub address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub service: String,
    pub destination: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The agent's metrics. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub peer_rtt_seconds: Family<PeerLabels, FGauge>,
    pub peer_reachable: Family<PeerLabels, Gauge>,
    pub peer_loss_ratio: Family<PeerLabels, FGauge>,
    pub probe_failures: Family<PeerLabels, Counter>,
    pub service_rps: Family<FlowLabels, FGauge>,
    pub service_bytes_sent: Family<FlowLabels, FGauge>,
    pub service_bytes_received: Family<FlowLabels, FGauge>,
    pub service_capacity_rps: Family<ServiceLabels, FGauge>,
    pub installed_generation: Family<ServiceLabels, Gauge>,
    pub updates_refused: Family<ServiceLabels, Counter>,
    pub update_lag_seconds: Histogram,
    pub discovery_failures: Counter,
    pub probe_targets: Family<SourceLabels, Gauge>,
    pub services_without_vip: Gauge,
    pub prerequisite_missing: Family<PrerequisiteLabels, Gauge>,
    pub broker_replica: Family<AddressLabels, Gauge>,
    pub broker_failovers: Counter,
    pub sockets_destroyed: Counter,
    pub socket_destroy_failures: Counter,
    /// The addresses `broker_replica` holds.
    broker_addresses: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("ballast_agent");
        let m = Self {
            registry: Arc::new(Registry::default()),
            peer_rtt_seconds: Family::default(),
            peer_reachable: Family::default(),
            peer_loss_ratio: Family::default(),
            probe_failures: Family::default(),
            service_rps: Family::default(),
            service_bytes_sent: Family::default(),
            service_bytes_received: Family::default(),
            service_capacity_rps: Family::default(),
            installed_generation: Family::default(),
            updates_refused: Family::default(),
            update_lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            discovery_failures: Counter::default(),
            probe_targets: Family::default(),
            services_without_vip: Gauge::default(),
            prerequisite_missing: Family::default(),
            broker_replica: Family::default(),
            broker_failovers: Counter::default(),
            sockets_destroyed: Counter::default(),
            socket_destroy_failures: Counter::default(),
            broker_addresses: Arc::default(),
        };
        r.register(
            "peer_rtt_seconds",
            "Smoothed RTT to the peer cluster's gateway (absent while unreachable)",
            m.peer_rtt_seconds.clone(),
        );
        r.register(
            "peer_reachable",
            "1 if the peer cluster answers probes, 0 if it is unreachable",
            m.peer_reachable.clone(),
        );
        r.register(
            "peer_loss_ratio",
            "Lost share of the recent probes to the peer",
            m.peer_loss_ratio.clone(),
        );
        r.register(
            "probe_failures",
            "Probes to the peer that got no answer",
            m.probe_failures.clone(),
        );
        r.register(
            "service_rps",
            "Connects per second from this cluster, per service and destination cluster",
            m.service_rps.clone(),
        );
        r.register(
            "service_bytes_sent_per_second",
            "Payload bytes per second this node's steered sockets sent, per service and \
             destination cluster",
            m.service_bytes_sent.clone(),
        );
        r.register(
            "service_bytes_received_per_second",
            "Payload bytes per second they received, per service and destination cluster",
            m.service_bytes_received.clone(),
        );
        r.register(
            "service_capacity_rps",
            "Capacity of the local export: per-pod capacity x ready pods",
            m.service_capacity_rps.clone(),
        );
        r.register(
            "installed_generation",
            "Weights generation installed in the data plane",
            m.installed_generation.clone(),
        );
        r.register(
            "updates_refused",
            "Weights updates refused (unknown service, bad weights, data plane failure)",
            m.updates_refused.clone(),
        );
        r.register(
            "update_lag_seconds",
            "Time from the broker publishing weights to their installation",
            m.update_lag_seconds.clone(),
        );
        r.register(
            "discovery_failures",
            "Discovery refreshes that failed (the last good catalog stayed)",
            m.discovery_failures.clone(),
        );
        r.register(
            "probe_targets",
            "Peers probed, by where their gateway came from (broker, configuration)",
            m.probe_targets.clone(),
        );
        r.register(
            "services_without_vip",
            "ServiceImports discovery knows but cannot steer: type ClusterSetIP without \
             spec.ips (enable Lighthouse clusterset IPs)",
            m.services_without_vip.clone(),
        );
        r.register(
            "prerequisite_missing",
            "1 while the prerequisite is missing (mcs_crds, kernel, cgroup_v2, btf, bpffs), 0 once found",
            m.prerequisite_missing.clone(),
        );
        r.register(
            "broker_replica",
            "1 for the broker replica (address dialed) the session is on, 0 for the other known ones",
            m.broker_replica.clone(),
        );
        r.register(
            "broker_failovers",
            "Broker sessions re-established on another replica than the last one",
            m.broker_failovers.clone(),
        );
        r.register(
            "sockets_destroyed",
            "Established steered connections closed because their backend failed (unready endpoint, unreachable cluster)",
            m.sockets_destroyed.clone(),
        );
        r.register(
            "socket_destroy_failures",
            "Failed attempts at closing connections to failed backends",
            m.socket_destroy_failures.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Sets `prerequisite_missing{prerequisite}` to 1 (missing) or 0.
    pub fn set_prerequisite_missing(&self, prerequisite: &str, missing: bool) {
        self.prerequisite_missing
            .get_or_create(&PrerequisiteLabels {
                prerequisite: prerequisite.to_owned(),
            })
            .set(i64::from(missing));
    }

    /// Makes `broker_replica` hold exactly `known` (addresses no longer known removed), 1 for
    /// `in_use` and 0 for the others.
    pub fn set_broker_replicas<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str>,
        in_use: Option<&str>,
    ) {
        let known: std::collections::BTreeSet<&str> = known.into_iter().collect();
        let stale: Vec<AddressLabels> = {
            let mut stale = Vec::new();
            // prometheus-client has no iteration over a family: keep the last set here
            if let Ok(last) = self.broker_addresses.lock() {
                stale.extend(
                    last.iter()
                        .filter(|a| !known.contains(a.as_str()))
                        .map(|a| AddressLabels { address: a.clone() }),
                );
            }
            stale
        };
        for l in &stale {
            self.broker_replica.remove(l);
        }
        for a in &known {
            self.broker_replica
                .get_or_create(&AddressLabels {
                    address: (*a).to_owned(),
                })
                .set(i64::from(Some(*a) == in_use));
        }
        if let Ok(mut last) = self.broker_addresses.lock() {
            *last = known.iter().map(|a| (*a).to_owned()).collect();
        }
    }

    /// Sets how many probe targets come from `source`.
    pub fn set_probe_targets(&self, source: &str, n: usize) {
        self.probe_targets
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Mirrors a probe table: RTT, reachability, loss; counts new failures since `prev`.
    pub fn observe_peers(&self, prev: &PeerTable, table: &PeerTable) {
        for (peer, st) in table {
            let l = PeerLabels { peer: peer.clone() };
            match st.reachability {
                Reachability::Reachable { rtt_ewma, .. } => {
                    self.peer_rtt_seconds
                        .get_or_create(&l)
                        .set(rtt_ewma.as_secs_f64());
                    self.peer_reachable.get_or_create(&l).set(1);
                }
                Reachability::Unreachable => {
                    self.peer_rtt_seconds.remove(&l);
                    self.peer_reachable.get_or_create(&l).set(0);
                }
                Reachability::Unknown => {}
            }
            self.peer_loss_ratio.get_or_create(&l).set(st.loss);
            let before = prev
                .get(peer)
                .filter(|p| p.gateway == st.gateway)
                .map_or(0, |p| p.failed);
            let new = st.failed.saturating_sub(before);
            if new > 0 {
                self.probe_failures.get_or_create(&l).inc_by(new);
            }
        }
        for peer in prev.keys().filter(|p| !table.contains_key(*p)) {
            let l = PeerLabels { peer: peer.clone() };
            self.peer_rtt_seconds.remove(&l);
            self.peer_reachable.remove(&l);
            self.peer_loss_ratio.remove(&l);
        }
    }

    /// Counts the discovery source's failed refreshes into `discovery_failures`, in a task.
    pub fn follow_discovery_status(
        &self,
        mut status: tokio::sync::watch::Receiver<crate::discovery::SourceStatus>,
    ) -> tokio::task::JoinHandle<()> {
        let counter = self.discovery_failures.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while status.changed().await.is_ok() {
                let failed = status.borrow_and_update().refreshes_failed;
                if failed > seen {
                    counter.inc_by(failed - seen);
                    seen = failed;
                }
            }
        })
    }

    /// Keeps `services_without_vip` equal to the catalog's count of imports without a VIP,
    /// in a task (set at once, then on every catalog change).
    pub fn follow_catalog(
        &self,
        mut catalog: tokio::sync::watch::Receiver<Arc<crate::catalog::Catalog>>,
    ) -> tokio::task::JoinHandle<()> {
        let gauge = self.services_without_vip.clone();
        let count =
            |c: &crate::catalog::Catalog| i64::try_from(c.without_vip.len()).unwrap_or(i64::MAX);
        gauge.set(count(&catalog.borrow_and_update()));
        tokio::spawn(async move {
            while catalog.changed().await.is_ok() {
                gauge.set(count(&catalog.borrow_and_update()));
            }
        })
    }

    /// The registry, for `ballast_runtime::AdminServer`.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        ballast_runtime::encode_metrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Method, Outcome, PeerStatus, ProbeConfig};
    use std::time::Duration;

    #[test]
    fn exposition_holds_rtt_failures_and_generation() {
        let m = Metrics::new();
        let cfg = ProbeConfig {
            unhealthy_after: 1,
            ..ProbeConfig::default()
        };
        let ip = "127.0.0.2".parse().expect("ip");
        let mut west = PeerStatus::new(ip);
        west.record(
            &Outcome::Answered(Duration::from_millis(40)),
            Method::Icmp,
            &cfg,
        );
        let mut south = PeerStatus::new(ip);
        south.record(&Outcome::Failed("timeout".into()), Method::Icmp, &cfg);
        let t1: PeerTable = [
            ("west".to_owned(), west.clone()),
            ("south".to_owned(), south.clone()),
        ]
        .into();
        m.observe_peers(&PeerTable::new(), &t1);
        south.record(&Outcome::Failed("timeout".into()), Method::Icmp, &cfg);
        let t2: PeerTable = [("west".to_owned(), west), ("south".to_owned(), south)].into();
        m.observe_peers(&t1, &t2);
        m.installed_generation
            .get_or_create(&ServiceLabels {
                service: "shop/web".into(),
            })
            .set(42);
        m.service_rps
            .get_or_create(&FlowLabels {
                service: "shop/web".into(),
                destination: "west".into(),
            })
            .set(12.5);
        m.update_lag_seconds.observe(0.02);
        m.set_broker_replicas(["https://10.0.0.1:7443", "https://10.0.0.2:7443"], None);
        m.set_broker_replicas(
            ["https://10.0.0.2:7443", "https://10.0.0.3:7443"],
            Some("https://10.0.0.3:7443"),
        );
        m.broker_failovers.inc();

        // served on /metrics by ballast_runtime::AdminServer (tested there)
        let resp = m.encode();
        assert!(
            resp.contains("ballast_agent_peer_rtt_seconds{peer=\"west\"} 0.04"),
            "{resp}"
        );
        assert!(
            !resp.contains("ballast_agent_peer_rtt_seconds{peer=\"south\"}"),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_peer_reachable{peer=\"south\"} 0"),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_probe_failures_total{peer=\"south\"} 2"),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_installed_generation{service=\"shop/web\"} 42"),
            "{resp}"
        );
        assert!(
            resp.contains(
                "ballast_agent_service_rps{service=\"shop/web\",destination=\"west\"} 12.5"
            ),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_update_lag_seconds_count 1"),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_broker_replica{address=\"https://10.0.0.3:7443\"} 1")
                && resp
                    .contains("ballast_agent_broker_replica{address=\"https://10.0.0.2:7443\"} 0")
                && !resp.contains("10.0.0.1"),
            "{resp}"
        );
        assert!(
            resp.contains("ballast_agent_broker_failovers_total 1"),
            "{resp}"
        );
    }
}
