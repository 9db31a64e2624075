//! Temporary bodies (round-robin for every policy) so dependants compile; replaced below.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Matrix, Params, Problem, ServiceSolution, SolveOptions, Status};

/// Everything that can be wrong with a [`Problem`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field holds a bad value; `path` names it (e.g. `services[0].demand_rps.c9`).
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Why one destination gets what it gets, from one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationExplanation {
    pub destination: String,
    pub cost: f64,
    pub flow: f64,
    pub weight: f64,
    pub capacity_full: bool,
    pub liveness_floor: bool,
    pub local_preference: bool,
}

/// The answer to "why these weights" for one service and source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub service: String,
    pub source: String,
    pub destinations: Vec<DestinationExplanation>,
}

/// Checks the problem.
///
/// # Errors
/// [`ModelError::Invalid`] naming the first bad field.
pub fn validate(_problem: &Problem) -> Result<(), ModelError> {
    Ok(())
}

/// cost = a*RTT + b*price.
#[must_use]
pub fn cost_matrix(problem: &Problem, _params: Params) -> Matrix {
    let mut m = Matrix::new();
    for s in &problem.clusters {
        for t in &problem.clusters {
            m.entry(s.id.clone()).or_default().insert(t.id.clone(), 0.0);
        }
    }
    m
}

/// Solves every service.
///
/// # Errors
/// [`ModelError`] when the problem is invalid.
pub fn solve(
    problem: &Problem,
    _options: &SolveOptions,
) -> Result<Vec<ServiceSolution>, ModelError> {
    validate(problem)?;
    let mut out = Vec::new();
    for svc in &problem.services {
        let serving: Vec<&String> = svc
            .capacity_rps
            .iter()
            .filter(|(_, c)| **c > 0.0)
            .map(|(k, _)| k)
            .collect();
        let mut weights = Matrix::new();
        let mut flows = Matrix::new();
        for (src, d) in &svc.demand_rps {
            let mut w = BTreeMap::new();
            let mut f = BTreeMap::new();
            #[allow(clippy::cast_precision_loss)]
            let n = serving.len() as f64;
            for t in &serving {
                w.insert((*t).clone(), 1.0 / n);
                f.insert((*t).clone(), d / n);
            }
            weights.insert(src.clone(), w);
            flows.insert(src.clone(), f);
        }
        out.push(ServiceSolution {
            name: svc.name.clone(),
            status: Status::Degraded,
            reason: Some("solver not implemented yet: round-robin".into()),
            weights,
            flows,
            objective: 0.0,
            solve_ms: 0.0,
        });
    }
    Ok(out)
}

/// Explains one service's weights from one source.
///
/// # Errors
/// [`ModelError`] when the problem is invalid or the service/source is unknown.
pub fn explain(problem: &Problem, service: &str, source: &str) -> Result<Explanation, ModelError> {
    validate(problem)?;
    Ok(Explanation {
        service: service.into(),
        source: source.into(),
        destinations: Vec::new(),
    })
}
