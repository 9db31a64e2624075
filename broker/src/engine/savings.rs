//! Dollars: the egress the measured bytes cost, per (service, source, destination), and what
//! round-robin would have cost for the same traffic ([`savings`]). Pure over a [`Snapshot`].
//!
//! - Bytes are what the agents' BPF counters measured (transport payload), summed over each
//!   source's nodes, fresh samples only: `sent` leaves the source (request bytes, billed at the
//!   source's egress price to the destination), `received` leaves the destination (response
//!   bytes, billed at the destination's price back to the source).
//! - USD per hour = `(sent x price(src -> dst) + received x price(dst -> src)) x 3600 / 1e9`
//!   with prices in USD per GB (10^9 bytes, as the clouds bill): the region table with the
//!   policy CRD's rows over it where it covers the pair, else the broker's tier prices; a
//!   cluster to itself at the same-zone tier.
//! - The round-robin counterfactual keeps each source's total bytes each way and splits them
//!   equally over the service's serving clusters (fresh capacity > 0), as `round-robin` does;
//!   it assumes a connection's bytes do not depend on where it goes. Without serving clusters
//!   the counterfactual is what was spent.

use std::collections::{BTreeMap, BTreeSet};

use ballast_model::cost::{tier, Tier};
use ballast_model::egress_prices::EgressPrices;
use ballast_model::{Cluster, PriceTable};
use serde::Serialize;

use super::plan;
use super::snapshot::Snapshot;
use super::EngineConfig;

/// Bytes per GB as egress is billed.
pub const BYTES_PER_GB: f64 = 1e9;

/// Prices per direction between registered clusters.
#[derive(Debug, Clone)]
pub struct EgressBook {
    clusters: BTreeMap<String, Cluster>,
    regions: EgressPrices,
    tiers: PriceTable,
}

impl EgressBook {
    /// The prices in force for `snap`'s clusters (region table + CRD rows, tiers).
    #[must_use]
    pub fn from_snapshot(snap: &Snapshot, cfg: &EngineConfig) -> Self {
        Self {
            clusters: snap
                .clusters
                .iter()
                .map(|c| {
                    (
                        c.cluster_id.clone(),
                        Cluster {
                            id: c.cluster_id.clone(),
                            region: c.region.clone(),
                            zone: c.zone.clone(),
                            provider: c.provider.clone(),
                        },
                    )
                })
                .collect(),
            regions: plan::region_prices(snap, cfg).into_owned(),
            tiers: plan::prices(&snap.prices, cfg),
        }
    }

    /// USD per GB of traffic leaving `from` for `to`; `None` for an unknown cluster.
    #[must_use]
    pub fn usd_per_gb(&self, from: &str, to: &str) -> Option<f64> {
        let a = self.clusters.get(from)?;
        let b = self.clusters.get(to)?;
        if from == to {
            return Some(self.tiers.price(Tier::SameZone));
        }
        Some(
            self.regions
                .price(&a.provider, &a.region, &b.provider, &b.region)
                .map_or_else(|| self.tiers.price(tier(a, b)), |m| m.usd_per_gb),
        )
    }

    /// USD per hour of `sent` bytes/s from `src` to `dst` and `received` bytes/s back.
    #[must_use]
    pub fn usd_per_hour(&self, src: &str, dst: &str, sent: f64, received: f64) -> f64 {
        let there = self.usd_per_gb(src, dst).unwrap_or(0.0);
        let back = self.usd_per_gb(dst, src).unwrap_or(0.0);
        (sent * there + received * back) * 3600.0 / BYTES_PER_GB
    }
}

/// One (service, source, destination).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flow {
    pub service: String,
    pub source: String,
    pub destination: String,
    pub bytes_sent_per_second: f64,
    pub bytes_received_per_second: f64,
    pub usd_per_gb_sent: f64,
    pub usd_per_gb_received: f64,
    pub usd_per_hour: f64,
    pub round_robin_usd_per_hour: f64,
}

/// Totals of one service (`service` empty: of all).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Total {
    pub service: String,
    pub bytes_per_second: f64,
    pub usd_per_hour: f64,
    pub round_robin_usd_per_hour: f64,
    pub saved_usd_per_hour: f64,
}

