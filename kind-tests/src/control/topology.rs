//! The agents' topology files (format: `member-agent/examples/topology.yaml`), one per
//! cluster: every cluster, the demo service and each backend's readiness. The lab marks a
//! backend not ready here before it stops it; agents poll the file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ballast_types::ServiceTime;
use serde::Serialize;

use crate::error::{LabError, Result};
use crate::lab::LabState;
use crate::sys;

#[derive(Debug, Serialize)]
struct Topology {
    local_cluster: String,
    clusters: Vec<TopoCluster>,
    services: Vec<TopoService>,
}

/// A cluster of the file. Only the local cluster's facts are written: the agents learn
/// the other clusters (with their gateways, which they probe) from the broker's peer stream,
/// as in a real fleet; the file names them only because endpoints refer to them.
#[derive(Debug, Serialize)]
struct TopoCluster {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Serialize)]
struct TopoService {
    name: String,
    vips: Vec<Ipv4Addr>,
    ports: Vec<TopoPort>,
    /// The local cluster's declaration; absent: none declared (capacity withdrawn).
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity_rps_per_pod: Option<f64>,
    /// The local cluster's declared service-time curve per pod; absent: none declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_time: Option<ServiceTime>,
    /// The path the local cluster's agents probe to measure the service time.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_time_probe: Option<String>,
    /// The unit the local cluster's capacity counts; absent: connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_unit: Option<ballast_types::LoadUnit>,
    endpoints: Vec<TopoEndpoint>,
}

#[derive(Debug, Serialize)]
struct TopoPort {
    name: String,
    port: u16,
    protocol: String,
}

#[derive(Debug, Serialize)]
struct TopoEndpoint {
    address: SocketAddr,
    cluster: String,
    ready: bool,
    port_name: String,
}

/// The topology file of cluster `local`: every cluster, every service, every backend
/// with its readiness, and the capacity per pod `local` declares for each service. Every
/// node of the cluster reads the same file (a cluster's declaration is a cluster fact).
pub fn topology_yaml(state: &LabState, local: &str) -> Result<String> {
    let t = Topology {
        local_cluster: local.to_string(),
        clusters: state
            .clusters
            .iter()
            .map(|c| {
                let own = c.id == local;
                TopoCluster {
                    id: c.id.clone(),
                    region: own.then(|| c.region.clone()),
                    zone: own.then(|| format!("{}a", c.region)),
                    provider: own.then(|| c.provider.clone()),
                    gateway: own.then_some(c.address),
                }
            })
            .collect(),
        services: state
            .services
            .iter()
            .map(|s| {
                Ok(TopoService {
                    name: s.name.clone(),
                    vips: vec![s.vip],
                    ports: vec![TopoPort {
                        name: "http".into(),
                        port: s.port,
                        protocol: "TCP".into(),
                    }],
                    capacity_rps_per_pod: s.per_pod_capacity(local),
                    service_time: s.declared_curve(local)?,
                    service_time_probe: s.service_time_probe.get(local).cloned(),
                    load_unit: s.load_unit.get(local).copied(),
                    endpoints: s
                        .backends
                        .iter()
                        .map(|b| TopoEndpoint {
                            address: b.addr,
                            cluster: b.cluster.clone(),
                            ready: b.ready,
                            port_name: "http".into(),
                        })
                        .collect(),
                })
            })
            .collect::<Result<_>>()?,
    };
    let body = serde_yaml::to_string(&t).map_err(|e| LabError::Other(e.to_string()))?;
    Ok(format!(
        "# written by ballast-lab for cluster {local}; rewritten on `backends stop|start` and `capacity`\n{body}"
    ))
}

pub fn topology_path(state_dir: &Path, cluster: &str) -> PathBuf {
    state_dir.join(format!("topology-{cluster}.yaml"))
}

/// Writes every cluster's topology file (atomically, only when it changed).
pub fn write_topologies(state_dir: &Path, state: &LabState) -> Result<()> {
    for c in &state.clusters {
        let path = topology_path(state_dir, &c.id);
        let text = topology_yaml(state, &c.id)?;
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            sys::write_atomic(&path, text.as_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_without_a_declaration_states_no_capacity() {
        let mut s = crate::lab::state_tests::lab_state(3, 2);
        s.services[0].per_pod_capacity.insert("c3".into(), None);
        s.services[0]
            .per_pod_capacity
            .insert("c2".into(), Some(50.0));
        let c2 = topology_yaml(&s, "c2").unwrap();
        assert!(c2.contains("capacity_rps_per_pod: 50"), "{c2}");
        let c3 = topology_yaml(&s, "c3").unwrap();
        assert!(!c3.contains("capacity_rps_per_pod"), "{c3}");
        let c1 = topology_yaml(&s, "c1").unwrap();
        assert!(c1.contains("capacity_rps_per_pod: 2000"), "{c1}");
    }

    #[test]
    fn only_the_declaring_cluster_writes_its_service_time() {
        let mut s = crate::lab::state_tests::lab_state(3, 2);
        s.services[0]
            .declared_service_time
            .insert("c2".into(), "base_ms=2,slope_ms_per_rps=1.5".into());
        let c2 = topology_yaml(&s, "c2").unwrap();
        assert!(
            c2.contains("service_time:\n    base_ms: 2.0\n    slope_ms_per_rps: 1.5"),
            "{c2}"
        );
        let c3 = topology_yaml(&s, "c3").unwrap();
        assert!(!c3.contains("service_time"), "{c3}");
        s.services[0]
            .declared_service_time
            .insert("c2".into(), "base_ms=-2,slope_ms_per_rps=1".into());
        let e = topology_yaml(&s, "c2").unwrap_err().to_string();
        assert!(
            e.contains("declared_service_time") && e.contains("base_ms"),
            "{e}"
        );
    }
}
