//! Per-service solving: a dense view of one service (indices, costs), the policy dispatch,
//! damping, and the translation back to name-keyed matrices.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::cost::{self, CostModel};
use super::damping::damp_row;
use super::load_aware::LoadCurve;
use super::optimized::optimized;
use super::round_robin::{local_first_round_robin, round_robin, weighted_round_robin};
use super::{
    validate, Matrix, ModelError, Params, Policy, Problem, ServiceInput, ServiceSolution,
    SolveOptions, Status,
};

/// One service in dense form: sources (demand_rps keys, any demand) × serving destinations
/// (capacity_rps entries > 0), both in id order.
pub(crate) struct View<'p> {
    pub index: usize,
    pub svc: &'p ServiceInput,
    pub policy: Policy,
    pub params: Params,
    pub source_ids: Vec<&'p str>,
    pub sources: Vec<usize>,
    pub demand: Vec<f64>,
    pub dest_ids: Vec<&'p str>,
    pub dests: Vec<usize>,
    pub capacity: Vec<f64>,
    /// `sources × dests`, row-major.
    pub cost: Vec<f64>,
    /// Service time curve per destination (zero where the service states none).
    pub curve: Vec<LoadCurve>,
    /// Cost units per ms of latency under the params (the RTT coefficient).
    pub latency_weight: f64,
}

impl View<'_> {
    /// Whether `optimized` is load-aware here: some destination has a curve that depends on
    /// load or differs in base, and the params weigh latency (`cost` stays linear in $).
    pub(crate) fn load_aware(&self) -> bool {
        self.params != Params::Cost && self.curve.iter().any(|c| *c != LoadCurve::ZERO)
    }
}

/// A policy's answer in dense form.
pub(crate) struct Dense {
    /// `sources × dests`, row-major; each row sums to 1 (empty rows when nothing serves).
    pub weights: Vec<f64>,
    pub status: Status,
    pub reason: Option<String>,
    /// Liveness floor per source as a weight (0 when there is none).
    pub floor: Vec<f64>,
}

impl Dense {
    pub(crate) fn no_serving(ns: usize) -> Self {
        Self {
            weights: Vec::new(),
            status: Status::Degraded,
            reason: Some("no serving cluster (no capacity_rps > 0): no weights".into()),
            floor: vec![0.0; ns],
        }
    }
}

/// Lazily built cost models, one per params in use.
pub(crate) struct Costs<'p> {
    problem: &'p Problem,
    index: HashMap<&'p str, usize>,
    models: [Option<CostModel<'p>>; 3],
}

impl<'p> Costs<'p> {
    pub(crate) fn new(problem: &'p Problem) -> Self {
        Self {
            problem,
            index: cost::index(problem),
            models: [None, None, None],
        }
    }

    fn model(&mut self, params: Params) -> &mut CostModel<'p> {
        let slot = match params {
            Params::Cost => 0,
            Params::Performance => 1,
            Params::Mixed => 2,
        };
        let problem = self.problem;
        self.models[slot].get_or_insert_with(|| CostModel::new(problem, params))
    }

    pub(crate) fn view(&mut self, index: usize) -> View<'p> {
        let problem = self.problem;
        let svc = &problem.services[index];
        let policy = svc.policy.unwrap_or(problem.policy);
        let params = svc.params.unwrap_or(problem.params);
        let mut source_ids = Vec::with_capacity(svc.demand_rps.len());
        let mut sources = Vec::with_capacity(svc.demand_rps.len());
        let mut demand = Vec::with_capacity(svc.demand_rps.len());
        for (id, d) in &svc.demand_rps {
            if let Some(&i) = self.index.get(id.as_str()) {
                source_ids.push(id.as_str());
                sources.push(i);
                demand.push(*d);
            }
        }
        let mut dest_ids = Vec::new();
        let mut dests = Vec::new();
        let mut capacity = Vec::new();
        for (id, c) in &svc.capacity_rps {
            if *c > 0.0 {
                if let Some(&i) = self.index.get(id.as_str()) {
                    dest_ids.push(id.as_str());
                    dests.push(i);
                    capacity.push(*c);
                }
            }
        }
        let model = self.model(params);
        let mut cost = Vec::with_capacity(sources.len() * dests.len());
        for &s in &sources {
            for &t in &dests {
                cost.push(model.cost(s, t));
            }
        }
        let curve = dest_ids
            .iter()
            .map(|id| {
                svc.service_time
                    .get(*id)
                    .copied()
                    .unwrap_or(LoadCurve::ZERO)
            })
            .collect();
        View {
            index,
            svc,
            policy,
            params,
            source_ids,
            sources,
            demand,
            dest_ids,
            dests,
            capacity,
            cost,
            curve,
            latency_weight: cost::coefficients(params).0,
        }
    }
}

