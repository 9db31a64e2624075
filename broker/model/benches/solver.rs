//! Solver benchmark (a bench binary printing a table; `harness = false`):
//!
//! ```text
//! cargo bench -p ballast-model --bench solver
//! ```
//!
//! Instances are built from the real data in `broker/data/` (69 regions of AWS, Azure and
//! GCP, their measured inter-region RTT, AWS's egress price tiers): cluster i lives in region
//! i mod 69, zone (i div 69) mod 3; same-region RTT is 1 ms across zones and 0.5 ms within one.
//! - optimized: N clusters, every one a source, every other one serving; demand per source
//!   uniform in [1000, 10000] RPS, total capacity 1.25 × (ample) or 1.02 × (tight) total
//!   demand, spread unevenly (0.5..1.5 shares) over the serving half. The dedicated solver and the LP library solve the same cost matrix;
//!   `solve()` is the public end-to-end call (validation, costs from RTT and prices, output
//!   maps).
//! - weighted-round-robin: 10,000 service imports on a 100-cluster fleet, each with 10
//!   importing and 3 serving clusters, through the public `solve()`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[path = "../tests/reference/lp.rs"]
mod lp;

use ballast_model::data::RegionData;
use ballast_model::transport::{solve_transport, TransportProblem};
use ballast_model::{
    cost_matrix, liveness_floor_rps, solve, validate, Cluster, Matrix, Params, Policy, PriceTable,
    Problem, ServiceInput, SolveOptions, Status,
};
use lp::solve_lp_within;

/// Time limit for one LP-library solve; past it the cell says so.
const LP_LIMIT: Duration = Duration::from_secs(60);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        #[allow(clippy::cast_precision_loss)]
        let v = (x >> 11) as f64 / (1u64 << 53) as f64;
        v
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f64) as usize).min(n - 1)
    }
}

struct Data {
    regions: Vec<(String, String)>,
    rtt: BTreeMap<(String, String), f64>,
    prices: PriceTable,
}

fn load() -> Data {
    let d = RegionData::embedded().expect("broker/data parses");
    let regions = d
        .regions()
        .iter()
        .map(|r| (r.region.clone(), r.provider.clone()))
        .collect::<Vec<_>>();
    let mut rtt = BTreeMap::new();
    for a in &regions {
        for b in &regions {
            if let Some(ms) = d.measured_rtt_ms(&a.0, &b.0) {
                rtt.insert((a.0.clone(), b.0.clone()), ms);
            }
        }
    }
    Data {
        regions,
        rtt,
        prices: d.price_table("aws").expect("aws prices"),
    }
}

fn fleet(data: &Data, n: usize) -> (Vec<Cluster>, Matrix) {
    let nr = data.regions.len();
    let clusters: Vec<Cluster> = (0..n)
        .map(|i| {
            let (region, provider) = &data.regions[i % nr];
            Cluster {
                id: format!("c{i:04}"),
                region: region.clone(),
                zone: format!("{region}-{}", ["a", "b", "c"][(i / nr) % 3]),
                provider: provider.clone(),
            }
        })
        .collect();
    let mut rtt = Matrix::new();
    for a in &clusters {
        let row = rtt.entry(a.id.clone()).or_default();
        for b in &clusters {
            let v = if a.id == b.id {
                continue;
            } else if a.region == b.region {
                if a.zone == b.zone {
                    0.5
                } else {
                    1.0
                }
            } else if let Some(v) = data.rtt.get(&(a.region.clone(), b.region.clone())) {
                *v
            } else {
                continue; // not measured: the cost model's documented fallback applies
            };
            row.insert(b.id.clone(), v);
        }
    }
    (clusters, rtt)
}

fn optimized_problem(data: &Data, n: usize, slack: f64, rng: &mut Rng) -> Problem {
    let (clusters, rtt_ms) = fleet(data, n);
    let demand: BTreeMap<String, f64> = clusters
        .iter()
        .map(|c| (c.id.clone(), rng.range(1000.0, 10000.0)))
        .collect();
    let total: f64 = demand.values().sum();
    let serving: Vec<&Cluster> = clusters.iter().step_by(2).collect();
    let shares: Vec<f64> = serving.iter().map(|_| rng.range(0.5, 1.5)).collect();
    let share_total: f64 = shares.iter().sum();
    let capacity = serving
        .iter()
        .zip(&shares)
        .map(|(c, s)| (c.id.clone(), slack * total * s / share_total))
        .collect();
    Problem {
        policy: Policy::Optimized,
        params: Params::Mixed,
        clusters,
        rtt_ms,
        prices: data.prices,
        pair_prices: Default::default(),
        cost: None,
        services: vec![ServiceInput {
            name: "bench/svc".into(),
            demand_rps: demand,
            capacity_rps: capacity,
            policy: None,
            params: None,
            service_time: Default::default(),
        }],
    }
}

