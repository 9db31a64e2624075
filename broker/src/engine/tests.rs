//! The engine's scenarios on its pure core: plans and rounds from hand-built snapshots, no
//! database (the same scenarios against SQLite and PostgreSQL are in
//! `tests/store_backends.rs`).
#![allow(clippy::unwrap_used, clippy::float_cmp)]

use std::collections::{BTreeMap, BTreeSet};

use ballast_store::{
    AgentRecord, CapacityRecord, ClusterRecord, ImportDeclaration, RpsRecord, RttRecord,
    ServiceTimePoint,
};
use ballast_types::WeightsStatus;

use super::fit::{self, CurveOrigin};
use super::plan::{plan, Inputs};
use super::round::{round, Computed, RoundMemory, RoundOutcome};
use super::status::cluster_status;
use super::{EngineConfig, Entry, Published, Snapshot};

const NOW: i64 = 1_800_000_000_000;
const SVC: &str = "ns/web";

fn cluster(id: &str, region: &str) -> ClusterRecord {
    ClusterRecord {
        cluster_id: id.into(),
        region: region.into(),
        zone: format!("{region}a"),
        provider: "aws".into(),
        gateway_address: String::new(),
        registered_at_ms: NOW - 1_000,
        updated_at_ms: NOW - 1_000,
    }
}

fn agent(c: &str, node: &str, last_report_ms: i64) -> AgentRecord {
    AgentRecord {
        cluster_id: c.into(),
        node_name: node.into(),
        agent_version: "test".into(),
        registered_at_ms: NOW - 1_000,
        last_report_ms,
        acked_generation: 0,
    }
}

fn cap(c: &str, node: &str, capacity_rps: f64, at: i64) -> CapacityRecord {
    CapacityRecord {
        cluster_id: c.into(),
        service: SVC.into(),
        node_name: node.into(),
        capacity_rps,
        measured_at_ms: at,
        service_base_ms: None,
        service_slope_ms_per_rps: None,
        measured_service_ms: None,
        load_unit: "connections".into(),
    }
}

fn rtt(src: &str, dst: &str, node: &str, rtt_ms: f64, at: i64) -> RttRecord {
    RttRecord {
        src: src.into(),
        dst: dst.into(),
        node_name: node.into(),
        rtt_ms,
        loss_ratio: 0.0,
        reachable: true,
        measured_at_ms: at,
    }
}

fn rps(src: &str, dst: &str, node: &str, rps: f64) -> RpsRecord {
    RpsRecord {
        src: src.into(),
        service: SVC.into(),
        dst: dst.into(),
        node_name: node.into(),
        rps,
        measured_at_ms: NOW,
        bytes_sent_per_s: 0.0,
        bytes_received_per_s: 0.0,
    }
}

fn decl(c: &str, node: &str, heard_at_ms: i64, services: &[&str]) -> ImportDeclaration {
    ImportDeclaration {
        cluster_id: c.into(),
        node_name: node.into(),
        declared_at_ms: heard_at_ms,
        heard_at_ms,
        services: services.iter().map(|s| (*s).to_string()).collect(),
    }
}

/// c1 (us-east-1) imports `ns/web`, served by c2 (us-east-2, near) and c3 (eu-west-1, far),
/// every sample fresh.
fn fleet() -> Snapshot {
    let mut rtts = Vec::new();
    for (a, b, ms) in [("c1", "c2", 12.0), ("c1", "c3", 75.0), ("c2", "c3", 80.0)] {
        rtts.push(rtt(a, b, "n1", ms, NOW));
        rtts.push(rtt(b, a, "n1", ms, NOW));
    }
    Snapshot {
        clusters: vec![
            cluster("c1", "us-east-1"),
            cluster("c2", "us-east-2"),
            cluster("c3", "eu-west-1"),
        ],
        agents: ["c1", "c2", "c3"]
            .iter()
            .map(|c| agent(c, "n1", NOW))
            .collect(),
        rtt: rtts,
        capacity: vec![cap("c2", "n1", 1_000.0, NOW), cap("c3", "n1", 1_000.0, NOW)],
        ..Snapshot::default()
    }
}

/// `s` with every measurement and report made again at `at` (the same values).
fn measured_again(s: &Snapshot, at: i64) -> Snapshot {
    let mut s = s.clone();
    for r in &mut s.rtt {
        r.measured_at_ms = at;
    }
    for c in &mut s.capacity {
        c.measured_at_ms = at;
    }
    for r in &mut s.rps {
        r.measured_at_ms = at;
    }
    for c in &mut s.clusters {
        c.updated_at_ms = at;
    }
    for a in &mut s.agents {
        a.last_report_ms = at;
    }
    s
}

fn cfg() -> EngineConfig {
    EngineConfig::default()
}

fn computed(o: RoundOutcome) -> Computed {
    match o {
        RoundOutcome::Computed(c) => *c,
        RoundOutcome::Unchanged => panic!("round skipped"),
    }
}

fn first_round(inputs: &Inputs) -> Computed {
    computed(round(
        inputs,
        &Published::default(),
        &RoundMemory::default(),
        &cfg(),
        NOW,
    ))
}

