//! The lab's control plane: mTLS certificates (`ballast-broker certs`), the broker (SQLite,
//! in the wan namespace on 10.77.0.1), one topology file and one `ballast-agent` per
//! cluster, and the broker's Admin API (`ballast-broker admin`) for weights, installed
//! generations and the policy.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::BROKER_ADDR;
use crate::error::{IoContext, LabError, Result};
use crate::lab::LabState;
use crate::sys::{self, Placement};

pub const BROKER_PORT: u16 = 7443;
pub const BROKER_METRICS_PORT: u16 = 9464;
/// The agent's /metrics, on each cluster's own loopback.
pub const AGENT_METRICS: &str = "127.0.0.1:9464";
/// Capacity declared per backend of the demo service (requests per second): well above
/// what the load generator sends, so the split follows RTT and price rather than capacity.
pub const CAPACITY_RPS_PER_POD: f64 = 2000.0;
pub const POLICIES: [&str; 3] = ["round-robin", "weighted-round-robin", "optimized"];

/// Where the control plane's pieces are, kept in the lab state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlPlane {
    pub broker_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub certs_dir: PathBuf,
    pub broker_url: String,
    pub database: String,
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
        }
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

// ---- topology files (format: member-agent/examples/topology.yaml) ----

#[derive(Debug, Serialize)]
struct Topology {
    local_cluster: String,
    clusters: Vec<TopoCluster>,
    services: Vec<TopoService>,
}

#[derive(Debug, Serialize)]
struct TopoCluster {
    id: String,
    region: String,
    zone: String,
    provider: String,
    gateway: Ipv4Addr,
}

