//! The rows the store reads and writes, one struct per kind; rows read back are mapped with
//! `sqlx::FromRow` (column names = field names).

use std::collections::BTreeSet;

/// A registered cluster.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClusterRecord {
    pub cluster_id: String,
    pub region: String,
    pub zone: String,
    pub provider: String,
    pub gateway_address: String,
    pub registered_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One agent (node) of a cluster.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AgentRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub agent_version: String,
    pub registered_at_ms: i64,
    /// When its last report was received (0 = never).
    pub last_report_ms: i64,
    /// The highest generation it acknowledged as applied (0 = none).
    pub acked_generation: i64,
}

/// Latest RTT from `src` to `dst` as measured by one node of `src`.
#[derive(Debug, Clone, PartialEq)]
pub struct RttRecord {
    pub src: String,
    pub dst: String,
    pub node_name: String,
    pub rtt_ms: f64,
    pub loss_ratio: f64,
    pub reachable: bool,
    pub measured_at_ms: i64,
}

/// Latest RPS sent by one node of `src` for `service` to `dst`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RpsRecord {
    pub src: String,
    pub service: String,
    pub dst: String,
    pub node_name: String,
    pub rps: f64,
    pub measured_at_ms: i64,
    /// Payload bytes per second the node sent to `dst` for `service` (requests).
    pub bytes_sent_per_s: f64,
    /// Payload bytes per second it received from `dst` (responses).
    pub bytes_received_per_s: f64,
}

/// Latest capacity of one node's share of `service` in `cluster_id`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CapacityRecord {
    pub cluster_id: String,
    pub service: String,
    pub node_name: String,
    pub capacity_rps: f64,
    pub measured_at_ms: i64,
    /// The declared service-time curve (`base_ms + slope x load`), when the sample carried
    /// one: both or neither.
    pub service_base_ms: Option<f64>,
    pub service_slope_ms_per_rps: Option<f64>,
    /// The service time (ms) the node measured on the cluster's endpoints with the sample.
    pub measured_service_ms: Option<f64>,
    /// The unit `capacity_rps` counts (`ballast_types::LoadUnit` spelling: `connections`,
    /// `requests` or `bytes`).
    pub load_unit: String,
}

/// One row of the policy CRD's egress prices, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CrdPriceRecord {
    pub provider: String,
    pub from_region: String,
    pub to_region: String,
    pub usd_per_gb: f64,
    pub note: String,
}

/// One point of a (service, cluster)'s service-time curve: the measured service time and the
/// load the broker saw on the cluster then. The leader records them (one per
/// [`ServiceTimePoint::at_ms`], keyed by the newest sample's time); every replica fits from them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ServiceTimePoint {
    pub service: String,
    pub cluster_id: String,
    /// When the newest sample in the point was measured (Unix ms).
    pub at_ms: i64,
    /// RPS sent to the cluster for the service then (every source, every node).
    pub load_rps: f64,
    /// The measured service time (ms): the median over the cluster's fresh node samples.
    pub service_ms: f64,
}

/// One validated report of one agent, stored atomically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub received_at_ms: i64,
    pub rtt: Vec<RttRecord>,
    pub rps: Vec<RpsRecord>,
    pub capacity: Vec<CapacityRecord>,
    /// The node's full list of imported services, when the report says it (`None`: not
    /// said; the previous declaration, if any, stays).
    pub imports: Option<Vec<String>>,
    /// `rtt`, `rps` and `capacity` are all of the node's facts: the node's other stored
    /// samples are withdrawn (deleted) with this report.
    pub full_set: bool,
    /// The ServiceImports the node cannot steer for want of a VIP; with `full_set` the
    /// node's full list (replacing what it said before), ignored without it.
    pub services_without_vip: Vec<String>,
}

/// One ServiceImport a node of a cluster cannot steer for want of a VIP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, sqlx::FromRow)]
pub struct WithoutVipRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub service: String,
}

/// What one node last said its cluster imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportDeclaration {
    pub cluster_id: String,
    pub node_name: String,
    /// When the node said it.
    pub declared_at_ms: i64,
    /// When the node was last heard from (its declaration or a later report without one:
    /// agents send their imports only when they change).
    pub heard_at_ms: i64,
    pub services: BTreeSet<String>,
}

