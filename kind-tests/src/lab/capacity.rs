//! `capacity`: what each cluster declares for a service (capacity per pod, in its topology
//! file) beside the figure the broker solved with, and changing or withdrawing one cluster's
//! declaration.
//!
//! Decision: capacity is a cluster fact. Every node's agent reads the same topology file
//! and reports the same figure (declared per-pod capacity x the cluster's ready pods); the
//! broker must count it once. [`CapacityRow::expected`] is that figure as the lab computes
//! it from its own state (the agent's rule: ready pods = distinct addresses of the
//! cluster's ready endpoints), so `capacity --check` shows at once whether the broker
//! counts it once or once per node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Lab, LabState};
use crate::control::{self, SolveView};
use crate::error::{LabError, Result};

/// One (service, cluster): the declaration, the pods, and the broker's figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityRow {
    pub service: String,
    pub cluster: String,
    /// Declared capacity per pod (RPS); None: not declared.
    pub per_pod: Option<f64>,
    /// Ready pods of the service in the cluster.
    pub ready_pods: usize,
    /// Nodes (agents) of the cluster, each reporting the figure.
    pub nodes: usize,
    /// The broker's capacity for the cluster in its last solve (None: not a serving
    /// destination there).
    pub broker: Option<f64>,
}

impl CapacityRow {
    /// What the broker should solve with: per-pod x ready pods, or None when that is not a
    /// serving capacity (undeclared, or no ready pod).
    pub fn expected(&self) -> Option<f64> {
        let cap = self.per_pod? * self.ready_pods as f64;
        (cap > 0.0).then_some(cap)
    }

    /// Whether the broker's figure is the expected one (to 1e-6 relative).
    pub fn matches(&self) -> bool {
        match (self.expected(), self.broker) {
            (None, None) => true,
            (Some(want), Some(got)) => (want - got).abs() <= 1e-6 * want.max(1.0),
            _ => false,
        }
    }
}

/// The rows of every (service, cluster) of the lab, with the broker's figures from `solve`.
pub fn capacity_rows(state: &LabState, solve: &SolveView) -> Vec<CapacityRow> {
    let mut rows = Vec::new();
    for s in &state.services {
        for c in &state.clusters {
            rows.push(CapacityRow {
                service: s.name.clone(),
                cluster: c.id.clone(),
                per_pod: s.per_pod_capacity(&c.id),
                ready_pods: s.ready_pods(&c.id),
                nodes: c.nodes.len(),
                broker: solve
                    .capacity
                    .get(&s.name)
                    .and_then(|m| m.get(&c.id))
                    .copied(),
            });
        }
    }
    rows
}

