//! cost(src, dst) = a·RTT + b·price.
//!
//! Units and constants (so the two terms are comparable):
//! - RTT in milliseconds, as measured (`rtt_ms[src][dst]`). Missing entries: the reverse
//!   direction is used (a round trip crosses the same two paths); a cluster to itself is 0 ms;
//!   a pair with neither direction measured is assumed as slow as the slowest measured pair
//!   ([`MISSING_RTT_FALLBACK_MS`] when nothing is measured) — pessimistic, never free.
//! - price in USD per GB: the problem's `pair_prices` entry for the ordered pair (a region
//!   price table: providers price inter-region transfer by source region and continent, see
//!   [`crate::egress_prices`]), else the operator's [`PriceTable`] by tier ([`Tier`]); scaled by
//!   [`PRICE_SCALE`] = 1000 (i.e. milli-USD per GB): cross-region at 0.02 USD/GB weighs 20,
//!   like 20 ms of RTT; internet egress at 0.09 USD/GB weighs like 90 ms.
//! - (a, b) per [`Params`]: `performance` = (0.9, 0.1), `mixed` = (0.5, 0.5),
//!   `cost` = (0.1, 0.9). Each keeps a small share of the other term as a tie-breaker.
//! - An explicit `cost` matrix in the problem overrides the formula pair by pair; pairs it
//!   does not list are computed as above.

use std::collections::HashMap;

use serde::Serialize;

use super::{Cluster, Matrix, Params, PriceTable, Problem};

/// Multiplies USD/GB so a price weighs like milliseconds of RTT (milli-USD per GB).
pub const PRICE_SCALE: f64 = 1000.0;
/// RTT assumed for a pair with no measurement in either direction when the problem has no
/// RTT at all; otherwise the largest measured RTT is used.
pub const MISSING_RTT_FALLBACK_MS: f64 = 300.0;

/// Where two clusters are relative to each other, which decides the egress price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Same provider, region and zone (also a cluster to itself).
    SameZone,
    /// Same provider and region, different zone.
    CrossZone,
    /// Same provider, different region.
    CrossRegion,
    /// Different providers: traffic leaves over the internet.
    Internet,
}

/// The price tier between `a` and `b`.
#[must_use]
pub fn tier(a: &Cluster, b: &Cluster) -> Tier {
    if a.provider != b.provider {
        Tier::Internet
    } else if a.region != b.region {
        Tier::CrossRegion
    } else if a.zone != b.zone {
        Tier::CrossZone
    } else {
        Tier::SameZone
    }
}

impl PriceTable {
    /// USD per GB for `tier`.
    #[must_use]
    pub fn price(&self, tier: Tier) -> f64 {
        match tier {
            Tier::SameZone => self.same_zone,
            Tier::CrossZone => self.cross_zone,
            Tier::CrossRegion => self.cross_region,
            Tier::Internet => self.internet,
        }
    }
}

/// The egress price (USD/GB) from cluster `src` to cluster `dst` as the cost uses it: the
/// problem's `pair_prices` entry, else the tier's price. `None` for an unknown cluster.
#[must_use]
pub fn egress_price(problem: &Problem, src: &str, dst: &str) -> Option<f64> {
    if let Some(p) = problem.pair_prices.get(src).and_then(|row| row.get(dst)) {
        return Some(*p);
    }
    let a = problem.clusters.iter().find(|c| c.id == src)?;
    let b = problem.clusters.iter().find(|c| c.id == dst)?;
    Some(problem.prices.price(tier(a, b)))
}

/// (a, b) in cost = a·RTT_ms + b·price_usd_per_gb·[`PRICE_SCALE`].
#[must_use]
pub fn coefficients(params: Params) -> (f64, f64) {
    match params {
        Params::Performance => (0.9, 0.1),
        Params::Mixed => (0.5, 0.5),
        Params::Cost => (0.1, 0.9),
    }
}