/// The same instance as the dedicated solver sees it inside `solve()`.
fn transport(problem: &Problem) -> TransportProblem {
    let svc = &problem.services[0];
    let costs = cost_matrix(problem, problem.params);
    let dests: Vec<&String> = svc.capacity_rps.keys().collect();
    let mut cost = Vec::new();
    for s in svc.demand_rps.keys() {
        for t in &dests {
            cost.push(costs[s][*t]);
        }
    }
    TransportProblem {
        supply: svc.demand_rps.values().copied().collect(),
        capacity: svc.capacity_rps.values().copied().collect(),
        cost,
        floor: svc
            .demand_rps
            .values()
            .map(|d| liveness_floor_rps(*d, dests.len()))
            .collect(),
    }
}

fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let out = f();
        times.push(start.elapsed());
        last = Some(out);
    }
    times.sort();
    (times[runs / 2], last.expect("at least one run"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let data = load();
    let mut rng = Rng(0x00C0_FFEE_1234_5678);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| clusters | capacity / demand | sources x serving | dedicated (ms) | solve() end-to-end (ms) | of which validate (ms) | LP library (ms) | objective rel. diff |"
    );
    let _ = writeln!(table, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [10usize, 100, 300, 1000] {
        for slack in [1.25, 1.02] {
            let problem = optimized_problem(&data, n, slack, &mut rng);
            let tp = transport(&problem);
            let runs = if n >= 1000 { 3 } else { 5 };
            let (t_dedicated, sol) = median(runs, || solve_transport(&tp).expect("feasible"));
            let (t_solve, out) = median(runs, || {
                solve(&problem, &SolveOptions::default()).expect("valid")
            });
            assert_eq!(out[0].status, Status::Optimal, "{:?}", out[0].reason);
            let (t_validate, ()) = median(runs, || validate(&problem).expect("valid"));
            let lp_runs = if n >= 100 { 1 } else { runs };
            let (t_lp, lp) = median(lp_runs, || solve_lp_within(&tp, Some(LP_LIMIT)));
            let (lp_cell, diff_cell) = match lp {
                Ok(lp) => {
                    let diff = (sol.objective - lp.objective).abs() / lp.objective.abs().max(1.0);
                    let note = if t_lp >= LP_LIMIT {
                        " (hit the limit)"
                    } else {
                        ""
                    };
                    (format!("{:.1}{note}", ms(t_lp)), format!("{diff:.1e}"))
                }
                Err(e) => (format!("> {} s: {e}", LP_LIMIT.as_secs()), "-".to_owned()),
            };
            let _ = writeln!(
                table,
                "| {n} | {slack} | {} x {} | {:.3} | {:.2} | {:.2} | {lp_cell} | {diff_cell} |",
                tp.n_source(),
                tp.n_dest(),
                ms(t_dedicated),
                ms(t_solve),
                ms(t_validate),
            );
            eprintln!("done: {n} clusters, slack {slack}");
        }
    }

    // weighted-round-robin, 10,000 service imports.
    let (clusters, rtt_ms) = fleet(&data, 100);
    let services = (0..10_000)
        .map(|i| {
            let mut demand = BTreeMap::new();
            while demand.len() < 10 {
                demand.insert(clusters[rng.below(100)].id.clone(), rng.range(1.0, 1000.0));
            }
            let mut capacity = BTreeMap::new();
            while capacity.len() < 3 {
                capacity.insert(
                    clusters[rng.below(100)].id.clone(),
                    rng.range(100.0, 5000.0),
                );
            }
            ServiceInput {
                name: format!("ns{}/svc{i}", i % 50),
                demand_rps: demand,
                capacity_rps: capacity,
                policy: None,
                params: None,
                service_time: Default::default(),
            }
        })
        .collect();
    let wrr = Problem {
        policy: Policy::WeightedRoundRobin,
        params: Params::Mixed,
        clusters,
        rtt_ms,
        prices: data.prices,
        pair_prices: Default::default(),
        cost: None,
        services,
    };
    let (t_wrr, out) = median(5, || solve(&wrr, &SolveOptions::default()).expect("valid"));
    assert_eq!(out.len(), 10_000);
    let _ = writeln!(
        table,
        "\nweighted-round-robin, 10,000 service imports (100 clusters, 10 sources x 3 serving each), solve() end-to-end: {:.1} ms",
        ms(t_wrr)
    );
    print!("{table}");
}