fn published(c: &Computed) -> Published {
    Published::new(c.generation, NOW, c.entries.clone())
}

fn weights(c: &Computed, src: &str) -> BTreeMap<String, f64> {
    c.entries[&(SVC.to_string(), src.to_string())]
        .weights
        .clone()
}

#[test]
fn plan_counts_cluster_facts_once_and_takes_the_median_rtt() {
    let mut s = fleet();
    // Capacity is a cluster fact: three nodes of c2 state it; it counts once, the newest
    // fresh sample (n3's), not the sum (3,300) nor the largest (n1's stale-ish 1,200).
    s.capacity = vec![
        cap("c2", "n1", 1_200.0, NOW - 5_000),
        cap("c2", "n2", 1_000.0, NOW - 1_000),
        cap("c2", "n3", 1_100.0, NOW),
        cap("c3", "n1", 1_000.0, NOW),
        cap("c3", "n2", 1_000.0, NOW),
    ];
    s.rtt.retain(|r| !(r.src == "c1" && r.dst == "c2"));
    for (node, ms) in [("n1", 10.0), ("n2", 20.0), ("n3", 90.0)] {
        s.rtt.push(rtt("c1", "c2", node, ms, NOW));
    }
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC].problem;
    assert_eq!(p.services[0].capacity_rps["c2"], 1_100.0);
    assert_eq!(p.services[0].capacity_rps["c3"], 1_000.0, "not 2 x 1,000");
    assert_eq!(p.rtt_ms["c1"]["c2"], 20.0);
    assert!(inputs.services[SVC].stale.is_empty());
}

#[test]
fn plan_takes_the_service_time_curve_of_the_capacity_sample_it_counts() {
    let mut s = fleet();
    let with_curve = |mut c: CapacityRecord, base: f64, slope: f64| {
        c.service_base_ms = Some(base);
        c.service_slope_ms_per_rps = Some(slope);
        c
    };
    s.capacity = vec![
        // c2: n2's sample is the newest, so its curve is the cluster's (not n1's)
        with_curve(cap("c2", "n1", 1_000.0, NOW - 1_000), 50.0, 1.0),
        with_curve(cap("c2", "n2", 1_000.0, NOW), 5.0, 0.02),
        // c3: no curve declared
        cap("c3", "n1", 1_000.0, NOW),
        // c1: declares a curve but serves nothing (capacity 0): not a destination
        with_curve(cap("c1", "n1", 0.0, NOW), 1.0, 1.0),
    ];
    let inputs = plan(&s, &cfg(), NOW);
    let svc = &inputs.services[SVC].problem.services[0];
    assert_eq!(svc.service_time.len(), 1, "{:?}", svc.service_time);
    let c2 = svc.service_time["c2"];
    assert_eq!((c2.base_ms, c2.slope_ms_per_rps), (5.0, 0.02));

    // A stale curve is never used: c2's only sample is too old -> capacity stale, no curve.
    s.capacity = vec![
        with_curve(cap("c2", "n1", 1_000.0, NOW - 3_600_000), 5.0, 0.02),
        cap("c3", "n1", 1_000.0, NOW),
    ];
    let inputs = plan(&s, &cfg(), NOW);
    assert!(inputs.services[SVC].problem.services[0]
        .service_time
        .is_empty());
}

#[test]
fn load_aware_round_moves_weight_off_the_cluster_that_declares_a_steeper_curve() {
    // c2 and c3 at equal distance from c1 with ample capacity; c1 sends 100 rps.
    let mut s = fleet();
    s.rtt.retain(|r| r.src != "c1");
    s.rtt.push(rtt("c1", "c2", "n1", 40.0, NOW));
    s.rtt.push(rtt("c1", "c3", "n1", 40.0, NOW));
    s.rps = vec![rps("c1", "c2", "n1", 50.0), rps("c1", "c3", "n1", 50.0)];
    s.clusters[2].region = "us-east-2".into();
    let linear = first_round(&plan(&s, &cfg(), NOW));
    let w_lin = weights(&linear, "c1");
    let mut steep = cap("c2", "n1", 1_000.0, NOW);
    steep.service_base_ms = Some(5.0);
    steep.service_slope_ms_per_rps = Some(1.0);
    let mut gentle = cap("c3", "n1", 1_000.0, NOW);
    gentle.service_base_ms = Some(5.0);
    gentle.service_slope_ms_per_rps = Some(0.01);
    s.capacity = vec![steep, gentle];
    let aware = first_round(&plan(&s, &cfg(), NOW));
    let w = weights(&aware, "c1");
    assert!(
        w["c2"] < 0.2 && w["c3"] > 0.8,
        "load-aware {w:?} (linear gave {w_lin:?})"
    );
}

/// Points of `svc` at `cluster`: service time `base + slope x load` at loads 0, 10, ... 50.
fn measured_line(cluster: &str, base: f64, slope: f64) -> Vec<ServiceTimePoint> {
    (0..6)
        .map(|i| {
            let load = 10.0 * f64::from(i);
            ServiceTimePoint {
                service: SVC.into(),
                cluster_id: cluster.into(),
                at_ms: NOW - 10_000 + i64::from(i) * 1_000,
                load_rps: load,
                service_ms: base + slope * load,
            }
        })
        .collect()
}

