//! How the engine turns measurements into weights: staleness, damping, default demand, the
//! cluster-wide policy and prices when none are stored, retention and cluster expiry.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use ballast_model::egress_prices::EgressPrices;

use ballast_model::{Params, Policy, PriceTable};
use ballast_store::StoreLimits;

/// How the engine turns measurements into weights.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Samples older than this are not used.
    pub stale_after: Duration,
    /// Herd damping: the largest move of one weight per round (`None` = undamped).
    pub max_step: Option<f64>,
    /// Publication hysteresis: a service is re-published only when some weight moved by more
    /// than this from the published one, or its status, policy, params, sources or
    /// destinations changed (0 = every change is published). See [`super::round`].
    pub publish_threshold: f64,
    /// Demand (RPS) of a source that reported no RPS for a service yet.
    pub default_demand_rps: f64,
    /// The cluster-wide policy when none is stored.
    pub policy: Policy,
    /// The cluster-wide params when none are stored.
    pub params: Params,
    /// Egress prices per tier when none are stored: for the pairs `region_prices` does not
    /// cover (zones of one region, regions or providers the table does not know).
    pub prices: PriceTable,
    /// Egress prices per (provider, source region, destination): the built-in table of
    /// `broker/data/region_egress_prices.csv` with the operator's rows over it
    /// (`--egress-prices`), or none (tiers only).
    pub region_prices: Arc<EgressPrices>,
    /// Retention: how many published generations the store keeps (the newest ones); older
    /// ones are pruned after every publish.
    pub keep_generations: NonZeroU64,
    /// A cluster heard from (registration or report) longer ago than this is treated as gone:
    /// neither a source nor a destination, its samples unused, so the other clusters'
    /// weights are solved again without it instead of staying stale. `None` = never.
    pub cluster_expiry: Option<Duration>,
    /// Per-cluster bounds the store checks (`--max-nodes-per-cluster`,
    /// `--max-imports-per-cluster`).
    pub store_limits: StoreLimits,
    /// Distinct services with a capacity or RPS sample, broker-wide (`--max-services`): a
    /// report that would add services beyond it is refused.
    pub max_services: u64,
}

/// Default of [`EngineConfig::publish_threshold`] (and `--publish-threshold`): 0.02, two
/// slots in a hundred of the agents' selection table — below what a client can tell apart
/// from sampling noise at a few connections per second, and well above the weight jitter a
/// steady load's measured demand causes.
pub const DEFAULT_PUBLISH_THRESHOLD: f64 = 0.02;

/// Default of [`EngineConfig::max_services`] (and `--max-services`).
pub const DEFAULT_MAX_SERVICES: u64 = 50_000;

/// Default of [`EngineConfig::cluster_expiry`] (and `--cluster-expiry`).
pub const DEFAULT_CLUSTER_EXPIRY: Duration = Duration::from_secs(600);

/// Default of [`EngineConfig::keep_generations`] (and `--keep-generations`).
pub const DEFAULT_KEEP_GENERATIONS: NonZeroU64 = match NonZeroU64::new(1000) {
    Some(n) => n,
    None => NonZeroU64::MIN,
};

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(60),
            max_step: Some(0.2),
            publish_threshold: DEFAULT_PUBLISH_THRESHOLD,
            default_demand_rps: 10.0,
            policy: Policy::Optimized,
            params: Params::Mixed,
            prices: DEFAULT_PRICES,
            region_prices: Arc::new(builtin_region_prices()),
            keep_generations: DEFAULT_KEEP_GENERATIONS,
            cluster_expiry: Some(DEFAULT_CLUSTER_EXPIRY),
            store_limits: StoreLimits::default(),
            max_services: DEFAULT_MAX_SERVICES,
        }
    }
}

/// Default egress prices (USD/GB), AWS-like: same zone free, cross zone 0.01, cross region
/// 0.02, internet / other provider 0.09.
pub const DEFAULT_PRICES: PriceTable = PriceTable {
    same_zone: 0.0,
    cross_zone: 0.01,
    cross_region: 0.02,
    internet: 0.09,
};

/// The built-in region price table; empty (tiers only) if the embedded data did not parse,
/// which this crate's tests and `ballast-model`'s rule out.
#[must_use]
pub fn builtin_region_prices() -> EgressPrices {
    EgressPrices::builtin().unwrap_or_default()
}
