//! The lab's control plane: mTLS certificates (`ballast-broker certs`), the broker (SQLite,
//! in the wan namespace on 10.77.0.1) and one `ballast-agent` per node of every cluster (as a
//! DaemonSet runs them: same cluster identity and topology file, each with its node name,
//! its node's cgroup, pins and metrics port): their command lines and where their files are
//! (this file); the agents' topology files (`topology`); the broker's Admin API over gRPC
//! (`admin`); waiting on the weights it publishes (`wait`).
//!
//! Decision: the lab starts the real binaries (`ballast-broker serve`, `ballast-agent`) as
//! daemons, as an operator would, and talks to the broker only through its public Admin
//! API, with the same admin certificate an operator's `ballast-broker admin` uses.

mod admin;
mod topology;
mod wait;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_types::Policy;
use serde::{Deserialize, Serialize};

use crate::config::BROKER_ADDR;
use crate::error::Result;
use crate::lab::LabState;
use crate::sys;

pub use admin::{
    broker_view, explain_rows, savings, set_policy, solve_view, BrokerView, SolveView,
};
pub use topology::{topology_path, topology_yaml, write_topologies};
pub use wait::{fmt_weights, settle, wait_installed, wait_policy};

pub const BROKER_PORT: u16 = 7443;
pub const BROKER_METRICS_PORT: u16 = 9464;
/// The first node's agent /metrics, on each cluster's own loopback (node k: port + k - 1,
/// [`crate::config::agent_metrics_addr`]).
pub const AGENT_METRICS: &str = "127.0.0.1:9464";
/// Capacity declared per pod of the demo service unless `ballast-lab capacity` changed it.
pub const CAPACITY_RPS_PER_POD: f64 = crate::lab::DEFAULT_PER_POD_CAPACITY;

/// Where the control plane's pieces are, kept in the lab state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlPlane {
    pub broker_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub certs_dir: PathBuf,
    /// The first broker's URL (broker k listens on [`BROKER_PORT`] + k - 1).
    pub broker_url: String,
    /// SQLite with one broker; the lab's own PostgreSQL ([`crate::lab::postgres`]) with
    /// several.
    pub database: String,
    /// Broker replicas (1: one broker on SQLite; more: replicas on PostgreSQL).
    #[serde(default = "one")]
    pub brokers: usize,
    /// The policy the brokers started with (a replica started again gets the same).
    #[serde(default)]
    pub policy: Option<Policy>,
}

fn one() -> usize {
    1
}

impl ControlPlane {
    pub fn new(state_dir: &Path, broker_bin: PathBuf, agent_bin: PathBuf) -> Self {
        ControlPlane {
            broker_bin,
            agent_bin,
            certs_dir: state_dir.join("certs"),
            broker_url: format!("https://{BROKER_ADDR}:{BROKER_PORT}"),
            database: format!(
                "sqlite://{}?mode=rwc",
                state_dir.join("broker.db").display()
            ),
            brokers: 1,
            policy: None,
        }
    }
    /// Every broker's URL, the first first.
    pub fn broker_urls(&self) -> Vec<String> {
        (1..=self.brokers.max(1))
            .map(|k| format!("https://{}", broker_socket_of(k)))
            .collect()
    }
    /// `--ca CA --cert NAME.pem --key NAME-key.pem`: the TLS flags every ballast binary takes.
    fn tls_args(&self, name: &str) -> Vec<String> {
        let path = |file: String| self.certs_dir.join(file).display().to_string();
        vec![
            "--ca".to_string(),
            path("ca.pem".to_string()),
            "--cert".to_string(),
            path(format!("{name}.pem")),
            "--key".to_string(),
            path(format!("{name}-key.pem")),
        ]
    }
}

