//! Load-aware `optimized`: the transportation problem with a convex cost of load at each
//! destination, because a destination's response time rises with the load sent to it.
//!
//! ```text
//! minimise   Σ cost(s,t)·n(s,t) + w · Σ_t L(t)·S_t(L(t)),   L(t) = Σ_s n(s,t)
//! subject to Σ_t n(s,t) = supply(s),  Σ_s n(s,t) ≤ capacity(t),  n(s,t) ≥ floor(s)
//! ```
//!
//! `S_t(L) = base_ms + slope_ms_per_rps · L` is the service time of one request at `t` when
//! `t` serves `L` RPS ([`LoadCurve`]), `w` the latency coefficient of the params (the same `a`
//! that weighs RTT in the linear cost), so every request pays its RTT *and* the service time
//! at the load the solution puts on its destination. `L·S(L)` is convex (a quadratic with
//! non-negative coefficients), so the problem is a convex-cost transportation problem.
//!
//! Why linear `S` and not the queueing form `base / (1 - L/capacity)`: the linear form is
//! what the published multi-cluster service-selection models fit per service (`slope x load +
//! base`), it is what an agent can fit from a few (load, time) samples without knowing the
//! service's true capacity, and the capacity constraint already keeps the load below
//! capacity. The queueing form would make the cost explode near a capacity that is itself an
//! operator's estimate.
//!
//! Method (exact for the piecewise-linear interpolation of `L·S(L)`, see the tolerance
//! below): the floor is assigned first (it loads `t` with `F_t = Σ_s floor(s)`), then each
//! destination's remaining range `[F_t, capacity(t)]` is cut into `segments` pieces of equal
//! width; piece `k` becomes a virtual destination with the piece's width as capacity and the
//! piece's secant slope of `w·L·S(L)` added to every source's cost to it. Secant slopes of a
//! convex function increase, so cheaper pieces fill first and the plain transportation
//! problem over `|T| x segments` destinations ([`solve_transport`], successive shortest
//! paths) is the convex problem with `L·S(L)` replaced by its interpolation.
//!
//! Tolerance: linear interpolation of `w·slope·L²` over a piece of width `h` is off by at
//! most `w·slope·h²/4`, so the objective is within `Σ_t w·slope_t·h_t²/4`
//! ([`ConvexSolution::error_bound`]) of the true convex optimum. With 64 pieces that is
//! `w·slope·capacity²/16384` per destination: checked against a general QP solver
//! (Clarabel, interior point) on random instances in `tests/load_aware.rs`.

use crate::transport::{solve_transport, Infeasible, TransportProblem};

/// Pieces per destination of the piecewise-linear interpolation (see the module doc).
pub const DEFAULT_SEGMENTS: usize = 64;

/// A destination's service time per request as a function of the load on it:
/// `base_ms + slope_ms_per_rps · load`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadCurve {
    /// Service time at no load (ms).
    pub base_ms: f64,
    /// Extra service time per RPS of load (ms per RPS); 0 = load-independent.
    pub slope_ms_per_rps: f64,
}

impl LoadCurve {
    /// A curve that adds nothing.
    pub const ZERO: Self = Self {
        base_ms: 0.0,
        slope_ms_per_rps: 0.0,
    };

    /// Service time per request at `load` RPS (ms).
    #[must_use]
    pub fn service_ms(&self, load: f64) -> f64 {
        self.base_ms + self.slope_ms_per_rps * load
    }

    /// Total service time per second of every request at `load`: `load · S(load)`.
    #[must_use]
    pub fn total(&self, load: f64) -> f64 {
        load * self.service_ms(load)
    }

    /// d/dL of [`LoadCurve::total`]: the service time the next request adds to everyone's.
    #[must_use]
    pub fn marginal(&self, load: f64) -> f64 {
        self.base_ms + 2.0 * self.slope_ms_per_rps * load
    }

