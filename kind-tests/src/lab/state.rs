//! What the lab keeps in its state file (`STATE_FILE` in the state dir): the clusters, the
//! services and their backends, the processes it started, the control plane's paths.
//!
//! Decision: the state is the only memory between commands (each command is a new process);
//! `down` does not need it (it also works from the names), every other command does.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ballast_types::Policy;
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
    /// Where its agent pins BPF maps.
    pub bpf_dir: PathBuf,
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
    /// Start the broker and one agent per cluster (needs `ballast-broker` and
    /// `ballast-agent`); without it the lab is network, backends and load only.
    pub control_plane: bool,
    /// The broker's policy at start.
    pub policy: Policy,
}
