//! Service-time curves from measurements (pure; the round records the points, the plan fits).
//!
//! Agents with a probe for a service send, with its capacity sample, the service time they
//! just measured on their cluster's own ready endpoints (`CapacitySample.measured_service_ms`).
//! Each round the leader turns the fresh samples into at most one point per (service,
//! cluster) every [`POINT_INTERVAL_MS`] — the median over the cluster's nodes, paired with
//! the load the broker sees on the cluster then (every source's fresh RPS for the service to
//! it, summed) — and records it in the store ([`new_points`]); every replica fits from the
//! points of the last [`WINDOW`] ([`fitted_curves`]), so a new leader or a follower's
//! `explain` has the same curves.
//!
//! The fit is ordinary least squares of service time on load, `base + slope x load`, with
//! `slope >= 0` and `base >= 0` (a curve that falls with load is not convex; the constrained
//! optimum is then the flat mean, or the line through the origin). It needs
//! [`MIN_POINTS`] points whose loads spread by at least [`MIN_SPREAD_RPS`] and
//! [`MIN_SPREAD_SHARE`] of the largest (without spread the slope is noise). Without a fit the
//! plan takes the declared curve, or else a flat curve at the median measured time
//! ([`CurveOrigin::Measured`]): a fact at today's load, which moves traffic and so makes the
//! spread the fit needs. Measured curves count only while the cluster's agents still send a
//! measured time (a probe removed takes its curve with it at once, not after the window).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ballast_model::load_aware::LoadCurve;
use ballast_store::ServiceTimePoint;

use super::plan::median;
use super::snapshot::Snapshot;

/// How far back points count.
pub const WINDOW: Duration = Duration::from_secs(300);
/// At most one point per (service, cluster) this often.
pub const POINT_INTERVAL_MS: i64 = 2_000;
/// Points needed for a fit.
pub const MIN_POINTS: usize = 5;
/// The loads of the points must spread by at least this (RPS) ...
pub const MIN_SPREAD_RPS: f64 = 1.0;
/// ... and by at least this share of the largest load.
pub const MIN_SPREAD_SHARE: f64 = 0.25;

/// [`WINDOW`] in ms.
#[must_use]
pub fn window_ms() -> i64 {
    i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX)
}

/// Where the curve the plan uses for a (service, cluster) came from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum CurveOrigin {
    /// Least squares over this many points.
    Fitted(usize),
    /// Declared (ServiceExport annotation / topology file).
    Declared,
    /// Flat at the median of this many measured points (too little load spread to fit).
    Measured(usize),
}

/// The points this round adds (see the module docs): fresh samples are those measured at or
/// after `cut`, from clusters in `known`.
#[must_use]
pub fn new_points(snap: &Snapshot, known: &BTreeSet<&str>, cut: i64) -> Vec<ServiceTimePoint> {
    // (service, cluster) -> (measured ms of its nodes, newest sample time)
    let mut samples: BTreeMap<(&str, &str), (Vec<f64>, i64)> = BTreeMap::new();
    for c in &snap.capacity {
        let Some(ms) = c.measured_service_ms else {
            continue;
        };
        if c.measured_at_ms < cut || !known.contains(c.cluster_id.as_str()) {
            continue;
        }
        let e = samples
            .entry((c.service.as_str(), c.cluster_id.as_str()))
            .or_insert((Vec::new(), i64::MIN));
        e.0.push(ms);
        e.1 = e.1.max(c.measured_at_ms);
    }
    if samples.is_empty() {
        return Vec::new();
    }
    let mut load: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for r in &snap.rps {
        if r.measured_at_ms >= cut && known.contains(r.src.as_str()) {
            *load
                .entry((r.service.as_str(), r.dst.as_str()))
                .or_default() += r.rps;
        }
    }
    let mut last: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for p in &snap.service_time_points {
        let e = last
            .entry((p.service.as_str(), p.cluster_id.as_str()))
            .or_insert(i64::MIN);
        *e = (*e).max(p.at_ms);
    }
    samples
        .into_iter()
        .filter_map(|((service, cluster), (mut ms, at))| {
            let due = last
                .get(&(service, cluster))
                .is_none_or(|l| at >= l.saturating_add(POINT_INTERVAL_MS));
            Some(ServiceTimePoint {
                service: service.to_owned(),
                cluster_id: cluster.to_owned(),
                at_ms: at,
                load_rps: load.get(&(service, cluster)).copied().unwrap_or(0.0),
                service_ms: median(&mut ms)?,
            })
            .filter(|_| due)
        })
        .collect()
}

/// Least squares `service_ms = base + slope x load` over `(load, service_ms)` points, with
/// `slope >= 0` and `base >= 0`; None without [`MIN_POINTS`] points of enough load spread.
#[must_use]
pub fn fit(points: &[(f64, f64)]) -> Option<LoadCurve> {
    let n = points.len();
    if n < MIN_POINTS {
        return None;
    }
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
            (lo.min(*x), hi.max(*x))
        });
    let spread = hi - lo;
    if !(spread >= MIN_SPREAD_RPS && spread >= MIN_SPREAD_SHARE * hi) {
        return None;
    }
    let nf = n as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    let curve = if slope <= 0.0 {
        LoadCurve {
            base_ms: my.max(0.0),
            slope_ms_per_rps: 0.0,
        }
    } else if my - slope * mx < 0.0 {
        // the best line with base >= 0 then goes through the origin
        let sxx0: f64 = points.iter().map(|p| p.0 * p.0).sum();
        let sxy0: f64 = points.iter().map(|p| p.0 * p.1).sum();
        LoadCurve {
            base_ms: 0.0,
            slope_ms_per_rps: (sxy0 / sxx0).max(0.0),
        }
    } else {
        LoadCurve {
            base_ms: my - slope * mx,
            slope_ms_per_rps: slope,
        }
    };
    (curve.base_ms.is_finite() && curve.slope_ms_per_rps.is_finite()).then_some(curve)
}