    /// Refuses a curve that is negative, NaN or infinite (a negative slope would make the
    /// cost non-convex), naming the field under `path`.
    ///
    /// # Errors
    /// `(field path, reason)`.
    pub fn check(&self, path: &str) -> Result<(), (String, String)> {
        for (field, v) in [
            ("base_ms", self.base_ms),
            ("slope_ms_per_rps", self.slope_ms_per_rps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err((
                    format!("{path}.{field}"),
                    format!(
                        "{v} is not a finite non-negative number (a service time that falls \
                         with load is not convex)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One convex-cost transportation instance, dense, row-major like [`TransportProblem`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConvexTransport {
    pub supply: Vec<f64>,
    pub capacity: Vec<f64>,
    /// Linear cost per RPS, `cost[s * n_dest + t]`.
    pub cost: Vec<f64>,
    /// Minimum RPS from source `s` to every destination.
    pub floor: Vec<f64>,
    /// Service time curve of each destination.
    pub curve: Vec<LoadCurve>,
    /// Weight of one ms of service time in cost units (the params' RTT coefficient).
    pub latency_weight: f64,
    /// Pieces per destination (>= 1).
    pub segments: usize,
}

/// An optimal flow of the interpolated problem.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvexSolution {
    /// RPS per (source, destination), row-major.
    pub flow: Vec<f64>,
    /// The true convex objective of `flow` (not the interpolated one).
    pub objective: f64,
    /// How far `objective` can be above the true optimum (interpolation error bound).
    pub error_bound: f64,
}

impl ConvexTransport {
    /// The true objective of `flow`: linear cost plus `w · Σ_t L·S(L)`.
    #[must_use]
    pub fn objective(&self, flow: &[f64]) -> f64 {
        let nt = self.capacity.len();
        let linear: f64 = flow.iter().zip(&self.cost).map(|(f, c)| f * c).sum();
        let mut load = vec![0.0; nt];
        for (i, f) in flow.iter().enumerate() {
            load[i % nt] += f;
        }
        linear
            + self.latency_weight
                * load
                    .iter()
                    .zip(&self.curve)
                    .map(|(l, c)| c.total(*l))
                    .sum::<f64>()
    }

    /// Load per destination of `flow`.
    #[must_use]
    pub fn loads(&self, flow: &[f64]) -> Vec<f64> {
        let nt = self.capacity.len();
        let mut load = vec![0.0; nt];
        for (i, f) in flow.iter().enumerate() {
            load[i % nt] += f;
        }
        load
    }
}

/// Solves `p` (see the module doc).
///
/// # Errors
/// The reasons the instance is infeasible, as [`solve_transport`] states them (indices into
/// `p`'s vectors; a floor that does not fit is reported with the source's or destination's
/// floor need).
pub fn solve_convex(p: &ConvexTransport) -> Result<ConvexSolution, Vec<Infeasible>> {
    let (ns, nt) = (p.supply.len(), p.capacity.len());
    let k = p.segments.max(1);
    if p.cost.len() != ns * nt || p.floor.len() != ns || p.curve.len() != nt {
        return Err(vec![Infeasible::Malformed]);
    }
    // The floor first: it loads each destination with F_t.
    let floor_load: f64 = p.floor.iter().sum();
    let mut reasons = Vec::new();
    for s in 0..ns {
        #[allow(clippy::cast_precision_loss)]
        let need = p.floor[s] * nt as f64;
        if p.supply[s] + 1e-9 < need {
            reasons.push(Infeasible::SupplyBelowFloor {
                source: s,
                supply: p.supply[s],
                need,
            });
        }
    }
    for t in 0..nt {
        if p.capacity[t] + 1e-9 < floor_load {
            reasons.push(Infeasible::CapacityBelowFloor {
                destination: t,
                capacity: p.capacity[t],
                need: floor_load,
            });
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    // Virtual destinations (t, piece): capacity = piece width, cost += secant slope.
    let mut capacity = Vec::with_capacity(nt * k);
    let mut extra = Vec::with_capacity(nt * k);
    let mut error_bound = 0.0;
    for t in 0..nt {
        let c = &p.curve[t];
        #[allow(clippy::cast_precision_loss)]
        let h = (p.capacity[t] - floor_load).max(0.0) / k as f64;
        error_bound += p.latency_weight * c.slope_ms_per_rps * h * h / 4.0;
        for piece in 0..k {
            #[allow(clippy::cast_precision_loss)]
            let lo = floor_load + h * piece as f64;
            let slope = if h > 0.0 {
                (c.total(lo + h) - c.total(lo)) / h
            } else {
                c.marginal(lo)
            };
            capacity.push(h);
            extra.push(p.latency_weight * slope);
        }
    }
    let supply: Vec<f64> = (0..ns)
        .map(|s| {
            #[allow(clippy::cast_precision_loss)]
            let rest = p.supply[s] - p.floor[s] * nt as f64;
            rest.max(0.0)
        })
        .collect();
    let mut cost = Vec::with_capacity(ns * nt * k);
    for s in 0..ns {
        for t in 0..nt {
            for x in &extra[t * k..(t + 1) * k] {
                cost.push(p.cost[s * nt + t] + x);
            }
        }
    }
    let inner = TransportProblem {
        supply,
        capacity,
        cost,
        floor: vec![0.0; ns],
    };
    let solution = solve_transport(&inner).map_err(|reasons| {
        reasons
            .into_iter()
            .map(|r| match r {
                Infeasible::SupplyAboveCapacity { .. } => Infeasible::SupplyAboveCapacity {
                    supply: p.supply.iter().sum(),
                    capacity: p.capacity.iter().sum(),
                },
                other => other,
            })
            .collect::<Vec<_>>()
    })?;
    let mut flow = vec![0.0; ns * nt];
    for s in 0..ns {
        for t in 0..nt {
            let pieces = &solution.flow[(s * nt + t) * k..(s * nt + t + 1) * k];
            flow[s * nt + t] = p.floor[s] + pieces.iter().sum::<f64>();
        }
    }
    Ok(ConvexSolution {
        objective: p.objective(&flow),
        flow,
        error_bound,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn instance(slope: [f64; 2]) -> ConvexTransport {
        ConvexTransport {
            supply: vec![100.0],
            capacity: vec![200.0, 200.0],
            cost: vec![10.0, 10.0],
            floor: vec![1.0],
            curve: vec![
                LoadCurve {
                    base_ms: 5.0,
                    slope_ms_per_rps: slope[0],
                },
                LoadCurve {
                    base_ms: 5.0,
                    slope_ms_per_rps: slope[1],
                },
            ],
            latency_weight: 0.5,
            segments: DEFAULT_SEGMENTS,
        }
    }

    #[test]
    fn two_equally_near_destinations_share_by_their_slopes() {
        // Equal slopes: an even split (the linear model would be indifferent).
        let s = solve_convex(&instance([0.1, 0.1])).unwrap();
        assert!((s.flow[0] - 50.0).abs() < 2.0, "{:?}", s.flow);
        // The second gets slower 3x as fast with load: it gets about a quarter
        // (marginals equal: 0.1·L0 = 0.3·L1, L0 + L1 = 100 -> L1 = 25).
        let s = solve_convex(&instance([0.1, 0.3])).unwrap();
        assert!((s.flow[1] - 25.0).abs() < 2.0, "{:?}", s.flow);
        assert!(
            s.error_bound < 1e-3 * s.objective,
            "{} of {}",
            s.error_bound,
            s.objective
        );
    }

    #[test]
    fn floor_and_capacity_hold() {
        let mut p = instance([0.0, 1.0]);
        p.capacity = vec![60.0, 200.0];
        let s = solve_convex(&p).unwrap();
        assert!(s.flow[0] <= 60.0 + 1e-9, "{:?}", s.flow);
        assert!(s.flow[1] >= 1.0 - 1e-9, "{:?}", s.flow);
        assert!((s.flow.iter().sum::<f64>() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_negative_or_non_finite_curve_is_refused_by_field() {
        let bad = LoadCurve {
            base_ms: 1.0,
            slope_ms_per_rps: -0.1,
        };
        let (field, why) = bad.check("service_time.c2").unwrap_err();
        assert_eq!(field, "service_time.c2.slope_ms_per_rps");
        assert!(why.contains("not convex"), "{why}");
        let bad = LoadCurve {
            base_ms: f64::NAN,
            slope_ms_per_rps: 0.0,
        };
        assert_eq!(bad.check("x").unwrap_err().0, "x.base_ms");
    }
}
