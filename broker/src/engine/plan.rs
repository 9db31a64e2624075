//! The pure first half of a round: stored facts ([`Snapshot`]) -> one [`Problem`] per service
//! ([`plan`]). No I/O; every scenario is unit-tested below without a database.
//!
//! How measurements become a problem (per service):
//! - facts are of two kinds: **node facts** come from one node's own measurements (RPS from
//!   its BPF counters: summed over the cluster's nodes; RTT from its probes: the median) and
//!   **cluster facts** are the same for every node of a cluster (capacity = declared per-pod
//!   capacity x the cluster's ready pods, imports): counted once, never summed over nodes;
//! - capacity `cap(t)` = the newest fresh capacity sample of any node of `t` (a cluster
//!   fact); the serving clusters are those with `cap(t) > 0`. A node withdraws a fact by
//!   reporting its full set without it (`ReportRequest.full_set`), so a service whose
//!   capacity a cluster withdrew is solved again without that cluster, not left stale;
//! - service time at `t`: the curve `base + slope x load` fitted from the points the agents'
//!   probes measured ([`super::fit`]) when there are enough, else the one declared with the
//!   sample counted as `cap(t)` (agents send it from the ServiceExport annotation
//!   `ballast.io/service-time` or the topology file), else flat at the measured time; for
//!   serving clusters; load-aware `optimized` uses it;
//! - demand `N(s)` = sum over the nodes of `s` and over destinations of their fresh RPS samples;
//!   when a source has no RPS yet (or 0), it gets the default demand `--default-demand-rps`,
//!   so that weights exist from the start (the liveness floor is a share of the demand, so any
//!   demand > 0 meets it);
//! - sources are the clusters that import the service, as their agents declare
//!   (`ReportRequest.imports`, sent when they change): per cluster, the union of the latest
//!   declarations of its nodes heard from within the stale-after age, or of all its nodes'
//!   declarations when none was (imports are configuration, kept while the agents are quiet);
//!   a cluster none of whose nodes ever declared imports every service. A service no cluster
//!   imports gets no weights;
//! - RTT(s, t) = the median over the nodes of `s` of their fresh, reachable samples to `t`;
//! - clusters not heard from (registration or any agent's report) within the cluster expiry
//!   are left out as sources and destinations.
//!
//! Stale inputs: a sample older than the stale-after age is never used. When a service's
//! capacity at some cluster, or an RTT between a source and a (possibly) serving cluster, has
//! only stale samples, the plan says so ([`ServicePlan::stale`]) and the round keeps the
//! service's previous weights.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use ballast_model::egress_prices::{EgressPrices, PriceRow, DEFAULT_REQUEST_BYTE_SHARE};
use ballast_model::load_aware::LoadCurve;
use ballast_model::{Cluster, Matrix, Params, Policy, PriceTable, Problem, ServiceInput};
use ballast_store::{CapacityRecord, ImportDeclaration, PolicyRecord};
use serde::Serialize;
use tracing::{debug, warn};

use super::fit::{self, CurveOrigin};
use super::snapshot::Snapshot;
use super::units;
use super::EngineConfig;
use ballast_types::LoadUnit;

/// The solve input of one service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePlan {
    /// A one-service problem.
    pub problem: Problem,
    /// Why the service's inputs are stale (empty = fresh).
    pub stale: Vec<String>,
    /// Where each serving cluster's service-time curve came from (clusters with one only).
    pub service_time_origin: BTreeMap<String, CurveOrigin>,
    /// What the demand and capacities count (the unit the serving clusters state).
    pub unit: LoadUnit,
}

impl ServicePlan {
    /// Whether `source` is a source of this plan (imports the service).
    #[must_use]
    pub fn has_source(&self, source: &str) -> bool {
        self.problem
            .services
            .iter()
            .any(|s| s.demand_rps.contains_key(source))
    }
}

