//! What the broker has published: per (service, source) an [`Entry`] of weights with its
//! status, and the generation that holds them. Equality ignores when an entry was computed,
//! so re-computing the same weights publishes nothing.

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
