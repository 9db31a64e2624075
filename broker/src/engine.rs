//! The engine: turns the stored measurements into one [`Problem`] per service, solves them
//! with the model, and publishes a new weights generation when anything changed.
//!
//! How measurements become a problem (per service):
//! - capacity `cap(t)` = sum over the nodes of `t` of their fresh capacity samples; the
//!   serving clusters are those with `cap(t) > 0`;
//! - demand `N(s)` = sum over the nodes of `s` and over destinations of their fresh RPS samples;
//!   when a source has no RPS yet (or 0), it gets a small default demand,
//!   `max(--default-demand-rps, number of serving clusters)`, so that weights exist from the
//!   start and the liveness floor (1 RPS per serving destination) is feasible;
//! - sources are the clusters that import the service, as their agents declare
//!   (`ReportRequest.imports`, sent when they change): per cluster, the union of the latest
//!   declarations of its nodes heard from within the stale-after age, or of all its nodes'
//!   declarations when none was (imports are configuration, kept while the agents are quiet);
//!   a cluster none of whose nodes ever declared imports every service. A service no cluster
//!   imports gets no weights. A node not heard from for the cluster expiry loses its
//!   declaration (pruned at the start of a round);
//! - RTT(s, t) = the median over the nodes of `s` of their fresh, reachable samples to `t`.
//!
//! Retention: after every publish the store keeps the newest `keep_generations` generations
//! and prunes older ones ([`Store::prune_generations`]), and at most that many solver runs
//! ([`Store::prune_solver_runs`], also after rounds that publish nothing); the in-memory
//! current generation and the sequence after a restart do not depend on the pruned rows.
//!
//! Stale inputs: a sample older than the stale-after age is never used. When a service's
//! capacity at some cluster, or an RTT between a source and a (possibly) serving cluster, has
//! only stale samples, the service keeps its previous weights, flagged `stale` with a reason
//! naming the input (and counted in the `stale_inputs` / `stale_services` metrics). A service
//! that never had weights gets none until its inputs are fresh.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use ballast_model::{
    Cluster, Explanation, Matrix, Params, Policy, PriceTable, Problem, ServiceInput,
    ServiceSolution, SolveOptions, Status,
};
use ballast_store::{ImportDeclaration, SolverRunRecord, Store, StoreError, WeightRecord};

/// How the engine turns measurements into weights.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Samples older than this are not used.
    pub stale_after: Duration,
    /// Herd damping: the largest move of one weight per round (`None` = undamped).
    pub max_step: Option<f64>,
    /// Demand (RPS) of a source that reported no RPS for a service yet.
    pub default_demand_rps: f64,
    /// The cluster-wide policy when none is stored.
    pub policy: Policy,
    /// The cluster-wide params when none are stored.
    pub params: Params,
    /// Egress prices when none are stored.
    pub prices: PriceTable,
    /// Retention: how many published generations the store keeps (the newest ones); older
    /// ones are pruned after every publish.
    pub keep_generations: NonZeroU64,
    /// A cluster heard from (registration or report) longer ago than this is treated as gone:
    /// neither a source nor a destination, its samples unused, so the other clusters'
    /// weights are solved again without it instead of staying stale. `None` = never.
    pub cluster_expiry: Option<Duration>,
}

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
            default_demand_rps: 10.0,
            policy: Policy::Optimized,
            params: Params::Mixed,
            prices: DEFAULT_PRICES,
            keep_generations: DEFAULT_KEEP_GENERATIONS,
            cluster_expiry: Some(DEFAULT_CLUSTER_EXPIRY),
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

/// How one service's weights were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsState {
    Optimal,
    Degraded,
    Stale,
}

impl WeightsState {
    /// The store's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optimal => "optimal",
            Self::Degraded => "degraded",
            Self::Stale => "stale",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "optimal" => Self::Optimal,
            "stale" => Self::Stale,
            _ => Self::Degraded,
        }
    }
}

