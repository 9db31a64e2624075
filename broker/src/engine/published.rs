//! What the broker has published: per (service, source) an [`Entry`] of weights with its
//! status, and the generation that holds them. Equality ignores when an entry was computed,
//! so re-computing the same weights publishes nothing.

use std::collections::BTreeMap;

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

/// One published generation: every (service, source) entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Published {
    pub generation: u64,
    pub created_at_ms: i64,
    /// `(service, source) -> entry`.
    pub entries: BTreeMap<PairKey, Entry>,
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
