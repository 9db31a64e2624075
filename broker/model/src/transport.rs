//! The dedicated exact solver for the `optimized` policy's transportation LP:
//!
//! ```text
//! minimise   Σ cost(s,t)·n(s,t)
//! subject to Σ_t n(s,t) = supply(s)      for every source s
//!            Σ_s n(s,t) ≤ capacity(t)    for every destination t
//!            n(s,t) ≥ floor(s)           for every pair (the liveness floor, per source)
//! ```
//!
//! Method: the floor is shifted out first (n = floor(s) + m, m ≥ 0; supply(s) shrinks by
//! floor(s)·|T|, capacity by Σ_s floor(s); the objective gains the constant
//! Σ floor(s)·cost(s,t)), which leaves a plain
//! transportation problem on the complete bipartite graph with uncapacitated arcs. That is a
//! min-cost flow solved by successive shortest paths with node potentials (Johnson
//! reweighting, so Dijkstra works on non-negative reduced costs): sources are added one at a
//! time, and each augmentation follows a cheapest path from the new source through the
//! residual graph (forward arcs s→t, backward arcs t→s' where flow is positive) to a
//! destination with spare capacity. Dijkstra stops as soon as the sink is settled, and the
//! potentials are updated with `min(dist, dist(sink))`, which keeps every reduced cost
//! non-negative. Each augmentation empties the source, fills a destination or empties a
//! backward arc, so the number of augmentations is about |S| + |T|.
//!
//! Real-valued (RPS) supplies are fine: the flow is not required to be integral.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One transportation instance, dense. `cost` is row-major: `cost[s * n_dest + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportProblem {
    /// Demand of each source (RPS), every one must be shipped.
    pub supply: Vec<f64>,
    /// Capacity of each destination (RPS), an upper bound.
    pub capacity: Vec<f64>,
    /// `supply.len() * capacity.len()` non-negative costs, row-major.
    pub cost: Vec<f64>,
    /// Minimum flow from each source to every destination (RPS), one per source: the
    /// liveness floor (`optimized` uses [`crate::liveness_floor_rps`]). All zero = no floor.
    pub floor: Vec<f64>,
}

/// An optimal flow. `flow` is row-major like [`TransportProblem::cost`].
#[derive(Debug, Clone, PartialEq)]
pub struct TransportSolution {
    pub flow: Vec<f64>,
    pub objective: f64,
}

/// Why an instance has no feasible flow (indices into the problem's vectors).
#[derive(Debug, Clone, PartialEq)]
pub enum Infeasible {
    /// `supply[source] < floor[source] · n_dest`.
    SupplyBelowFloor {
        source: usize,
        supply: f64,
        need: f64,
    },
    /// `capacity[destination] < Σ floor`.
    CapacityBelowFloor {
        destination: usize,
        capacity: f64,
        need: f64,
    },
    /// `Σ supply > Σ capacity`.
    SupplyAboveCapacity { supply: f64, capacity: f64 },
    /// The sizes do not match (`cost.len() != supply.len() * capacity.len()`, or
    /// `floor.len() != supply.len()`), or a floor is negative or not finite.
    Malformed,
    /// The solver stopped without shipping every supply (numerical trouble; not expected).
    NotConverged { source: usize, left: f64 },
}

impl TransportProblem {
    #[must_use]
    pub fn n_source(&self) -> usize {
        self.supply.len()
    }

    #[must_use]
    pub fn n_dest(&self) -> usize {
        self.capacity.len()
    }

    /// Σ cost · flow.
    #[must_use]
    pub fn objective(&self, flow: &[f64]) -> f64 {
        self.cost.iter().zip(flow).map(|(c, f)| c * f).sum()
    }

