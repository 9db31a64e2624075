//! What the lab keeps in its state file (`STATE_FILE` in the state dir): the clusters, the
//! services and their backends, the processes it started, the control plane's paths.
//!
//! Decision: the state is the only memory between commands (each command is a new process);
//! `down` does not need it (it also works from the names), every other command does.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ballast_types::{Policy, ServiceTime};
use serde::{Deserialize, Serialize};

use crate::control::ControlPlane;
use crate::error::{LabError, Result};
use crate::sys::{self, Spawned};

pub const STATE_FILE: &str = "state.json";
pub const DEMO_SERVICE: &str = "demo/echo";
pub const DEMO_VIP: Ipv4Addr = Ipv4Addr::new(127, 96, 0, 10);
pub const DEMO_PORT: u16 = 80;
/// Ports of the backends of the demo service (one backend per port, per serving cluster).
pub const BACKEND_PORTS: [u16; 2] = [8080, 8081];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub id: String,
    pub index: usize,
    pub region: String,
    pub provider: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The cluster's address (its `eth0`), what others reach it by: its gateway.
    pub address: Ipv4Addr,
    /// The wan side of its link (its next hop).
    pub wan_address: Ipv4Addr,
    /// Under which its nodes' agents pin BPF maps (one directory per node).
    pub bpf_dir: PathBuf,
    /// Its nodes: one agent each, with its own cgroup (the node's "pods") under the
    /// cluster's, its own pins and metrics port. A state written before nodes existed has
    /// none here; `up` fills them in.
    #[serde(default)]
    pub nodes: Vec<NodeState>,
}

/// One node of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// `c1-n2`: the agent's `--node-name`, how the broker tells the cluster's agents apart.
    pub name: String,
    /// 1-based.
    pub index: usize,
    /// The node's cgroup (under the cluster's): clients run here, its agent attaches here.
    pub cgroup: PathBuf,
    /// Where its agent pins the BPF maps and links.
    pub bpf_dir: PathBuf,
    /// Its agent's /metrics, /live, /ready (on the cluster's loopback).
    pub metrics_addr: SocketAddr,
}