/// Finds a ballast binary: `$BALLAST_LAB_BIN_DIR`, next to this program, then `$PATH`.
pub fn find_binary(name: &str, exe: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("BALLAST_LAB_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = exe.parent() {
        dirs.push(d.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

// ---- certificates, broker, agents ----

/// `ballast-broker certs` into the state dir (once; kept across `up`).
pub fn ensure_certs(cp: &ControlPlane, state: &LabState) -> Result<()> {
    let ids: Vec<&str> = state.clusters.iter().map(|c| c.id.as_str()).collect();
    let have_all = cp.certs_dir.join("ca.pem").exists()
        && ids
            .iter()
            .all(|id| cp.certs_dir.join(format!("cluster-{id}.pem")).exists());
    if have_all {
        return Ok(());
    }
    let out = cp.certs_dir.display().to_string();
    let clusters = ids.join(",");
    let san = BROKER_ADDR.to_string();
    sys::run(
        &cp.broker_bin.display().to_string(),
        &[
            "certs",
            "--out",
            &out,
            "--clusters",
            &clusters,
            "--server-san",
            &san,
        ],
    )
    .map(|_| ())
}

/// Broker `k`'s role in the lab state: `broker` (the first, and the only one without
/// replicas), then `broker-2`, `broker-3`, ...
pub fn broker_role(k: usize) -> String {
    if k <= 1 {
        "broker".to_string()
    } else {
        format!("broker-{k}")
    }
}

/// Broker `k`'s gRPC address (1-based).
pub fn broker_socket_of(k: usize) -> SocketAddr {
    let port = BROKER_PORT + u16::try_from(k.saturating_sub(1)).unwrap_or(0);
    SocketAddr::V4(SocketAddrV4::new(BROKER_ADDR, port))
}

/// Broker `k`'s /metrics and /ready address (1-based).
pub fn broker_metrics_of(k: usize) -> SocketAddr {
    let port = BROKER_METRICS_PORT + u16::try_from(k.saturating_sub(1)).unwrap_or(0);
    SocketAddr::V4(SocketAddrV4::new(BROKER_ADDR, port))
}

/// Lease time of broker replicas in the lab: a killed leader is replaced within it.
pub const LAB_LEASE_TIME: &str = "3s";

/// Broker `k`'s command line (1-based; with several brokers, replicas on one PostgreSQL).
pub fn broker_args(cp: &ControlPlane, policy: Policy, k: usize) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &broker_socket_of(k).to_string(),
        "--metrics-addr",
        &broker_metrics_of(k).to_string(),
        "--database",
        &cp.database,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(cp.tls_args("server"));
    args.extend(
        [
            "--policy",
            policy.as_str(),
            "--report-interval",
            "1s",
            "--solve-interval",
            "5s",
            "--stale-after",
            "30s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    if cp.brokers > 1 {
        args.extend([
            "--replicas".to_string(),
            cp.brokers.to_string(),
            "--lease-time".to_string(),
            LAB_LEASE_TIME.to_string(),
            "--replica-id".to_string(),
            broker_role(k),
        ]);
    }
    args
}

/// The command line of node `node`'s agent (it runs in the cluster's netns; BPF on the
/// node's cgroup, pins in the node's directory, metrics on the node's port).
pub fn agent_args(
    cp: &ControlPlane,
    state_dir: &Path,
    c: &crate::lab::ClusterState,
    node: &crate::lab::NodeState,
) -> Vec<String> {
    let mut args: Vec<String> = ["--cluster-id", &c.id, "--node-name", &node.name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Every replica: the agent keeps one session and moves when its replica dies.
    for url in cp.broker_urls() {
        args.extend(["--broker".to_string(), url]);
    }
    args.extend(cp.tls_args(&format!("cluster-{}", c.id)));
    args.extend(
        [
            "--discovery",
            "topology",
            "--topology",
            &topology_path(state_dir, &c.id).display().to_string(),
            "--topology-poll-interval",
            "500ms",
            "--cgroup",
            &node.cgroup.display().to_string(),
            "--pin-dir",
            &node.bpf_dir.display().to_string(),
            "--metrics-addr",
            &node.metrics_addr.to_string(),
            "--probe-interval",
            "1s",
            "--report-interval",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

/// Waits until something accepts TCP on `addr` inside `netns`.
pub fn wait_listening(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    sys::wait_for(&format!("{addr} to listen in {netns}"), timeout, || {
        sys::listening_in(netns, addr)
    })
}

pub fn broker_socket() -> SocketAddr {
    broker_socket_of(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_carry_each_binarys_certificate() {
        let cp = ControlPlane::new(Path::new("/s"), "b".into(), "a".into());
        let tls = |name: &str| {
            vec![
                "--ca".to_string(),
                "/s/certs/ca.pem".to_string(),
                "--cert".to_string(),
                format!("/s/certs/{name}.pem"),
                "--key".to_string(),
                format!("/s/certs/{name}-key.pem"),
            ]
        };
        let broker = broker_args(&cp, Policy::Optimized, 1);
        assert_eq!(broker[..7].join(" "), format!("serve --listen {BROKER_ADDR}:{BROKER_PORT} --metrics-addr {BROKER_ADDR}:{BROKER_METRICS_PORT} --database {}", cp.database));
        assert_eq!(broker[7..13], tls("server")[..]);
        assert_eq!(
            broker[13..].join(" "),
            "--policy optimized --report-interval 1s --solve-interval 5s --stale-after 30s"
        );
        let c = crate::lab::ClusterState {
            id: "c1".into(),
            index: 0,
            region: "r".into(),
            provider: "p".into(),
            netns: "n".into(),
            cgroup: "/cg".into(),
            address: std::net::Ipv4Addr::LOCALHOST,
            wan_address: std::net::Ipv4Addr::LOCALHOST,
            bpf_dir: "/bpf".into(),
            nodes: Vec::new(),
        };
        let node = crate::lab::NodeState {
            name: "c1-n2".into(),
            index: 2,
            cgroup: "/cg/n2".into(),
            bpf_dir: "/bpf/n2".into(),
            metrics_addr: crate::config::agent_metrics_addr(2),
        };
        let agent = agent_args(&cp, Path::new("/s"), &c, &node);
        assert_eq!(
            agent[..6].join(" "),
            format!(
                "--cluster-id c1 --node-name c1-n2 --broker {}",
                cp.broker_url
            )
        );
        assert_eq!(agent[6..12], tls("cluster-c1")[..]);
        assert_eq!(agent[12], "--discovery");
        assert_eq!(agent.len(), 12 + 16);
        let rest = agent[16..].join(" ");
        assert!(
            rest.contains("--cgroup /cg/n2 --pin-dir /bpf/n2 --metrics-addr 127.0.0.1:9465"),
            "{rest}"
        );
    }
}
