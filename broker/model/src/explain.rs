//! Why a source's weights are what they are.

use serde::Serialize;

use super::load_aware::LoadCurve;
use super::optimized::liveness_floor_rps;
use super::service::{flows, run_policy, Costs};
use super::{validate, ModelError, Params, Policy, Problem, Status};

/// A constraint or rule that decides a destination's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Binding {
    /// `optimized`: the destination's capacity is used up (by all sources together).
    CapacityFull,
    /// `optimized`: this source sends only its liveness floor there
    /// ([`crate::liveness_floor_rps`]: a share of its demand).
    LivenessFloor,
    /// The destination is the source itself, or costs 0 (weighted-round-robin sends it all).
    LocalPreference,
}

/// One destination, from one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationExplanation {
    pub destination: String,
    pub cost: f64,
    /// The egress price (USD/GB) of a request's traffic between the source and this
    /// destination that the cost used: the region price table's (both directions blended,
    /// see `egress_prices::EgressPrices::request_price`), or the tier's where the table does
    /// not cover the pair.
    pub usd_per_gb: f64,
    /// RPS from this source.
    pub flow: f64,
    pub weight: f64,
    pub capacity_rps: f64,
    /// RPS into this destination from every source of the service.
    pub total_flow_rps: f64,
    /// The destination's service-time curve, when the service has one for it (load-aware
    /// `optimized` uses it; the other policies ignore it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_time: Option<LoadCurve>,
    /// Service time per request at `total_flow_rps` on that curve (ms; 0 without a curve).
    pub service_ms: f64,
    /// What one more RPS from this source to this destination would cost: `cost` plus, when
    /// the solve is load-aware, the latency weight times the curve's marginal service time
    /// at the destination's load. In a load-aware optimum every destination that gets more
    /// than its floor and is not full has the same marginal cost (the one that set the split).
    pub marginal_cost: f64,
    pub capacity_full: bool,
    pub liveness_floor: bool,
    pub local_preference: bool,
    /// The same three facts as a list, for display.
    pub binding: Vec<Binding>,
}

/// The answer to "why these weights" for one service and source (undamped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub service: String,
    pub source: String,
    pub policy: Policy,
    pub params: Params,
    pub status: Status,
    pub reason: Option<String>,
    pub demand_rps: f64,
    /// `optimized`: the liveness floor of this source to each destination (RPS; 0 for the
    /// other policies and for a source without demand).
    pub liveness_floor_rps: f64,
    pub destinations: Vec<DestinationExplanation>,
}

/// Explains one service's weights from one source: cost, flow and weight per serving
/// destination and which constraints bind.
///
/// # Errors
/// [`ModelError`] when the problem does not validate, the service or the source is unknown,
/// or the policy itself fails (weighted-round-robin with two zero costs).
pub fn explain(problem: &Problem, service: &str, source: &str) -> Result<Explanation, ModelError> {
    validate(problem)?;
    let index = problem
        .services
        .iter()
        .position(|s| s.name == service)
        .ok_or_else(|| ModelError::UnknownService(service.to_owned()))?;
    let mut costs = Costs::new(problem);
    let view = costs.view(index);
    let s = view
        .source_ids
        .iter()
        .position(|id| *id == source)
        .ok_or_else(|| ModelError::UnknownSource {
            index,
            service: service.to_owned(),
            source_cluster: source.to_owned(),
        })?;
    let dense = run_policy(&view)?;
    let flow = flows(&view, &dense);
    let nt = view.dests.len();
    let lp_bound = view.policy == Policy::Optimized && dense.status == Status::Optimal;
    let floor_rps = if view.policy == Policy::Optimized {
        liveness_floor_rps(view.demand[s], nt)
    } else {
        0.0
    };
    let mut destinations = Vec::with_capacity(nt);
    if !dense.weights.is_empty() {
        for (t, dst) in view.dest_ids.iter().enumerate() {
            let total: f64 = (0..view.sources.len()).map(|k| flow[k * nt + t]).sum();
            let cap = view.capacity[t];
            let (cost, f, w) = (
                view.cost[s * nt + t],
                flow[s * nt + t],
                dense.weights[s * nt + t],
            );
            let capacity_full = lp_bound && total >= cap - 1e-6 * cap.max(1.0);
            let liveness_floor =
                lp_bound && view.demand[s] > 0.0 && f <= floor_rps + 1e-7 * view.demand[s].max(1.0);
            let local_preference = w > 0.0 && (*dst == source || cost <= 0.0);
            let binding = [
                (capacity_full, Binding::CapacityFull),
                (liveness_floor, Binding::LivenessFloor),
                (local_preference, Binding::LocalPreference),
            ]
            .into_iter()
            .filter_map(|(on, b)| on.then_some(b))
            .collect();
            let curve = view.svc.service_time.get(*dst).copied();
            let service_ms = curve.map_or(0.0, |c| c.service_ms(total));
            let marginal_cost = match curve {
                Some(c) if view.policy == Policy::Optimized && view.load_aware() => {
                    cost + view.latency_weight * c.marginal(total)
                }
                _ => cost,
            };
            destinations.push(DestinationExplanation {
                destination: (*dst).to_owned(),
                cost,
                usd_per_gb: crate::cost::egress_price(problem, source, dst).unwrap_or(0.0),
                flow: f,
                weight: w,
                capacity_rps: cap,
                total_flow_rps: total,
                service_time: curve,
                service_ms,
                marginal_cost,
                capacity_full,
                liveness_floor,
                local_preference,
                binding,
            });
        }
    }
    Ok(Explanation {
        service: service.to_owned(),
        source: source.to_owned(),
        policy: view.policy,
        params: view.params,
        status: dense.status,
        reason: dense.reason,
        demand_rps: view.demand[s],
        liveness_floor_rps: floor_rps,
        destinations,
    })
}
