//! The reference solver: the same transportation LP handed to a general LP library
//! (`good_lp` with the pure-Rust `microlp` simplex backend), written in its original form
//! (n ≥ floor as variable bounds, no shifting) so it checks the dedicated solver
//! independently. Used by the property tests and the benchmark; far slower at scale.

use std::time::Duration;

use good_lp::{
    microlp, variable, Expression, ProblemVariables, Solution, SolverModel, Variable, WithTimeLimit,
};

use ballast_model::transport::{TransportProblem, TransportSolution};

/// Solves `p` with the general LP library.
///
/// # Errors
/// The library's message when it finds no optimum (e.g. the instance is infeasible).
#[allow(dead_code)] // the bench uses only solve_lp_within
pub fn solve_lp(p: &TransportProblem) -> Result<TransportSolution, String> {
    solve_lp_within(p, None)
}

/// [`solve_lp`] with a time limit (the benchmark uses it on large instances). A solution
/// returned after the limit is feasible but may not be optimal.
///
/// # Errors
/// The library's message when it finds no feasible point in time or at all.
pub fn solve_lp_within(
    p: &TransportProblem,
    limit: Option<Duration>,
) -> Result<TransportSolution, String> {
    let (ns, nt) = (p.n_source(), p.n_dest());
    if p.cost.len() != ns * nt {
        return Err("cost has the wrong size".into());
    }
    let mut vars = ProblemVariables::new();
    if p.floor.len() != ns {
        return Err("floor has the wrong size".into());
    }
    let x: Vec<Variable> = (0..ns * nt)
        .map(|k| vars.add(variable().min(p.floor[k / nt.max(1)])))
        .collect();
    let mut objective = Expression::with_capacity(ns * nt);
    for (v, c) in x.iter().zip(&p.cost) {
        objective.add_mul(*c, *v);
    }
    let mut model = vars.minimise(objective).using(microlp);
    if let Some(limit) = limit {
        model = model.with_time_limit(limit.as_secs_f64());
    }
    for s in 0..ns {
        let row: Expression = x[s * nt..(s + 1) * nt].iter().copied().sum();
        model = model.with(row.eq(p.supply[s]));
    }
    for t in 0..nt {
        let col: Expression = (0..ns).map(|s| x[s * nt + t]).sum();
        model = model.with(col.leq(p.capacity[t]));
    }
    let solution = model.solve().map_err(|e| e.to_string())?;
    let flow: Vec<f64> = x.iter().map(|v| solution.value(*v)).collect();
    let objective = p.objective(&flow);
    Ok(TransportSolution { flow, objective })
}