#[test]
fn measured_points_fit_a_curve_that_goes_before_the_declared_one() {
    let mut s = fleet();
    s.rtt.retain(|r| r.src != "c1");
    s.rtt.push(rtt("c1", "c2", "n1", 40.0, NOW));
    s.rtt.push(rtt("c1", "c3", "n1", 40.0, NOW));
    s.rps = vec![rps("c1", "c2", "n1", 50.0), rps("c1", "c3", "n1", 50.0)];
    s.clusters[2].region = "us-east-2".into();
    // c2 declares a flat curve, but its probes say it slows down steeply; c3 measures flat
    // at one load only (no spread: no fit) and declares nothing.
    let mut c2 = cap("c2", "n1", 1_000.0, NOW);
    c2.service_base_ms = Some(5.0);
    c2.service_slope_ms_per_rps = Some(0.0);
    c2.measured_service_ms = Some(55.0);
    let mut c3 = cap("c3", "n1", 1_000.0, NOW);
    c3.measured_service_ms = Some(6.0);
    s.capacity = vec![c2, c3];
    s.service_time_points = measured_line("c2", 5.0, 1.0);
    s.service_time_points
        .extend(measured_line("c3", 6.0, 0.0).into_iter().map(|mut p| {
            p.load_rps = 50.0;
            p
        }));
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC];
    let curves = &p.problem.services[0].service_time;
    assert!(
        (curves["c2"].slope_ms_per_rps - 1.0).abs() < 1e-9,
        "{curves:?}"
    );
    assert_eq!(p.service_time_origin["c2"], CurveOrigin::Fitted(6));
    assert_eq!(curves["c3"].slope_ms_per_rps, 0.0);
    assert!((curves["c3"].base_ms - 6.0).abs() < 1e-9);
    assert_eq!(p.service_time_origin["c3"], CurveOrigin::Measured(6));
    let w = weights(&first_round(&inputs), "c1");
    assert!(w["c2"] < 0.2 && w["c3"] > 0.8, "{w:?}");

    // The probes removed (fresh samples without a measured time): the points are ignored.
    let mut unprobed = s.clone();
    for c in &mut unprobed.capacity {
        c.measured_service_ms = None;
    }
    let inputs = plan(&unprobed, &cfg(), NOW);
    let p = &inputs.services[SVC];
    assert_eq!(
        p.service_time_origin.get("c2"),
        Some(&CurveOrigin::Declared)
    );
    assert!(!p.service_time_origin.contains_key("c3"));

    // Points older than the fit window count no more: back to the declared curve.
    let later = NOW + fit::window_ms() + 60_000;
    let old = measured_again(&s, later);
    let inputs = plan(&old, &cfg(), later);
    let p = &inputs.services[SVC];
    assert_eq!(
        p.service_time_origin.get("c2"),
        Some(&CurveOrigin::Declared)
    );
    assert_eq!(
        p.problem.services[0].service_time["c2"].slope_ms_per_rps,
        0.0
    );
    assert!(!p.service_time_origin.contains_key("c3"));
}

#[test]
fn new_points_pair_the_median_measured_time_with_the_load_on_the_cluster_once_per_interval() {
    let mut s = fleet();
    s.rps = vec![
        rps("c1", "c2", "n1", 30.0),
        rps("c1", "c2", "n2", 12.0),
        rps("c3", "c2", "n1", 8.0),
        rps("c1", "c3", "n1", 99.0),
    ];
    let mut a = cap("c2", "n1", 1_000.0, NOW);
    a.measured_service_ms = Some(10.0);
    let mut b = cap("c2", "n2", 1_000.0, NOW - 500);
    b.measured_service_ms = Some(14.0);
    let mut stale = cap("c2", "n3", 1_000.0, NOW - 3_600_000);
    stale.measured_service_ms = Some(500.0);
    s.capacity = vec![a, b, stale, cap("c3", "n1", 1_000.0, NOW)];
    let known: BTreeSet<&str> = ["c1", "c2", "c3"].into();
    let cut = NOW - 60_000;
    let pts = fit::new_points(&s, &known, cut);
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(
        (
            pts[0].cluster_id.as_str(),
            pts[0].at_ms,
            pts[0].load_rps,
            pts[0].service_ms
        ),
        ("c2", NOW, 50.0, 12.0)
    );
    // recorded: the next round adds none until a sample POINT_INTERVAL_MS newer arrives
    s.service_time_points = pts;
    assert!(fit::new_points(&s, &known, cut).is_empty());
    s.capacity[0].measured_at_ms = NOW + fit::POINT_INTERVAL_MS;
    assert_eq!(fit::new_points(&s, &known, cut).len(), 1);
}

