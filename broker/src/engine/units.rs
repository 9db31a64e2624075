//! The load unit each serving cluster states its capacity in, kept in memory so a report can
//! be checked against the other clusters' units without a database read.
//!
//! A service's demand and capacity must count the same thing (`connections`, `requests` or
//! `bytes`, [`LoadUnit`]), so every cluster serving it must state the same unit. The table is
//! fed by every report this replica accepts ([`LoadUnits::note`]) and by every snapshot it reads
//! ([`LoadUnits::reconcile`]: what other replicas accepted); entries older than the stale-after
//! age no longer count, so a fleet that changes a service's unit everywhere is held up for at
//! most that long. The planner checks again ([`super::plan`]): units that still disagree (two
//! replicas accepting conflicting reports at once) keep the service's previous weights.

use std::collections::BTreeMap;
use std::str::FromStr;

use ballast_store::CapacityRecord;
use ballast_types::LoadUnit;

/// `service -> cluster -> (unit, newest sample's measured_at_ms)`.
#[derive(Debug, Default)]
pub struct LoadUnits {
    by_service: BTreeMap<String, BTreeMap<String, (LoadUnit, i64)>>,
}

/// A stored unit spelling (the store keeps the text); an unknown one (never written by this
/// broker) reads as the default.
#[must_use]
pub fn parse_stored(text: &str) -> LoadUnit {
    LoadUnit::from_str(text).unwrap_or_default()
}

impl LoadUnits {
    /// Records the units of accepted capacity samples.
    pub fn note<'a>(&mut self, samples: impl IntoIterator<Item = &'a CapacityRecord>) {
        for c in samples {
            let unit = parse_stored(&c.load_unit);
            let e = self
                .by_service
                .entry(c.service.clone())
                .or_default()
                .entry(c.cluster_id.clone())
                .or_insert((unit, c.measured_at_ms));
            if c.measured_at_ms >= e.1 {
                *e = (unit, c.measured_at_ms);
            }
        }
    }

    /// Adds what a snapshot holds and forgets entries measured before `cut_ms`.
    pub fn reconcile(&mut self, capacity: &[CapacityRecord], cut_ms: i64) {
        self.note(capacity.iter().filter(|c| c.measured_at_ms >= cut_ms));
        for clusters in self.by_service.values_mut() {
            clusters.retain(|_, (_, at)| *at >= cut_ms);
        }
        self.by_service.retain(|_, c| !c.is_empty());
    }

    /// Another cluster that states `service`'s capacity fresh (measured at or after `cut_ms`)
    /// in a unit other than `unit`, with that unit; `None` when none does.
    #[must_use]
    pub fn conflict(
        &self,
        service: &str,
        cluster: &str,
        unit: LoadUnit,
        cut_ms: i64,
    ) -> Option<(String, LoadUnit)> {
        self.by_service
            .get(service)?
            .iter()
            .find(|(c, (u, at))| c.as_str() != cluster && *u != unit && *at >= cut_ms)
            .map(|(c, (u, _))| (c.clone(), *u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(cluster: &str, unit: &str, at: i64) -> CapacityRecord {
        CapacityRecord {
            cluster_id: cluster.into(),
            service: "a/web".into(),
            node_name: "n1".into(),
            capacity_rps: 10.0,
            measured_at_ms: at,
            service_base_ms: None,
            service_slope_ms_per_rps: None,
            measured_service_ms: None,
            load_unit: unit.into(),
        }
    }

    #[test]
    fn another_clusters_fresh_unit_conflicts_its_own_and_stale_ones_do_not() {
        let mut u = LoadUnits::default();
        u.note(&[cap("c2", "connections", 1_000)]);
        assert_eq!(
            u.conflict("a/web", "c3", LoadUnit::Bytes, 0),
            Some(("c2".into(), LoadUnit::Connections))
        );
        assert_eq!(u.conflict("a/web", "c3", LoadUnit::Connections, 0), None);
        // c2 may change its own unit
        assert_eq!(u.conflict("a/web", "c2", LoadUnit::Bytes, 0), None);
        // a stale declaration no longer holds the unit
        assert_eq!(u.conflict("a/web", "c3", LoadUnit::Bytes, 2_000), None);
        u.reconcile(&[], 2_000);
        assert_eq!(u.conflict("a/web", "c3", LoadUnit::Bytes, 0), None);
    }

    #[test]
    fn the_newest_sample_of_a_cluster_gives_its_unit() {
        let mut u = LoadUnits::default();
        u.note(&[cap("c2", "bytes", 2_000), cap("c2", "connections", 1_000)]);
        assert_eq!(
            u.conflict("a/web", "c3", LoadUnit::Connections, 0),
            Some(("c2".into(), LoadUnit::Bytes))
        );
    }
}
