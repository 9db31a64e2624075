//! From the broker's cluster weights to per-backend integer weights — a pure function.
//!
//! The broker decides how traffic of one service splits over destination clusters; the agent
//! knows which endpoints of each cluster are ready and which clusters answer probes. Expansion:
//!
//! 1. A cluster is *eligible* when its weight is positive, it has at least one ready endpoint
//!    and it is healthy (answers probes). The local cluster is never probed, so it is healthy
//!    by this rule. An ineligible cluster gets nothing; its share moves to the others in
//!    proportion to their weights.
//! 2. If no cluster with positive weight is eligible but healthy ready endpoints exist
//!    elsewhere, traffic spreads evenly over those (better than failing every connect).
//! 3. The total `scale` is apportioned over eligible clusters by largest remainder with a
//!    floor of 1: a cluster with positive weight never rounds down to 0.
//! 4. Each cluster's integer splits evenly over its ready endpoints (the first ones in address
//!    order take the remainder). The result sums to exactly `scale`.
//!
//! An empty result means there is nowhere to send traffic: the data plane should fast-fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::catalog::{ClusterId, Endpoint};

/// Default sum of the integer weights of one service: the data plane's slot table size
/// (`ballast_bpf::layout::SLOTS`), so weights map onto slots exactly.
pub const DEFAULT_SCALE: u32 = 4096;

/// Errors: the update cannot be applied as given.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightsError {
    #[error("weight of cluster {cluster:?} is {weight}: must be finite and not negative")]
    InvalidWeight { cluster: ClusterId, weight: f64 },
    #[error("scale {scale} is smaller than the {clusters} clusters that must get a share")]
    ScaleTooSmall { scale: u32, clusters: usize },
    #[error("scale must be at least 1")]
    ZeroScale,
}

/// One backend and its integer weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendWeight {
    pub address: SocketAddr,
    pub cluster: ClusterId,
    pub weight: u32,
}

/// Why the expansion came out as it did (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Broker weights over eligible clusters.
    Broker,
    /// No positive-weight cluster was eligible: even split over all healthy ready endpoints.
    EvenFallback,
    /// No healthy ready endpoint at all: nothing to install but fast-fail.
    NoBackend,
}

/// The expansion of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expansion {
    pub basis: Basis,
    /// Backends with weight > 0, in (cluster, address) order. Sums to `scale` unless empty.
    pub backends: Vec<BackendWeight>,
}

/// Expands `cluster_weights` over the ready endpoints in `endpoints` (unready ones are
/// ignored), skipping clusters in `unhealthy`, into integer weights summing to `scale`.
pub fn expand(
    cluster_weights: &BTreeMap<ClusterId, f64>,
    endpoints: &[&Endpoint],
    unhealthy: &BTreeSet<ClusterId>,
    scale: u32,
) -> Result<Expansion, WeightsError> {
    if scale == 0 {
        return Err(WeightsError::ZeroScale);
    }
    for (cluster, &weight) in cluster_weights {
        if !weight.is_finite() || weight < 0.0 {
            return Err(WeightsError::InvalidWeight {
                cluster: cluster.clone(),
                weight,
            });
        }
    }
    // Ready endpoints of healthy clusters, grouped by cluster, deduplicated and sorted.
    let mut by_cluster: BTreeMap<&str, BTreeSet<SocketAddr>> = BTreeMap::new();
    for e in endpoints {
        if e.ready && !unhealthy.contains(&e.cluster) {
            by_cluster
                .entry(e.cluster.as_str())
                .or_default()
                .insert(e.address);
        }
    }
    if by_cluster.is_empty() {
        return Ok(Expansion {
            basis: Basis::NoBackend,
            backends: vec![],
        });
    }
    let eligible: Vec<(&str, f64)> = by_cluster
        .keys()
        .filter_map(|c| {
            cluster_weights
                .get(*c)
                .copied()
                .filter(|w| *w > 0.0)
                .map(|w| (*c, w))
        })
        .collect();
    let (basis, shares): (Basis, Vec<(&str, f64)>) = if eligible.is_empty() {
        // Even over endpoints: a cluster's share is its endpoint count.
        let shares = by_cluster
            .iter()
            .map(|(c, eps)| (*c, eps.len() as f64))
            .collect();
        (Basis::EvenFallback, shares)
    } else {
        (Basis::Broker, eligible)
    };
    let weights: Vec<f64> = shares.iter().map(|(_, w)| *w).collect();
    let per_cluster = apportion(&weights, scale)?;
    let mut backends = Vec::new();
    for ((cluster, _), total) in shares.iter().zip(per_cluster) {
        let eps = &by_cluster[cluster];
        let n = u32::try_from(eps.len()).unwrap_or(u32::MAX);
        let (q, r) = (total / n, total % n);
        for (i, address) in eps.iter().enumerate() {
            let weight = q + u32::from((i as u64) < u64::from(r));
            if weight > 0 {
                backends.push(BackendWeight {
                    address: *address,
                    cluster: (*cluster).to_owned(),
                    weight,
                });
            }
        }
    }
    Ok(Expansion { basis, backends })
}