#[derive(Debug, Serialize)]
struct TopoService {
    name: String,
    vips: Vec<Ipv4Addr>,
    ports: Vec<TopoPort>,
    capacity_rps_per_pod: f64,
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
/// with its readiness.
pub fn topology_yaml(state: &LabState, local: &str) -> Result<String> {
    let t = Topology {
        local_cluster: local.to_string(),
        clusters: state
            .clusters
            .iter()
            .map(|c| TopoCluster {
                id: c.id.clone(),
                region: c.region.clone(),
                zone: format!("{}a", c.region),
                provider: c.provider.clone(),
                gateway: c.address,
            })
            .collect(),
        services: state
            .services
            .iter()
            .map(|s| TopoService {
                name: s.name.clone(),
                vips: vec![s.vip],
                ports: vec![TopoPort {
                    name: "http".into(),
                    port: s.port,
                    protocol: "TCP".into(),
                }],
                capacity_rps_per_pod: CAPACITY_RPS_PER_POD,
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
            .collect(),
    };
    let body = serde_yaml::to_string(&t).map_err(|e| LabError::Other(e.to_string()))?;
    Ok(format!(
        "# written by ballast-lab for cluster {local}; rewritten on `backends stop|start`\n{body}"
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

/// The broker's command line.
pub fn broker_args(cp: &ControlPlane, policy: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("{BROKER_ADDR}:{BROKER_PORT}"),
        "--metrics-addr",
        &format!("{BROKER_ADDR}:{BROKER_METRICS_PORT}"),
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
            policy,
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
    args
}

/// One agent's command line (it runs in the cluster's netns; BPF on the cluster's cgroup).
pub fn agent_args(
    cp: &ControlPlane,
    state_dir: &Path,
    c: &crate::lab::ClusterState,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--cluster-id",
        &c.id,
        "--node-name",
        &format!("{}-node", c.id),
        "--broker",
        &cp.broker_url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
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
            &c.cgroup.display().to_string(),
            "--pin-dir",
            &c.bpf_dir.display().to_string(),
            "--metrics-addr",
            AGENT_METRICS,
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
    let ns = netns.to_string();
    sys::wait_for(
        &format!("{addr} to listen in {netns}"),
        timeout,
        move || {
            let ns = ns.clone();
            crate::lab::in_netns(&ns, move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false)
        },
    )
}

pub fn broker_socket() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(BROKER_ADDR, BROKER_PORT))
}

// ---- the Admin API ----

/// Runs `ballast-broker admin ARGS` (admin certificate) in the wan namespace.
pub fn admin(cp: &ControlPlane, wan_netns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(&cp.broker_bin);
    cmd.args(["admin", "--broker", &cp.broker_url])
        .args(cp.tls_args("admin"))
        .args(args)
        .stdin(Stdio::null());
    Placement::netns(wan_netns).apply(&mut cmd)?;
    let out = cmd.output().ctx(|| "running ballast-broker admin".into())?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("ballast-broker admin {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the broker publishes and what the agents acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerView {
    pub generation: u64,
    /// service -> source -> destination -> weight
    pub weights: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// cluster -> the lowest generation its agents acknowledged (absent: never acked)
    pub acked: BTreeMap<String, u64>,
    /// service -> source -> policy name
    pub policy: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WeightsJson {
    generation: u64,
    weights: Vec<WeightRow>,
}
#[derive(Deserialize)]
struct WeightRow {
    service: String,
    source: String,
    weights: BTreeMap<String, f64>,
    #[serde(default)]
    policy: String,
}
#[derive(Deserialize)]
struct ClustersJson {
    clusters: Vec<ClusterRow>,
}
#[derive(Deserialize)]
struct ClusterRow {
    cluster_id: String,
    #[serde(default)]
    nodes: Vec<NodeRow>,
}
#[derive(Deserialize)]
struct NodeRow {
    #[serde(default)]
    acked_generation: u64,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| LabError::Other(format!("unexpected `admin {what} --json` output: {e}")))
}

pub fn broker_view(cp: &ControlPlane, wan_netns: &str) -> Result<BrokerView> {
    let w: WeightsJson = parse("weights", &admin(cp, wan_netns, &["weights", "--json"])?)?;
    let c: ClustersJson = parse("clusters", &admin(cp, wan_netns, &["clusters", "--json"])?)?;
    let mut v = BrokerView {
        generation: w.generation,
        ..Default::default()
    };
    for row in w.weights {
        v.policy
            .entry(row.service.clone())
            .or_default()
            .insert(row.source.clone(), row.policy);
        v.weights
            .entry(row.service)
            .or_default()
            .insert(row.source, row.weights);
    }
    for c in c.clusters {
        if let Some(min) = c.nodes.iter().map(|n| n.acked_generation).min() {
            if min > 0 {
                v.acked.insert(c.cluster_id, min);
            }
        }
    }
    Ok(v)
}

/// Waits until the broker has published weights newer than `after` for every (service,
/// source) and every cluster's agent acknowledged that generation.
pub fn wait_installed(
    cp: &ControlPlane,
    state: &LabState,
    after: u64,
    timeout: Duration,
) -> Result<BrokerView> {
    wait_published(cp, state, timeout, after, |v| v.generation > after)
}

/// Waits until every (service, source) of the lab has weights computed with `policy`
/// and every agent installed the current generation (a switch to the policy in force
/// publishes nothing new, and that is fine).
pub fn wait_policy(
    cp: &ControlPlane,
    state: &LabState,
    policy: &str,
    timeout: Duration,
) -> Result<BrokerView> {
    wait_published(cp, state, timeout, 0, |v| {
        state.services.iter().all(|s| {
            v.policy.get(&s.name).is_some_and(|by_src| {
                state
                    .clusters
                    .iter()
                    .all(|c| by_src.get(&c.id).is_some_and(|p| p == policy))
            })
        })
    })
}

fn wait_published(
    cp: &ControlPlane,
    state: &LabState,
    timeout: Duration,
    after: u64,
    ready: impl Fn(&BrokerView) -> bool,
) -> Result<BrokerView> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<BrokerView> = None;
    let mut last_err = None;
    loop {
        match broker_view(cp, &state.wan_netns) {
            Ok(v) => {
                let g = v.generation;
                let published = ready(&v)
                    && state.services.iter().all(|s| {
                        v.weights
                            .get(&s.name)
                            .is_some_and(|w| state.clusters.iter().all(|c| w.contains_key(&c.id)))
                    });
                let acked = state
                    .clusters
                    .iter()
                    .all(|c| v.acked.get(&c.id).is_some_and(|a| *a >= g));
                if published && acked {
                    return Ok(v);
                }
                last = Some(v);
            }
            Err(e) => last_err = Some(e.to_string()),
        }
        if Instant::now() >= deadline {
            let detail = match (&last, last_err) {
                (Some(v), _) => {
                    let missing: Vec<String> = state
                        .clusters
                        .iter()
                        .filter(|c| v.acked.get(&c.id).is_none_or(|a| *a < v.generation))
                        .map(|c| {
                            format!(
                                "{} (acked {})",
                                c.id,
                                v.acked
                                    .get(&c.id)
                                    .map_or("nothing".into(), |a| a.to_string())
                            )
                        })
                        .collect();
                    format!(
                        "broker generation {} (waiting for {}); not installed by: {}",
                        v.generation,
                        if ready(v) {
                            "the agents".to_string()
                        } else if after > 0 {
                            format!("weights newer than generation {after}")
                        } else {
                            "the broker's weights".to_string()
                        },
                        if missing.is_empty() {
                            "-".into()
                        } else {
                            missing.join(", ")
                        }
                    )
                }
                (None, Some(e)) => format!("broker not answering: {e}"),
                (None, None) => "no answer".into(),
            };
            return Err(LabError::Timeout(format!(
                "agents to install weights ({detail})"
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Follows the broker until its weights stop moving: returns once every agent installed
/// the current generation and no new one came for `stable_for`. `on_change` sees every
/// new generation (weights move in damped steps, so a change takes several).
pub fn settle(
    cp: &ControlPlane,
    state: &LabState,
    stable_for: Duration,
    timeout: Duration,
    mut on_change: impl FnMut(&BrokerView),
) -> Result<BrokerView> {
    let deadline = Instant::now() + timeout;
    let mut last_gen = None;
    let mut since = Instant::now();
    loop {
        let v = broker_view(cp, &state.wan_netns)?;
        if last_gen != Some(v.generation) {
            on_change(&v);
            last_gen = Some(v.generation);
            since = Instant::now();
        }
        let acked = state
            .clusters
            .iter()
            .all(|c| v.acked.get(&c.id).is_some_and(|a| *a >= v.generation));
        if acked && v.generation > 0 && since.elapsed() >= stable_for {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout(format!(
                "weights to settle (generation {}, installed {:?})",
                v.generation, v.acked
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One line of weights: `c2 60.0%  c3 40.0%`.
pub fn fmt_weights(w: &BTreeMap<String, f64>) -> String {
    w.iter()
        .map(|(c, x)| format!("{c} {:.1}%", 100.0 * x))
        .collect::<Vec<_>>()
        .join("  ")
}

pub fn validate_policy(p: &str) -> Result<()> {
    if POLICIES.contains(&p) {
        Ok(())
    } else {
        Err(LabError::invalid(
            "policy",
            format!("{p:?}: want one of {}", POLICIES.join(", ")),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_validated() {
        for p in POLICIES {
            validate_policy(p).unwrap();
        }
        let e = validate_policy("fastest").unwrap_err().to_string();
        assert!(e.contains("policy") && e.contains("fastest"), "{e}");
    }

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
        let broker = broker_args(&cp, "optimized");
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
        };
        let agent = agent_args(&cp, Path::new("/s"), &c);
        assert_eq!(
            agent[..6].join(" "),
            format!(
                "--cluster-id c1 --node-name c1-node --broker {}",
                cp.broker_url
            )
        );
        assert_eq!(agent[6..12], tls("cluster-c1")[..]);
        assert_eq!(agent[12], "--discovery");
        assert_eq!(agent.len(), 12 + 16);
    }

    #[test]
    fn broker_view_parses_admin_json() {
        let w: WeightsJson = parse(
            "weights",
            r#"{"generation": 7, "weights": [{"service": "demo/echo", "source": "c1",
                "weights": {"c2": 0.6, "c3": 0.4}, "status": "optimal", "reason": "",
                "policy": "optimized", "params": "mixed", "computed_at_ms": 1}]}"#,
        )
        .unwrap();
        assert_eq!(w.generation, 7);
        assert_eq!(w.weights[0].weights["c2"], 0.6);
        let c: ClustersJson = parse(
            "clusters",
            r#"{"clusters": [{"cluster_id": "c1", "region": "us-east-1", "nodes":
                [{"node_name": "n", "acked_generation": 7}]}]}"#,
        )
        .unwrap();
        assert_eq!(c.clusters[0].nodes[0].acked_generation, 7);
        assert!(parse::<ClustersJson>("clusters", "{}").is_err());
    }
}