/// Every service's plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Inputs {
    pub services: BTreeMap<String, ServicePlan>,
    /// Count of stale inputs (capacity per (cluster, service), RTT pairs).
    pub stale_inputs: usize,
    /// Registered clusters taken into account (not expired).
    pub clusters: usize,
    /// Registered clusters not heard from within the cluster expiry, left out.
    pub expired: BTreeSet<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When each registered cluster was last heard from: its latest registration (or
/// re-registration) or the latest report of any of its agents, whichever is newer.
#[must_use]
pub fn last_heard(snap: &Snapshot) -> BTreeMap<String, i64> {
    let mut heard: BTreeMap<String, i64> = snap
        .clusters
        .iter()
        .map(|c| {
            (
                c.cluster_id.clone(),
                c.updated_at_ms.max(c.registered_at_ms),
            )
        })
        .collect();
    for a in &snap.agents {
        if let Some(t) = heard.get_mut(&a.cluster_id) {
            *t = (*t).max(a.last_report_ms).max(a.registered_at_ms);
        }
    }
    heard
}

/// The registered clusters not heard from within [`EngineConfig::cluster_expiry`] as of
/// `now_ms` (none when expiry is off).
#[must_use]
pub fn expired_clusters(snap: &Snapshot, cfg: &EngineConfig, now_ms: i64) -> BTreeSet<String> {
    let Some(expiry) = cfg.cluster_expiry else {
        return BTreeSet::new();
    };
    let expiry_ms = millis(expiry);
    last_heard(snap)
        .into_iter()
        .filter(|(_, t)| now_ms.saturating_sub(*t) > expiry_ms)
        .map(|(c, _)| c)
        .collect()
}

/// The services each declaring cluster imports as of `now_ms`: per cluster, the union of
/// the declarations of its nodes heard from within the stale-after age, or of all of them
/// when none was. Clusters none of whose nodes declared are absent (they import every
/// service).
#[must_use]
pub fn imports(
    decls: &[ImportDeclaration],
    cfg: &EngineConfig,
    now_ms: i64,
) -> BTreeMap<String, BTreeSet<String>> {
    let cut = now_ms.saturating_sub(millis(cfg.stale_after));
    let mut by_cluster: BTreeMap<&str, Vec<&ImportDeclaration>> = BTreeMap::new();
    for d in decls {
        by_cluster.entry(&d.cluster_id).or_default().push(d);
    }
    by_cluster
        .into_iter()
        .map(|(cluster, decls)| {
            let any_fresh = decls.iter().any(|d| d.heard_at_ms >= cut);
            let services = decls
                .into_iter()
                .filter(|d| !any_fresh || d.heard_at_ms >= cut)
                .flat_map(|d| d.services.iter().cloned())
                .collect();
            (cluster.to_owned(), services)
        })
        .collect()
}

/// The effective (policy, params) of `service` (`""` = cluster-wide) given the stored
/// policies: the service's row over the cluster-wide row over the configuration. A stored
/// value that does not parse is skipped (the store only holds what was validated).
#[must_use]
pub fn resolve_policy(
    rows: &[PolicyRecord],
    service: &str,
    cfg: &EngineConfig,
) -> (Policy, Params) {
    let mut policy = cfg.policy;
    let mut params = cfg.params;
    for scope in ["", service] {
        if let Some(r) = rows.iter().find(|r| r.scope == scope) {
            if let Ok(p) = r.policy.parse() {
                policy = p;
            }
            if let Ok(p) = r.params.parse() {
                params = p;
            }
        }
    }
    (policy, params)
}

/// The egress prices: the stored tiers over the configured ones.
#[must_use]
pub fn prices(rows: &[(String, f64)], cfg: &EngineConfig) -> PriceTable {
    let mut p = cfg.prices;
    for (tier, v) in rows {
        match tier.as_str() {
            "same_zone" => p.same_zone = *v,
            "cross_zone" => p.cross_zone = *v,
            "cross_region" => p.cross_region = *v,
            "internet" => p.internet = *v,
            other => warn!(tier = other, "unknown price tier in the store, ignored"),
        }
    }
    p
}

/// The region price table in force: the broker's (built-in table and `--egress-prices` file)
/// with the policy CRD's rows over it. Rows the table refuses (they were checked before they
/// were stored, so only a table changed under them) are logged and left out, all of them.
pub(super) fn region_prices<'a>(snap: &Snapshot, cfg: &'a EngineConfig) -> Cow<'a, EgressPrices> {
    if snap.crd_prices.is_empty() {
        return Cow::Borrowed(cfg.region_prices.as_ref());
    }
    let rows: Vec<PriceRow> = snap
        .crd_prices
        .iter()
        .map(|r| PriceRow {
            provider: r.provider.clone(),
            from: r.from_region.clone(),
            to: r.to_region.clone(),
            usd_per_gb: r.usd_per_gb,
            source: if r.note.is_empty() {
                "LoadBalancingPolicy/default".into()
            } else {
                r.note.clone()
            },
        })
        .collect();
    match cfg
        .region_prices
        .as_ref()
        .clone()
        .with_override_rows("LoadBalancingPolicy/default spec.egressPrices", &rows)
    {
        Ok(p) => Cow::Owned(p),
        Err(e) => {
            warn!(error = %e, "the policy's egress prices are left out");
            Cow::Borrowed(cfg.region_prices.as_ref())
        }
    }
}

