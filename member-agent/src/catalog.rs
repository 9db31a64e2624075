//! The catalog: what discovery knows at one moment — this cluster, its peers and the
//! services to steer with their endpoints. Plain types, no kube, no files: every discovery
//! source produces a [`Catalog`], and everything downstream (probing, capacity, weights)
//! reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// A cluster identity, e.g. `east`. A lower-case DNS label: the one rule is
/// [`ballast_types::ClusterId::validate`] (see [`validate_cluster_id`]). Kept a `String` here so
/// maps keyed by it borrow as `&str` everywhere in the agent.
pub type ClusterId = String;

/// A service name `namespace/name`, the key of a ServiceImport (the vocabulary crate's).
pub use ballast_types::{ServiceName, ServiceTime};

/// A cluster taking part: this one or a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub id: ClusterId,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub provider: Option<String>,
    /// Where RTT to this cluster is measured (ICMP echo, or TCP connect on the probe port).
    pub gateway: Option<IpAddr>,
}

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`; `SCTP` is refused: the data plane
    /// hooks only TCP and UDP).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "TCP" | "tcp" => Ok(Self::Tcp),
            "UDP" | "udp" => Ok(Self::Udp),
            other => Err(format!("protocol {other:?} is not TCP or UDP")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// One port of a service (what clients connect to on the VIP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Optional name; endpoints of a multi-port service say which port they serve by name.
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    /// Where the backend listens.
    pub address: SocketAddr,
    /// The cluster the backend runs in.
    pub cluster: ClusterId,
    pub ready: bool,
    /// Name of the service port this endpoint serves; `None` for a single-port service.
    pub port_name: Option<String>,
}

/// A service to steer (a ServiceImport).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: ServiceName,
    /// The VIPs clients connect to.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Declared capacity of one pod of the local export, requests per second; `None` when this
    /// cluster exports no capacity for the service.
    pub capacity_rps_per_pod: Option<f64>,
    /// Declared service time of one pod of the local export; `None` when not declared.
    pub service_time_per_pod: Option<ServiceTime>,
    /// The HTTP path the agent probes on the local cluster's ready endpoints to measure the
    /// service time (see [`crate::service_probe`]); `None`: not probed.
    pub service_time_probe: Option<String>,
    /// The unit `capacity_rps_per_pod` counts (and so the service's demand at the broker).
    pub load_unit: ballast_types::LoadUnit,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// Ready endpoints that serve `port` (by name for multi-port services), sorted by address.
    pub fn ready_endpoints_for(&self, port: &ServicePort) -> Vec<&Endpoint> {
        let mut out: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter(|e| match (&e.port_name, &port.name) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            })
            .collect();
        out.sort();
        out
    }

    /// Number of ready endpoints in `cluster` (distinct addresses' IPs: one pod may serve
    /// several ports).
    pub fn ready_pods_in(&self, cluster: &str) -> usize {
        let mut ips: Vec<IpAddr> = self
            .endpoints
            .iter()
            .filter(|e| e.ready && e.cluster == cluster)
            .map(|e| e.address.ip())
            .collect();
        ips.sort();
        ips.dedup();
        ips.len()
    }
}

/// One snapshot of everything discovery knows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catalog {
    /// This cluster.
    pub local: ClusterId,
    /// Every known cluster, this one included, by id.
    pub clusters: BTreeMap<ClusterId, Cluster>,
    /// Services by name.
    pub services: BTreeMap<ServiceName, Service>,
    /// Imports that cannot be steered because they carry no VIP (a ClusterSetIP
    /// ServiceImport without `spec.ips`, Lighthouse's default): not in `services`, reported
    /// to the broker (`ReportRequest.services_without_vip`) and counted in the metrics.
    pub without_vip: BTreeSet<ServiceName>,
}

impl Catalog {
    /// Peers with a gateway to probe (every known cluster but this one).
    pub fn probe_targets(&self) -> Vec<(ClusterId, IpAddr)> {
        self.clusters
            .values()
            .filter(|c| c.id != self.local)
            .filter_map(|c| c.gateway.map(|g| (c.id.clone(), g)))
            .collect()
    }
}

/// Checks a cluster id: the vocabulary's rule ([`ballast_types::ClusterId::validate`]).
pub fn validate_cluster_id(s: &str) -> Result<(), String> {
    ballast_types::ClusterId::validate(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_parses_and_rejects() {
        let n = ServiceName::parse("shop/web").expect("valid");
        assert_eq!(n.to_string(), "shop/web");
        assert!(ServiceName::parse("web").is_err());
        assert!(ServiceName::parse("Shop/web").is_err());
        assert!(ServiceName::parse("shop/-web").is_err());
        assert!(ServiceName::parse("shop/").is_err());
    }

    #[test]
    fn ready_endpoints_filter_by_port_name_and_readiness() {
        let ep = |a: &str, ready, port: Option<&str>| Endpoint {
            address: a.parse().expect("addr"),
            cluster: "east".into(),
            ready,
            port_name: port.map(str::to_owned),
        };
        let svc = Service {
            name: ServiceName::parse("a/b").expect("valid"),
            vips: vec![],
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                ServicePort {
                    name: Some("grpc".into()),
                    port: 81,
                    protocol: Protocol::Tcp,
                },
            ],
            capacity_rps_per_pod: None,
            service_time_per_pod: None,
            service_time_probe: None,
            load_unit: ballast_types::LoadUnit::default(),
            endpoints: vec![
                ep("127.0.0.2:8080", true, Some("http")),
                ep("127.0.0.2:9090", true, Some("grpc")),
                ep("127.0.0.3:8080", false, Some("http")),
                ep("127.0.0.4:8080", true, Some("http")),
            ],
        };
        let http: Vec<_> = svc
            .ready_endpoints_for(&svc.ports[0])
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(http, ["127.0.0.2:8080", "127.0.0.4:8080"]);
        assert_eq!(svc.ready_endpoints_for(&svc.ports[1]).len(), 1);
        // 127.0.0.2 serves two ports but is one pod.
        assert_eq!(svc.ready_pods_in("east"), 2);
        assert_eq!(svc.ready_pods_in("west"), 0);
    }
}