/// `service -> cluster -> (curve, origin)` from the points measured at or after `since_ms`:
/// [`fit`] where it can, else flat at the median measured time ([`CurveOrigin::Measured`]).
#[must_use]
pub fn measured_curves(
    points: &[ServiceTimePoint],
    since_ms: i64,
) -> BTreeMap<String, BTreeMap<String, (LoadCurve, CurveOrigin)>> {
    let mut by_pair: BTreeMap<(&str, &str), Vec<(f64, f64)>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.at_ms >= since_ms) {
        by_pair
            .entry((p.service.as_str(), p.cluster_id.as_str()))
            .or_default()
            .push((p.load_rps, p.service_ms));
    }
    let mut out: BTreeMap<String, BTreeMap<String, (LoadCurve, CurveOrigin)>> = BTreeMap::new();
    for ((service, cluster), pts) in by_pair {
        let n = pts.len();
        let entry = match fit(&pts) {
            Some(c) => (c, CurveOrigin::Fitted(n)),
            None => {
                let mut times: Vec<f64> = pts.iter().map(|p| p.1).collect();
                let Some(m) = median(&mut times) else {
                    continue;
                };
                (
                    LoadCurve {
                        base_ms: m,
                        slope_ms_per_rps: 0.0,
                    },
                    CurveOrigin::Measured(n),
                )
            }
        };
        out.entry(service.to_owned())
            .or_default()
            .insert(cluster.to_owned(), entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn a_line_with_noise_is_recovered_and_constraints_hold() {
        // 20 + 0.5 x load, +-1 ms alternating
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| {
                let x = 10.0 * f64::from(i);
                (x, 20.0 + 0.5 * x + if i % 2 == 0 { 1.0 } else { -1.0 })
            })
            .collect();
        let c = fit(&pts).expect("enough spread");
        assert!(close(c.slope_ms_per_rps, 0.5, 0.03), "{c:?}");
        assert!(close(c.base_ms, 20.0, 1.5), "{c:?}");

        // falling with load: the flat mean, never a negative slope
        let falling: Vec<(f64, f64)> = (0..6)
            .map(|i| (f64::from(i) * 10.0, 50.0 - f64::from(i)))
            .collect();
        let c = fit(&falling).expect("spread");
        assert_eq!(c.slope_ms_per_rps, 0.0);
        assert!(close(c.base_ms, 47.5, 1e-9), "{c:?}");

        // a line that would cross below 0 at no load: through the origin instead
        let steep: Vec<(f64, f64)> = (1..7)
            .map(|i| (f64::from(i) * 10.0, f64::from(i) * 30.0 - 40.0))
            .collect();
        let c = fit(&steep).expect("spread");
        assert_eq!(c.base_ms, 0.0);
        assert!(c.slope_ms_per_rps > 0.0);
    }

    #[test]
    fn too_few_points_or_too_little_spread_fit_nothing() {
        let few: Vec<(f64, f64)> = (0..MIN_POINTS - 1)
            .map(|i| (i as f64 * 10.0, 5.0))
            .collect();
        assert_eq!(fit(&few), None);
        // 40 +- 2 RPS: 10 % of the largest, under the 25 % needed
        let flat: Vec<(f64, f64)> = (0..8).map(|i| (38.0 + f64::from(i % 5), 40.0)).collect();
        assert_eq!(fit(&flat), None);
        let tiny: Vec<(f64, f64)> = (0..8).map(|i| (0.1 * f64::from(i), 40.0)).collect();
        assert_eq!(fit(&tiny), None, "0.7 RPS of spread is under 1 RPS");
    }

    fn point(svc: &str, cluster: &str, at: i64, load: f64, ms: f64) -> ServiceTimePoint {
        ServiceTimePoint {
            service: svc.into(),
            cluster_id: cluster.into(),
            at_ms: at,
            load_rps: load,
            service_ms: ms,
        }
    }

    #[test]
    fn curves_are_fitted_where_the_load_spread_else_flat_at_the_median() {
        let mut pts = Vec::new();
        for i in 0..6 {
            let load = 10.0 * f64::from(i);
            pts.push(point("a/b", "c2", 1_000 + i64::from(i), load, 2.0 + load));
            pts.push(point(
                "a/b",
                "c3",
                1_000 + i64::from(i),
                40.0,
                12.0 + f64::from(i),
            ));
        }
        pts.push(point("a/b", "c4", 10, 40.0, 99.0)); // before the window
        let curves = measured_curves(&pts, 100);
        let (c2, o2) = curves["a/b"]["c2"];
        assert!(close(c2.base_ms, 2.0, 1e-9) && close(c2.slope_ms_per_rps, 1.0, 1e-9));
        assert_eq!(o2, CurveOrigin::Fitted(6));
        let (c3, o3) = curves["a/b"]["c3"];
        assert_eq!(c3.slope_ms_per_rps, 0.0);
        assert!(close(c3.base_ms, 14.5, 1e-9), "{c3:?}");
        assert_eq!(o3, CurveOrigin::Measured(6));
        assert!(!curves["a/b"].contains_key("c4"));
    }
}