#[test]
fn a_cluster_whose_capacity_is_withdrawn_is_solved_without_it_not_stale() {
    let first = first_round(&plan(&fleet(), &cfg(), NOW));
    assert!(weights(&first, "c1").contains_key("c3"));
    // c3's node reported its full set without ns/web: the store holds no capacity row of c3
    let mut s = fleet();
    s.capacity.retain(|c| c.cluster_id != "c3");
    let out = computed(round(
        &plan(&s, &cfg(), NOW + 1),
        &published(&first),
        &first.memory,
        &cfg(),
        NOW + 1,
    ));
    let e = &out.entries[&(SVC.into(), "c1".into())];
    assert_eq!(e.status, WeightsStatus::Optimal);
    assert_eq!(e.weights.keys().collect::<Vec<_>>(), ["c2"]);
    assert_eq!(out.stale_services, 0);
}

#[test]
fn plan_gives_sources_without_rps_a_default_demand_and_sums_reported_rps() {
    let mut s = fleet();
    s.rps = vec![rps("c1", "c2", "n1", 30.0), rps("c1", "c3", "n2", 12.0)];
    let inputs = plan(&s, &cfg(), NOW);
    let demand = &inputs.services[SVC].problem.services[0].demand_rps;
    assert_eq!(demand["c1"], 42.0);
    // c2 and c3 import it too (undeclared) and reported nothing: the default demand (10)
    assert_eq!(demand["c2"], 10.0);
}

#[test]
fn plan_flags_stale_capacity_and_rtt_and_never_uses_stale_samples() {
    let mut s = fleet();
    let old = NOW - 61_000;
    s.capacity = vec![cap("c2", "n1", 1_000.0, old), cap("c3", "n1", 1_000.0, NOW)];
    for r in &mut s.rtt {
        if r.src == "c1" && r.dst == "c3" {
            r.measured_at_ms = old;
        }
    }
    let inputs = plan(&s, &cfg(), NOW);
    let plan = &inputs.services[SVC];
    assert_eq!(
        plan.stale,
        vec![
            "capacity of ns/web in c2 is older than 1m".to_string(),
            "rtt c1 -> c3 is older than 1m".to_string(),
        ]
    );
    assert!(!plan.problem.services[0].capacity_rps.contains_key("c2"));
    assert!(!plan.problem.rtt_ms["c1"].contains_key("c3"));
    assert_eq!(inputs.stale_inputs, 2);
}

/// Makes c3 (index 2 of the fleet) not heard from for 11 minutes (the expiry is 10).
fn silence_c3(s: &mut Snapshot) {
    let long_ago = NOW - 11 * 60_000;
    s.clusters[2].registered_at_ms = long_ago;
    s.clusters[2].updated_at_ms = long_ago;
    s.agents[2].last_report_ms = long_ago;
    s.agents[2].registered_at_ms = long_ago;
}

#[test]
fn plan_leaves_clusters_not_heard_from_within_the_expiry_out() {
    let mut s = fleet();
    silence_c3(&mut s);
    let inputs = plan(&s, &cfg(), NOW);
    assert_eq!(inputs.expired, BTreeSet::from(["c3".to_string()]));
    assert_eq!(inputs.clusters, 2);
    let p = &inputs.services[SVC].problem;
    assert!(!p.services[0].capacity_rps.contains_key("c3"));
    assert!(!p.services[0].demand_rps.contains_key("c3"));
    // expiry off: c3 is back
    let never = EngineConfig {
        cluster_expiry: None,
        ..cfg()
    };
    assert!(plan(&s, &never, NOW).expired.is_empty());
}

#[test]
fn plan_makes_sources_of_the_declared_importers_only() {
    let mut s = fleet();
    let stale = NOW - 120_000;
    s.imports = vec![
        decl("c1", "n1", NOW, &[SVC]),
        // c2's fresh node does not import it; its stale node's old declaration is shadowed
        decl("c2", "n1", NOW, &["ns/other"]),
        decl("c2", "n2", stale, &[SVC]),
        // c3's only declaration is stale: still used (imports are configuration)
        decl("c3", "n1", stale, &[SVC]),
    ];
    let inputs = plan(&s, &cfg(), NOW);
    let sources: Vec<&String> = inputs.services[SVC].problem.services[0]
        .demand_rps
        .keys()
        .collect();
    assert_eq!(sources, ["c1", "c3"]);
    // a service nobody imports gets no plan
    s.imports = vec![
        decl("c1", "n1", NOW, &[]),
        decl("c2", "n1", NOW, &[]),
        decl("c3", "n1", NOW, &[]),
    ];
    assert!(plan(&s, &cfg(), NOW).services.is_empty());
}