/// The region price table's price of a request's traffic for every ordered pair of
/// `clusters` it covers in both directions (`src -> dst -> USD/GB`: request bytes at the
/// source's price, response bytes at the destination's, one half each until bytes are
/// measured); one table lookup per distinct (provider, region) pair.
fn pair_prices(clusters: &[Cluster], prices: &EgressPrices) -> Matrix {
    let mut memo: HashMap<(&str, &str, &str, &str), Option<f64>> = HashMap::new();
    let mut out = Matrix::new();
    for a in clusters {
        for b in clusters {
            let key = (
                a.provider.as_str(),
                a.region.as_str(),
                b.provider.as_str(),
                b.region.as_str(),
            );
            let price = *memo.entry(key).or_insert_with(|| {
                prices.request_price((key.0, key.1), (key.2, key.3), DEFAULT_REQUEST_BYTE_SHARE)
            });
            if let Some(p) = price {
                out.entry(a.id.clone()).or_default().insert(b.id.clone(), p);
            }
        }
    }
    out
}

pub(super) fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// RTT: the median of fresh reachable samples per (src, dst) among `known` clusters, and
/// the pairs that have only stale samples.
fn rtt_matrix(
    snap: &Snapshot,
    known: &BTreeSet<&str>,
    cut: i64,
) -> (Matrix, BTreeSet<(String, String)>) {
    let mut groups: BTreeMap<(&str, &str), (Vec<f64>, bool)> = BTreeMap::new();
    for r in &snap.rtt {
        if !known.contains(r.src.as_str()) || !known.contains(r.dst.as_str()) {
            continue;
        }
        let g = groups.entry((&r.src, &r.dst)).or_default();
        if r.measured_at_ms >= cut {
            g.1 = true;
            if r.reachable {
                g.0.push(r.rtt_ms);
            }
        }
    }
    let mut rtt_ms = Matrix::new();
    let mut stale = BTreeSet::new();
    for ((s, d), (mut v, any_fresh)) in groups {
        if !any_fresh {
            stale.insert((s.to_owned(), d.to_owned()));
        } else if let Some(m) = median(&mut v) {
            rtt_ms
                .entry(s.to_owned())
                .or_default()
                .insert(d.to_owned(), m);
        }
    }
    (rtt_ms, stale)
}