impl Total {
    fn add(&mut self, f: &Flow) {
        self.bytes_per_second += f.bytes_sent_per_second + f.bytes_received_per_second;
        self.usd_per_hour += f.usd_per_hour;
        self.round_robin_usd_per_hour += f.round_robin_usd_per_hour;
        self.saved_usd_per_hour = self.round_robin_usd_per_hour - self.usd_per_hour;
    }
}

/// Spent, round-robin and saved, per flow, per service and in total.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Savings {
    pub flows: Vec<Flow>,
    pub services: Vec<Total>,
    pub total: Total,
}

/// Destination -> (bytes/s sent, bytes/s received).
type PerDestination<'a> = BTreeMap<&'a str, (f64, f64)>;

/// The savings of every service (or only `only`) from `snap`'s fresh samples as of `now_ms`.
#[must_use]
pub fn savings(
    snap: &Snapshot,
    cfg: &EngineConfig,
    book: &EgressBook,
    now_ms: i64,
    only: Option<&str>,
) -> Savings {
    let cut = now_ms.saturating_sub(i64::try_from(cfg.stale_after.as_millis()).unwrap_or(i64::MAX));
    let expired = plan::expired_clusters(snap, cfg, now_ms);
    let live = |c: &str| book.clusters.contains_key(c) && !expired.contains(c);
    let wanted = |s: &str| only.is_none_or(|o| o == s);
    // service -> src -> dst -> (sent, received)
    let mut measured: BTreeMap<&str, BTreeMap<&str, PerDestination>> = BTreeMap::new();
    for r in &snap.rps {
        if r.measured_at_ms < cut || !wanted(&r.service) || !live(&r.src) || !live(&r.dst) {
            continue;
        }
        let e = measured
            .entry(&r.service)
            .or_default()
            .entry(&r.src)
            .or_default()
            .entry(&r.dst)
            .or_default();
        e.0 += r.bytes_sent_per_s;
        e.1 += r.bytes_received_per_s;
    }
    // service -> serving clusters (the newest fresh capacity sample > 0)
    let mut newest: BTreeMap<(&str, &str), (i64, f64)> = BTreeMap::new();
    for c in &snap.capacity {
        if c.measured_at_ms < cut || !wanted(&c.service) || !live(&c.cluster_id) {
            continue;
        }
        let e = newest
            .entry((&c.service, &c.cluster_id))
            .or_insert((i64::MIN, 0.0));
        if c.measured_at_ms > e.0 || (c.measured_at_ms == e.0 && c.capacity_rps > e.1) {
            *e = (c.measured_at_ms, c.capacity_rps);
        }
    }
    let mut serving: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for ((svc, cluster), (_, cap)) in newest {
        if cap > 0.0 {
            serving.entry(svc).or_default().insert(cluster);
        }
    }
    let mut out = Savings::default();
    for (svc, sources) in &measured {
        let mut total = Total {
            service: (*svc).to_owned(),
            ..Total::default()
        };
        let targets = serving.get(svc).cloned().unwrap_or_default();
        for (src, dsts) in sources {
            let (all_sent, all_received) = dsts
                .values()
                .fold((0.0, 0.0), |(a, b), (s, r)| (a + s, b + r));
            let share = if targets.is_empty() {
                0.0
            } else {
                1.0 / targets.len() as f64
            };
            let shown: BTreeSet<&str> = dsts
                .keys()
                .copied()
                .chain(targets.iter().copied())
                .collect();
            for dst in shown {
                let (sent, received) = dsts.get(dst).copied().unwrap_or((0.0, 0.0));
                let usd = book.usd_per_hour(src, dst, sent, received);
                let rr = if targets.is_empty() {
                    usd
                } else if targets.contains(dst) {
                    book.usd_per_hour(src, dst, all_sent * share, all_received * share)
                } else {
                    0.0
                };
                let flow = Flow {
                    service: (*svc).to_owned(),
                    source: (*src).to_owned(),
                    destination: dst.to_owned(),
                    bytes_sent_per_second: sent,
                    bytes_received_per_second: received,
                    usd_per_gb_sent: book.usd_per_gb(src, dst).unwrap_or(0.0),
                    usd_per_gb_received: book.usd_per_gb(dst, src).unwrap_or(0.0),
                    usd_per_hour: usd,
                    round_robin_usd_per_hour: rr,
                };
                total.add(&flow);
                out.total.add(&flow);
                out.flows.push(flow);
            }
        }
        out.services.push(total);
    }
    out
}