/// A policy row: `scope` is `""` for the cluster-wide policy or a service name.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PolicyRecord {
    pub scope: String,
    pub policy: String,
    pub params: String,
}

/// Where a policy row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// Set through the Admin API (`ballast-broker admin policy`, gRPC Admin SetPolicy).
    Admin,
    /// Written from a policy CRD by the broker's watcher.
    Crd,
}

impl PolicyOrigin {
    /// The stored spelling: `admin` or `crd`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Crd => "crd",
        }
    }
}

impl std::fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy row with where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub scope: String,
    pub policy: String,
    pub params: String,
    pub origin: PolicyOrigin,
    /// For origin `crd`: `LoadBalancingPolicy/NAME` or
    /// `ServiceLoadBalancingPolicy/NAMESPACE/NAME`; empty for `admin`.
    pub source: String,
}

/// A policy row a CRD asks for ([`Store::sync_crd_policies`](crate::Store::sync_crd_policies)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdPolicy {
    /// `""` (cluster-wide) or a service name.
    pub scope: String,
    pub policy: String,
    pub params: String,
    /// The object, `LoadBalancingPolicy/NAME` or `ServiceLoadBalancingPolicy/NAMESPACE/NAME`.
    pub source: String,
}

/// What one [`Store::sync_crd_policies`](crate::Store::sync_crd_policies) did, scopes sorted
/// within each list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrdSync {
    /// Scopes written (new or changed).
    pub written: Vec<String>,
    /// Scopes already equal (not rewritten).
    pub unchanged: Vec<String>,
    /// Of `written`: scopes that held an admin row, replaced by the CRD.
    pub replaced_admin: Vec<String>,
    /// CRD rows deleted: their object no longer exists (or names another service now).
    pub deleted: Vec<String>,
    /// CRD rows kept although not desired: their object exists but is invalid now.
    pub kept: Vec<String>,
}

/// One weight of one published generation.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WeightRecord {
    pub service: String,
    pub src: String,
    pub dst: String,
    pub weight: f64,
    pub status: String,
    pub reason: String,
    pub policy: String,
    pub params: String,
    pub computed_at_ms: i64,
}

/// One solver run.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SolverRunRecord {
    pub id: i64,
    pub started_at_ms: i64,
    pub inputs_digest: String,
    pub status: String,
    pub objective: f64,
    pub duration_ms: f64,
    pub services: i64,
    pub generation: i64,
    pub detail: String,
}

/// One acknowledgement from an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub service: String,
    pub generation: i64,
    pub applied: bool,
    pub error: String,
    pub acked_at_ms: i64,
}

/// What one [`Store::prune_generations`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// The newest generation deleted (0 = nothing was deleted).
    pub up_to_generation: i64,
    /// `generations` rows deleted.
    pub generations: u64,
    /// `weights` rows deleted.
    pub weights: u64,
    /// `solver_runs` rows deleted.
    pub solver_runs: u64,
}

/// `reachable` is stored as an integer (0/1) on both databases, which the derive cannot map
/// to `bool`; the other columns map by name.
impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for RttRecord {
    fn from_row(r: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            src: r.try_get("src")?,
            dst: r.try_get("dst")?,
            node_name: r.try_get("node_name")?,
            rtt_ms: r.try_get("rtt_ms")?,
            loss_ratio: r.try_get("loss_ratio")?,
            reachable: r.try_get::<i64, _>("reachable")? != 0,
            measured_at_ms: r.try_get("measured_at_ms")?,
        })
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for StoredPolicy {
    fn from_row(r: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let origin: String = r.try_get("origin")?;
        let origin = match origin.as_str() {
            "admin" => PolicyOrigin::Admin,
            "crd" => PolicyOrigin::Crd,
            other => {
                return Err(sqlx::Error::ColumnDecode {
                    index: "origin".into(),
                    source: format!("unknown policy origin {other:?} (expected admin or crd)")
                        .into(),
                })
            }
        };
        Ok(Self {
            scope: r.try_get("scope")?,
            policy: r.try_get("policy")?,
            params: r.try_get("params")?,
            origin,
            source: r.try_get("source")?,
        })
    }
}
