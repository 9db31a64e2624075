//! The load-aware solver against a general convex QP solver (Clarabel, interior point) on
//! random instances: same objective within the stated interpolation bound; capacity and
//! floor respected; with every slope and base 0 it is the linear transportation answer.

use ballast_model::load_aware::{solve_convex, ConvexTransport, LoadCurve, DEFAULT_SEGMENTS};
use ballast_model::transport::{solve_transport, TransportProblem};
use clarabel::algebra::CscMatrix;
use clarabel::solver::{
    DefaultSettingsBuilder, DefaultSolver, IPSolver, NonnegativeConeT, SolverStatus, ZeroConeT,
};
use proptest::prelude::*;

/// Dense row-major `rows x cols` into CSC, keeping only the upper triangle when `triu`.
fn csc(dense: &[Vec<f64>], cols: usize, triu: bool) -> CscMatrix<f64> {
    let rows = dense.len();
    let (mut colptr, mut rowval, mut nzval) = (vec![0], Vec::new(), Vec::new());
    for c in 0..cols {
        for (r, row) in dense.iter().enumerate() {
            if (!triu || r <= c) && row[c] != 0.0 {
                rowval.push(r);
                nzval.push(row[c]);
            }
        }
        colptr.push(rowval.len());
    }
    CscMatrix::new(rows, cols, colptr, rowval, nzval)
}

/// The same problem as a QP: minimise ½xᵀPx + qᵀx over x = n(s,t), row-major.
fn reference(p: &ConvexTransport) -> Option<f64> {
    let (ns, nt) = (p.supply.len(), p.capacity.len());
    let n = ns * nt;
    let w = p.latency_weight;
    // L_t² = Σ_{s,s'} x_st x_s't: P[(s,t),(s',t)] = 2·w·slope_t.
    let mut pm = vec![vec![0.0; n]; n];
    for t in 0..nt {
        for s in 0..ns {
            for s2 in 0..ns {
                pm[s * nt + t][s2 * nt + t] = 2.0 * w * p.curve[t].slope_ms_per_rps;
            }
        }
    }
    let q: Vec<f64> = (0..n)
        .map(|i| p.cost[i] + w * p.curve[i % nt].base_ms)
        .collect();
    // Rows: supply (zero cone), capacity and floor (non-negative cone).
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in 0..ns {
        let mut row = vec![0.0; n];
        for t in 0..nt {
            row[s * nt + t] = 1.0;
        }
        a.push(row);
        b.push(p.supply[s]);
    }
    for t in 0..nt {
        let mut row = vec![0.0; n];
        for s in 0..ns {
            row[s * nt + t] = 1.0;
        }
        a.push(row);
        b.push(p.capacity[t]);
    }
    for i in 0..n {
        let mut row = vec![0.0; n];
        row[i] = -1.0;
        a.push(row);
        b.push(-p.floor[i / nt]);
    }
    let cones = [ZeroConeT(ns), NonnegativeConeT(nt + n)];
    let settings = DefaultSettingsBuilder::default()
        .verbose(false)
        .tol_gap_abs(1e-10)
        .tol_gap_rel(1e-10)
        .build()
        .ok()?;
    let mut solver = DefaultSolver::new(
        &csc(&pm, n, true),
        &q,
        &csc(&a, n, false),
        &b,
        &cones,
        settings,
    )
    .ok()?;
    solver.solve();
    (solver.solution.status == SolverStatus::Solved).then(|| p.objective(&solver.solution.x))
}

fn instance() -> impl Strategy<Value = ConvexTransport> {
    (1usize..5, 1usize..5).prop_flat_map(|(ns, nt)| {
        (
            prop::collection::vec(10.0f64..500.0, ns),
            prop::collection::vec(0.0f64..100.0, ns * nt),
            prop::collection::vec((0.0f64..20.0, 0.0f64..0.5), nt),
            prop::collection::vec(0.3f64..1.0, nt),
            1.1f64..2.0,
            0.05f64..1.0,
        )
            .prop_map(move |(supply, cost, curves, shares, slack, weight)| {
                let total: f64 = supply.iter().sum();
                let sum_shares: f64 = shares.iter().sum();
                ConvexTransport {
                    floor: supply.iter().map(|d| (0.01 * d).min(1.0)).collect(),
                    capacity: shares
                        .iter()
                        .map(|s| s / sum_shares * total * slack)
                        .collect(),
                    supply,
                    cost,
                    curve: curves
                        .into_iter()
                        .map(|(base_ms, slope_ms_per_rps)| LoadCurve {
                            base_ms,
                            slope_ms_per_rps,
                        })
                        .collect(),
                    latency_weight: weight,
                    segments: DEFAULT_SEGMENTS,
                }
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_qp_solver_within_the_stated_bound(p in instance()) {
        let ours = solve_convex(&p).expect("feasible by construction");
        let nt = p.capacity.len();
        for (t, load) in p.loads(&ours.flow).iter().enumerate() {
            prop_assert!(*load <= p.capacity[t] * (1.0 + 1e-9) + 1e-9, "capacity of {t}: {load}");
        }
        for (i, f) in ours.flow.iter().enumerate() {
            prop_assert!(*f >= p.floor[i / nt] - 1e-9, "floor of pair {i}: {f}");
        }
        for s in 0..p.supply.len() {
            let sent: f64 = ours.flow[s * nt..(s + 1) * nt].iter().sum();
            prop_assert!((sent - p.supply[s]).abs() <= 1e-6 * p.supply[s]);
        }
        let reference = reference(&p).expect("the QP solver solves it");
        let tol = 1e-6 * reference.abs().max(1.0);
        prop_assert!(ours.objective <= reference + ours.error_bound + tol,
            "ours {} reference {} bound {}", ours.objective, reference, ours.error_bound);
        prop_assert!(ours.objective >= reference - tol,
            "ours {} below the optimum {}", ours.objective, reference);
    }

    #[test]
    fn with_flat_curves_it_is_the_linear_answer(p in instance()) {
        let mut flat = p.clone();
        flat.curve = vec![LoadCurve::ZERO; p.capacity.len()];
        let convex = solve_convex(&flat).expect("feasible");
        let linear = solve_transport(&TransportProblem {
            supply: flat.supply.clone(),
            capacity: flat.capacity.clone(),
            cost: flat.cost.clone(),
            floor: flat.floor.clone(),
        })
        .expect("feasible");
        prop_assert!((convex.objective - linear.objective).abs() <= 1e-6 * linear.objective.abs().max(1.0),
            "convex {} linear {}", convex.objective, linear.objective);
        prop_assert_eq!(convex.error_bound, 0.0);
    }
}
