//! Property tests on random instances: the dedicated transportation solver against the
//! general LP library, the public `solve` invariants, and the damping bound.

use std::collections::BTreeMap;

#[path = "reference/lp.rs"]
mod lp;

use ballast_model::damping::damp_row;
use ballast_model::transport::{solve_transport, TransportProblem};
use ballast_model::{
    liveness_floor_rps, solve, Cluster, Matrix, Params, Policy, PriceTable, Problem, ServiceInput,
    SolveOptions, Status, LIVENESS_FLOOR_RPS,
};
use lp::solve_lp;
use proptest::prelude::*;

/// A random feasible-or-not transportation instance: (supply, capacity, cost).
fn instance() -> impl Strategy<Value = TransportProblem> {
    (1usize..7, 1usize..6).prop_flat_map(|(ns, nt)| {
        (
            prop::collection::vec(0.0f64..400.0, ns),
            prop::collection::vec(0.0f64..400.0, nt),
            prop::collection::vec(
                prop_oneof![3 => 0.0f64..100.0, 1 => Just(0.0), 1 => Just(7.0)],
                ns * nt,
            ),
            // Per-source floors: none, the largest `optimized` uses (1 rps), and in between.
            prop::collection::vec(
                prop_oneof![1 => Just(0.0), 1 => Just(LIVENESS_FLOOR_RPS), 2 => 0.0f64..1.5],
                ns,
            ),
        )
            .prop_map(move |(s, c, cost, floor)| TransportProblem {
                // Keep most instances above the floor so the optimum is exercised.
                supply: s.into_iter().map(|x| x + nt as f64).collect(),
                capacity: c.into_iter().map(|x| x + ns as f64).collect(),
                cost,
                floor,
            })
    })
}

/// Larger, tight instances (capacity just above demand): long augmenting paths through
/// backward arcs.
fn tight_instance() -> impl Strategy<Value = TransportProblem> {
    (5usize..30, 3usize..20, 1.0f64..1.1).prop_flat_map(|(ns, nt, slack)| {
        (
            prop::collection::vec(0.0f64..300.0, ns),
            prop::collection::vec(0.5f64..1.5, nt),
            prop::collection::vec(0.0f64..50.0, ns * nt),
        )
            .prop_map(move |(s, shares, cost)| {
                let supply: Vec<f64> = s.into_iter().map(|x| x + nt as f64).collect();
                let total: f64 = supply.iter().sum();
                let share_total: f64 = shares.iter().sum();
                TransportProblem {
                    capacity: shares
                        .iter()
                        .map(|x| (slack * total * x / share_total).max(ns as f64))
                        .collect(),
                    floor: supply.iter().map(|x| liveness_floor_rps(*x, nt)).collect(),
                    supply,
                    cost,
                }
            })
    })
}

