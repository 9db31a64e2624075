//! `optimized`: the transportation LP (see [`super::transport`]) with the liveness floor of
//! [`LIVENESS_FLOOR_RPS`] on every (source, serving destination) pair.
//!
//! Decisions:
//! - Only sources with demand > 0 take part in the LP. A source with zero demand still gets a
//!   valid split for its next new connection: weights ∝ the spare capacity the LP left on each
//!   destination (∝ capacity when nothing is spare).
//! - A source that also serves may serve itself: its own cluster is a destination like any
//!   other, at cost(s, s) (0 ms RTT unless measured, same-zone price), and that traffic counts
//!   against its capacity.
//! - Infeasible (Σ demand > Σ capacity, a demand below |T|·floor, a capacity below
//!   |S|·floor), or the solver failing to converge (not expected): never an error and never `optimal` — `degraded`, a reason listing what is
//!   wrong, and every source's weights ∝ capacity.

use std::fmt::Write as _;

use super::service::{Dense, View};
use super::transport::{solve_transport, Infeasible, TransportProblem};
use super::Status;

/// The liveness floor: every serving destination receives at least this much from every
/// source with demand (RPS), so it keeps being probed and never starves.
pub const LIVENESS_FLOOR_RPS: f64 = 1.0;

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
    let problem = TransportProblem {
        supply: active.iter().map(|&s| view.demand[s]).collect(),
        capacity: view.capacity.clone(),
        cost,
        floor: LIVENESS_FLOOR_RPS,
    };
    match solve_transport(&problem) {
        Ok(solution) => {
            let mut weights = vec![0.0; ns * nt];
            let mut floor = vec![0.0; ns];
            let mut used = vec![0.0; nt];
            for (k, &s) in active.iter().enumerate() {
                let n = view.demand[s];
                floor[s] = LIVENESS_FLOOR_RPS / n;
                for t in 0..nt {
                    let f = solution.flow[k * nt + t];
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
                "demand {supply} rps from {} is below the liveness floor ({need} rps: \
                 {LIVENESS_FLOOR_RPS} rps to each of {} serving clusters)",
                view.source_ids[active[*source]],
                view.dests.len()
            ),
            Infeasible::CapacityBelowFloor {
                destination,
                capacity,
                need,
            } => write!(
                out,
                "capacity {capacity} rps of {} is below the liveness floor ({need} rps: \
                 {LIVENESS_FLOOR_RPS} rps from each of {} sources)",
                view.dest_ids[*destination],
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
