//! `status`: what the lab is (from its state), what the broker publishes and the agents
//! installed (from the broker's Admin API, when a control plane runs), and the link table;
//! `render_up` is the table `up` and `status` print.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use ballast_types::WeightsStatus;

use super::{Lab, LabState};
use crate::control::{self, SolveView};
use crate::error::Result;
use crate::wan::{self, LinkTable};

/// What `status --json` prints (the shape, plus links).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub clusters: Vec<StatusCluster>,
    pub services: Vec<StatusService>,
    /// service -> source cluster -> destination cluster -> weight.
    pub weights: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// service -> source cluster -> status of its weights (`optimal`, `degraded`, `stale`).
    pub weights_status: BTreeMap<String, BTreeMap<String, WeightsStatus>>,
    /// cluster -> generation all its nodes' agents installed (the lowest of them).
    pub installed_generation: BTreeMap<String, u64>,
    /// The generation the broker published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub links: Vec<wan::Link>,
    /// Why weights are missing, when the broker could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_error: Option<String>,
    /// Every broker replica: address, pid, role (leader, follower, not-ready, down), term.
    #[serde(default)]
    pub brokers: Vec<super::brokers::BrokerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusCluster {
    pub id: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub gateway: Ipv4Addr,
    pub region: String,
    /// Its nodes' names (one agent each), as the lab runs them.
    pub nodes: Vec<String>,
    /// Its agents' node names as registered with the broker (absent: the broker was not asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_nodes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// Running backends per cluster.
    pub backends: BTreeMap<String, usize>,
    /// Ready pods per cluster (distinct addresses of its ready backends, the agent's rule).
    pub ready_pods: BTreeMap<String, usize>,
    /// Capacity per pod (RPS) each cluster declares; null: none declared.
    pub per_pod_capacity: BTreeMap<String, Option<f64>>,
    /// The broker's capacity (RPS) per serving cluster as used in its last solve: should be
    /// per-pod x ready pods, whatever the number of nodes.
    pub capacity: BTreeMap<String, f64>,
    /// The broker's demand (RPS) per source cluster: its nodes' RPS summed.
    pub demand: BTreeMap<String, f64>,
}

impl Lab {
    pub fn status(&self) -> Result<Status> {
        let state = self.load_state()?;
        let links = LinkTable::load(&self.state_dir)
            .map(|t| t.links)
            .unwrap_or_default();
        let (view, broker_error) = match &state.control {
            Some(cp) => match control::broker_view(cp, &state.wan_netns) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        let solve = match (&state.control, &view) {
            (Some(cp), Some(_)) => control::solve_view(cp, &state.wan_netns, None)
                .map_err(|e| tracing::warn!("broker Explain: {e}"))
                .unwrap_or_default(),
            _ => SolveView::default(),
        };
        Ok(Status {
            clusters: state
                .clusters
                .iter()
                .map(|c| StatusCluster {
                    id: c.id.clone(),
                    netns: c.netns.clone(),
                    cgroup: c.cgroup.clone(),
                    gateway: c.address,
                    region: c.region.clone(),
                    nodes: c.nodes.iter().map(|n| n.name.clone()).collect(),
                    broker_nodes: view
                        .as_ref()
                        .map(|v| v.nodes.get(&c.id).cloned().unwrap_or_default()),
                })
                .collect(),
            services: state
                .services
                .iter()
                .map(|s| {
                    let mut backends = BTreeMap::new();
                    for b in &s.backends {
                        let e = backends.entry(b.cluster.clone()).or_insert(0);
                        if b.running() {
                            *e += 1;
                        }
                    }
                    StatusService {
                        name: s.name.clone(),
                        vip: s.vip,
                        port: s.port,
                        backends,
                        ready_pods: state
                            .clusters
                            .iter()
                            .map(|c| (c.id.clone(), s.ready_pods(&c.id)))
                            .collect(),
                        per_pod_capacity: super::capacity::per_pod_of(&state, &s.name),
                        capacity: solve.capacity.get(&s.name).cloned().unwrap_or_default(),
                        demand: solve.demand.get(&s.name).cloned().unwrap_or_default(),
                    }
                })
                .collect(),
            weights: view.as_ref().map(|v| v.weights.clone()).unwrap_or_default(),
            weights_status: view.as_ref().map(|v| v.status.clone()).unwrap_or_default(),
            installed_generation: view.as_ref().map(|v| v.acked.clone()).unwrap_or_default(),
            generation: view.as_ref().map(|v| v.generation),
            links,
            broker_error,
            brokers: match &state.control {
                Some(cp) => super::brokers::broker_statuses(&state, cp),
                None => Vec::new(),
            },
        })
    }
}

/// The table `up` prints.
pub fn render_up(state: &LabState, status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<4} {:<16} {:<12} {:<16} {:<30} {}\n",
        "id", "region", "gateway", "netns", "cgroup", "nodes"
    ));
    for c in &state.clusters {
        let nodes: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
        out.push_str(&format!(
            "{:<4} {:<16} {:<12} {:<16} {:<30} {}\n",
            c.id,
            c.region,
            c.address.to_string(),
            c.netns,
            c.cgroup.display().to_string(),
            nodes.join(" ")
        ));
    }
    out.push('\n');
    for s in &status.services {
        let b: Vec<String> = s.backends.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        out.push_str(&format!(
            "service {} vip {}:{} backends {}\n",
            s.name,
            s.vip,
            s.port,
            b.join(" ")
        ));
        if !s.capacity.is_empty() {
            let caps: Vec<String> = s
                .capacity
                .iter()
                .map(|(c, x)| format!("{c} {x:.0}"))
                .collect();
            out.push_str(&format!("  broker capacity (RPS): {}\n", caps.join("  ")));
        }
        match status.weights.get(&s.name) {
            Some(w) if !w.is_empty() => {
                for (src, dsts) in w {
                    let d: Vec<String> = dsts
                        .iter()
                        .map(|(c, x)| format!("{c} {:.1}%", 100.0 * x))
                        .collect();
                    let flag = match status.weights_status.get(&s.name).and_then(|m| m.get(src)) {
                        Some(st) if *st != WeightsStatus::Optimal => format!("  ({st})"),
                        _ => String::new(),
                    };
                    out.push_str(&format!("  weights from {src}: {}{flag}\n", d.join("  ")));
                }
            }
            _ => out.push_str("  weights: none published yet\n"),
        }
    }
    if let Some(g) = status.generation {
        let inst: Vec<String> = state
            .clusters
            .iter()
            .map(|c| match status.installed_generation.get(&c.id) {
                Some(x) => format!("{} {x}", c.id),
                None => format!("{} -", c.id),
            })
            .collect();
        out.push_str(&format!(
            "broker generation {g}; installed: {}\n",
            inst.join("  ")
        ));
    }
    if let Some(e) = &status.broker_error {
        out.push_str(&format!("broker: {e}\n"));
    }
    if status.brokers.len() > 1 {
        out.push_str(&format!(
            "brokers: {}\n",
            super::brokers::render(&status.brokers)
        ));
    }
    out.push_str("\nlinks (one-way ms):\n");
    for l in status.links.iter().filter(|l| l.from < l.to) {
        out.push_str(&format!("  {} <-> {}  {:.1} ms", l.from, l.to, l.delay_ms));
        if l.loss > 0.0 {
            out.push_str(&format!("  loss {:.1}%", 100.0 * l.loss));
        }
        out.push('\n');
    }
    out
}