#[test]
fn a_round_publishes_once_and_skips_identical_inputs() {
    let inputs = plan(&fleet(), &cfg(), NOW);
    let first = first_round(&inputs);
    assert!(first.changed);
    assert_eq!(first.generation, 1);
    let w = weights(&first, "c1");
    assert!(w["c2"] > w["c3"], "the near cluster gets more: {w:?}");
    assert_eq!(
        first.entries[&(SVC.into(), "c1".into())].status,
        WeightsStatus::Optimal
    );
    assert!(first.removed.is_empty());
    // the same inputs against what the round published (generation 1): a new digest
    // (the generation is part of it), the same weights, no new generation
    let again = computed(round(
        &inputs,
        &published(&first),
        &first.memory,
        &cfg(),
        NOW + 5,
    ));
    assert!(!again.changed);
    assert_eq!(again.generation, 1);
    assert!(again.rows.is_empty());
    let e = &again.entries[&(SVC.into(), "c1".into())];
    assert_eq!(
        e.computed_at_ms, NOW,
        "an unchanged entry keeps when it was computed"
    );
    // and then the same digest: skipped
    assert!(matches!(
        round(&inputs, &published(&first), &again.memory, &cfg(), NOW + 10),
        RoundOutcome::Unchanged
    ));
}

#[test]
fn stale_inputs_keep_the_previous_weights_flagged_stale() {
    let first = first_round(&plan(&fleet(), &cfg(), NOW));
    let mut s = fleet();
    s.capacity[1].measured_at_ms = NOW - 61_000;
    let later = NOW + 1_000;
    let inputs = plan(&s, &cfg(), later);
    let out = computed(round(
        &inputs,
        &published(&first),
        &first.memory,
        &cfg(),
        later,
    ));
    let e = &out.entries[&(SVC.into(), "c1".into())];
    assert_eq!(e.status, WeightsStatus::Stale);
    assert_eq!(e.reason, "capacity of ns/web in c3 is older than 1m");
    assert_eq!(
        e.weights,
        weights(&first, "c1"),
        "weights kept as they were"
    );
    assert!(out.changed, "the status changed");
    assert_eq!(out.generation, 2);
    assert_eq!(out.stale_services, 1);
    assert_eq!(out.status.as_str(), "degraded");
    // a service that never had weights gets none while stale
    let none = first_round(&inputs);
    assert!(none.entries.is_empty());
}

#[test]
fn weights_move_at_most_max_step_per_round() {
    let inputs = plan(&fleet(), &cfg(), NOW);
    // previously everything went to the far cluster
    let mut prev = Published::new(7, NOW, BTreeMap::new());
    for src in ["c1", "c2", "c3"] {
        prev.entries.insert(
            (SVC.into(), src.into()),
            Entry {
                weights: BTreeMap::from([("c2".into(), 0.0), ("c3".into(), 1.0)]),
                status: WeightsStatus::Optimal,
                reason: String::new(),
                policy: ballast_types::Policy::Optimized,
                params: ballast_types::Params::Mixed,
                computed_at_ms: NOW - 1,
            },
        );
    }
    let out = computed(round(&inputs, &prev, &RoundMemory::default(), &cfg(), NOW));
    // The previous row lifted to the liveness floor (1 % of c1's 10 rps: 0.1 rps, weight
    // 0.01) is c2 0.01, c3 0.99; the optimum (c2 0.99, c3 0.01) is approached by one
    // max_step (0.2).
    let w = weights(&out, "c1");
    assert!((w["c2"] - 0.21).abs() < 1e-9, "{w:?}");
    assert!((w["c3"] - 0.79).abs() < 1e-9, "{w:?}");
    assert_eq!(out.generation, 8);
    let undamped = EngineConfig {
        max_step: None,
        ..cfg()
    };
    let free = computed(round(
        &inputs,
        &prev,
        &RoundMemory::default(),
        &undamped,
        NOW,
    ));
    assert!(weights(&free, "c1")["c2"] > 0.5);
}

#[test]
fn pairs_that_lose_their_weights_are_written_as_tombstones() {
    let first = first_round(&plan(&fleet(), &cfg(), NOW));
    assert!(first.entries.contains_key(&(SVC.into(), "c3".into())));
    // c3 stops importing the service
    let mut s = fleet();
    s.imports = vec![decl("c3", "n1", NOW, &[])];
    let out = computed(round(
        &plan(&s, &cfg(), NOW),
        &published(&first),
        &first.memory,
        &cfg(),
        NOW,
    ));
    assert_eq!(out.removed, vec![(SVC.to_string(), "c3".to_string())]);
    assert!(out.changed);
    assert!(out.rows.iter().all(|r| r.src != "c3"));
    assert!(!out.entries.contains_key(&(SVC.into(), "c3".into())));
}

#[test]
fn cluster_status_says_stale_expired_and_imports() {
    let mut s = fleet();
    s.imports = vec![decl("c1", "n1", NOW, &[SVC])];
    s.agents[1].last_report_ms = NOW - 90_000;
    s.rtt.retain(|r| r.src != "c2");
    s.capacity.retain(|c| c.cluster_id != "c2");
    silence_c3(&mut s);
    let st = cluster_status(&s, &cfg(), NOW);
    let by: BTreeMap<&str, _> = st
        .iter()
        .map(|c| (c.cluster.cluster_id.as_str(), c))
        .collect();
    assert!(!by["c1"].stale && !by["c1"].expired);
    assert_eq!(by["c1"].imports, Some(BTreeSet::from([SVC.to_string()])));
    assert!(by["c2"].stale && !by["c2"].expired, "{:?}", by["c2"]);
    assert_eq!(by["c2"].last_report_age_ms, 90_000);
    assert_eq!(by["c2"].imports, None, "never declared: imports everything");
    assert!(by["c3"].expired);
}