/// The rows as a table; a mismatch is marked and says what the broker's figure amounts to.
pub fn render_capacity(rows: &[CapacityRow]) -> String {
    let mut out = format!(
        "{:<12} {:<8} {:>9} {:>5} {:>5} {:>10} {:>10}\n",
        "SERVICE", "CLUSTER", "PER_POD", "PODS", "NODES", "EXPECTED", "BROKER"
    );
    let num = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    for r in rows {
        let mut line = format!(
            "{:<12} {:<8} {:>9} {:>5} {:>5} {:>10} {:>10}",
            r.service,
            r.cluster,
            num(r.per_pod),
            r.ready_pods,
            r.nodes,
            num(r.expected()),
            num(r.broker)
        );
        if !r.matches() {
            line.push_str("  MISMATCH");
            if let (Some(want), Some(got)) = (r.expected(), r.broker) {
                line.push_str(&format!(" ({:.2} x per-pod x pods)", got / want));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

impl Lab {
    /// Every (service, cluster)'s declaration, pods and the broker's figure.
    pub fn capacity(&self) -> Result<Vec<CapacityRow>> {
        let state = self.load_state()?;
        let cp = state.control_plane()?;
        let solve = control::solve_view(cp, &state.wan_netns, None)?;
        Ok(capacity_rows(&state, &solve))
    }

    /// Polls the broker until every row matches (Ok with the rows) or `timeout` passes
    /// (Err naming the rows that do not).
    pub fn wait_capacity(&self, timeout: Duration) -> Result<Vec<CapacityRow>> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.capacity()?;
            if rows.iter().all(CapacityRow::matches) {
                return Ok(rows);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Other(format!(
                    "the broker's capacity is not per-pod x ready pods after {timeout:?}:\n{}",
                    render_capacity(&rows)
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `capacity --cluster C --service S --per-pod X | --none [--unit U]`: rewrites C's declaration in
    /// its topology file (every node of C reads it) and waits (up to `timeout`; zero: not at
    /// all) until the broker solved `service` with C's new figure, or without C. Returns the
    /// row and how long the broker took.
    pub fn set_capacity(
        &self,
        cluster: &str,
        service: &str,
        per_pod: Option<f64>,
        unit: Option<ballast_types::LoadUnit>,
        timeout: Duration,
    ) -> Result<(CapacityRow, Duration)> {
        if let Some(x) = per_pod {
            if !x.is_finite() || x < 0.0 {
                return Err(LabError::invalid(
                    "per-pod",
                    format!("{x}: want a finite number >= 0 (RPS per pod)"),
                ));
            }
        }
        let started;
        {
            let _lock = self.lock()?;
            let mut state = self.load_state()?;
            state.cluster(cluster)?;
            state.service(service)?;
            for s in state.services.iter_mut().filter(|s| s.name == service) {
                s.per_pod_capacity.insert(cluster.to_string(), per_pod);
                if let Some(u) = unit {
                    s.load_unit.insert(cluster.to_string(), u);
                }
            }
            self.save_state(&state)?;
            started = Instant::now();
            if state.control.is_some() {
                control::write_topologies(&self.state_dir, &state)?;
            }
        }
        let row = |rows: Vec<CapacityRow>| {
            rows.into_iter()
                .find(|r| r.service == service && r.cluster == cluster)
                .ok_or_else(|| LabError::Other(format!("no row for {service} in {cluster}")))
        };
        let state = self.load_state()?;
        let Some(cp) = &state.control else {
            let r = row(capacity_rows(&state, &SolveView::default()))?;
            return Ok((r, started.elapsed()));
        };
        let deadline = started + timeout;
        loop {
            let solve = control::solve_view(cp, &state.wan_netns, Some(service))?;
            let r = row(capacity_rows(&state, &solve))?;
            if r.matches() || Instant::now() >= deadline {
                if !r.matches() && !timeout.is_zero() {
                    return Err(LabError::Timeout(format!(
                        "the broker to solve {service} with {cluster}'s new capacity \
                         (after {timeout:?}):\n{}",
                        render_capacity(&[r])
                    )));
                }
                return Ok((r, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The declarations of one cluster, as `status` shows them: cluster -> per-pod (None: none).
pub fn per_pod_of(state: &LabState, service: &str) -> BTreeMap<String, Option<f64>> {
    state
        .service(service)
        .map(|s| {
            state
                .clusters
                .iter()
                .map(|c| (c.id.clone(), s.per_pod_capacity(&c.id)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(per_pod: Option<f64>, pods: usize, broker: Option<f64>) -> CapacityRow {
        CapacityRow {
            service: "demo/echo".into(),
            cluster: "c2".into(),
            per_pod,
            ready_pods: pods,
            nodes: 3,
            broker,
        }
    }

    #[test]
    fn the_broker_figure_must_be_per_pod_times_pods_once() {
        assert!(row(Some(2000.0), 1, Some(2000.0)).matches());
        // summed over 3 nodes: refused, and the table says by how much
        let r = row(Some(2000.0), 1, Some(6000.0));
        assert!(!r.matches());
        assert!(render_capacity(&[r]).contains("MISMATCH (3.00 x"));
        // withdrawn or no ready pod: the cluster must not be a serving destination
        assert!(row(None, 1, None).matches());
        assert!(!row(None, 1, Some(2000.0)).matches());
        assert!(row(Some(2000.0), 0, None).matches());
        assert!(!row(Some(50.0), 2, None).matches());
        assert!(row(Some(50.0), 2, Some(100.0)).matches());
    }
}