/// The weights of one (service, source).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Destination -> weight.
    pub weights: BTreeMap<String, f64>,
    pub status: WeightsState,
    pub reason: String,
    pub policy: Policy,
    pub params: Params,
    pub computed_at_ms: i64,
}

impl Entry {
    /// The same weights (within 1e-9), status, reason, policy and params; when the entry
    /// was computed does not count.
    #[must_use]
    pub fn same_as(&self, other: &Entry) -> bool {
        same_weights(&self.weights, &other.weights)
            && self.status == other.status
            && self.reason == other.reason
            && self.policy == other.policy
            && self.params == other.params
    }
}

/// One published generation: every (service, source) entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    pub generation: u64,
    pub created_at_ms: i64,
    /// `(service, source) -> entry`.
    pub entries: BTreeMap<(String, String), Entry>,
}

/// The solve input of one service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePlan {
    /// A one-service problem.
    pub problem: Problem,
    /// Why the service's inputs are stale (empty = fresh).
    pub stale: Vec<String>,
}

/// Every service's plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Inputs {
    pub services: BTreeMap<String, ServicePlan>,
    /// Count of stale inputs (capacity per (cluster, service), RTT pairs).
    pub stale_inputs: usize,
    /// Registered clusters taken into account (not expired).
    pub clusters: usize,
    /// Registered clusters not heard from within the cluster expiry, left out.
    pub expired: BTreeSet<String>,
}

/// Engine failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Model(#[from] ballast_model::ModelError),
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The store spelling of a policy.
#[must_use]
pub fn policy_str(p: Policy) -> &'static str {
    match p {
        Policy::RoundRobin => "round-robin",
        Policy::WeightedRoundRobin => "weighted-round-robin",
        Policy::Optimized => "optimized",
    }
}

/// The store spelling of params.
#[must_use]
pub fn params_str(p: Params) -> &'static str {
    match p {
        Params::Cost => "cost",
        Params::Performance => "performance",
        Params::Mixed => "mixed",
    }
}

/// Parses a policy (`round-robin`, `weighted-round-robin`, `optimized`).
#[must_use]
pub fn parse_policy(s: &str) -> Option<Policy> {
    match s {
        "round-robin" => Some(Policy::RoundRobin),
        "weighted-round-robin" => Some(Policy::WeightedRoundRobin),
        "optimized" => Some(Policy::Optimized),
        _ => None,
    }
}

/// Parses params (`cost`, `performance`, `mixed`).
#[must_use]
pub fn parse_params(s: &str) -> Option<Params> {
    match s {
        "cost" => Some(Params::Cost),
        "performance" => Some(Params::Performance),
        "mixed" => Some(Params::Mixed),
        _ => None,
    }
}

/// The services each declaring cluster imports: per cluster, the union of the declarations of
/// its nodes heard from at or after `cut`, or of all of them when none was. Clusters none of
/// whose nodes declared are absent (they import every service).
fn import_sets(decls: Vec<ImportDeclaration>, cut: i64) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_cluster: BTreeMap<String, Vec<ImportDeclaration>> = BTreeMap::new();
    for d in decls {
        by_cluster.entry(d.cluster_id.clone()).or_default().push(d);
    }
    by_cluster
        .into_iter()
        .map(|(cluster, decls)| {
            let any_fresh = decls.iter().any(|d| d.heard_at_ms >= cut);
            let services = decls
                .into_iter()
                .filter(|d| !any_fresh || d.heard_at_ms >= cut)
                .flat_map(|d| d.services)
                .collect();
            (cluster, services)
        })
        .collect()
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

fn same_weights(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (va - vb).abs() <= 1e-9)
}

fn same_entries(
    a: &BTreeMap<(String, String), Entry>,
    b: &BTreeMap<(String, String), Entry>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, ea), (kb, eb))| ka == kb && ea.same_as(eb))
}