/// The cost of every ordered pair of clusters (including a cluster to itself) under `params`,
/// with the explicit `cost` entries of the problem taking precedence.
///
/// Call [`super::validate`] first; values referring to unknown clusters are ignored here.
#[must_use]
pub fn cost_matrix(problem: &Problem, params: Params) -> Matrix {
    let mut model = CostModel::new(problem, params);
    let n = problem.clusters.len();
    let mut out = Matrix::new();
    for s in 0..n {
        let row = out.entry(problem.clusters[s].id.clone()).or_default();
        for t in 0..n {
            row.insert(problem.clusters[t].id.clone(), model.cost(s, t));
        }
    }
    out
}

/// Cluster id -> position in `problem.clusters`.
pub(crate) fn index(problem: &Problem) -> HashMap<&str, usize> {
    problem
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect()
}

type Row = std::collections::BTreeMap<String, f64>;

/// Lazily computed, cached cost of pairs of clusters by index.
pub(crate) struct CostModel<'a> {
    problem: &'a Problem,
    a: f64,
    b: f64,
    missing_rtt: f64,
    /// `rtt_ms` / `cost` / `pair_prices` rows by cluster index (one map lookup per pair
    /// instead of two).
    rtt_rows: Vec<Option<&'a Row>>,
    price_rows: Vec<Option<&'a Row>>,
    cost_rows: Vec<Option<&'a Row>>,
    cache: Vec<f64>,
}

fn rows<'a>(problem: &'a Problem, m: Option<&'a Matrix>) -> Vec<Option<&'a Row>> {
    problem
        .clusters
        .iter()
        .map(|c| m.and_then(|m| m.get(&c.id)))
        .collect()
}

impl<'a> CostModel<'a> {
    pub(crate) fn new(problem: &'a Problem, params: Params) -> Self {
        let (a, b) = coefficients(params);
        let missing_rtt = problem
            .rtt_ms
            .values()
            .flat_map(|row| row.values().copied())
            .filter(|v| v.is_finite())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            .unwrap_or(MISSING_RTT_FALLBACK_MS);
        let n = problem.clusters.len();
        Self {
            problem,
            a,
            b,
            missing_rtt,
            rtt_rows: rows(problem, Some(&problem.rtt_ms)),
            price_rows: rows(problem, Some(&problem.pair_prices)),
            cost_rows: rows(problem, problem.cost.as_ref()),
            cache: vec![f64::NAN; n * n],
        }
    }

    /// Measured (or assumed, see the module doc) RTT from cluster `s` to cluster `t`.
    pub(crate) fn rtt(&self, s: usize, t: usize) -> f64 {
        let get = |x: usize, y: usize| {
            self.rtt_rows[x]
                .and_then(|row| row.get(&self.problem.clusters[y].id))
                .copied()
        };
        get(s, t)
            .or_else(|| get(t, s))
            .unwrap_or(if s == t { 0.0 } else { self.missing_rtt })
    }

    /// Egress price (USD/GB) from cluster `s` to cluster `t`: the pair's entry in
    /// `pair_prices`, else the tier's price.
    pub(crate) fn price(&self, s: usize, t: usize) -> f64 {
        let (cs, ct) = (&self.problem.clusters[s], &self.problem.clusters[t]);
        self.price_rows[s]
            .and_then(|row| row.get(&ct.id))
            .copied()
            .unwrap_or_else(|| self.problem.prices.price(tier(cs, ct)))
    }

    /// cost(s, t), cached.
    pub(crate) fn cost(&mut self, s: usize, t: usize) -> f64 {
        let n = self.problem.clusters.len();
        let cached = self.cache[s * n + t];
        if !cached.is_nan() {
            return cached;
        }
        let ct = &self.problem.clusters[t];
        let explicit = self.cost_rows[s].and_then(|row| row.get(&ct.id)).copied();
        let value = explicit.unwrap_or_else(|| {
            let price = self.price(s, t) * PRICE_SCALE;
            self.a * self.rtt(s, t) + self.b * price
        });
        self.cache[s * n + t] = value;
        value
    }
}