    /// Every reason the instance is infeasible (empty when it is feasible). With the
    /// complete bipartite graph and uncapacitated arcs these are also sufficient.
    #[must_use]
    pub fn infeasibility(&self) -> Vec<Infeasible> {
        let (ns, nt) = (self.n_source(), self.n_dest());
        if self.cost.len() != ns * nt
            || (ns > 0 && nt == 0)
            || self.floor.len() != ns
            || self.floor.iter().any(|f| !f.is_finite() || *f < 0.0)
        {
            return vec![Infeasible::Malformed];
        }
        let mut out = Vec::new();
        let total_supply: f64 = self.supply.iter().sum();
        let total_capacity: f64 = self.capacity.iter().sum();
        let tol = tolerance(total_supply.max(total_capacity));
        if total_supply > total_capacity + tol {
            out.push(Infeasible::SupplyAboveCapacity {
                supply: total_supply,
                capacity: total_capacity,
            });
        }
        let need_t: f64 = self.floor.iter().sum();
        for (s, &supply) in self.supply.iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let need_s = self.floor[s] * nt as f64;
            if supply + tol < need_s {
                out.push(Infeasible::SupplyBelowFloor {
                    source: s,
                    supply,
                    need: need_s,
                });
            }
        }
        for (t, &capacity) in self.capacity.iter().enumerate() {
            if capacity + tol < need_t {
                out.push(Infeasible::CapacityBelowFloor {
                    destination: t,
                    capacity,
                    need: need_t,
                });
            }
        }
        out
    }
}