/// c1 sends `c1_rps` and c2 serves only 100 rps, so c1's weight on c2 follows its demand
/// (c2 is full): ~90 / `c1_rps`.
fn capacity_bound(c1_rps: f64) -> Snapshot {
    let mut s = fleet();
    s.capacity = vec![cap("c2", "n1", 100.0, NOW), cap("c3", "n1", 1_000.0, NOW)];
    s.rps = vec![rps("c1", "c2", "n1", c1_rps)];
    s
}

#[test]
fn demand_jitter_publishes_no_new_generation_but_a_real_move_and_a_status_change_do() {
    let first = first_round(&plan(&capacity_bound(150.0), &cfg(), NOW));
    let w0 = weights(&first, "c1")["c2"];
    assert!((0.55..0.65).contains(&w0), "{w0}");
    let next = |s: &Snapshot, cfg: &EngineConfig| {
        computed(round(
            &plan(s, cfg, NOW + 1),
            &published(&first),
            &first.memory,
            cfg,
            NOW + 1,
        ))
    };

    // Jitter: 150 -> 152 rps moves c1's weight on c2 by under 0.01: nothing is published.
    let jitter = next(&capacity_bound(152.0), &cfg());
    assert!(!jitter.changed);
    assert_eq!(jitter.generation, first.generation);
    assert_eq!(jitter.held_services, 1);
    assert!(jitter.rows.is_empty() && jitter.removed.is_empty());
    assert_eq!(weights(&jitter, "c1"), weights(&first, "c1"));
    // Without hysteresis the same jitter is a new generation.
    let eager = EngineConfig {
        publish_threshold: 0.0,
        ..cfg()
    };
    let e = next(&capacity_bound(152.0), &eager);
    assert!(e.changed && e.held_services == 0);
    let moved = (weights(&e, "c1")["c2"] - w0).abs();
    assert!(moved > 1e-4 && moved <= 0.02, "{moved}");

    // A real move: 150 -> 250 rps.
    let real = next(&capacity_bound(250.0), &cfg());
    assert!(real.changed);
    assert_eq!(real.generation, first.generation + 1);
    assert!(
        weights(&real, "c1")["c2"] < w0 - 0.1,
        "{:?}",
        weights(&real, "c1")
    );

    // A status change with the same weights: c1 -> c3's RTT goes stale; the weights are kept,
    // flagged stale, and that is published.
    let mut s = capacity_bound(150.0);
    for r in &mut s.rtt {
        if r.src == "c1" && r.dst == "c3" {
            r.measured_at_ms = NOW - 61_000;
        }
    }
    let stale = next(&s, &cfg());
    assert!(stale.changed);
    assert_eq!(stale.generation, first.generation + 1);
    let e = &stale.entries[&(SVC.to_string(), "c1".to_string())];
    assert_eq!(e.status, WeightsStatus::Stale);
    assert_eq!(e.weights, weights(&first, "c1"));

    // A policy change publishes even if no weight moved past the threshold.
    let mut s = capacity_bound(150.0);
    s.policies = vec![ballast_store::PolicyRecord {
        scope: String::new(),
        policy: "local-first-round-robin".into(),
        params: "mixed".into(),
    }];
    let lf = next(&s, &cfg());
    assert!(lf.changed);
    // c1 does not serve: an equal split over c2 and c3; c2 and c3 stay local.
    assert_eq!(weights(&lf, "c1")["c2"], 0.5);
    assert_eq!(weights(&lf, "c2")["c2"], 1.0);
}

/// Generations over an hour of steady load with measurement noise, round by round through
/// the pure core (one round per 10 s report interval): c1 sends ~`mean_rps` (each report a
/// noisy count), every RTT jitters by up to ±5 %. Returns the generations published with
/// each threshold.
fn generations_per_hour(
    policy: &str,
    mean_rps: f64,
    c2_capacity: f64,
    thresholds: &[f64],
) -> Vec<u64> {
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        #[allow(clippy::cast_precision_loss)]
        let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
        2.0 * u - 1.0
    };
    let snaps: Vec<Snapshot> = (0..360)
        .map(|_| {
            let mut s = fleet();
            s.capacity = vec![
                cap("c2", "n1", c2_capacity, NOW),
                cap("c3", "n1", 1_000.0, NOW),
            ];
            // A 10 s count of a Poisson stream: about ±1/sqrt(10·rate) relative noise.
            let sd = (mean_rps / 10.0).sqrt();
            s.rps = vec![rps(
                "c1",
                "c2",
                "n1",
                (mean_rps + 1.7 * sd * noise()).max(0.1),
            )];
            for r in &mut s.rtt {
                r.rtt_ms *= 1.0 + 0.05 * noise();
            }
            s.policies = vec![ballast_store::PolicyRecord {
                scope: String::new(),
                policy: policy.into(),
                params: "mixed".into(),
            }];
            s
        })
        .collect();
    let run = |cfg: &EngineConfig| {
        let mut current = Published::default();
        let mut memory = RoundMemory::default();
        for (i, s) in snaps.iter().enumerate() {
            let now = NOW + 10_000 * i64::try_from(i).unwrap();
            let s = measured_again(s, now);
            if let RoundOutcome::Computed(out) =
                round(&plan(&s, cfg, now), &current, &memory, cfg, now)
            {
                if out.changed {
                    current = Published::new(out.generation, now, out.entries.clone());
                }
                memory = out.memory;
            }
        }
        current.generation
    };
    thresholds
        .iter()
        .map(|t| {
            run(&EngineConfig {
                publish_threshold: *t,
                ..cfg()
            })
        })
        .collect()
}

