//! `status`: what the lab is (from its state), what the broker publishes and the agents
//! installed (from the broker's Admin API, when a control plane runs), and the link table;
//! `render_up` is the table `up` and `status` print.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Lab, LabState};
use crate::control;
use crate::error::Result;
use crate::wan::{self, LinkTable};

/// What `status --json` prints (the shape, plus links).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub clusters: Vec<StatusCluster>,
    pub services: Vec<StatusService>,
    /// service -> source cluster -> destination cluster -> weight.
    pub weights: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// cluster -> generation its agent installed.
    pub installed_generation: BTreeMap<String, u64>,
    /// The generation the broker published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub links: Vec<wan::Link>,
    /// Why weights are missing, when the broker could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusCluster {
    pub id: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub gateway: Ipv4Addr,
    pub region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// Running backends per cluster.
    pub backends: BTreeMap<String, usize>,
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
                    }
                })
                .collect(),
            weights: view.as_ref().map(|v| v.weights.clone()).unwrap_or_default(),
            installed_generation: view.as_ref().map(|v| v.acked.clone()).unwrap_or_default(),
            generation: view.as_ref().map(|v| v.generation),
            links,
            broker_error,
        })
    }
}

/// The table `up` prints.
pub fn render_up(state: &LabState, status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<4} {:<16} {:<12} {:<16} {}\n",
        "id", "region", "gateway", "netns", "cgroup"
    ));
    for c in &state.clusters {
        out.push_str(&format!(
            "{:<4} {:<16} {:<12} {:<16} {}\n",
            c.id,
            c.region,
            c.address.to_string(),
            c.netns,
            c.cgroup.display()
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
        match status.weights.get(&s.name) {
            Some(w) if !w.is_empty() => {
                for (src, dsts) in w {
                    let d: Vec<String> = dsts
                        .iter()
                        .map(|(c, x)| format!("{c} {:.1}%", 100.0 * x))
                        .collect();
                    out.push_str(&format!("  weights from {src}: {}\n", d.join("  ")));
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
