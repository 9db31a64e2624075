//! Decision-quality scenarios and their one evaluator (issue 13, part 5), shared by the
//! `decisions` bench (which prints the table of `broker/BENCHMARKS.md`) and the
//! `decision_quality` test (which asserts what the table claims).
//!
//! A scenario is an application of several services in a call chain (front-end requests call
//! the first service, each call of service `i` makes `calls_per_request` calls of service
//! `i + 1` from the cluster that served it), deployed over real regions of `broker/data/`:
//! real RTTs, real per-region egress prices, front-ends in several regions with
//! Pareto-distributed demand, per-cluster capacities set so the fleet runs at a target
//! utilisation, and per-(service, cluster) service times that rise linearly with load
//! (`base + slope x load`, the slope differing by cluster: some clusters slow down faster).
//!
//! Every policy is solved service by service down the chain, as the broker would see the
//! demand each one measures in steady state, and every answer is scored by [`evaluate`]:
//! - mean response time of a front-end request (ms): the sum over the chain's calls of
//!   RTT(source, destination) + service time at the destination's resulting load, weighted by
//!   traffic (calls are sequential); a call inside its own cluster costs [`INTRA_CLUSTER_MS`];
//! - egress USD per hour: request bytes priced by the table price leaving the source, response
//!   bytes by the price leaving the destination (the tier price where the table is silent);
//! - peak utilisation: the largest load / capacity over (service, cluster). Beyond 100 % the
//!   linear curve still applies, which flatters an overloaded answer (a real queue grows
//!   without bound there): the table marks such rows.

#![allow(dead_code)] // each of the two users uses part of it

use std::collections::BTreeMap;

use ballast_model::cost::tier;
use ballast_model::data::RegionData;
use ballast_model::egress_prices::EgressPrices;
use ballast_model::load_aware::LoadCurve;
use ballast_model::{
    solve, Cluster, Matrix, Params, Policy, PriceTable, Problem, ServiceInput, SolveOptions, Status,
};

/// RTT of a call that stays in its cluster (ms).
pub const INTRA_CLUSTER_MS: f64 = 0.5;

/// RTT between two clusters in different zones of one region (ms).
pub const CROSS_ZONE_MS: f64 = 1.5;

/// One service of the chain.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    /// Calls of this service per call of the previous one (the first: per front-end request).
    pub calls_per_request: f64,
    pub request_kb: f64,
    pub response_kb: f64,
    /// RPS each serving cluster can take.
    pub capacity: BTreeMap<String, f64>,
    /// Service time per serving cluster.
    pub curve: BTreeMap<String, LoadCurve>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub params: Params,
    pub clusters: Vec<Cluster>,
    pub frontend_rps: BTreeMap<String, f64>,
    pub services: Vec<ServiceSpec>,
    pub target_utilisation: f64,
    /// Whether every cluster is on AWS (the per-pair vs tier price claim is about those).
    pub aws_only: bool,
}

/// The policies compared, in the table's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    RoundRobin,
    LocalFirstRoundRobin,
    WeightedRoundRobin,
    /// Linear `optimized` priced by the four tiers only.
    LinearTiers,
    /// Linear `optimized` with the per-region price table.
    Linear,
    /// Load-aware `optimized` (service-time curves) with the price table.
    LoadAware,
}

impl Choice {
    pub const ALL: [Choice; 6] = [
        Choice::RoundRobin,
        Choice::LocalFirstRoundRobin,
        Choice::WeightedRoundRobin,
        Choice::LinearTiers,
        Choice::Linear,
        Choice::LoadAware,
    ];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Choice::RoundRobin => "round-robin",
            Choice::LocalFirstRoundRobin => "local-first round-robin",
            Choice::WeightedRoundRobin => "weighted-round-robin",
            Choice::LinearTiers => "optimized, linear, tier prices",
            Choice::Linear => "optimized, linear",
            Choice::LoadAware => "optimized, load-aware",
        }
    }

    fn policy(self) -> Policy {
        match self {
            Choice::RoundRobin => Policy::RoundRobin,
            Choice::LocalFirstRoundRobin => Policy::LocalFirstRoundRobin,
            Choice::WeightedRoundRobin => Policy::WeightedRoundRobin,
            Choice::LinearTiers | Choice::Linear | Choice::LoadAware => Policy::Optimized,
        }
    }

    fn pair_prices(self) -> bool {
        self != Choice::LinearTiers
    }

    fn load_aware(self) -> bool {
        self == Choice::LoadAware
    }
}