#[test]
fn a_steady_load_with_noisy_measurements_publishes_a_handful_of_generations_an_hour() {
    // (policy, c1's mean rps, c2's capacity): c2 ample, or so tight that c1's weight on c2
    // follows its measured demand.
    // The floor being a share of demand, optimized at 3 rps does not move with the demand
    // noise even without hysteresis (the floor weight is 0.01 whatever the demand below
    // 100 rps); weighted-round-robin follows every RTT jitter, and a capacity-bound source
    // every demand jitter (its weight on the full cluster is capacity / demand, here ~0.6
    // with a noise of about ±0.03), unless held.
    for (policy, mean, c2_cap, most) in [
        ("optimized", 3.0, 1_000.0, 1),
        ("optimized", 150.0, 100.0, 180),
        ("weighted-round-robin", 3.0, 1_000.0, 30),
    ] {
        let g = generations_per_hour(policy, mean, c2_cap, &[0.0, 0.02, 0.05]);
        eprintln!(
            "{policy} at {mean} rps, c2 capacity {c2_cap}: generations an hour (360 rounds) \
             with threshold 0 / 0.02 / 0.05: {g:?}"
        );
        assert!(g[1] <= most, "{policy} {mean}: {g:?}");
        assert!(g[2] <= g[1] && g[1] <= g[0], "{policy} {mean}: {g:?}");
    }
}

#[test]
fn the_plan_prices_region_pairs_from_the_table_and_tiers_where_it_has_none() {
    let mut s = fleet();
    s.clusters.push(ClusterRecord {
        provider: "azure".into(),
        ..cluster("c4", "westeurope")
    });
    s.clusters.push(cluster("c5", "sa-east-1"));
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC].problem;
    let price = |a: &str, b: &str| p.pair_prices.get(a).and_then(|r| r.get(b)).copied();
    // us-east-1 <-> us-east-2: AWS's 0.01 both ways.
    assert_eq!(price("c1", "c2"), Some(0.01));
    // Virginia -> São Paulo: request bytes at 0.02, response bytes back at 0.138.
    assert!((price("c1", "c5").unwrap() - 0.079).abs() < 1e-12);
    // To Azure: each side's internet rate (AWS Virginia 0.09, Azure Europe 0.0875).
    assert!((price("c1", "c4").unwrap() - 0.08875).abs() < 1e-12);
    // A cluster to itself is the tiers' (same zone): not in the table.
    assert_eq!(price("c1", "c1"), None);
    let tiers_only = EngineConfig {
        region_prices: std::sync::Arc::new(ballast_model::egress_prices::EgressPrices::none()),
        ..cfg()
    };
    let inputs = plan(&s, &tiers_only, NOW);
    assert!(inputs.services[SVC].problem.pair_prices.is_empty());

    // The policy CRD's rows win: a negotiated rate out of São Paulo.
    s.crd_prices = vec![ballast_store::CrdPriceRecord {
        provider: "aws".into(),
        from_region: "sa-east-1".into(),
        to_region: "*".into(),
        usd_per_gb: 0.018,
        note: "contract 2026".into(),
    }];
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC].problem;
    let price = |a: &str, b: &str| p.pair_prices.get(a).and_then(|r| r.get(b)).copied();
    assert!(
        (price("c1", "c5").unwrap() - 0.019).abs() < 1e-12,
        "{:?}",
        price("c1", "c5")
    );
    assert_eq!(
        price("c1", "c2"),
        Some(0.01),
        "other pairs keep the table's"
    );
    // A row the table refuses (e.g. a region it no longer knows): every CRD row left out.
    s.crd_prices[0].from_region = "sa-moon-1".into();
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC].problem;
    let price = |a: &str, b: &str| p.pair_prices.get(a).and_then(|r| r.get(b)).copied();
    assert!((price("c1", "c5").unwrap() - 0.079).abs() < 1e-12);
}

fn rps_bytes(src: &str, dst: &str, node: &str, sent: f64, received: f64, at: i64) -> RpsRecord {
    RpsRecord {
        bytes_sent_per_s: sent,
        bytes_received_per_s: received,
        measured_at_ms: at,
        ..rps(src, dst, node, 10.0)
    }
}

