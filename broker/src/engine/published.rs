//! What the broker has published: per (service, source) an [`Entry`] of weights with its
//! status, and the generation that holds them. Equality ignores when an entry was computed,
//! so re-computing the same weights publishes nothing.
//!
//! Publication hysteresis ([`hold`]): a service whose new entries are of the same class as
//! the published ones ([`Entry::same_class`]: status, policy, params, destinations and which
//! of them get traffic) and whose weights all moved by at most the threshold
//! (`--publish-threshold`) keeps its published entries, so a steady load with jittery
//! measurements gives steady weights and no new generation. The comparison is against what
//! is published, not the last computed weights, so a slow drift is published once it adds up
//! to more than the threshold.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use ballast_model::{Params, Policy};
use ballast_types::WeightsStatus;
use serde::Serialize;

/// The weights of one (service, source).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Destination -> weight.
    pub weights: BTreeMap<String, f64>,
    pub status: WeightsStatus,
    pub reason: String,
    pub policy: Policy,
    pub params: Params,
    pub computed_at_ms: i64,
}

impl Entry {
    /// The same weights (within 1e-9), status, reason, policy and params; when the entry
    /// was computed does not count.
    #[must_use]
    pub fn same_as(&self, other: &Entry) -> bool {
        same_weights(&self.weights, &other.weights)
            && self.status == other.status
            && self.reason == other.reason
            && self.policy == other.policy
            && self.params == other.params
    }
}

impl Entry {
    /// The same class of answer: status, policy, params, the same destinations, and the same
    /// destinations with a weight > 0. The reason text and the weights themselves do not count.
    #[must_use]
    pub fn same_class(&self, other: &Entry) -> bool {
        self.status == other.status
            && self.policy == other.policy
            && self.params == other.params
            && self.weights.len() == other.weights.len()
            && self
                .weights
                .iter()
                .zip(&other.weights)
                .all(|((ka, va), (kb, vb))| ka == kb && (*va > 0.0) == (*vb > 0.0))
    }

    /// The largest change of one weight from `other` (same destinations assumed; a
    /// destination only one has counts its whole weight).
    #[must_use]
    pub fn max_move(&self, other: &Entry) -> f64 {
        let one_way = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
            a.iter()
                .map(|(k, v)| (v - b.get(k).copied().unwrap_or(0.0)).abs())
                .fold(0.0, f64::max)
        };
        one_way(&self.weights, &other.weights).max(one_way(&other.weights, &self.weights))
    }
}

/// Publication hysteresis for one service: whether its `new` entries (every source's) may be
/// left unpublished in favour of the `published` ones — the same sources, each entry of the
/// same class ([`Entry::same_class`]) and no weight moved by more than `threshold`. A
/// threshold of 0 holds nothing (every change beyond 1e-9 is published).
#[must_use]
pub fn hold(published: &[(&PairKey, &Entry)], new: &[(&PairKey, &Entry)], threshold: f64) -> bool {
    threshold > 0.0
        && !published.is_empty()
        && published.len() == new.len()
        && published.iter().zip(new).all(|((ka, ea), (kb, eb))| {
            ka == kb && ea.same_class(eb) && ea.max_move(eb) <= threshold
        })
}

/// `(service, source)`.
pub type PairKey = (String, String);

/// One source's entries: service -> entry.
pub type SourceEntries = BTreeMap<String, Entry>;

/// One published generation: every (service, source) entry.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub generation: u64,
    pub created_at_ms: i64,
    /// `(service, source) -> entry`.
    pub entries: BTreeMap<PairKey, Entry>,
    /// The entries by source, built once per generation on first use
    /// ([`Published::of_source`]): every watcher of a generation reads its own source's
    /// entries from here instead of scanning all of them (services x sources per watcher: at
    /// 5,000 agents over 500 clusters, 2.5e8 entry visits per generation).
    by_source: OnceLock<BTreeMap<String, Arc<SourceEntries>>>,
}

/// Equality of what was published (the index is derived).
impl PartialEq for Published {
    fn eq(&self, other: &Self) -> bool {
        self.generation == other.generation
            && self.created_at_ms == other.created_at_ms
            && self.entries == other.entries
    }
}

impl Published {
    #[must_use]
    pub fn new(generation: u64, created_at_ms: i64, entries: BTreeMap<PairKey, Entry>) -> Self {
        Self {
            generation,
            created_at_ms,
            entries,
            by_source: OnceLock::new(),
        }
    }

