//! The broker's model: cost, policies and solvers as pure functions over plain types.
//!
//! No I/O lives here (no tokio, tonic, sqlx or kube; `cargo tree -p ballast-model` shows it):
//! the broker's engine and the `solve` CLI translate their
//! inputs into a [`Problem`] and call [`solve`] / [`explain`].
//!
//! Shapes (the contract the server and the CLI rely on):
//! - cluster ids are strings (`"c1"`);
//! - a weight / flow / cost matrix is `source -> destination -> value`;
//! - every source's weights sum to 1.
//!
//! Layout and decisions (each module documents its own):
//! - [`validate`]: every bad value is an error naming its field path.
//! - [`cost`]: cost = a·RTT + b·price·1000, (a, b) per [`Params`]; explicit `cost` wins;
//!   price = `pair_prices` (from [`egress_prices`]: per provider and source region) or the tier.
//! - sources are the keys of `demand_rps`; destinations are `capacity_rps` entries > 0; a
//!   cluster that is both may serve itself at cost(s, s) and that traffic uses its capacity.
//! - `round-robin`, `local-first-round-robin` (the source's own cluster when it serves, else
//!   round-robin), `weighted-round-robin` (`round_robin.rs`); `optimized` (`optimized.rs`)
//!   solved exactly by [`transport`], checked against a general LP library (good_lp +
//!   microlp, `tests/reference/lp.rs`, a dev-dependency only), with a liveness floor that is
//!   a share of each source's demand ([`liveness_floor_rps`]: min(1 rps, 1 %, 10 % / |T|)).
//! - infeasible or nothing serving: [`Status::Degraded`] with a reason, never an error.
//! - [`damping`]: `SolveOptions::max_step` bounds each weight's move per round.
//! - [`explain`]: per destination cost, flow, weight and the binding constraints.
//! - [`data`]: the region, RTT and egress-price tables of `broker/data/` (embedded), read
//!   once for the lab, the benches and the tests.

use std::collections::BTreeMap;

pub use ballast_types::{Params, Policy, WeightsStatus};
use serde::{Deserialize, Serialize};

/// `source cluster -> destination cluster -> value`.
pub type Matrix = BTreeMap<String, BTreeMap<String, f64>>;

/// Where a cluster runs; the egress price tier between two clusters is derived from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub provider: String,
}

/// Egress price per tier (USD per GB), set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    pub same_zone: f64,
    pub cross_zone: f64,
    pub cross_region: f64,
    pub internet: f64,
}

/// One ServiceImport: demand per source cluster and capacity per serving cluster (RPS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInput {
    pub name: String,
    pub demand_rps: BTreeMap<String, f64>,
    pub capacity_rps: BTreeMap<String, f64>,
    /// Per-service override of the cluster-wide policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Per-service override of the cluster-wide params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Params>,
    /// Service time per request as a function of load, per serving cluster
    /// ([`load_aware::LoadCurve`]). With any curve and params other than `cost`, `optimized`
    /// adds the service time at the resulting load to every request's cost (load-aware,
    /// [`load_aware`]); clusters without a curve add none. Empty: the linear model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_time: BTreeMap<String, load_aware::LoadCurve>,
}

/// Everything a solve needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Problem {
    pub policy: Policy,
    pub params: Params,
    pub clusters: Vec<Cluster>,
    /// Measured RTT, `src -> dst -> ms`.
    #[serde(default)]
    pub rtt_ms: Matrix,
    pub prices: PriceTable,
    /// Egress price per ordered pair of clusters (USD/GB), `src -> dst -> price`, where a
    /// region price table covers the pair ([`egress_prices::EgressPrices`]); pairs it does not
    /// list are priced by tier from `prices`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pair_prices: Matrix,
    /// Explicit cost matrix; when present it is used as is instead of a*RTT + b*price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Matrix>,
    pub services: Vec<ServiceInput>,
}

/// `optimal` when the policy's answer was computed as specified; `degraded` when a stated
/// fallback was used (reason says which and why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Optimal,
    Degraded,
}

impl From<Status> for WeightsStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Optimal => WeightsStatus::Optimal,
            Status::Degraded => WeightsStatus::Degraded,
        }
    }
}

/// The answer for one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSolution {
    pub name: String,
    pub status: Status,
    pub reason: Option<String>,
    /// `src -> dst -> weight`, each source's weights sum to 1.
    pub weights: Matrix,
    /// `src -> dst -> RPS`.
    pub flows: Matrix,
    pub objective: f64,
    pub solve_ms: f64,
}

/// Herd damping: how far one round may move a weight.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SolveOptions {
    /// Largest change of any single weight in one round (e.g. 0.2); `None` = undamped.
    pub max_step: Option<f64>,
    /// Weights published in the previous round, per service name.
    pub previous: BTreeMap<String, Matrix>,
}

pub mod cost;
pub mod damping;
pub mod data;
pub mod egress_prices;
mod error;
mod explain;
pub mod load_aware;
mod optimized;
mod round_robin;
mod service;
pub mod transport;
mod validate;

pub use cost::{cost_matrix, egress_price, Tier};
pub use error::ModelError;
pub use explain::{explain, Binding, DestinationExplanation, Explanation};
pub use optimized::{
    liveness_floor_rps, LIVENESS_FLOOR_RPS, LIVENESS_FLOOR_SHARE, LIVENESS_FLOOR_TOTAL_SHARE,
};
pub use service::solve;
pub use validate::validate;
