//! Herd damping: many sources solving independently must not all jump to the same cheap
//! destination in one round. Each round a weight may move at most `max_step` from the weight
//! published the round before.
//!
//! Method: the new row is the convex combination `prev + λ·(target − prev)` with the largest
//! λ ∈ [0, 1] that keeps every |change| ≤ `max_step`. Both rows sum to 1 and both respect the
//! liveness floor, so the result does too — no renormalisation step can break the bound.
//! Before that, the previous row is aligned with today's serving destinations: destinations
//! that stopped serving drop out at once (there is nothing to damp toward), new ones start at
//! 0, the row is renormalised and lifted to the floor. The bound therefore holds against that
//! aligned previous row, which equals the published one whenever the destination set did not
//! change.

/// Damps one source's row. `target`, `previous` and the result are aligned on the same
/// destinations; `previous` may be all zero (no history: the target is returned);
/// `floor` is the liveness floor as a weight (0 when there is none): for `optimized`,
/// `liveness_floor_rps(N, |T|) / N` = min(1/N, 0.01, 0.1/|T|) — a share of the source's own
/// demand, so it is the same 0.01 (or 0.1/|T|) for every source below 100 rps.
#[must_use]
pub fn damp_row(target: &[f64], previous: &[f64], floor: f64, max_step: f64) -> Vec<f64> {
    let total: f64 = previous.iter().sum();
    if total.is_nan()
        || total <= 0.0
        || !max_step.is_finite()
        || max_step < 0.0
        || target.is_empty()
    {
        return target.to_vec();
    }
    let prev: Vec<f64> = previous.iter().map(|w| w / total).collect();
    let prev = lift_to_floor(&prev, floor);
    let max_diff = target
        .iter()
        .zip(&prev)
        .map(|(t, p)| (t - p).abs())
        .fold(0.0, f64::max);
    let lambda = if max_diff <= max_step {
        1.0
    } else {
        max_step / max_diff
    };
    target
        .iter()
        .zip(&prev)
        .map(|(t, p)| p + lambda * (t - p))
        .collect()
}

/// Raises every weight to at least `floor`, taking the mass from the weights above it in
/// proportion to their excess, so the row still sums to 1.
#[must_use]
pub fn lift_to_floor(row: &[f64], floor: f64) -> Vec<f64> {
    #[allow(clippy::cast_precision_loss)]
    let n = row.len() as f64;
    if floor <= 0.0 || row.is_empty() {
        return row.to_vec();
    }
    if floor * n >= 1.0 {
        return vec![1.0 / n; row.len()];
    }
    if row.iter().all(|w| *w >= floor) {
        return row.to_vec();
    }
    let excess: f64 = row.iter().map(|w| (w - floor).max(0.0)).sum();
    let free = 1.0 - floor * n;
    if excess <= 0.0 {
        return vec![1.0 / n; row.len()];
    }
    row.iter()
        .map(|w| floor + (w - floor).max(0.0) * free / excess)
        .collect()
}