    /// The entries of one source (service -> entry); empty when it has none. The index is
    /// built from `entries` on the first call: change `entries` only before it.
    #[must_use]
    pub fn of_source(&self, source: &str) -> Arc<SourceEntries> {
        let index = self.by_source.get_or_init(|| {
            let mut by: BTreeMap<String, SourceEntries> = BTreeMap::new();
            for ((svc, src), e) in &self.entries {
                by.entry(src.clone())
                    .or_default()
                    .insert(svc.clone(), e.clone());
            }
            by.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
        });
        index.get(source).cloned().unwrap_or_default()
    }
}

fn same_weights(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (va - vb).abs() <= 1e-9)
}

/// Whether two sets of entries are the same pair by pair ([`Entry::same_as`]).
#[must_use]
pub fn same_entries(a: &BTreeMap<PairKey, Entry>, b: &BTreeMap<PairKey, Entry>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, ea), (kb, eb))| ka == kb && ea.same_as(eb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(w: f64) -> Entry {
        Entry {
            weights: BTreeMap::from([("c2".to_string(), w)]),
            status: WeightsStatus::Optimal,
            reason: String::new(),
            policy: Policy::Optimized,
            params: Params::Mixed,
            computed_at_ms: 1,
        }
    }

    fn key(src: &str) -> PairKey {
        ("ns/web".to_string(), src.to_string())
    }

    fn row(w: &[(&str, f64)]) -> Entry {
        Entry {
            weights: w.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            ..entry(0.0)
        }
    }

    #[test]
    fn hysteresis_holds_small_moves_of_the_same_class_only() {
        let k1 = key("c1");
        let old = row(&[("c1", 0.98), ("c2", 0.01), ("c3", 0.01)]);
        let held = |new: &Entry, threshold: f64| hold(&[(&k1, &old)], &[(&k1, new)], threshold);
        // Jitter within the threshold (and a different reason text): held.
        let mut jitter = row(&[("c1", 0.965), ("c2", 0.025), ("c3", 0.01)]);
        jitter.reason = "damped".into();
        assert!((jitter.max_move(&old) - 0.015).abs() < 1e-12);
        assert!(held(&jitter, 0.02));
        // A real move: published.
        assert!(!held(
            &row(&[("c1", 0.9), ("c2", 0.09), ("c3", 0.01)]),
            0.02
        ));
        // Threshold 0: every change is published.
        assert!(!held(&jitter, 0.0));
        // A class change, however small the move: a destination appears or disappears, one
        // starts or stops getting traffic, the status, policy or params change.
        assert!(!held(&row(&[("c1", 0.99), ("c2", 0.01)]), 0.02));
        assert!(!held(
            &row(&[("c1", 0.99), ("c2", 0.01), ("c3", 0.0)]),
            0.02
        ));
        let changes: [fn(&mut Entry); 4] = [
            |e: &mut Entry| e.status = WeightsStatus::Stale,
            |e: &mut Entry| e.status = WeightsStatus::Degraded,
            |e: &mut Entry| e.policy = Policy::RoundRobin,
            |e: &mut Entry| e.params = Params::Cost,
        ];
        for change in changes {
            let mut e = old.clone();
            change(&mut e);
            assert!(!held(&e, 0.02), "{e:?}");
        }
        // A source appears or disappears: published.
        let k2 = key("c2");
        assert!(!hold(&[(&k1, &old)], &[(&k1, &old), (&k2, &old)], 0.02));
        assert!(!hold(&[(&k1, &old), (&k2, &old)], &[(&k1, &old)], 0.02));
        // Nothing published yet: published.
        assert!(!hold(&[], &[(&k1, &old)], 0.02));
    }

    #[test]
    fn a_sources_entries_are_its_own_and_the_index_does_not_change_equality() {
        let entries: BTreeMap<PairKey, Entry> = [
            (("a".to_string(), "c1".to_string()), entry(0.1)),
            (("b".to_string(), "c1".to_string()), entry(0.2)),
            (("a".to_string(), "c2".to_string()), entry(0.3)),
        ]
        .into_iter()
        .collect();
        let p = Published::new(3, 1, entries);
        let fresh = p.clone();
        let c1 = p.of_source("c1");
        assert_eq!(c1.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c1["b"].weights["c2"], 0.2);
        assert_eq!(p.of_source("c2")["a"].weights["c2"], 0.3);
        assert!(p.of_source("c9").is_empty());
        assert!(Arc::ptr_eq(&c1, &p.of_source("c1")), "built once");
        assert_eq!(p, fresh);
    }
}