/// What [`evaluate`] measures of one policy's answer.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub mean_response_ms: f64,
    pub usd_per_hour: f64,
    pub peak_utilisation: f64,
    /// Services whose answer was `degraded` (a stated fallback).
    pub degraded: usize,
}

/// The embedded data both tables come from.
pub struct World {
    pub data: RegionData,
    pub prices: EgressPrices,
}

impl World {
    /// # Panics
    /// The embedded data does not parse (this crate's tests catch that first).
    #[must_use]
    pub fn load() -> Self {
        #[allow(clippy::expect_used)]
        Self {
            data: RegionData::embedded().expect("embedded region data"),
            prices: EgressPrices::builtin().expect("built-in price table"),
        }
    }

    fn rtt(&self, a: &Cluster, b: &Cluster) -> f64 {
        if a.id == b.id {
            INTRA_CLUSTER_MS
        } else if a.region == b.region {
            CROSS_ZONE_MS
        } else {
            self.data
                .rtt_ms(&a.region, &b.region)
                .unwrap_or(ballast_model::cost::MISSING_RTT_FALLBACK_MS)
        }
    }

    fn tiers(&self, provider: &str) -> PriceTable {
        self.data.price_table(provider).unwrap_or(PriceTable {
            same_zone: 0.0,
            cross_zone: 0.01,
            cross_region: 0.02,
            internet: 0.09,
        })
    }

    /// USD/GB of bytes leaving `from` for `to`: the table, else `from`'s provider's tier.
    fn price(&self, from: &Cluster, to: &Cluster) -> f64 {
        if from.id == to.id {
            return 0.0;
        }
        self.prices
            .price(&from.provider, &from.region, &to.provider, &to.region)
            .map_or_else(
                || self.tiers(&from.provider).price(tier(from, to)),
                |m| m.usd_per_gb,
            )
    }
}

/// A small deterministic generator (SplitMix64) so the table is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }

    /// Pareto(x_m, alpha), capped at 50 x_m (the "80/20" alpha = 1.16 has no finite variance).
    fn pareto(&mut self, xm: f64, alpha: f64) -> f64 {
        let u = self.next().max(1e-12);
        (xm * u.powf(-1.0 / alpha)).min(50.0 * xm)
    }

    /// `k` distinct items of `items`, in their order.
    fn pick<'a>(&mut self, items: &'a [Cluster], k: usize) -> Vec<&'a Cluster> {
        let mut keyed: Vec<(f64, usize)> = (0..items.len()).map(|i| (self.next(), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut chosen: Vec<usize> = keyed.into_iter().take(k).map(|(_, i)| i).collect();
        chosen.sort_unstable();
        chosen.into_iter().map(|i| &items[i]).collect()
    }
}

/// (name, calls per request, request kB, response kB, base service time ms).
const CHAIN: [(&str, f64, f64, f64, f64); 3] = [
    ("shop/api", 1.0, 2.0, 16.0, 30.0),
    ("shop/catalog", 2.0, 1.0, 8.0, 20.0),
    ("shop/inventory", 1.0, 0.5, 2.0, 10.0),
];

/// `zones` clusters per region (`<region>-a`, `<region>-b`, ...), each its own zone.
fn clusters(regions: &[(&str, &str)], zones: usize) -> Vec<Cluster> {
    regions
        .iter()
        .flat_map(|(provider, region)| {
            (0..zones).map(move |z| {
                let zone = format!("{region}-{}", char::from(b'a' + (z % 26) as u8));
                Cluster {
                    id: zone.clone(),
                    region: (*region).to_owned(),
                    zone,
                    provider: (*provider).to_owned(),
                }
            })
        })
        .collect()
}