fn check_feasible_flow(p: &TransportProblem, flow: &[f64]) {
    let (ns, nt) = (p.n_source(), p.n_dest());
    for s in 0..ns {
        let row: f64 = flow[s * nt..(s + 1) * nt].iter().sum();
        assert!(
            (row - p.supply[s]).abs() <= 1e-6 * p.supply[s].max(1.0),
            "demand"
        );
        for t in 0..nt {
            assert!(flow[s * nt + t] >= p.floor[s] - 1e-7, "liveness");
        }
    }
    for t in 0..nt {
        let col: f64 = (0..ns).map(|s| flow[s * nt + t]).sum();
        assert!(col <= p.capacity[t] * (1.0 + 1e-9) + 1e-6, "capacity");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn dedicated_solver_matches_the_lp_library(p in instance()) {
        match solve_transport(&p) {
            Ok(sol) => {
                check_feasible_flow(&p, &sol.flow);
                let lp = solve_lp(&p).expect("the LP library solves a feasible instance");
                let scale = lp.objective.abs().max(1.0);
                prop_assert!(
                    (sol.objective - lp.objective).abs() <= 1e-6 * scale,
                    "dedicated {} vs lp {}", sol.objective, lp.objective
                );
            }
            Err(reasons) => {
                prop_assert!(!reasons.is_empty());
                prop_assert!(solve_lp(&p).is_err(), "LP found a solution to an infeasible instance");
            }
        }
    }

    #[test]
    fn dedicated_solver_matches_the_lp_library_on_tight_instances(p in tight_instance()) {
        let sol = solve_transport(&p).expect("tight but feasible");
        check_feasible_flow(&p, &sol.flow);
        let lp = solve_lp(&p).expect("the LP library solves it");
        let scale = lp.objective.abs().max(1.0);
        prop_assert!(
            (sol.objective - lp.objective).abs() <= 1e-6 * scale,
            "dedicated {} vs lp {}", sol.objective, lp.objective
        );
    }

    /// Issue 13: a source moves away from far clusters whatever its demand. One source c0
    /// that serves itself (cost 0) and `n` other serving clusters far away, plenty of
    /// capacity: every far weight is the floor share, at most 1 %, and the floors together
    /// take at most 10 % of the source's demand — at 0.05 rps as at 100,000.
    #[test]
    fn a_source_of_any_demand_sends_only_its_floor_share_to_far_clusters(
        demand in prop_oneof![0.05f64..10.0, 10.0f64..1e5],
        n in 1usize..30,
        far_cost in 1.0f64..500.0,
    ) {
        let ids: Vec<String> = (0..=n).map(|i| format!("c{i}")).collect();
        let clusters = ids
            .iter()
            .map(|id| Cluster { id: id.clone(), region: "r".into(), zone: "z".into(), provider: "p".into() })
            .collect();
        let mut cost = Matrix::new();
        for t in &ids {
            cost.entry("c0".into()).or_default().insert(t.clone(), if t == "c0" { 0.0 } else { far_cost });
        }
        let problem = Problem {
            policy: Policy::Optimized,
            params: Params::Performance,
            clusters,
            rtt_ms: Matrix::new(),
            prices: PriceTable { same_zone: 0.0, cross_zone: 0.01, cross_region: 0.02, internet: 0.09 },
            pair_prices: Default::default(),
            cost: Some(cost),
            services: vec![ServiceInput {
                name: "ns/svc".into(),
                demand_rps: BTreeMap::from([("c0".to_string(), demand)]),
                capacity_rps: ids.iter().map(|id| (id.clone(), 10.0 * demand)).collect(),
                policy: None,
                params: None,
                service_time: Default::default(),
            }],
        };
        let sol = &solve(&problem, &SolveOptions::default()).expect("solves")[0];
        prop_assert_eq!(sol.status, Status::Optimal, "{:?}", sol.reason);
        let floor = liveness_floor_rps(demand, n + 1);
        prop_assert!(floor <= LIVENESS_FLOOR_RPS);
        prop_assert!(floor * (n + 1) as f64 <= 0.1 * demand * (1.0 + 1e-12));
        let row = &sol.weights["c0"];
        for (t, w) in row {
            if t != "c0" {
                prop_assert!((w - floor / demand).abs() < 1e-9, "{t}: {w}");
                prop_assert!(*w <= 0.01 + 1e-12, "{t}: {w}");
            }
        }
        prop_assert!(row["c0"] >= 0.9 - 1e-9);
    }

    #[test]
    fn damping_never_moves_a_weight_more_than_the_step(
        raw_t in prop::collection::vec(0.01f64..1.0, 2..8),
        raw_p in prop::collection::vec(0.01f64..1.0, 8),
        step in 0.0f64..0.5,
        floor_share in 0.0f64..0.9,
    ) {
        let n = raw_t.len();
        let floor = floor_share / n as f64;
        let norm = |v: &[f64]| {
            let s: f64 = v.iter().sum();
            // Both rows respect the floor, as the solver's rows do.
            v.iter().map(|x| floor + (1.0 - floor * n as f64) * x / s).collect::<Vec<_>>()
        };
        let target = norm(&raw_t);
        let prev = norm(&raw_p[..n]);
        let out = damp_row(&target, &prev, floor, step);
        let sum: f64 = out.iter().sum();
        prop_assert!((sum - 1.0).abs() < 1e-9);
        for i in 0..n {
            prop_assert!((out[i] - prev[i]).abs() <= step + 1e-12);
            prop_assert!(out[i] >= floor - 1e-12);
        }
    }

    #[test]
    fn solve_optimized_keeps_every_invariant(
        p in instance(),
        serving_src in prop::collection::vec(any::<bool>(), 7),
    ) {
        // Sources s0.., destinations d0..; a source may also be a destination (self-serving).
        let (ns, nt) = (p.n_source(), p.n_dest());
        let cid = |i: usize| format!("c{i}");
        let dest_cluster = |t: usize| if t < ns && serving_src[t] { t } else { ns + t };
        let n_clusters = ns + nt;
        let clusters: Vec<Cluster> = (0..n_clusters)
            .map(|i| Cluster {
                id: cid(i),
                region: "r".into(),
                zone: format!("z{}", i % 2),
                provider: "aws".into(),
            })
            .collect();
        let mut cost = Matrix::new();
        let mut capacity = BTreeMap::new();
        for t in 0..nt {
            *capacity.entry(cid(dest_cluster(t))).or_insert(0.0) += p.capacity[t];
        }
        let dests: Vec<String> = capacity.keys().cloned().collect();
        for s in 0..ns {
            for (k, d) in dests.iter().enumerate() {
                cost.entry(cid(s)).or_default().insert(d.clone(), p.cost[s * nt + k % nt]);
            }
        }
        let demand: BTreeMap<String, f64> =
            (0..ns).map(|s| (cid(s), p.supply[s])).collect();
        let problem = Problem {
            policy: Policy::Optimized,
            params: Params::Mixed,
            clusters,
            rtt_ms: Matrix::new(),
            prices: PriceTable { same_zone: 0.0, cross_zone: 0.01, cross_region: 0.02, internet: 0.09 },
            pair_prices: Default::default(),
            cost: Some(cost.clone()),
            services: vec![ServiceInput {
                name: "ns/svc".into(),
                demand_rps: demand.clone(),
                capacity_rps: capacity.clone(),
                policy: None,
                params: None,
                service_time: Default::default(),
            }],
        };
        let sol = &solve(&problem, &SolveOptions::default()).expect("valid problem")[0];
        for (src, row) in &sol.weights {
            let sum: f64 = row.values().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "weights of {src} sum to {sum}");
            prop_assert!(row.values().all(|w| *w >= -1e-12));
        }
        if sol.status == Status::Optimal {
            prop_assert!(sol.reason.is_none());
            let mut used: BTreeMap<&str, f64> = BTreeMap::new();
            for (src, row) in &sol.flows {
                let total: f64 = row.values().sum();
                prop_assert!((total - demand[src]).abs() <= 1e-6 * demand[src].max(1.0));
                for (dst, f) in row {
                    let floor = liveness_floor_rps(demand[src], row.len());
                    prop_assert!(floor <= LIVENESS_FLOOR_RPS && floor <= 0.01 * demand[src] + 1e-12);
                    prop_assert!(*f >= floor - 1e-7, "liveness {src}->{dst}");
                    *used.entry(dst.as_str()).or_default() += f;
                }
            }
            for (dst, u) in used {
                prop_assert!(u <= capacity[dst] * (1.0 + 1e-9) + 1e-6, "capacity of {dst}");
            }
            // Same objective as the LP library on the same (merged) instance.
            let d: Vec<String> = dests.clone();
            let tp = TransportProblem {
                supply: (0..ns).map(|s| p.supply[s]).collect(),
                capacity: d.iter().map(|x| capacity[x]).collect(),
                cost: (0..ns).flat_map(|s| d.iter().map(move |x| (s, x))).map(|(s, x)| cost[&cid(s)][x]).collect(),
                floor: (0..ns).map(|s| liveness_floor_rps(p.supply[s], d.len())).collect(),
            };
            let lp = solve_lp(&tp).expect("feasible");
            prop_assert!((sol.objective - lp.objective).abs() <= 1e-6 * lp.objective.abs().max(1.0));
        } else {
            prop_assert!(sol.reason.as_deref().unwrap_or("").contains("infeasible"));
        }
    }
}