/// Apportions `scale` over positive `weights` (largest remainder with a floor of 1): the
/// result sums to `scale`, every entry is at least 1, and each entry is less than 1 away
/// from its exact share, plus 1 for every entry whose exact share is below 1 and was
/// raised to the floor (those slots come from the others). Ties go to the earlier entry.
pub fn apportion(weights: &[f64], scale: u32) -> Result<Vec<u32>, WeightsError> {
    let k = weights.len();
    if k == 0 {
        return Ok(vec![]);
    }
    if (scale as usize) < k {
        return Err(WeightsError::ScaleTooSmall { scale, clusters: k });
    }
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights
        .iter()
        .map(|w| w / total * f64::from(scale))
        .collect();
    // floor, but at least 1
    let mut out: Vec<u32> = exact
        .iter()
        .map(|q| (q.floor() as u32).max(1))
        .collect::<Vec<_>>();
    let mut sum: i64 = out.iter().map(|&a| i64::from(a)).sum();
    let target = i64::from(scale);
    while sum < target {
        // give one to the entry furthest below its exact share
        let i = (0..k)
            .max_by(|&a, &b| {
                let da = exact[a] - f64::from(out[a]);
                let db = exact[b] - f64::from(out[b]);
                da.total_cmp(&db).then(b.cmp(&a))
            })
            .unwrap_or(0);
        out[i] += 1;
        sum += 1;
    }
    while sum > target {
        // take one from the entry furthest above its exact share that can spare it
        let Some(i) = (0..k).filter(|&i| out[i] > 1).max_by(|&a, &b| {
            let da = f64::from(out[a]) - exact[a];
            let db = f64::from(out[b]) - exact[b];
            da.total_cmp(&db).then(b.cmp(&a))
        }) else {
            break; // cannot happen: scale >= k
        };
        out[i] -= 1;
        sum -= 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ep(cluster: &str, i: u8, ready: bool) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 1, i], 8080)),
            cluster: cluster.into(),
            ready,
            port_name: None,
        }
    }

    fn w(pairs: &[(&str, f64)]) -> BTreeMap<ClusterId, f64> {
        pairs.iter().map(|(c, w)| ((*c).to_owned(), *w)).collect()
    }

    fn per_cluster(e: &Expansion) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for b in &e.backends {
            *m.entry(b.cluster.clone()).or_insert(0) += b.weight;
        }
        m
    }

    #[test]
    fn cluster_weight_times_even_split() {
        let eps = [ep("a", 1, true), ep("a", 2, true), ep("b", 3, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let e =
            expand(&w(&[("a", 3.0), ("b", 1.0)]), &refs, &BTreeSet::new(), 1024).expect("valid");
        assert_eq!(e.basis, Basis::Broker);
        let ws: Vec<u32> = e.backends.iter().map(|b| b.weight).collect();
        assert_eq!(ws, [384, 384, 256]);
    }

    #[test]
    fn cluster_without_ready_endpoints_gives_its_share_away() {
        let eps = [ep("a", 1, false), ep("b", 2, true), ep("c", 3, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let e = expand(
            &w(&[("a", 0.5), ("b", 0.25), ("c", 0.25)]),
            &refs,
            &BTreeSet::new(),
            1024,
        )
        .expect("valid");
        let m = per_cluster(&e);
        assert_eq!(m.get("a"), None);
        assert_eq!(m["b"], 512);
        assert_eq!(m["c"], 512);
    }

    #[test]
    fn unhealthy_cluster_is_dropped_at_once() {
        let eps = [ep("a", 1, true), ep("b", 2, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let unhealthy: BTreeSet<ClusterId> = ["b".to_owned()].into();
        let e = expand(&w(&[("a", 0.1), ("b", 0.9)]), &refs, &unhealthy, 1024).expect("valid");
        assert_eq!(per_cluster(&e), [("a".to_owned(), 1024)].into());
    }

    #[test]
    fn tiny_positive_weight_keeps_one_slot() {
        let eps = [ep("a", 1, true), ep("b", 2, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let e = expand(
            &w(&[("a", 1.0), ("b", 1e-9)]),
            &refs,
            &BTreeSet::new(),
            1024,
        )
        .expect("valid");
        let m = per_cluster(&e);
        assert_eq!(m["b"], 1);
        assert_eq!(m["a"], 1023);
    }

    #[test]
    fn falls_back_to_even_split_then_to_nothing() {
        let eps = [ep("a", 1, true), ep("b", 2, true), ep("b", 3, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        // only weight is on a cluster with no endpoints
        let e = expand(&w(&[("z", 1.0)]), &refs, &BTreeSet::new(), 999).expect("valid");
        assert_eq!(e.basis, Basis::EvenFallback);
        assert_eq!(
            e.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [333, 333, 333]
        );
        let all: BTreeSet<ClusterId> = ["a".to_owned(), "b".to_owned()].into();
        let e = expand(&w(&[("a", 1.0)]), &refs, &all, 1024).expect("valid");
        assert_eq!(e.basis, Basis::NoBackend);
        assert!(e.backends.is_empty());
    }

    #[test]
    fn bad_weights_are_refused_naming_the_cluster() {
        let eps = [ep("a", 1, true)];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let err =
                expand(&w(&[("a", bad)]), &refs, &BTreeSet::new(), 1024).expect_err("must refuse");
            assert!(err.to_string().contains("\"a\""), "{err}");
        }
        assert_eq!(
            expand(&w(&[("a", 1.0)]), &refs, &BTreeSet::new(), 0),
            Err(WeightsError::ZeroScale)
        );
        assert!(matches!(
            apportion(&[1.0, 1.0, 1.0], 2),
            Err(WeightsError::ScaleTooSmall { .. })
        ));
    }

    proptest! {
        #[test]
        fn expansion_invariants(
            weights in proptest::collection::vec(prop_oneof![Just(0.0), 1e-6f64..1.0, 1.0f64..1e6], 1..6),
            eps_per_cluster in proptest::collection::vec((0usize..5, 0usize..3), 6),
            unhealthy_mask in proptest::collection::vec(any::<bool>(), 6),
            scale in prop_oneof![Just(1024u32), Just(4096u32), 16u32..100],
        ) {
            let clusters: Vec<String> = (0..weights.len()).map(|i| format!("c{i}")).collect();
            let cw: BTreeMap<ClusterId, f64> =
                clusters.iter().cloned().zip(weights.iter().copied()).collect();
            let mut eps = Vec::new();
            let mut n = 0u8;
            for (ci, c) in clusters.iter().enumerate() {
                let (ready, unready) = eps_per_cluster[ci];
                for _ in 0..ready { n += 1; eps.push(ep(c, n, true)); }
                for _ in 0..unready { n += 1; eps.push(ep(c, n, false)); }
            }
            let unhealthy: BTreeSet<ClusterId> = clusters
                .iter()
                .zip(&unhealthy_mask)
                .filter(|(_, u)| **u)
                .map(|(c, _)| c.clone())
                .collect();
            let refs: Vec<&Endpoint> = eps.iter().collect();
            let e = expand(&cw, &refs, &unhealthy, scale).expect("valid input");
            let m = per_cluster(&e);
            let eligible: Vec<&String> = clusters
                .iter()
                .enumerate()
                .filter(|(i, c)| weights[*i] > 0.0 && eps_per_cluster[*i].0 > 0 && !unhealthy.contains(*c))
                .map(|(_, c)| c)
                .collect();
            let any_ready = clusters
                .iter()
                .enumerate()
                .any(|(i, c)| eps_per_cluster[i].0 > 0 && !unhealthy.contains(c));
            // every weight is positive and goes to a ready endpoint of a healthy cluster
            for b in &e.backends {
                prop_assert!(b.weight > 0);
                prop_assert!(!unhealthy.contains(&b.cluster));
                prop_assert!(eps.iter().any(|x| x.address == b.address && x.ready));
            }
            if !any_ready {
                prop_assert_eq!(e.basis, Basis::NoBackend);
                prop_assert!(e.backends.is_empty());
            } else {
                let sum: u32 = e.backends.iter().map(|b| b.weight).sum();
                prop_assert_eq!(sum, scale);
            }
            if !eligible.is_empty() {
                prop_assert_eq!(e.basis, Basis::Broker);
                let wsum: f64 = eligible
                    .iter()
                    .map(|c| cw[*c])
                    .sum();
                let floored = eligible
                    .iter()
                    .filter(|c| cw[**c] / wsum * f64::from(scale) < 1.0)
                    .count() as f64;
                for c in &eligible {
                    let got = m.get(*c).copied().unwrap_or(0);
                    // never rounded to zero, and close to the exact share
                    prop_assert!(got >= 1, "cluster {} got 0", c);
                    let exact = cw[*c] / wsum * f64::from(scale);
                    prop_assert!((f64::from(got) - exact).abs() < 1.0 + floored + 1e-9,
                        "cluster {} got {} for exact {}", c, got, exact);
                }
                // clusters that are not eligible get nothing
                for c in m.keys() {
                    prop_assert!(eligible.contains(&c));
                }
                // within a cluster, backends differ by at most one
                for c in &eligible {
                    let ws: Vec<u32> = e.backends.iter().filter(|b| &b.cluster == *c).map(|b| b.weight).collect();
                    if let (Some(lo), Some(hi)) = (ws.iter().min(), ws.iter().max()) {
                        prop_assert!(hi - lo <= 1);
                    }
                }
            }
        }

        #[test]
        fn apportion_sums_and_floors(
            weights in proptest::collection::vec(1e-9f64..1e9, 1..40),
            extra in 0u32..5000,
        ) {
            let scale = u32::try_from(weights.len()).unwrap_or(u32::MAX) + extra;
            let out = apportion(&weights, scale).expect("scale >= k");
            prop_assert_eq!(out.iter().sum::<u32>(), scale);
            prop_assert!(out.iter().all(|&a| a >= 1));
            let total: f64 = weights.iter().sum();
            let exact: Vec<f64> = weights.iter().map(|w| w / total * f64::from(scale)).collect();
            let floored = exact.iter().filter(|q| **q < 1.0).count() as f64;
            for (q, a) in exact.iter().zip(&out) {
                prop_assert!((f64::from(*a) - q).abs() < 1.0 + floored + 1e-9,
                    "got {} for exact {}", a, q);
            }
        }
    }
}