/// A scenario over `zones` clusters in each of `regions` at `utilisation`, drawn from `seed`.
#[must_use]
pub fn build(
    name: &str,
    (regions, zones): (&[(&str, &str)], usize),
    params: Params,
    utilisation: f64,
    seed: u64,
) -> Scenario {
    let mut rng = Rng(seed);
    let clusters = clusters(regions, zones);
    let n = clusters.len();
    // Front-ends in about half the regions (at least 3), Pareto-distributed demand.
    let frontends = rng.pick(&clusters, (n / 2).max(3).min(n));
    let frontend_rps: BTreeMap<String, f64> = frontends
        .iter()
        .map(|c| (c.id.clone(), rng.pareto(200.0, 1.16)))
        .collect();
    let total_frontend: f64 = frontend_rps.values().sum();
    let mut calls = 1.0;
    let services = CHAIN
        .iter()
        .map(|&(svc, per_request, request_kb, response_kb, base_ms)| {
            calls *= per_request;
            let demand = total_frontend * calls;
            // Deployed in about 60 % of the regions (at least 3), uneven capacity shares.
            let hosts = rng.pick(&clusters, ((n * 3) / 5).max(3).min(n));
            let shares: Vec<f64> = hosts.iter().map(|_| rng.range(0.5, 1.5)).collect();
            let sum: f64 = shares.iter().sum();
            let mut capacity = BTreeMap::new();
            let mut curve = BTreeMap::new();
            for (c, share) in hosts.iter().zip(&shares) {
                let cap = share / sum * demand / utilisation;
                // At full capacity a request takes (1 + k) x base; k from 0.5 to 6 by cluster.
                let k = rng.range(0.5, 6.0);
                let base = base_ms * rng.range(0.8, 1.25);
                capacity.insert(c.id.clone(), cap);
                curve.insert(
                    c.id.clone(),
                    LoadCurve {
                        base_ms: base,
                        slope_ms_per_rps: base * k / cap,
                    },
                );
            }
            ServiceSpec {
                name: svc.to_owned(),
                calls_per_request: per_request,
                request_kb,
                response_kb,
                capacity,
                curve,
            }
        })
        .collect();
    Scenario {
        name: name.to_owned(),
        params,
        aws_only: clusters.iter().all(|c| c.provider == "aws"),
        clusters,
        frontend_rps,
        services,
        target_utilisation: utilisation,
    }
}

/// AWS regions on four continents.
pub const AWS_CONTINENTS: [(&str, &str); 8] = [
    ("aws", "us-east-1"),
    ("aws", "us-west-2"),
    ("aws", "eu-west-1"),
    ("aws", "eu-central-1"),
    ("aws", "ap-northeast-1"),
    ("aws", "ap-southeast-1"),
    ("aws", "ap-south-1"),
    ("aws", "sa-east-1"),
];

/// Three providers, three continents.
pub const MULTI_CLOUD: [(&str, &str); 8] = [
    ("aws", "us-east-1"),
    ("aws", "eu-west-1"),
    ("aws", "ap-southeast-2"),
    ("gcp", "us-central1"),
    ("gcp", "europe-west4"),
    ("gcp", "asia-northeast1"),
    ("azure", "westeurope"),
    ("azure", "eastus"),
];

/// The report's scenarios.
#[must_use]
pub fn scenarios() -> Vec<Scenario> {
    vec![
        build(
            "aws-4-continents",
            (&AWS_CONTINENTS, 2),
            Params::Mixed,
            0.4,
            11,
        ),
        build(
            "aws-4-continents",
            (&AWS_CONTINENTS, 2),
            Params::Mixed,
            0.7,
            11,
        ),
        build(
            "aws-4-continents",
            (&AWS_CONTINENTS, 2),
            Params::Mixed,
            0.9,
            11,
        ),
        build(
            "aws-4-continents",
            (&AWS_CONTINENTS, 2),
            Params::Performance,
            0.8,
            17,
        ),
        build(
            "aws-4-continents",
            (&AWS_CONTINENTS, 1),
            Params::Cost,
            0.7,
            23,
        ),
        build("multi-cloud", (&MULTI_CLOUD, 2), Params::Mixed, 0.7, 37),
        build(
            "multi-cloud",
            (&MULTI_CLOUD, 2),
            Params::Performance,
            0.9,
            41,
        ),
    ]
}