pub(crate) fn run_policy(view: &View<'_>) -> Result<Dense, ModelError> {
    match view.policy {
        Policy::RoundRobin => Ok(round_robin(view)),
        Policy::LocalFirstRoundRobin => Ok(local_first_round_robin(view)),
        Policy::WeightedRoundRobin => weighted_round_robin(view),
        Policy::Optimized => Ok(optimized(view)),
    }
}

/// Solves every service of the problem with its effective policy (the service's override or
/// the problem's), then damps against `options.previous` when `options.max_step` is set.
///
/// # Errors
/// [`ModelError`] when the problem does not validate, `max_step` is not in [0, 1], or
/// weighted-round-robin meets two zero-cost destinations for one source.
pub fn solve(
    problem: &Problem,
    options: &SolveOptions,
) -> Result<Vec<ServiceSolution>, ModelError> {
    validate(problem)?;
    if let Some(step) = options.max_step {
        if !(0.0..=1.0).contains(&step) {
            return Err(ModelError::invalid(
                "options.max_step",
                format!("must be in [0, 1], got {step}"),
            ));
        }
    }
    let mut costs = Costs::new(problem);
    let mut out = Vec::with_capacity(problem.services.len());
    for index in 0..problem.services.len() {
        let start = Instant::now();
        let view = costs.view(index);
        let mut dense = run_policy(&view)?;
        if let (Some(step), Some(previous)) =
            (options.max_step, options.previous.get(&view.svc.name))
        {
            damp(&view, &mut dense, previous, step);
        }
        out.push(to_solution(&view, &dense, start));
    }
    Ok(out)
}

fn damp(view: &View<'_>, dense: &mut Dense, previous: &Matrix, step: f64) {
    let nt = view.dests.len();
    if nt == 0 || dense.weights.is_empty() {
        return;
    }
    let mut moved = false;
    for (s, id) in view.source_ids.iter().enumerate() {
        let Some(prev_row) = previous.get(*id) else {
            continue;
        };
        let prev: Vec<f64> = view
            .dest_ids
            .iter()
            .map(|t| prev_row.get(*t).copied().unwrap_or(0.0))
            .filter(|w| w.is_finite())
            .map(|w| w.max(0.0))
            .collect();
        if prev.len() != nt {
            continue;
        }
        let row = &mut dense.weights[s * nt..(s + 1) * nt];
        let damped = damp_row(row, &prev, dense.floor[s], step);
        if damped
            .iter()
            .zip(row.iter())
            .any(|(a, b)| (a - b).abs() > 1e-12)
        {
            moved = true;
        }
        row.copy_from_slice(&damped);
    }
    if moved {
        let note = format!("damped: no weight moved more than {step} from the previous round");
        dense.reason = Some(match dense.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
}

pub(crate) fn flows(view: &View<'_>, dense: &Dense) -> Vec<f64> {
    let nt = view.dests.len();
    if dense.weights.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(dense.weights.len());
    for (s, d) in view.demand.iter().enumerate() {
        out.extend(dense.weights[s * nt..(s + 1) * nt].iter().map(|w| w * d));
    }
    out
}

fn to_solution(view: &View<'_>, dense: &Dense, start: Instant) -> ServiceSolution {
    let nt = view.dests.len();
    let flow = flows(view, dense);
    let objective = flow.iter().zip(&view.cost).map(|(f, c)| f * c).sum();
    // Ids are already sorted: `collect` bulk-builds each map instead of inserting one by one.
    let row = |values: &[f64], s: usize| -> BTreeMap<String, f64> {
        if values.is_empty() {
            return BTreeMap::new();
        }
        view.dest_ids
            .iter()
            .zip(&values[s * nt..(s + 1) * nt])
            .map(|(dst, v)| ((*dst).to_owned(), *v))
            .collect()
    };
    let weights: Matrix = view
        .source_ids
        .iter()
        .enumerate()
        .map(|(s, id)| ((*id).to_owned(), row(&dense.weights, s)))
        .collect();
    let flows_m: Matrix = view
        .source_ids
        .iter()
        .enumerate()
        .map(|(s, id)| ((*id).to_owned(), row(&flow, s)))
        .collect();
    ServiceSolution {
        name: view.svc.name.clone(),
        status: dense.status,
        reason: dense.reason.clone(),
        weights,
        flows: flows_m,
        objective,
        solve_ms: start.elapsed().as_secs_f64() * 1000.0,
    }
}