/// Tier prices only (no region table), c3 on another provider (internet tier).
fn priced() -> (Snapshot, EngineConfig) {
    let mut s = fleet();
    s.clusters[2].provider = "azure".into();
    let cfg = EngineConfig {
        region_prices: std::sync::Arc::new(ballast_model::egress_prices::EgressPrices::none()),
        prices: ballast_model::PriceTable {
            same_zone: 0.0,
            cross_zone: 0.01,
            cross_region: 0.02,
            internet: 0.09,
        },
        ..cfg()
    };
    (s, cfg)
}

#[test]
fn savings_price_measured_bytes_each_way_against_an_even_split_over_the_serving_clusters() {
    let (mut s, cfg) = priced();
    // c1's two nodes send 1 MB/s to c2 and get 4 MB/s back, all to c2 (the near one);
    // a stale sample (to c3) is left out
    s.rps = vec![
        rps_bytes("c1", "c2", "n1", 600_000.0, 2_500_000.0, NOW),
        rps_bytes("c1", "c2", "n2", 400_000.0, 1_500_000.0, NOW),
        rps_bytes("c1", "c3", "n1", 9e9, 9e9, NOW - 3_600_000),
    ];
    let book = super::savings::EgressBook::from_snapshot(&s, &cfg);
    assert_eq!(book.usd_per_gb("c1", "c2"), Some(0.02));
    assert_eq!(book.usd_per_gb("c3", "c1"), Some(0.09));
    let out = super::savings::savings(&s, &cfg, &book, NOW, None);
    let flow = |d: &str| out.flows.iter().find(|f| f.destination == d).unwrap();
    // spent: 5e6 B/s x 0.02 $/GB x 3600 s/h / 1e9 B/GB = 0.36 $/h, all on c1 -> c2
    assert!((flow("c2").usd_per_hour - 0.36).abs() < 1e-9, "{out:?}");
    assert_eq!(flow("c3").usd_per_hour, 0.0);
    assert_eq!(flow("c3").bytes_sent_per_second, 0.0);
    // round-robin: 2.5e6 B/s to each: 0.18 $/h to c2, 0.81 $/h to c3 (internet)
    assert!((flow("c2").round_robin_usd_per_hour - 0.18).abs() < 1e-9);
    assert!((flow("c3").round_robin_usd_per_hour - 0.81).abs() < 1e-9);
    assert!((out.total.usd_per_hour - 0.36).abs() < 1e-9);
    assert!((out.total.round_robin_usd_per_hour - 0.99).abs() < 1e-9);
    assert!((out.total.saved_usd_per_hour - 0.63).abs() < 1e-9);
    assert!((out.total.bytes_per_second - 5e6).abs() < 1e-6);
    assert_eq!(out.services.len(), 1);
    assert_eq!(out.services[0].service, SVC);
    // a filter on another service shows nothing
    assert!(
        super::savings::savings(&s, &cfg, &book, NOW, Some("ns/other"))
            .flows
            .is_empty()
    );
}

#[test]
fn savings_response_bytes_leave_the_destination_at_its_own_price() {
    let (mut s, cfg) = priced();
    // only responses, from c3 (azure) back to c1: billed at azure's internet egress
    s.rps = vec![rps_bytes("c1", "c3", "n1", 0.0, 1e6, NOW)];
    let book = super::savings::EgressBook::from_snapshot(&s, &cfg);
    let out = super::savings::savings(&s, &cfg, &book, NOW, None);
    assert!((out.total.usd_per_hour - 1e6 * 0.09 * 3600.0 / 1e9).abs() < 1e-12);
}

#[test]
fn plan_counts_bytes_demand_for_a_service_whose_capacity_is_in_bytes() {
    let mut s = fleet();
    for c in &mut s.capacity {
        c.load_unit = "bytes".into();
        c.capacity_rps = 1e9;
    }
    s.rps = vec![rps_bytes("c1", "c2", "n1", 1_000.0, 9_000.0, NOW)];
    let inputs = plan(&s, &cfg(), NOW);
    let p = &inputs.services[SVC];
    assert_eq!(p.unit, ballast_types::LoadUnit::Bytes);
    assert_eq!(p.problem.services[0].demand_rps["c1"], 10_000.0);
    assert!(p.stale.is_empty(), "{:?}", p.stale);
    // the same service counted in connections takes the connection rate
    let mut c = s.clone();
    for cap in &mut c.capacity {
        cap.load_unit = "connections".into();
    }
    let p = &plan(&c, &cfg(), NOW).services[SVC];
    assert_eq!(p.unit, ballast_types::LoadUnit::Connections);
    assert_eq!(p.problem.services[0].demand_rps["c1"], 10.0);
}

#[test]
fn plan_keeps_the_weights_of_a_service_whose_serving_clusters_disagree_on_the_unit() {
    let mut s = fleet();
    s.capacity[0].load_unit = "bytes".into();
    let p = &plan(&s, &cfg(), NOW).services[SVC];
    assert_eq!(p.stale.len(), 1, "{:?}", p.stale);
    assert!(p.stale[0].contains("different units"), "{}", p.stale[0]);
    assert!(p.stale[0].contains("bytes: c2"), "{}", p.stale[0]);
}
