//! `optimized`: the transportation LP (see [`super::transport`]) with a liveness floor on
//! every (source, serving destination) pair.
//!
//! The floor is a small share of the source's own demand, not an absolute rate
//! ([`liveness_floor_rps`]): per destination
//!
//! ```text
//! floor(s) = min(1 rps, 1 % of N(s), 10 % of N(s) / |T|)
//! ```
//!
//! - 1 % keeps every serving destination probed by real traffic (a source at 100 rps sends
//!   1 rps to each) while a low-demand source still goes where it should: a source at 3 rps
//!   sends 0.03 rps (weight 0.01) to a far cluster instead of a third of its traffic, as an
//!   absolute 1-rps floor forced (issue 13: 0.33 to a cluster 150 ms away).
//! - 1 rps caps it for busy sources (1,000 rps: 1 rps, weight 0.001), as before.
//! - 10 % / |T| caps what the floors of one source take together: at most 10 % of its
//!   demand however many clusters serve (beyond 10 serving clusters each floor shrinks), so
//!   the floor never turns `optimized` back into round-robin, and a source's floors are
//!   always feasible on their own (no "demand below the floor" for any demand > 0).
//!
//! As a weight the floor is `floor(s) / N(s)` = min(1/N(s), 0.01, 0.1/|T|): what damping
//! lifts a row to ([`super::damping`]) and what `explain` reports as `liveness-floor`.
//!
//! Load-aware (see [`super::load_aware`]): when the service states service-time curves and the
//! params weigh latency (`performance`, `mixed`), each request also pays its destination's
//! service time at the load the solution puts there (convex), solved by
//! [`super::load_aware::solve_convex`]; `cost` stays linear in $.
//!
//! Decisions:
//! - Only sources with demand > 0 take part in the LP. A source with zero demand still gets a
//!   valid split for its next new connection: weights ∝ the spare capacity the LP left on each
//!   destination (∝ capacity when nothing is spare).
//! - A source that also serves may serve itself: its own cluster is a destination like any
//!   other, at cost(s, s) (0 ms RTT unless measured, same-zone price), and that traffic counts
//!   against its capacity.
//! - Infeasible (Σ demand > Σ capacity, a capacity below the sum of the sources' floors),
//!   or the solver failing to converge (not expected): never an error and never `optimal` —
//!   `degraded`, a reason listing what is wrong, and every source's weights ∝ capacity.

use std::fmt::Write as _;

use super::load_aware::{solve_convex, ConvexTransport, DEFAULT_SEGMENTS};
use super::service::{Dense, View};
use super::transport::{solve_transport, Infeasible, TransportProblem};
use super::Status;

/// The liveness floor's cap (RPS): a busy source sends at least this much to every serving
/// destination, so it keeps being probed and never starves ([`liveness_floor_rps`]).
pub const LIVENESS_FLOOR_RPS: f64 = 1.0;

/// The liveness floor per destination as a share of the source's demand (1 %).
pub const LIVENESS_FLOOR_SHARE: f64 = 0.01;

/// The most the floors of one source take together, as a share of its demand (10 %).
pub const LIVENESS_FLOOR_TOTAL_SHARE: f64 = 0.1;

/// The liveness floor (RPS) from a source with `demand_rps` to each of `serving` destinations:
/// `min(LIVENESS_FLOOR_RPS, LIVENESS_FLOOR_SHARE · demand, LIVENESS_FLOOR_TOTAL_SHARE ·
/// demand / serving)`; 0 when the demand or the number of destinations is 0 (see the module
/// doc for why).
#[must_use]
pub fn liveness_floor_rps(demand_rps: f64, serving: usize) -> f64 {
    if demand_rps.is_nan() || demand_rps <= 0.0 || serving == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let per_dest_total = LIVENESS_FLOOR_TOTAL_SHARE * demand_rps / serving as f64;
    LIVENESS_FLOOR_RPS
        .min(LIVENESS_FLOOR_SHARE * demand_rps)
        .min(per_dest_total)
}