/// Solves `choice` down the chain of `sc`: per service, `src -> dst -> RPS`.
///
/// # Errors
/// A solve that fails (a model error: a bug in the scenario).
pub fn run(world: &World, sc: &Scenario, choice: Choice) -> Result<(Vec<Matrix>, usize), String> {
    let rtt_ms: Matrix = sc
        .clusters
        .iter()
        .map(|a| {
            let row = sc
                .clusters
                .iter()
                .filter(|b| b.id != a.id)
                .map(|b| (b.id.clone(), world.rtt(a, b)))
                .collect();
            (a.id.clone(), row)
        })
        .collect();
    let tiers = world.tiers(&sc.clusters[0].provider);
    let mut calls_from = sc.frontend_rps.clone();
    let mut out = Vec::new();
    let mut degraded = 0;
    for svc in &sc.services {
        let demand: BTreeMap<String, f64> = calls_from
            .iter()
            .filter(|(_, r)| **r > 0.0)
            .map(|(c, r)| (c.clone(), r * svc.calls_per_request))
            .collect();
        let share = svc.request_kb / (svc.request_kb + svc.response_kb);
        let mut pair_prices = Matrix::new();
        if choice.pair_prices() {
            for a in &sc.clusters {
                for b in sc.clusters.iter().filter(|b| b.id != a.id) {
                    if let Some(p) = world.prices.request_price(
                        (&a.provider, &a.region),
                        (&b.provider, &b.region),
                        share,
                    ) {
                        pair_prices
                            .entry(a.id.clone())
                            .or_default()
                            .insert(b.id.clone(), p);
                    }
                }
            }
        }
        let problem = Problem {
            policy: choice.policy(),
            params: sc.params,
            clusters: sc.clusters.clone(),
            rtt_ms: rtt_ms.clone(),
            prices: tiers,
            pair_prices,
            cost: None,
            services: vec![ServiceInput {
                name: svc.name.clone(),
                demand_rps: demand.clone(),
                capacity_rps: svc.capacity.clone(),
                policy: None,
                params: None,
                service_time: if choice.load_aware() {
                    svc.curve.clone()
                } else {
                    BTreeMap::new()
                },
            }],
        };
        let solved = solve(&problem, &SolveOptions::default()).map_err(|e| e.to_string())?;
        let sol = solved
            .into_iter()
            .next()
            .ok_or_else(|| "no solution".to_owned())?;
        if sol.status == Status::Degraded {
            degraded += 1;
        }
        // One evaluator for every policy: flows are weights x demand.
        let flows: Matrix = sol
            .weights
            .iter()
            .map(|(s, row)| {
                let d = demand.get(s).copied().unwrap_or(0.0);
                (
                    s.clone(),
                    row.iter().map(|(t, w)| (t.clone(), w * d)).collect(),
                )
            })
            .collect();
        calls_from = BTreeMap::new();
        for row in flows.values() {
            for (t, f) in row {
                *calls_from.entry(t.clone()).or_default() += f;
            }
        }
        out.push(flows);
    }
    Ok((out, degraded))
}

/// Scores the flows of one policy (see the module doc).
#[must_use]
pub fn evaluate(world: &World, sc: &Scenario, flows: &[Matrix], degraded: usize) -> Outcome {
    let by_id: BTreeMap<&str, &Cluster> = sc.clusters.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut latency_ms_rps = 0.0;
    let mut usd_per_second = 0.0;
    let mut peak: f64 = 0.0;
    for (svc, flows) in sc.services.iter().zip(flows) {
        let mut load: BTreeMap<&str, f64> = BTreeMap::new();
        for row in flows.values() {
            for (t, f) in row {
                *load.entry(t.as_str()).or_default() += f;
            }
        }
        for (t, l) in &load {
            let cap = svc.capacity.get(*t).copied().unwrap_or(0.0);
            if *l > 1e-9 {
                peak = peak.max(if cap > 0.0 { l / cap } else { f64::INFINITY });
            }
        }
        for (s, row) in flows {
            for (t, f) in row {
                let (Some(a), Some(b)) = (by_id.get(s.as_str()), by_id.get(t.as_str())) else {
                    continue;
                };
                let service_ms = svc.curve.get(t).map_or(0.0, |c| {
                    c.service_ms(load.get(t.as_str()).copied().unwrap_or(0.0))
                });
                latency_ms_rps += f * (world.rtt(a, b) + service_ms);
                usd_per_second += f
                    * 1e-6
                    * (svc.request_kb * world.price(a, b) + svc.response_kb * world.price(b, a));
            }
        }
    }
    let frontend: f64 = sc.frontend_rps.values().sum();
    Outcome {
        mean_response_ms: latency_ms_rps / frontend,
        usd_per_hour: usd_per_second * 3600.0,
        peak_utilisation: peak,
        degraded,
    }
}

/// Every policy of the table on `sc`.
///
/// # Errors
/// As [`run`].
pub fn report(world: &World, sc: &Scenario) -> Result<Vec<(Choice, Outcome)>, String> {
    Choice::ALL
        .iter()
        .map(|&c| {
            let (flows, degraded) = run(world, sc, c)?;
            Ok((c, evaluate(world, sc, &flows, degraded)))
        })
        .collect()
}
