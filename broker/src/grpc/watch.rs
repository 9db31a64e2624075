//! What a `WatchWeights` stream sends: the full state on subscribe, then per generation only
//! the services whose entry changed for the watcher's cluster ([`WatchState`]).

use std::sync::Arc;

use ballast_proto::v1::{LoadBalancing, OptimizedParams, WeightsStatus, WeightsUpdate};

use crate::engine::{Entry, Published, SourceEntries};

pub(crate) fn update_of(generation: u64, service: &str, source: &str, e: &Entry) -> WeightsUpdate {
    WeightsUpdate {
        generation,
        service: service.to_string(),
        source_cluster_id: source.to_string(),
        weights: e.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        status: WeightsStatus::from(e.status).into(),
        reason: e.reason.clone(),
        policy: LoadBalancing::from(e.policy).into(),
        params: OptimizedParams::from(e.params).into(),
        computed_at_ms: e.computed_at_ms,
        last_in_batch: false,
    }
}

/// What one `WatchWeights` stream has sent its source cluster, so that each new generation
/// sends only what changed for it.
#[derive(Debug, Default)]
pub struct WatchState {
    /// Service -> the entry last sent (none yet: the next batch is the full state).
    sent: Option<Arc<SourceEntries>>,
    generation: u64,
}

impl WatchState {
    /// The next batch for `source` from generation `p` (the last update flagged
    /// `last_in_batch`), or nothing when `p` is not newer than what was sent:
    /// - the first batch: every service's weights for `source` (the full state);
    /// - later: only the services whose weights, status, reason, policy or params changed;
    ///   when none did, one unchanged service re-sent at the new generation, so the agent
    ///   still learns (and acknowledges) that it is current.
    ///
    /// A service whose entry disappears is not sent (the agent keeps what it installed).
    pub fn next_batch(&mut self, p: &Published, source: &str) -> Vec<WeightsUpdate> {
        // This source's entries, indexed once per generation for all its watchers.
        let current = p.of_source(source);
        let mut out: Vec<WeightsUpdate> = match &self.sent {
            None => current
                .iter()
                .map(|(svc, e)| update_of(p.generation, svc, source, e))
                .collect(),
            Some(_) if p.generation <= self.generation => return Vec::new(),
            Some(sent) => {
                let changed: Vec<WeightsUpdate> = current
                    .iter()
                    .filter(|(svc, e)| sent.get(*svc).is_none_or(|old| !old.same_as(e)))
                    .map(|(svc, e)| update_of(p.generation, svc, source, e))
                    .collect();
                if changed.is_empty() {
                    current
                        .iter()
                        .take(1)
                        .map(|(svc, e)| update_of(p.generation, svc, source, e))
                        .collect()
                } else {
                    changed
                }
            }
        };
        if let Some(last) = out.last_mut() {
            last.last_in_batch = true;
        }
        self.sent = Some(current);
        self.generation = p.generation;
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(weights: &[(&str, f64)]) -> Entry {
        Entry {
            weights: weights
                .iter()
                .map(|(c, w)| ((*c).to_string(), *w))
                .collect(),
            status: ballast_types::WeightsStatus::Optimal,
            reason: String::new(),
            policy: ballast_types::Policy::Optimized,
            params: ballast_types::Params::Mixed,
            computed_at_ms: 1,
        }
    }

    fn published(generation: u64, entries: &[(&str, &str, Entry)]) -> Published {
        Published::new(
            generation,
            1,
            entries
                .iter()
                .map(|(svc, src, e)| (((*svc).to_string(), (*src).to_string()), e.clone()))
                .collect(),
        )
    }

    /// (service, generation, weight on c2) of each update; checks the batch flag.
    fn sent(batch: &[WeightsUpdate]) -> Vec<(String, u64, f64)> {
        for (i, u) in batch.iter().enumerate() {
            assert_eq!(u.last_in_batch, i + 1 == batch.len(), "{batch:?}");
            assert_eq!(u.source_cluster_id, "c1");
        }
        batch
            .iter()
            .map(|u| (u.service.clone(), u.generation, u.weights["c2"]))
            .collect()
    }

    fn s(svc: &str, generation: u64, w: f64) -> (String, u64, f64) {
        (svc.to_string(), generation, w)
    }

    #[test]
    fn watch_sends_the_full_state_then_only_what_changed_for_the_source() {
        let half = entry(&[("c2", 0.5), ("c3", 0.5)]);
        let most = entry(&[("c2", 0.9), ("c3", 0.1)]);
        let mut st = WatchState::default();
        // subscribe: every service of c1 (not c2's entries)
        let g1 = published(
            1,
            &[
                ("a/x", "c1", half.clone()),
                ("b/y", "c1", half.clone()),
                ("a/x", "c2", half.clone()),
            ],
        );
        assert_eq!(
            sent(&st.next_batch(&g1, "c1")),
            vec![s("a/x", 1, 0.5), s("b/y", 1, 0.5)]
        );
        // the same generation again: nothing
        assert!(st.next_batch(&g1, "c1").is_empty());
        // generation 2 changes b/y for c1 (and only recomputes a/x): b/y alone
        let mut recomputed = half.clone();
        recomputed.computed_at_ms = 99;
        let g2 = published(
            2,
            &[
                ("a/x", "c1", recomputed.clone()),
                ("b/y", "c1", most.clone()),
                ("a/x", "c2", most.clone()),
            ],
        );
        assert_eq!(sent(&st.next_batch(&g2, "c1")), vec![s("b/y", 2, 0.9)]);
        // generation 3 changes only c2's entries: one unchanged service at generation 3
        let g3 = published(
            3,
            &[
                ("a/x", "c1", recomputed.clone()),
                ("b/y", "c1", most.clone()),
                ("a/x", "c2", half.clone()),
            ],
        );
        assert_eq!(sent(&st.next_batch(&g3, "c1")), vec![s("a/x", 3, 0.5)]);
        // a status change alone is a change; a new service is sent
        let mut stale = most.clone();
        stale.status = ballast_types::WeightsStatus::Stale;
        let g4 = published(
            4,
            &[
                ("a/x", "c1", recomputed),
                ("b/y", "c1", stale),
                ("c/z", "c1", most),
            ],
        );
        assert_eq!(
            sent(&st.next_batch(&g4, "c1")),
            vec![s("b/y", 4, 0.9), s("c/z", 4, 0.9)]
        );
        // a new stream starts from the full state again
        assert_eq!(sent(&WatchState::default().next_batch(&g4, "c1")).len(), 3);
        // a source with no entries gets nothing
        assert!(WatchState::default().next_batch(&g4, "c9").is_empty());
    }
}