/// How the fresh samples of a cluster's nodes make one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// A node fact (RPS from each node's own counters): the sum over nodes.
    Sum,
    /// A cluster fact (capacity: every node states the cluster's figure): the newest sample
    /// of any node (the largest among equally new ones), counted once whatever the node count.
    Newest,
}

/// `service -> cluster -> (the fresh values folded, whether any sample was fresh)` over
/// samples `(service, cluster, value, measured_at_ms)` of `known` clusters: capacity per
/// serving cluster ([`Fold::Newest`]), demand per source ([`Fold::Sum`]).
fn fold_fresh<'a>(
    samples: impl Iterator<Item = (&'a str, &'a str, f64, i64)>,
    fold: Fold,
    known: &BTreeSet<&str>,
    cut: i64,
) -> BTreeMap<String, BTreeMap<String, (f64, bool)>> {
    // (value, any fresh, newest fresh sample's time)
    let mut acc: BTreeMap<String, BTreeMap<String, (f64, bool, i64)>> = BTreeMap::new();
    for (service, cluster, value, at) in samples {
        if !known.contains(cluster) {
            continue;
        }
        let e = acc
            .entry(service.to_owned())
            .or_default()
            .entry(cluster.to_owned())
            .or_insert((0.0, false, i64::MIN));
        if at < cut {
            continue;
        }
        match fold {
            Fold::Sum => e.0 += value,
            Fold::Newest if at > e.2 || (at == e.2 && value > e.0) => {
                e.0 = value;
                e.2 = at;
            }
            Fold::Newest => {}
        }
        e.1 = true;
    }
    acc.into_iter()
        .map(|(svc, m)| {
            (
                svc,
                m.into_iter().map(|(c, (v, f, _))| (c, (v, f))).collect(),
            )
        })
        .collect()
}

/// `(service, cluster) -> the sample [`Fold::Newest`] counts as the cluster's capacity` (the
/// newest fresh one, the largest among equally new), for fresh samples of `known` clusters.
fn counted_samples<'a>(
    snap: &'a Snapshot,
    known: &BTreeSet<&str>,
    cut: i64,
) -> BTreeMap<(&'a str, &'a str), &'a CapacityRecord> {
    let mut best: BTreeMap<(&str, &str), &CapacityRecord> = BTreeMap::new();
    for c in &snap.capacity {
        if c.measured_at_ms < cut || !known.contains(c.cluster_id.as_str()) {
            continue;
        }
        let key = (c.service.as_str(), c.cluster_id.as_str());
        let newer = best.get(&key).is_none_or(|b| {
            c.measured_at_ms > b.measured_at_ms
                || (c.measured_at_ms == b.measured_at_ms && c.capacity_rps > b.capacity_rps)
        });
        if newer {
            best.insert(key, c);
        }
    }
    best
}