impl ClusterState {
    /// A node by name (`c1-n2`), short name (`n2`) or number (`2`); the first node when
    /// `name` is None.
    pub fn node(&self, name: Option<&str>) -> Result<&NodeState> {
        let found = match name {
            None => self.nodes.first(),
            Some(n) => self.nodes.iter().find(|node| {
                node.name == n
                    || crate::config::node_dir(node.index) == n
                    || node.index.to_string() == n
            }),
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            LabError::invalid(
                "node",
                format!(
                    "{:?} is not a node of {} ({})",
                    name.unwrap_or("(first)"),
                    self.id,
                    if names.is_empty() {
                        "it has none; run `ballast-lab up`".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    pub cluster: String,
    pub addr: SocketAddr,
    pub process: Option<Spawned>,
    /// Whether the topology files list it as ready (false while it is being stopped).
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

impl BackendState {
    pub fn running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<BackendState>,
    /// Capacity (RPS) per pod each cluster declares for the service in its topology file;
    /// `None`: the cluster declares none (withdrawn with `ballast-lab capacity --none`). A
    /// cluster not listed declares [`DEFAULT_PER_POD_CAPACITY`].
    #[serde(default)]
    pub per_pod_capacity: BTreeMap<String, Option<f64>>,
    /// How each cluster's backends really slow under load, per pod (the spelling of
    /// [`ServiceTime`]); a cluster not listed: they do not.
    #[serde(default)]
    pub backend_service_time: BTreeMap<String, String>,
    /// The service-time curve per pod each cluster declares in its topology file (what the
    /// broker's load-aware `optimized` solves with); a cluster not listed declares none.
    #[serde(default)]
    pub declared_service_time: BTreeMap<String, String>,
    /// The HTTP path each cluster's agents probe on its backends to measure the service time
    /// (topology `service_time_probe`); a cluster not listed: not probed.
    #[serde(default)]
    pub service_time_probe: BTreeMap<String, String>,
    /// The unit each cluster's declared capacity counts (topology `load_unit`); a cluster
    /// not listed: the default, connections.
    #[serde(default)]
    pub load_unit: BTreeMap<String, ballast_types::LoadUnit>,
}

/// Capacity declared per pod of the demo service (requests per second): well above what the
/// load generator sends, so the split follows RTT and price rather than capacity.
pub const DEFAULT_PER_POD_CAPACITY: f64 = 2000.0;

impl ServiceState {
    /// The per-pod capacity cluster `cluster` declares (None: none declared).
    pub fn per_pod_capacity(&self, cluster: &str) -> Option<f64> {
        self.per_pod_capacity
            .get(cluster)
            .copied()
            .unwrap_or(Some(DEFAULT_PER_POD_CAPACITY))
    }

    /// How `cluster`'s backends slow under load, per pod (None: they do not).
    pub fn backend_curve(&self, cluster: &str) -> Result<Option<ServiceTime>> {
        curve_of(&self.backend_service_time, cluster, "backend_service_time")
    }

    /// The per-pod curve `cluster` declares (None: none).
    pub fn declared_curve(&self, cluster: &str) -> Result<Option<ServiceTime>> {
        curve_of(
            &self.declared_service_time,
            cluster,
            "declared_service_time",
        )
    }

    /// The backends of the service in `cluster` that share `ip` (one pod).
    pub fn backends_in_pod(&self, cluster: &str, ip: std::net::IpAddr) -> usize {
        self.backends
            .iter()
            .filter(|b| b.cluster == cluster && b.addr.ip() == ip)
            .count()
    }

    /// Ready pods of the service in `cluster` as an agent counts them: distinct addresses of
    /// its ready endpoints (the lab's two backends per cluster share the cluster's address,
    /// so they are one pod).
    pub fn ready_pods(&self, cluster: &str) -> usize {
        let ips: std::collections::BTreeSet<std::net::IpAddr> = self
            .backends
            .iter()
            .filter(|b| b.cluster == cluster && b.ready)
            .map(|b| b.addr.ip())
            .collect();
        ips.len()
    }
}

fn curve_of(
    map: &BTreeMap<String, String>,
    cluster: &str,
    field: &'static str,
) -> Result<Option<ServiceTime>> {
    map.get(cluster)
        .map(|text| {
            ServiceTime::parse(text)
                .map_err(|e| LabError::invalid(field, format!("{cluster}: {e}")))
        })
        .transpose()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub wan_netns: String,
    pub cgroup_root: PathBuf,
    pub bpf_dir: PathBuf,
    pub clusters: Vec<ClusterState>,
    pub services: Vec<ServiceState>,
    /// Long-lived processes other than backends (the wan forwarder, broker, agents).
    pub processes: Vec<Spawned>,
    /// The broker and agents, when `up` started them.
    #[serde(default)]
    pub control: Option<ControlPlane>,
}

impl LabState {
    pub fn cluster(&self, id: &str) -> Result<&ClusterState> {
        self.clusters.iter().find(|c| c.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.clusters.iter().map(|c| c.id.as_str()).collect();
            LabError::invalid(
                "cluster",
                format!("{id:?} is not in this lab ({})", ids.join(", ")),
            )
        })
    }
    pub fn service(&self, name: &str) -> Result<&ServiceState> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
                LabError::invalid(
                    "service",
                    format!("{name:?} is not in this lab ({})", names.join(", ")),
                )
            })
    }
    /// The broker and agents; an error when the lab was brought up without them.
    pub fn control_plane(&self) -> Result<&ControlPlane> {
        self.control.as_ref().ok_or_else(|| {
            LabError::Other(
                "no broker in this lab (it was brought up with --no-control-plane)".into(),
            )
        })
    }
    pub(super) fn process(&self, role: &str) -> Option<&Spawned> {
        self.processes.iter().find(|p| p.role == role)
    }
}

/// What `up` makes.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub clusters: usize,
    pub regions: Vec<String>,
    /// Start the broker and one agent per node of every cluster (needs `ballast-broker` and
    /// `ballast-agent`); without it the lab is network, backends and load only.
    pub control_plane: bool,
    /// The broker's policy at start.
    pub policy: Policy,
    /// Nodes (agents) per cluster; None: as the lab is (1 for a new lab).
    pub nodes: Option<usize>,
    /// Broker replicas (more than 1: on the lab's own PostgreSQL); None: as the lab is (1
    /// for a new lab).
    pub brokers: Option<usize>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A lab state of `clusters` clusters with `nodes` nodes each and the demo service
    /// served by c2.. (two backends on each cluster's address), without processes.
    pub(crate) fn lab_state(clusters: usize, nodes: usize) -> LabState {
        let clusters: Vec<ClusterState> = (1..=clusters)
            .map(|i| {
                let id = crate::config::cluster_id(i);
                ClusterState {
                    index: i,
                    region: "us-east-1".into(),
                    provider: "aws".into(),
                    netns: format!("t-{id}"),
                    cgroup: format!("/cg/{id}").into(),
                    address: crate::config::cluster_addr(i),
                    wan_address: crate::config::wan_side_addr(i),
                    bpf_dir: format!("/bpf/{id}").into(),
                    nodes: (1..=nodes)
                        .map(|k| NodeState {
                            name: crate::config::node_name(&id, k),
                            index: k,
                            cgroup: format!("/cg/{id}/n{k}").into(),
                            bpf_dir: format!("/bpf/{id}/n{k}").into(),
                            metrics_addr: crate::config::agent_metrics_addr(k),
                        })
                        .collect(),
                    id,
                }
            })
            .collect();
        let backends = clusters
            .iter()
            .skip(1)
            .flat_map(|c| {
                BACKEND_PORTS.iter().map(|&p| BackendState {
                    cluster: c.id.clone(),
                    addr: SocketAddr::from((c.address, p)),
                    process: None,
                    ready: true,
                })
            })
            .collect();
        LabState {
            prefix: "t".into(),
            wan_netns: "t-wan".into(),
            cgroup_root: "/cg".into(),
            bpf_dir: "/bpf".into(),
            clusters,
            services: vec![ServiceState {
                name: DEMO_SERVICE.into(),
                vip: DEMO_VIP,
                port: DEMO_PORT,
                backends,
                per_pod_capacity: BTreeMap::new(),
                backend_service_time: BTreeMap::new(),
                declared_service_time: BTreeMap::new(),
                service_time_probe: BTreeMap::new(),
                load_unit: BTreeMap::new(),
            }],
            processes: Vec::new(),
            control: None,
        }
    }

    #[test]
    fn a_node_is_found_by_name_short_name_or_number() {
        let s = lab_state(2, 3);
        let c = s.cluster("c1").unwrap();
        assert_eq!(c.node(None).unwrap().name, "c1-n1");
        for n in ["c1-n2", "n2", "2"] {
            assert_eq!(c.node(Some(n)).unwrap().name, "c1-n2", "{n}");
        }
        let e = c.node(Some("n4")).unwrap_err().to_string();
        assert!(e.contains("c1-n1, c1-n2, c1-n3"), "{e}");
        assert!(c.node(Some("c2-n1")).is_err(), "another cluster's node");
        assert_eq!(c.nodes[2].metrics_addr.port(), 9466);
    }

    #[test]
    fn ready_pods_are_distinct_addresses_and_per_pod_defaults() {
        let mut s = lab_state(3, 1);
        let svc = &mut s.services[0];
        // two backends on c2's one address: one pod
        assert_eq!(svc.ready_pods("c2"), 1);
        assert_eq!(svc.ready_pods("c1"), 0);
        svc.backends.iter_mut().for_each(|b| b.ready = false);
        assert_eq!(svc.ready_pods("c2"), 0);
        assert_eq!(svc.per_pod_capacity("c3"), Some(DEFAULT_PER_POD_CAPACITY));
        svc.per_pod_capacity.insert("c3".into(), None);
        assert_eq!(svc.per_pod_capacity("c3"), None);
    }
}