fn tolerance(scale: f64) -> f64 {
    1e-9 * scale.max(1.0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry(f64, u32);
impl Eq for Entry {}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Min-heap on the distance.
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Dijkstra's relaxation of the arc `u -> v`: when `nd` is shorter than `v`'s known distance,
/// record it with `u` as `v`'s predecessor (and `v` as touched on its first distance) and queue
/// `v`.
#[inline]
fn relax(
    dist: &mut [f64],
    pred: &mut [u32],
    touched: &mut Vec<u32>,
    heap: &mut BinaryHeap<Entry>,
    v: usize,
    nd: f64,
    u: usize,
) {
    if nd < dist[v] {
        if dist[v].is_infinite() {
            touched.push(v as u32);
        }
        dist[v] = nd;
        pred[v] = u as u32;
        heap.push(Entry(nd, v as u32));
    }
}

/// Solves the instance exactly (see the module doc).
///
/// # Errors
/// Every [`Infeasible`] reason when there is no feasible flow.
#[allow(clippy::too_many_lines)]
pub fn solve_transport(p: &TransportProblem) -> Result<TransportSolution, Vec<Infeasible>> {
    let reasons = p.infeasibility();
    if !reasons.is_empty() {
        return Err(reasons);
    }
    let (ns, nt) = (p.n_source(), p.n_dest());
    if ns == 0 {
        return Ok(TransportSolution {
            flow: Vec::new(),
            objective: 0.0,
        });
    }
    let shift_t: f64 = p.floor.iter().sum();
    let total_supply: f64 = p.supply.iter().sum();
    let eps = tolerance(total_supply);
    #[allow(clippy::cast_precision_loss)]
    let mut supply: Vec<f64> = p
        .supply
        .iter()
        .zip(&p.floor)
        .map(|(s, f)| (s - f * nt as f64).max(0.0))
        .collect();
    let mut spare: Vec<f64> = p.capacity.iter().map(|c| (c - shift_t).max(0.0)).collect();
    let mut flow = vec![0.0_f64; ns * nt];
    // users[t]: sources that may have positive flow to t (backward arcs); in_users dedupes.
    let mut users: Vec<Vec<u32>> = vec![Vec::new(); nt];
    let mut in_users = vec![false; ns * nt];

    // Nodes: sources 0..ns, destinations ns..ns+nt, sink ns+nt.
    let n_nodes = ns + nt + 1;
    let sink = ns + nt;
    let mut pot = vec![0.0_f64; n_nodes];
    let mut dist = vec![f64::INFINITY; n_nodes];
    let mut done = vec![false; n_nodes];
    let mut pred = vec![u32::MAX; n_nodes];
    let mut touched: Vec<u32> = Vec::with_capacity(n_nodes);
    let mut heap: BinaryHeap<Entry> = BinaryHeap::with_capacity(n_nodes);

    for s0 in 0..ns {
        if supply[s0] <= eps {
            continue;
        }
        // A fresh source has only forward arcs: make all their reduced costs >= 0.
        let row = &p.cost[s0 * nt..(s0 + 1) * nt];
        pot[s0] = (0..nt)
            .map(|t| pot[ns + t] - row[t])
            .fold(f64::NEG_INFINITY, f64::max);
        let mut guard = 0_usize;
        while supply[s0] > eps {
            guard += 1;
            if guard > ns * nt + ns + nt + 16 {
                // Cannot happen for a feasible instance; stop rather than spin.
                break;
            }
            for &v in &touched {
                dist[v as usize] = f64::INFINITY;
                done[v as usize] = false;
                pred[v as usize] = u32::MAX;
            }
            touched.clear();
            heap.clear();
            dist[s0] = 0.0;
            touched.push(s0 as u32);
            heap.push(Entry(0.0, s0 as u32));
            let mut reached = false;
            while let Some(Entry(d, u)) = heap.pop() {
                let u = u as usize;
                if done[u] || d > dist[u] {
                    continue;
                }
                done[u] = true;
                if u == sink {
                    reached = true;
                    break;
                }
                if u < ns {
                    let row = &p.cost[u * nt..(u + 1) * nt];
                    let pu = pot[u];
                    for (t, &c) in row.iter().enumerate() {
                        let v = ns + t;
                        if done[v] {
                            continue;
                        }
                        let nd = d + (c + pu - pot[v]).max(0.0);
                        relax(&mut dist, &mut pred, &mut touched, &mut heap, v, nd, u);
                    }
                } else {
                    let t = u - ns;
                    let pu = pot[u];
                    if spare[t] > eps {
                        let nd = d + (pu - pot[sink]).max(0.0);
                        relax(&mut dist, &mut pred, &mut touched, &mut heap, sink, nd, u);
                    }
                    let list = &mut users[t];
                    let mut i = 0;
                    while i < list.len() {
                        let s = list[i] as usize;
                        if flow[s * nt + t] <= eps {
                            in_users[s * nt + t] = false;
                            list.swap_remove(i);
                            continue;
                        }
                        i += 1;
                        if done[s] {
                            continue;
                        }
                        let nd = d + (pu - p.cost[s * nt + t] - pot[s]).max(0.0);
                        relax(&mut dist, &mut pred, &mut touched, &mut heap, s, nd, u);
                    }
                }
            }
            if !reached {
                break;
            }
            let dmax = dist[sink];
            for (v, pv) in pot.iter_mut().enumerate() {
                *pv += if done[v] { dist[v] } else { dmax };
            }
            // Bottleneck along sink <- t <- s <- t' <- ... <- s0.
            let last_t = pred[sink] as usize;
            let mut delta = supply[s0].min(spare[last_t - ns]);
            let mut v = last_t;
            while v != s0 {
                let s = pred[v] as usize; // forward arc s -> v
                if s == s0 {
                    break;
                }
                let t_prev = pred[s] as usize; // backward arc t_prev -> s
                delta = delta.min(flow[s * nt + (t_prev - ns)]);
                v = t_prev;
            }
            // Augment.
            let mut v = last_t;
            loop {
                let s = pred[v] as usize;
                let t = v - ns;
                flow[s * nt + t] += delta;
                if !in_users[s * nt + t] {
                    in_users[s * nt + t] = true;
                    users[t].push(s as u32);
                }
                if s == s0 {
                    break;
                }
                let t_prev = pred[s] as usize;
                let k = s * nt + (t_prev - ns);
                flow[k] = (flow[k] - delta).max(0.0);
                v = t_prev;
            }
            supply[s0] -= delta;
            spare[last_t - ns] -= delta;
        }
    }
    if let Some((source, &left)) = supply
        .iter()
        .enumerate()
        .find(|(_, left)| **left > eps * 1e3)
    {
        return Err(vec![Infeasible::NotConverged { source, left }]);
    }
    for (s, row) in flow.chunks_mut(nt).enumerate() {
        for f in row {
            *f += p.floor[s];
        }
    }
    let objective = p.objective(&flow);
    Ok(TransportSolution { flow, objective })
}