pub(crate) fn optimized(view: &View<'_>) -> Dense {
    let (ns, nt) = (view.sources.len(), view.dests.len());
    if nt == 0 {
        return Dense::no_serving(ns);
    }
    let active: Vec<usize> = (0..ns).filter(|&s| view.demand[s] > 0.0).collect();
    let mut cost = Vec::with_capacity(active.len() * nt);
    for &s in &active {
        cost.extend_from_slice(&view.cost[s * nt..(s + 1) * nt]);
    }
    let supply: Vec<f64> = active.iter().map(|&s| view.demand[s]).collect();
    let floors: Vec<f64> = active
        .iter()
        .map(|&s| liveness_floor_rps(view.demand[s], nt))
        .collect();
    let solved = if view.load_aware() {
        solve_convex(&ConvexTransport {
            floor: floors.clone(),
            supply,
            capacity: view.capacity.clone(),
            cost,
            curve: view.curve.clone(),
            latency_weight: view.latency_weight,
            segments: DEFAULT_SEGMENTS,
        })
        .map(|s| s.flow)
    } else {
        solve_transport(&TransportProblem {
            supply,
            capacity: view.capacity.clone(),
            cost,
            floor: floors.clone(),
        })
        .map(|s| s.flow)
    };
    match solved {
        Ok(flow) => {
            let mut weights = vec![0.0; ns * nt];
            let mut floor = vec![0.0; ns];
            let mut used = vec![0.0; nt];
            for (k, &s) in active.iter().enumerate() {
                let n = view.demand[s];
                floor[s] = floors[k] / n;
                for t in 0..nt {
                    let f = flow[k * nt + t];
                    used[t] += f;
                    weights[s * nt + t] = f / n;
                }
            }
            let spare: Vec<f64> = view
                .capacity
                .iter()
                .zip(&used)
                .map(|(c, u)| (c - u).max(0.0))
                .collect();
            let share = proportional(if spare.iter().sum::<f64>() > 1e-9 {
                &spare
            } else {
                &view.capacity
            });
            for s in (0..ns).filter(|&s| view.demand[s] <= 0.0) {
                weights[s * nt..(s + 1) * nt].copy_from_slice(&share);
            }
            Dense {
                weights,
                status: Status::Optimal,
                reason: None,
                floor,
            }
        }
        Err(reasons) => {
            let share = proportional(&view.capacity);
            let mut weights = Vec::with_capacity(ns * nt);
            for _ in 0..ns {
                weights.extend_from_slice(&share);
            }
            Dense {
                weights,
                status: Status::Degraded,
                reason: Some(describe(view, &active, &reasons)),
                floor: vec![0.0; ns],
            }
        }
    }
}

fn proportional(values: &[f64]) -> Vec<f64> {
    let total: f64 = values.iter().sum();
    #[allow(clippy::cast_precision_loss)]
    let n = values.len() as f64;
    if total > 0.0 {
        values.iter().map(|v| v / total).collect()
    } else {
        vec![1.0 / n; values.len()]
    }
}

fn describe(view: &View<'_>, active: &[usize], reasons: &[Infeasible]) -> String {
    const SHOWN: usize = 3;
    let mut out = String::from("infeasible: ");
    for (i, r) in reasons.iter().take(SHOWN).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = match r {
            Infeasible::SupplyAboveCapacity { supply, capacity } => write!(
                out,
                "total demand {supply} rps exceeds total capacity {capacity} rps"
            ),
            Infeasible::SupplyBelowFloor {
                source,
                supply,
                need,
            } => write!(
                out,
                "demand {supply} rps from {} is below its liveness floor ({need} rps in all to \
                 {} serving clusters)",
                view.source_ids[active[*source]],
                view.dests.len()
            ),
            Infeasible::CapacityBelowFloor {
                destination,
                capacity,
                need,
            } => write!(
                out,
                "capacity {capacity} rps of {} is below the liveness floor ({need:.3} rps: \
                 min({LIVENESS_FLOOR_RPS} rps, {}% of demand) from each of {} sources)",
                view.dest_ids[*destination],
                LIVENESS_FLOOR_SHARE * 100.0,
                active.len()
            ),
            Infeasible::Malformed => write!(out, "malformed instance"),
            Infeasible::NotConverged { source, left } => write!(
                out,
                "the solver stopped with {left} rps of {} unplaced",
                view.source_ids[active[*source]]
            ),
        };
    }
    if reasons.len() > SHOWN {
        let _ = write!(out, "; and {} more", reasons.len() - SHOWN);
    }
    out.push_str("; fallback: weights in proportion to capacity");
    out
}