struct RoundState {
    last_digest: String,
    next_run_id: i64,
    /// Service -> (digest of its plan and previous weights, its last solutions): a service
    /// whose inputs did not change since the last round is not solved again.
    solved: BTreeMap<String, (String, Vec<ServiceSolution>)>,
}

/// The engine (shared by the gRPC services and the solve loop).
pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    published: watch::Sender<Arc<Published>>,
    trigger: Notify,
    /// Set by [`Engine::trigger`], cleared when a round starts: a permit left in `trigger`
    /// by a trigger that an earlier round already covered does not cause another round.
    dirty: AtomicBool,
    round: tokio::sync::Mutex<RoundState>,
    known: RwLock<BTreeSet<String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

impl Engine {
    /// Loads the last published generation and the known clusters from the store.
    ///
    /// # Errors
    /// A store error.
    pub async fn load(
        store: Store,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let generation = store.last_generation().await?;
        let mut entries: BTreeMap<(String, String), Entry> = BTreeMap::new();
        let mut created = 0;
        for w in store.weights_of(generation).await? {
            created = created.max(w.computed_at_ms);
            let e = entries
                .entry((w.service.clone(), w.src.clone()))
                .or_insert_with(|| Entry {
                    weights: BTreeMap::new(),
                    status: WeightsState::parse(&w.status),
                    reason: w.reason.clone(),
                    policy: parse_policy(&w.policy).unwrap_or(cfg.policy),
                    params: parse_params(&w.params).unwrap_or(cfg.params),
                    computed_at_ms: w.computed_at_ms,
                });
            e.weights.insert(w.dst, w.weight);
        }
        let generation = u64::try_from(generation).unwrap_or(0);
        info!(
            generation,
            entries = entries.len(),
            "loaded last published generation"
        );
        metrics
            .generation
            .set(i64::try_from(generation).unwrap_or(0));
        let known: BTreeSet<String> = store
            .clusters()
            .await?
            .into_iter()
            .map(|c| c.cluster_id)
            .collect();
        metrics
            .clusters
            .set(i64::try_from(known.len()).unwrap_or(0));
        let next_run_id = store.last_run_id().await? + 1;
        let (published, _) = watch::channel(Arc::new(Published {
            generation,
            created_at_ms: created,
            entries,
        }));
        Ok(Self {
            store,
            cfg,
            metrics,
            published,
            trigger: Notify::new(),
            dirty: AtomicBool::new(false),
            round: tokio::sync::Mutex::new(RoundState {
                last_digest: String::new(),
                next_run_id,
                solved: BTreeMap::new(),
            }),
            known: RwLock::new(known),
        })
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The metrics.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The latest published generation.
    #[must_use]
    pub fn current(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// A receiver that sees every new generation.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// Asks the solve loop for a (debounced) round.
    pub fn trigger(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.trigger.notify_one();
    }

    /// Whether a cluster is registered.
    #[must_use]
    pub fn is_known(&self, cluster_id: &str) -> bool {
        self.known
            .read()
            .map(|k| k.contains(cluster_id))
            .unwrap_or(false)
    }

    /// Every registered cluster id, sorted.
    #[must_use]
    pub fn known(&self) -> Vec<String> {
        self.known
            .read()
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a newly registered cluster.
    pub fn add_known(&self, cluster_id: &str) {
        if let Ok(mut k) = self.known.write() {
            k.insert(cluster_id.to_string());
            self.metrics
                .clusters
                .set(i64::try_from(k.len()).unwrap_or(0));
        }
    }

    /// The effective (policy, params) of a service (`""` = cluster-wide).
    ///
    /// # Errors
    /// A store error.
    pub async fn policy_of(&self, service: &str) -> Result<(Policy, Params), EngineError> {
        let rows = self.store.policies().await?;
        Ok(resolve_policy(&rows, service, &self.cfg))
    }

    async fn prices(&self) -> Result<PriceTable, EngineError> {
        let mut p = self.cfg.prices;
        for (tier, v) in self.store.prices().await? {
            match tier.as_str() {
                "same_zone" => p.same_zone = v,
                "cross_zone" => p.cross_zone = v,
                "cross_region" => p.cross_region = v,
                "internet" => p.internet = v,
                other => warn!(tier = other, "unknown price tier in the store, ignored"),
            }
        }
        Ok(p)
    }

    /// Builds every service's problem from the store, as of `now_ms`.
    ///
    /// # Errors
    /// A store error.
    #[allow(clippy::too_many_lines)]
    pub async fn inputs(&self, now_ms: i64) -> Result<Inputs, EngineError> {
        let expired = self.expired_clusters(now_ms).await?;
        let clusters: Vec<_> = self
            .store
            .clusters()
            .await?
            .into_iter()
            .filter(|c| !expired.contains(&c.cluster_id))
            .collect();
        let known: BTreeSet<&str> = clusters.iter().map(|c| c.cluster_id.as_str()).collect();
        let stale_ms = i64::try_from(self.cfg.stale_after.as_millis()).unwrap_or(i64::MAX);
        let cut = now_ms.saturating_sub(stale_ms);
        let stale_txt = humantime::format_duration(self.cfg.stale_after).to_string();
        let policies = self.store.policies().await?;
        let prices = self.prices().await?;

        // RTT: median of fresh reachable samples per (src, dst); pairs with only stale samples.
        let mut rtt_groups: BTreeMap<(String, String), (Vec<f64>, bool)> = BTreeMap::new();
        for r in self.store.rtt().await? {
            if !known.contains(r.src.as_str()) || !known.contains(r.dst.as_str()) {
                continue;
            }
            let g = rtt_groups.entry((r.src, r.dst)).or_default();
            if r.measured_at_ms >= cut {
                g.1 = true;
                if r.reachable {
                    g.0.push(r.rtt_ms);
                }
            }
        }
        let mut rtt_ms = Matrix::new();
        let mut stale_rtt: BTreeSet<(String, String)> = BTreeSet::new();
        for ((s, d), (mut v, any_fresh)) in rtt_groups {
            if !any_fresh {
                stale_rtt.insert((s, d));
            } else if let Some(m) = median(&mut v) {
                rtt_ms.entry(s).or_default().insert(d, m);
            }
        }

        // Capacity: sum of fresh samples per (service, cluster).
        let mut cap: BTreeMap<String, BTreeMap<String, (f64, bool)>> = BTreeMap::new();
        for c in self.store.capacity().await? {
            if !known.contains(c.cluster_id.as_str()) {
                continue;
            }
            let e = cap
                .entry(c.service)
                .or_default()
                .entry(c.cluster_id)
                .or_default();
            if c.measured_at_ms >= cut {
                e.0 += c.capacity_rps;
                e.1 = true;
            }
        }
        // Imports: which services each declaring cluster is a source of.
        let imports = self.imports(now_ms).await?;
        let imports_of = |cluster: &str, svc: &str| {
            imports
                .get(cluster)
                .is_none_or(|services| services.contains(svc))
        };
        // Demand: sum of fresh RPS per (service, source).
        let mut demand: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for r in self.store.rps().await? {
            if !known.contains(r.src.as_str()) {
                continue;
            }
            let e = demand
                .entry(r.service)
                .or_default()
                .entry(r.src)
                .or_default();
            if r.measured_at_ms >= cut {
                *e += r.rps;
            }
        }

        let model_clusters: Vec<Cluster> = clusters
            .iter()
            .map(|c| Cluster {
                id: c.cluster_id.clone(),
                region: c.region.clone(),
                zone: c.zone.clone(),
                provider: c.provider.clone(),
            })
            .collect();
        let services: BTreeSet<&String> = cap.keys().chain(demand.keys()).collect();
        let mut out = Inputs {
            clusters: clusters.len(),
            stale_inputs: stale_rtt.len(),
            expired: expired.clone(),
            ..Inputs::default()
        };
        for svc in services {
            let sources: Vec<&str> = known
                .iter()
                .copied()
                .filter(|c| imports_of(c, svc))
                .collect();
            if sources.is_empty() {
                debug!(service = %svc, "imported by no cluster: no weights");
                continue;
            }
            let caps = cap.get(svc).cloned().unwrap_or_default();
            let mut stale = Vec::new();
            let mut capacity_rps = BTreeMap::new();
            for (t, (c, fresh)) in &caps {
                if !fresh {
                    out.stale_inputs += 1;
                    stale.push(format!(
                        "capacity of {svc} in {t} is older than {stale_txt}"
                    ));
                } else if *c > 0.0 {
                    capacity_rps.insert(t.clone(), *c);
                }
            }
            for s in &sources {
                for t in caps.keys() {
                    if stale_rtt.contains(&((*s).to_string(), t.clone())) {
                        stale.push(format!("rtt {s} -> {t} is older than {stale_txt}"));
                    }
                }
            }
            #[allow(clippy::cast_precision_loss)]
            let floor = self.cfg.default_demand_rps.max(capacity_rps.len() as f64);
            let reported = demand.get(svc);
            let demand_rps: BTreeMap<String, f64> = sources
                .iter()
                .map(|s| {
                    let d = reported.and_then(|m| m.get(*s)).copied().unwrap_or(0.0);
                    ((*s).to_string(), if d > 0.0 { d } else { floor })
                })
                .collect();
            let (policy, params) = resolve_policy(&policies, svc, &self.cfg);
            out.services.insert(
                svc.clone(),
                ServicePlan {
                    problem: Problem {
                        policy,
                        params,
                        clusters: model_clusters.clone(),
                        rtt_ms: rtt_ms.clone(),
                        prices,
                        cost: None,
                        services: vec![ServiceInput {
                            name: svc.clone(),
                            demand_rps,
                            capacity_rps,
                            policy: None,
                            params: None,
                        }],
                    },
                    stale,
                },
            );
        }
        Ok(out)
    }

    /// The services each declaring cluster imports as of `now_ms` (clusters that never
    /// declared are absent: they import every service).
    ///
    /// # Errors
    /// A store error.
    pub async fn imports(
        &self,
        now_ms: i64,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, EngineError> {
        let stale_ms = i64::try_from(self.cfg.stale_after.as_millis()).unwrap_or(i64::MAX);
        Ok(import_sets(
            self.store.imports().await?,
            now_ms.saturating_sub(stale_ms),
        ))
    }

    /// When each registered cluster was last heard from: its latest registration (or
    /// re-registration) or the latest report of any of its agents, whichever is newer.
    ///
    /// # Errors
    /// A store error.
    pub async fn last_heard(&self) -> Result<BTreeMap<String, i64>, EngineError> {
        let mut heard: BTreeMap<String, i64> = self
            .store
            .clusters()
            .await?
            .into_iter()
            .map(|c| {
                let t = c.updated_at_ms.max(c.registered_at_ms);
                (c.cluster_id, t)
            })
            .collect();
        for a in self.store.agents().await? {
            if let Some(t) = heard.get_mut(&a.cluster_id) {
                *t = (*t).max(a.last_report_ms).max(a.registered_at_ms);
            }
        }
        Ok(heard)
    }

    /// The registered clusters not heard from within [`EngineConfig::cluster_expiry`] as of
    /// `now_ms` (none when expiry is off).
    ///
    /// # Errors
    /// A store error.
    pub async fn expired_clusters(&self, now_ms: i64) -> Result<BTreeSet<String>, EngineError> {
        let Some(expiry) = self.cfg.cluster_expiry else {
            return Ok(BTreeSet::new());
        };
        let expiry_ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .last_heard()
            .await?
            .into_iter()
            .filter(|(_, t)| now_ms.saturating_sub(*t) > expiry_ms)
            .map(|(c, _)| c)
            .collect())
    }

    /// One solver round: builds the inputs, solves every service whose inputs are fresh,
    /// keeps the previous weights of stale ones, and publishes a new generation when anything
    /// changed. Returns the generation in force afterwards.
    ///
    /// # Errors
    /// A store error (then nothing is published).
    #[allow(clippy::too_many_lines)]
    pub async fn run_round(&self) -> Result<u64, EngineError> {
        let mut rs = self.round.lock().await;
        let started = Instant::now();
        let now = now_ms();
        if let Some(expiry) = self.cfg.cluster_expiry {
            // Nodes not heard from for the cluster expiry (gone from a DaemonSet, say) stop
            // counting in their cluster's imports; an agent that comes back declares again
            // on its new report stream.
            let cut = now.saturating_sub(i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX));
            match self.store.prune_import_declarations(cut).await {
                Ok(0) => {}
                Ok(n) => info!(nodes = n, "forgot the imports of nodes not heard from"),
                Err(e) => {
                    warn!(error = %e, "pruning import declarations failed; retried next round")
                }
            }
        }
        let inputs = self.inputs(now).await?;
        let current = self.current();
        self.metrics
            .clusters
            .set(i64::try_from(inputs.clusters).unwrap_or(0));
        self.metrics
            .expired_clusters
            .set(i64::try_from(inputs.expired.len()).unwrap_or(0));
        self.metrics
            .stale_inputs
            .set(i64::try_from(inputs.stale_inputs).unwrap_or(0));

        // One digest per service plan (reused to skip solving unchanged services), and the
        // round's over all of them.
        let plan_digests: BTreeMap<&String, String> = inputs
            .services
            .iter()
            .map(|(svc, plan)| {
                let mut h = Sha256::new();
                h.update(svc.as_bytes());
                h.update(serde_json::to_vec(plan).unwrap_or_default());
                (svc, hex::encode(h.finalize()))
            })
            .collect();
        let digest = {
            let mut h = Sha256::new();
            for d in plan_digests.values() {
                h.update(d.as_bytes());
            }
            h.update(format!("{:?}|{}", self.cfg.max_step, current.generation));
            hex::encode(h.finalize())
        };
        if digest == rs.last_digest {
            debug!("inputs unchanged, round skipped");
            return Ok(current.generation);
        }
        if !inputs.expired.is_empty() {
            info!(expired = ?inputs.expired, "clusters not heard from within the expiry are left out");
        }

        let mut entries: BTreeMap<(String, String), Entry> = BTreeMap::new();
        let mut objective = 0.0;
        let mut errors = Vec::new();
        let mut degraded = Vec::new();
        let mut stale_services: usize = 0;
        let mut solved = BTreeMap::new();
        for (svc, plan) in &inputs.services {
            // The previous weights of the sources this plan still has (a cluster that stopped
            // importing the service loses them).
            let prev: Vec<(&(String, String), &Entry)> = current
                .entries
                .range((svc.clone(), String::new())..)
                .take_while(|((s, _), _)| s == svc)
                .filter(|((_, src), _)| {
                    plan.problem
                        .services
                        .iter()
                        .any(|si| si.demand_rps.contains_key(src))
                })
                .collect();
            let (policy, params) = (plan.problem.policy, plan.problem.params);
            if !plan.stale.is_empty() {
                stale_services += 1;
                let reason = plan.stale.join("; ");
                if prev.is_empty() {
                    warn!(service = %svc, %reason, "stale inputs and no previous weights: none published");
                }
                for (k, e) in prev {
                    let mut e = e.clone();
                    e.status = WeightsState::Stale;
                    e.reason.clone_from(&reason);
                    entries.insert(k.clone(), e);
                }
                continue;
            }
            if plan
                .problem
                .services
                .iter()
                .all(|s| s.capacity_rps.is_empty())
            {
                debug!(service = %svc, "no serving cluster: no weights");
                continue;
            }
            let mut opts = SolveOptions {
                max_step: self.cfg.max_step,
                previous: BTreeMap::new(),
            };
            if !prev.is_empty() {
                let m: Matrix = prev
                    .iter()
                    .map(|((_, src), e)| (src.clone(), e.weights.clone()))
                    .collect();
                opts.previous.insert(svc.clone(), m);
            }
            // Same plan, same previous weights, same damping: the same solutions.
            let key = {
                let mut h = Sha256::new();
                h.update(plan_digests.get(svc).map_or("", String::as_str).as_bytes());
                h.update(format!("{:?}", opts.max_step));
                h.update(serde_json::to_vec(&opts.previous).unwrap_or_default());
                hex::encode(h.finalize())
            };
            let result = match rs.solved.get(svc) {
                Some((k, sols)) if *k == key => Ok(sols.clone()),
                _ => ballast_model::solve(&plan.problem, &opts),
            };
            if let Ok(sols) = &result {
                solved.insert(svc.clone(), (key, sols.clone()));
            }
            match result {
                Ok(solutions) => {
                    for sol in solutions {
                        objective += sol.objective;
                        let status = match sol.status {
                            Status::Optimal => WeightsState::Optimal,
                            Status::Degraded => WeightsState::Degraded,
                        };
                        let reason = sol.reason.clone().unwrap_or_default();
                        if status == WeightsState::Degraded {
                            degraded.push(format!("{}: {reason}", sol.name));
                        }
                        for (src, w) in sol.weights {
                            if w.is_empty() {
                                continue;
                            }
                            entries.insert(
                                (sol.name.clone(), src),
                                Entry {
                                    weights: w,
                                    status,
                                    reason: reason.clone(),
                                    policy,
                                    params,
                                    computed_at_ms: now,
                                },
                            );
                        }
                    }
                }
                Err(e) => {
                    warn!(service = %svc, error = %e, "solve failed; previous weights kept");
                    errors.push(format!("{svc}: {e}"));
                    for (k, prev_e) in prev {
                        let mut pe = prev_e.clone();
                        pe.status = WeightsState::Degraded;
                        pe.reason = format!("solve failed ({e}); previous weights kept");
                        entries.insert(k.clone(), pe);
                    }
                }
            }
        }
        self.metrics
            .stale_services
            .set(i64::try_from(stale_services).unwrap_or(0));
        let duration = started.elapsed();
        self.metrics.solve_duration.observe(duration.as_secs_f64());

        // A pair whose weights did not change keeps its entry as published before (with its
        // computation time), so the entries in memory are what the store holds and reloads.
        for (k, e) in &mut entries {
            if let Some(old) = current.entries.get(k) {
                if old.same_as(e) {
                    e.clone_from(old);
                }
            }
        }
        let changed = !same_entries(&current.entries, &entries);
        let generation = if changed {
            current.generation + 1
        } else {
            current.generation
        };
        let status = if !errors.is_empty() {
            "error"
        } else if !degraded.is_empty() || stale_services > 0 {
            "degraded"
        } else {
            "optimal"
        };
        let run = SolverRunRecord {
            id: rs.next_run_id,
            started_at_ms: now,
            inputs_digest: digest.clone(),
            status: status.to_string(),
            objective,
            duration_ms: duration.as_secs_f64() * 1000.0,
            services: i64::try_from(inputs.services.len()).unwrap_or(0),
            generation: i64::try_from(generation).unwrap_or(0),
            detail: errors
                .iter()
                .chain(degraded.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
        };
        if changed {
            // Only what changed is written; the store carries every other pair over.
            let rows: Vec<WeightRecord> = entries
                .iter()
                .filter(|(k, e)| current.entries.get(*k).is_none_or(|old| !old.same_as(e)))
                .flat_map(|((svc, src), e)| {
                    e.weights.iter().map(move |(dst, w)| WeightRecord {
                        service: svc.clone(),
                        src: src.clone(),
                        dst: dst.clone(),
                        weight: *w,
                        status: e.status.as_str().to_string(),
                        reason: e.reason.clone(),
                        policy: policy_str(e.policy).to_string(),
                        params: params_str(e.params).to_string(),
                        computed_at_ms: e.computed_at_ms,
                    })
                })
                .collect();
            let removed: Vec<(String, String)> = current
                .entries
                .keys()
                .filter(|k| !entries.contains_key(*k))
                .cloned()
                .collect();
            self.store
                .publish(
                    i64::try_from(generation).unwrap_or(0),
                    now,
                    &rows,
                    &removed,
                    &run,
                )
                .await?;
            self.published.send_replace(Arc::new(Published {
                generation,
                created_at_ms: now,
                entries,
            }));
            self.metrics
                .generation
                .set(i64::try_from(generation).unwrap_or(0));
            info!(
                generation,
                status,
                ms = run.duration_ms,
                "published a new generation"
            );
            // Retention. A failure leaves the old rows for the next publish's prune (which
            // computes what to delete from the table, not from this round); the generation
            // is already published.
            match self
                .store
                .prune_generations(self.cfg.keep_generations)
                .await
            {
                Ok(p) if p.generations > 0 => debug!(
                    up_to = p.up_to_generation,
                    generations = p.generations,
                    weights = p.weights,
                    solver_runs = p.solver_runs,
                    "pruned old generations"
                ),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "pruning old generations failed; retried after the next publish")
                }
            }
        } else {
            self.store.record_run(&run).await?;
            // Runs that published nothing all carry the current generation: bound them too.
            if let Err(e) = self
                .store
                .prune_solver_runs(self.cfg.keep_generations)
                .await
            {
                warn!(error = %e, "pruning old solver runs failed; retried after the next round");
            }
        }
        rs.next_run_id += 1;
        rs.last_digest = digest;
        rs.solved = solved;
        Ok(generation)
    }

    /// Explains a service's weights for one source, with the inputs as of now.
    ///
    /// # Errors
    /// `NotFound` for an unknown service or source; a model or store error.
    pub async fn explain(
        &self,
        service: &str,
        source: &str,
    ) -> Result<(Explanation, ServicePlan), EngineError> {
        if !self.is_known(source) {
            return Err(EngineError::NotFound(format!(
                "source_cluster_id: unknown cluster {source:?}"
            )));
        }
        let mut inputs = self.inputs(now_ms()).await?;
        let plan = inputs.services.remove(service).ok_or_else(|| {
            EngineError::NotFound(format!(
                "service: no plan for {service:?} (unknown, or imported by no cluster)"
            ))
        })?;
        if !plan
            .problem
            .services
            .iter()
            .any(|s| s.demand_rps.contains_key(source))
        {
            return Err(EngineError::NotFound(format!(
                "source_cluster_id: {source:?} does not import {service:?} (its agents' \
                 declared imports leave it out)"
            )));
        }
        let ex = ballast_model::explain(&plan.problem, service, source)?;
        Ok((ex, plan))
    }

    /// The solve loop: a round every `interval`, and `debounce` after a trigger, until
    /// `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        debounce: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.trigger.notified() => {
                    if !self.dirty.load(Ordering::SeqCst) {
                        continue;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(debounce) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            self.dirty.store(false, Ordering::SeqCst);
            if let Err(e) = self.run_round().await {
                warn!(error = %e, "solver round failed");
            }
        }
    }
}

/// The effective (policy, params) of `service` given the stored policies.
#[must_use]
pub fn resolve_policy(
    rows: &[ballast_store::PolicyRecord],
    service: &str,
    cfg: &EngineConfig,
) -> (Policy, Params) {
    let mut policy = cfg.policy;
    let mut params = cfg.params;
    for scope in ["", service] {
        if let Some(r) = rows.iter().find(|r| r.scope == scope) {
            if let Some(p) = parse_policy(&r.policy) {
                policy = p;
            }
            if let Some(p) = parse_params(&r.params) {
                params = p;
            }
        }
    }
    (policy, params)
}