/// A service's load unit: the one its serving clusters (`serving`) state their counted
/// capacity in; `Err` with a reason naming them when they disagree (the report check
/// refuses that, so only conflicting reports accepted at once by two replicas get here).
fn service_unit(
    counted: &BTreeMap<(&str, &str), &CapacityRecord>,
    svc: &str,
    serving: impl Iterator<Item = impl AsRef<str>>,
) -> Result<LoadUnit, String> {
    let mut by_unit: BTreeMap<LoadUnit, Vec<String>> = BTreeMap::new();
    for t in serving {
        if let Some(c) = counted.get(&(svc, t.as_ref())) {
            by_unit
                .entry(units::parse_stored(&c.load_unit))
                .or_default()
                .push(t.as_ref().to_owned());
        }
    }
    match by_unit.len() {
        0 => Ok(LoadUnit::default()),
        1 => Ok(by_unit.into_keys().next().unwrap_or_default()),
        _ => Err(format!(
            "the serving clusters state {svc}'s capacity in different units ({}): demand \
             cannot be compared with capacity",
            by_unit
                .iter()
                .map(|(u, cs)| format!("{u}: {}", cs.join(", ")))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

/// `service -> cluster -> curve`: the declared service-time curve of the sample that
/// [`Fold::Newest`] counts as the cluster's capacity (the newest fresh one, the largest among
/// equally new), when that sample carried a curve.
fn service_time_curves(
    snap: &Snapshot,
    known: &BTreeSet<&str>,
    cut: i64,
    now_ms: i64,
) -> BTreeMap<String, BTreeMap<String, (LoadCurve, CurveOrigin)>> {
    let best = counted_samples(snap, known, cut);
    let mut out: BTreeMap<String, BTreeMap<String, (LoadCurve, CurveOrigin)>> = BTreeMap::new();
    for ((svc, cluster), c) in best {
        if let (Some(base_ms), Some(slope_ms_per_rps)) =
            (c.service_base_ms, c.service_slope_ms_per_rps)
        {
            out.entry(svc.to_owned()).or_default().insert(
                cluster.to_owned(),
                (
                    LoadCurve {
                        base_ms,
                        slope_ms_per_rps,
                    },
                    CurveOrigin::Declared,
                ),
            );
        }
    }
    // Measured: a fit goes before a declaration, a flat measurement only where none is
    // declared; only while the cluster's agents still measure (a fresh sample carries a
    // measured time): a probe removed takes its curve with it at once.
    let probing: BTreeSet<(&str, &str)> = snap
        .capacity
        .iter()
        .filter(|c| {
            c.measured_service_ms.is_some()
                && c.measured_at_ms >= cut
                && known.contains(c.cluster_id.as_str())
        })
        .map(|c| (c.service.as_str(), c.cluster_id.as_str()))
        .collect();
    let measured = fit::measured_curves(
        &snap.service_time_points,
        now_ms.saturating_sub(fit::window_ms()),
    );
    for (svc, clusters) in measured {
        for (cluster, (curve, origin)) in clusters {
            if !probing.contains(&(svc.as_str(), cluster.as_str())) {
                continue;
            }
            let slot = out.entry(svc.clone()).or_default();
            let declared = slot.contains_key(&cluster);
            if matches!(origin, CurveOrigin::Fitted(_)) || !declared {
                slot.insert(cluster, (curve, origin));
            }
        }
    }
    out
}

/// Builds every service's problem from `snap` as of `now_ms`.
#[must_use]
pub fn plan(snap: &Snapshot, cfg: &EngineConfig, now_ms: i64) -> Inputs {
    let expired = expired_clusters(snap, cfg, now_ms);
    let clusters: Vec<_> = snap
        .clusters
        .iter()
        .filter(|c| !expired.contains(&c.cluster_id))
        .collect();
    let known: BTreeSet<&str> = clusters.iter().map(|c| c.cluster_id.as_str()).collect();
    let cut = now_ms.saturating_sub(millis(cfg.stale_after));
    let stale_txt = humantime::format_duration(cfg.stale_after).to_string();
    let prices = prices(&snap.prices, cfg);
    let (rtt_ms, stale_rtt) = rtt_matrix(snap, &known, cut);
    let cap = fold_fresh(
        snap.capacity.iter().map(|c| {
            (
                c.service.as_str(),
                c.cluster_id.as_str(),
                c.capacity_rps,
                c.measured_at_ms,
            )
        }),
        Fold::Newest,
        &known,
        cut,
    );
    let curves = service_time_curves(snap, &known, cut, now_ms);
    let imports = imports(&snap.imports, cfg, now_ms);
    let imports_of = |cluster: &str, svc: &str| {
        imports
            .get(cluster)
            .is_none_or(|services| services.contains(svc))
    };
    let demand = fold_fresh(
        snap.rps
            .iter()
            .map(|r| (r.service.as_str(), r.src.as_str(), r.rps, r.measured_at_ms)),
        Fold::Sum,
        &known,
        cut,
    );
    let demand_bytes = fold_fresh(
        snap.rps.iter().map(|r| {
            (
                r.service.as_str(),
                r.src.as_str(),
                r.bytes_sent_per_s + r.bytes_received_per_s,
                r.measured_at_ms,
            )
        }),
        Fold::Sum,
        &known,
        cut,
    );
    let counted = counted_samples(snap, &known, cut);

    let model_clusters: Vec<Cluster> = clusters
        .iter()
        .map(|c| Cluster {
            id: c.cluster_id.clone(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            provider: c.provider.clone(),
        })
        .collect();
    let pair_prices = pair_prices(&model_clusters, &region_prices(snap, cfg));
    let services: BTreeSet<&String> = cap.keys().chain(demand.keys()).collect();
    let mut out = Inputs {
        clusters: clusters.len(),
        stale_inputs: stale_rtt.len(),
        expired: expired.clone(),
        ..Inputs::default()
    };
    for svc in services {
        let sources: Vec<&str> = known
            .iter()
            .copied()
            .filter(|c| imports_of(c, svc))
            .collect();
        if sources.is_empty() {
            debug!(service = %svc, "imported by no cluster: no weights");
            continue;
        }
        let caps = cap.get(svc).cloned().unwrap_or_default();
        let mut stale = Vec::new();
        let mut capacity_rps = BTreeMap::new();
        for (t, (c, fresh)) in &caps {
            if !fresh {
                out.stale_inputs += 1;
                stale.push(format!(
                    "capacity of {svc} in {t} is older than {stale_txt}"
                ));
            } else if *c > 0.0 {
                capacity_rps.insert(t.clone(), *c);
            }
        }
        for s in &sources {
            for t in caps.keys() {
                if stale_rtt.contains(&((*s).to_string(), t.clone())) {
                    stale.push(format!("rtt {s} -> {t} is older than {stale_txt}"));
                }
            }
        }
        let unit = match service_unit(&counted, svc, capacity_rps.keys()) {
            Ok(u) => u,
            Err(reason) => {
                out.stale_inputs += 1;
                stale.push(reason);
                LoadUnit::default()
            }
        };
        let floor = cfg.default_demand_rps;
        let reported = match unit {
            LoadUnit::Bytes => demand_bytes.get(svc),
            LoadUnit::Connections | LoadUnit::Requests => demand.get(svc),
        };
        let demand_rps: BTreeMap<String, f64> = sources
            .iter()
            .map(|s| {
                let d = reported.and_then(|m| m.get(*s)).map_or(0.0, |(d, _)| *d);
                ((*s).to_string(), if d > 0.0 { d } else { floor })
            })
            .collect();
        let serving_curves: BTreeMap<&String, &(LoadCurve, CurveOrigin)> = curves
            .get(svc)
            .map(|m| {
                m.iter()
                    .filter(|(t, _)| capacity_rps.contains_key(*t))
                    .collect()
            })
            .unwrap_or_default();
        let service_time: BTreeMap<String, LoadCurve> = serving_curves
            .iter()
            .map(|(t, (c, _))| ((*t).clone(), *c))
            .collect();
        let service_time_origin: BTreeMap<String, CurveOrigin> = serving_curves
            .iter()
            .map(|(t, (_, o))| ((*t).clone(), *o))
            .collect();
        let (policy, params) = resolve_policy(&snap.policies, svc, cfg);
        out.services.insert(
            svc.clone(),
            ServicePlan {
                problem: Problem {
                    policy,
                    params,
                    clusters: model_clusters.clone(),
                    rtt_ms: rtt_ms.clone(),
                    prices,
                    pair_prices: pair_prices.clone(),
                    cost: None,
                    services: vec![ServiceInput {
                        name: svc.clone(),
                        demand_rps,
                        capacity_rps,
                        policy: None,
                        params: None,
                        service_time,
                    }],
                },
                stale,
                service_time_origin,
                unit,
            },
        );
    }
    out
}
