//! Cluster status for operators (`ListClusters`, `admin clusters`): pure, from a
//! [`Snapshot`]. A cluster's last report is the newest sample any of its nodes measured or,
//! if newer, when a node's report was received (not in the future); it is stale when it never
//! reported or that is older than the stale-after age.

use std::collections::{BTreeMap, BTreeSet};

use ballast_store::ClusterRecord;

use super::plan::{expired_clusters, imports};
use super::snapshot::Snapshot;
use super::EngineConfig;

/// One node (agent) of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_name: String,
    pub agent_version: String,
    pub last_report_ms: i64,
    pub acked_generation: u64,
}

/// One registered cluster as the broker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    /// What it registered.
    pub cluster: ClusterRecord,
    /// 0 = never.
    pub last_report_ms: i64,
    /// -1 = never.
    pub last_report_age_ms: i64,
    pub stale: bool,
    pub expired: bool,
    pub nodes: Vec<NodeStatus>,
    /// The services it imports; `None` when its agents never said (it imports every one).
    pub imports: Option<BTreeSet<String>>,
    /// How many services it imports (`None`: never declared), also when `imports` was
    /// read counts-only (then its set is empty).
    pub imports_count: Option<u64>,
    /// The imports its agents cannot steer for want of a VIP ([`without_vip`]).
    pub services_without_vip: BTreeSet<String>,
}

/// The imports each cluster's agents cannot steer for want of a VIP as of `now_ms`: per
/// cluster, the union of the lists of its nodes whose last report is within the stale-after
/// age, or of all of them when none is (a node gone from the cluster stops counting once
/// another reports).
#[must_use]
pub fn without_vip(
    snap: &Snapshot,
    cfg: &EngineConfig,
    now_ms: i64,
) -> BTreeMap<String, BTreeSet<String>> {
    let stale_ms = i64::try_from(cfg.stale_after.as_millis()).unwrap_or(i64::MAX);
    let cut = now_ms.saturating_sub(stale_ms);
    let fresh: BTreeSet<(&str, &str)> = snap
        .agents
        .iter()
        .filter(|a| a.last_report_ms >= cut)
        .map(|a| (a.cluster_id.as_str(), a.node_name.as_str()))
        .collect();
    let mut by_cluster: BTreeMap<&str, Vec<&ballast_store::WithoutVipRecord>> = BTreeMap::new();
    for r in &snap.without_vip {
        by_cluster.entry(&r.cluster_id).or_default().push(r);
    }
    by_cluster
        .into_iter()
        .map(|(cluster, rows)| {
            let is_fresh = |r: &&ballast_store::WithoutVipRecord| {
                fresh.contains(&(r.cluster_id.as_str(), r.node_name.as_str()))
            };
            let any_fresh = rows.iter().any(is_fresh);
            let services = rows
                .into_iter()
                .filter(|r| !any_fresh || is_fresh(r))
                .map(|r| r.service.clone())
                .collect();
            (cluster.to_owned(), services)
        })
        .collect()
}

/// Every registered cluster's status as of `now_ms`, sorted by id.
#[must_use]
pub fn cluster_status(snap: &Snapshot, cfg: &EngineConfig, now_ms: i64) -> Vec<ClusterStatus> {
    let mut newest: BTreeMap<&str, i64> = BTreeMap::new();
    let samples = snap
        .rtt
        .iter()
        .map(|r| (r.src.as_str(), r.measured_at_ms))
        .chain(snap.rps.iter().map(|r| (r.src.as_str(), r.measured_at_ms)))
        .chain(
            snap.capacity
                .iter()
                .map(|r| (r.cluster_id.as_str(), r.measured_at_ms)),
        );
    for (cluster, at) in samples {
        let e = newest.entry(cluster).or_default();
        *e = (*e).max(at);
    }
    let stale_ms = i64::try_from(cfg.stale_after.as_millis()).unwrap_or(i64::MAX);
    let expired = expired_clusters(snap, cfg, now_ms);
    let mut imports = imports(&snap.imports, cfg, now_ms);
    let mut no_vip = without_vip(snap, cfg, now_ms);
    snap.clusters
        .iter()
        .map(|c| {
            let nodes: Vec<NodeStatus> = snap
                .agents
                .iter()
                .filter(|a| a.cluster_id == c.cluster_id)
                .map(|a| NodeStatus {
                    node_name: a.node_name.clone(),
                    agent_version: a.agent_version.clone(),
                    last_report_ms: a.last_report_ms,
                    acked_generation: u64::try_from(a.acked_generation).unwrap_or(0),
                })
                .collect();
            let received = nodes.iter().map(|n| n.last_report_ms).max().unwrap_or(0);
            let last =
                newest
                    .get(c.cluster_id.as_str())
                    .copied()
                    .unwrap_or(0)
                    .max(if received > 0 {
                        received.min(now_ms)
                    } else {
                        0
                    });
            let age = if last > 0 { now_ms - last } else { -1 };
            ClusterStatus {
                cluster: c.clone(),
                last_report_ms: last,
                last_report_age_ms: age,
                stale: last == 0 || age > stale_ms,
                expired: expired.contains(&c.cluster_id),
                nodes,
                imports_count: imports.get(&c.cluster_id).map(|s| {
                    snap.import_counts
                        .get(&c.cluster_id)
                        .copied()
                        .unwrap_or(s.len() as u64)
                }),
                imports: imports.remove(&c.cluster_id),
                services_without_vip: no_vip.remove(&c.cluster_id).unwrap_or_default(),
            }
        })
        .collect()
}
