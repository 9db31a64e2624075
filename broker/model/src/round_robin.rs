//! `round-robin`, `local-first-round-robin` and `weighted-round-robin`.

use super::service::{Dense, View};
use super::{ModelError, Status};

/// Equal split over the serving clusters (capacity > 0), the same from every source.
pub(crate) fn round_robin(view: &View<'_>) -> Dense {
    let (ns, nt) = (view.sources.len(), view.dests.len());
    if nt == 0 {
        return Dense::no_serving(ns);
    }
    #[allow(clippy::cast_precision_loss)]
    let w = 1.0 / nt as f64;
    Dense {
        weights: vec![w; ns * nt],
        status: Status::Optimal,
        reason: None,
        floor: vec![0.0; ns],
    }
}

/// Submariner Lighthouse's local preference: a source whose own cluster serves (capacity >
/// 0: ready, healthy backends) sends everything there (weight 1, the others 0); a source whose
/// cluster does not serve — it has no backends, or they are unhealthy / report no capacity —
/// spreads equally over the serving clusters, as `round-robin` does. Capacity is not
/// otherwise looked at: the local cluster takes its own traffic however loaded it is.
pub(crate) fn local_first_round_robin(view: &View<'_>) -> Dense {
    let mut dense = round_robin(view);
    let nt = view.dests.len();
    if nt == 0 {
        return dense;
    }
    for (s, id) in view.source_ids.iter().enumerate() {
        if let Some(local) = view.dest_ids.iter().position(|t| t == id) {
            let row = &mut dense.weights[s * nt..(s + 1) * nt];
            row.fill(0.0);
            row[local] = 1.0;
        }
    }
    dense
}

/// Weight ∝ 1/cost per source. A cost of 0 means "always this cluster" (weight 1, the
/// local-preference rule; the others get 0); two zero-cost destinations for one source is an
/// error naming both.
pub(crate) fn weighted_round_robin(view: &View<'_>) -> Result<Dense, ModelError> {
    let (ns, nt) = (view.sources.len(), view.dests.len());
    if nt == 0 {
        return Ok(Dense::no_serving(ns));
    }
    let mut weights = vec![0.0; ns * nt];
    for s in 0..ns {
        let cost = &view.cost[s * nt..(s + 1) * nt];
        let out = &mut weights[s * nt..(s + 1) * nt];
        let mut zeros = cost.iter().enumerate().filter(|(_, c)| **c <= 0.0);
        if let Some((first, _)) = zeros.next() {
            if let Some((second, _)) = zeros.next() {
                return Err(ModelError::AmbiguousZeroCost {
                    path: format!("services[{}].demand_rps.{}", view.index, view.source_ids[s]),
                    source_cluster: view.source_ids[s].to_owned(),
                    first: view.dest_ids[first].to_owned(),
                    second: view.dest_ids[second].to_owned(),
                });
            }
            out[first] = 1.0;
            continue;
        }
        let total: f64 = cost.iter().map(|c| 1.0 / c).sum();
        for (w, c) in out.iter_mut().zip(cost) {
            *w = (1.0 / c) / total;
        }
    }
    Ok(Dense {
        weights,
        status: Status::Optimal,
        reason: None,
        floor: vec![0.0; ns],
    })
}
