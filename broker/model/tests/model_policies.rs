//! Policies, cost model, validation, damping and explain on small hand-made instances.

use std::collections::BTreeMap;

use ballast_model::{
    cost_matrix, explain, liveness_floor_rps, solve, validate, Binding, Cluster, Matrix,
    ModelError, Params, Policy, PriceTable, Problem, ServiceInput, SolveOptions, Status,
    LIVENESS_FLOOR_RPS, LIVENESS_FLOOR_SHARE,
};

const PRICES: PriceTable = PriceTable {
    same_zone: 0.0,
    cross_zone: 0.01,
    cross_region: 0.02,
    internet: 0.09,
};

fn cluster(id: &str, provider: &str, region: &str, zone: &str) -> Cluster {
    Cluster {
        id: id.into(),
        region: region.into(),
        zone: zone.into(),
        provider: provider.into(),
    }
}

fn map(entries: &[(&str, f64)]) -> BTreeMap<String, f64> {
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn matrix(entries: &[(&str, &str, f64)]) -> Matrix {
    let mut m = Matrix::new();
    for (s, t, v) in entries {
        m.entry((*s).to_owned())
            .or_default()
            .insert((*t).to_owned(), *v);
    }
    m
}

fn service(name: &str, demand: &[(&str, f64)], capacity: &[(&str, f64)]) -> ServiceInput {
    ServiceInput {
        name: name.into(),
        demand_rps: map(demand),
        capacity_rps: map(capacity),
        policy: None,
        params: None,
        service_time: Default::default(),
    }
}

fn three_clusters(policy: Policy, cost: Option<Matrix>, svc: ServiceInput) -> Problem {
    Problem {
        policy,
        params: Params::Mixed,
        clusters: vec![
            cluster("c1", "aws", "us-east-1", "us-east-1a"),
            cluster("c2", "aws", "us-east-1", "us-east-1b"),
            cluster("c3", "gcp", "us-east4", "us-east4-a"),
        ],
        rtt_ms: matrix(&[("c1", "c2", 1.0), ("c1", "c3", 8.0), ("c2", "c3", 9.0)]),
        prices: PRICES,
        pair_prices: Default::default(),
        cost,
        services: vec![svc],
    }
}

fn w(m: &Matrix, s: &str, t: &str) -> f64 {
    m.get(s).and_then(|r| r.get(t)).copied().unwrap_or(f64::NAN)
}

#[test]
fn wrr_proposal_example_c3_two_thirds_c2_one_third() {
    let p = three_clusters(
        Policy::WeightedRoundRobin,
        Some(matrix(&[("c1", "c2", 10.0), ("c1", "c3", 5.0)])),
        service("ns/svc", &[("c1", 90.0)], &[("c2", 500.0), ("c3", 500.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Optimal);
    assert!((w(&sol.weights, "c1", "c3") - 2.0 / 3.0).abs() < 1e-12);
    assert!((w(&sol.weights, "c1", "c2") - 1.0 / 3.0).abs() < 1e-12);
    assert!((w(&sol.flows, "c1", "c3") - 60.0).abs() < 1e-9);
    assert!((sol.objective - (30.0 * 10.0 + 60.0 * 5.0)).abs() < 1e-9);
}

#[test]
fn wrr_zero_cost_takes_everything_and_two_zeros_is_an_error_naming_both() {
    let p = three_clusters(
        Policy::WeightedRoundRobin,
        Some(matrix(&[("c1", "c2", 0.0), ("c1", "c3", 5.0)])),
        service("ns/svc", &[("c1", 10.0)], &[("c2", 5.0), ("c3", 5.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(w(&sol.weights, "c1", "c2"), 1.0);
    assert_eq!(w(&sol.weights, "c1", "c3"), 0.0);

    let p = three_clusters(
        Policy::WeightedRoundRobin,
        Some(matrix(&[("c1", "c2", 0.0), ("c1", "c3", 0.0)])),
        service("ns/svc", &[("c1", 10.0)], &[("c2", 5.0), ("c3", 5.0)]),
    );
    let err = solve(&p, &SolveOptions::default()).expect_err("two zero costs");
    assert!(matches!(err, ModelError::AmbiguousZeroCost { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("\"c2\"") && msg.contains("\"c3\"") && msg.contains("c1"),
        "{msg}"
    );
}

#[test]
fn wrr_with_computed_costs_prefers_the_local_cluster() {
    // c1 serves itself: 0 ms, same-zone price 0 -> cost 0 -> always local.
    let p = three_clusters(
        Policy::WeightedRoundRobin,
        None,
        service(
            "ns/svc",
            &[("c1", 10.0), ("c2", 10.0)],
            &[("c1", 50.0), ("c3", 50.0)],
        ),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(w(&sol.weights, "c1", "c1"), 1.0);
    // c2 -> c1 is cross-zone (1 ms, 0.01 USD/GB), c2 -> c3 is internet (9 ms, 0.09 USD/GB).
    let c = cost_matrix(&p, Params::Mixed);
    let (a, b) = (c["c2"]["c1"], c["c2"]["c3"]);
    assert!((a - (0.5 * 1.0 + 0.5 * 10.0)).abs() < 1e-9, "{a}");
    assert!((b - (0.5 * 9.0 + 0.5 * 90.0)).abs() < 1e-9, "{b}");
    assert!((w(&sol.weights, "c2", "c1") - (1.0 / a) / (1.0 / a + 1.0 / b)).abs() < 1e-12);
}

#[test]
fn round_robin_is_equal_over_serving_clusters_only() {
    let p = three_clusters(
        Policy::RoundRobin,
        None,
        service(
            "ns/svc",
            &[("c1", 30.0)],
            &[("c1", 10.0), ("c2", 0.0), ("c3", 10.0)],
        ),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.weights["c1"].len(), 2, "c2 has no capacity");
    assert_eq!(w(&sol.weights, "c1", "c1"), 0.5);
    assert_eq!(w(&sol.weights, "c1", "c3"), 0.5);
    assert_eq!(w(&sol.flows, "c1", "c3"), 15.0);
}

#[test]
fn local_first_round_robin_keeps_a_serving_source_at_home_and_spreads_the_others() {
    // c1 and c3 serve, c2 does not: c1 stays local, c2 spreads equally over c1 and c3.
    let p = three_clusters(
        Policy::LocalFirstRoundRobin,
        None,
        service(
            "ns/svc",
            &[("c1", 30.0), ("c2", 3.0), ("c3", 0.0)],
            &[("c1", 10.0), ("c2", 0.0), ("c3", 10.0)],
        ),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Optimal);
    assert_eq!(w(&sol.weights, "c1", "c1"), 1.0);
    assert_eq!(w(&sol.weights, "c1", "c3"), 0.0);
    assert_eq!(w(&sol.weights, "c3", "c3"), 1.0, "zero demand: still local");
    assert_eq!(w(&sol.weights, "c2", "c1"), 0.5);
    assert_eq!(w(&sol.weights, "c2", "c3"), 0.5);
    assert!(!sol.weights["c2"].contains_key("c2"));
    let e = explain(&p, "ns/svc", "c1").expect("explains");
    let local = e
        .destinations
        .iter()
        .find(|d| d.destination == "c1")
        .expect("c1");
    assert!(local.local_preference);

    // The plain round-robin stays selectable, per service too: c1 spreads.
    let mut p = p;
    p.services[0].policy = Some(Policy::RoundRobin);
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(w(&sol.weights, "c1", "c1"), 0.5);
    assert_eq!(w(&sol.weights, "c1", "c3"), 0.5);
}

#[test]
fn local_first_round_robin_spreads_when_the_local_cluster_has_no_capacity() {
    // c1's backends are unhealthy (no ready pods: capacity 0, or no capacity at all).
    for local in [Some(0.0), None] {
        let mut capacity = vec![("c2", 10.0), ("c3", 10.0)];
        if let Some(c) = local {
            capacity.push(("c1", c));
        }
        let p = three_clusters(
            Policy::LocalFirstRoundRobin,
            None,
            service("ns/svc", &[("c1", 30.0)], &capacity),
        );
        let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
        assert_eq!(sol.weights["c1"].len(), 2, "{local:?}");
        assert_eq!(w(&sol.weights, "c1", "c2"), 0.5);
        assert_eq!(w(&sol.weights, "c1", "c3"), 0.5);
    }
    // Nothing serves: no weights, degraded, as for round-robin.
    let p = three_clusters(
        Policy::LocalFirstRoundRobin,
        None,
        service("ns/svc", &[("c1", 30.0)], &[("c1", 0.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Degraded);
}

#[test]
fn params_change_the_cost_ranking() {
    let mut p = three_clusters(Policy::Optimized, None, service("s", &[], &[]));
    // c1 -> c2: 40 ms cross-zone (10 price units); c1 -> c3: 5 ms internet (90 price units).
    p.rtt_ms = matrix(&[("c1", "c2", 40.0), ("c1", "c3", 5.0)]);
    let perf = cost_matrix(&p, Params::Performance);
    let cost = cost_matrix(&p, Params::Cost);
    assert!(perf["c1"]["c3"] < perf["c1"]["c2"]);
    assert!(cost["c1"]["c2"] < cost["c1"]["c3"]);
    // Reverse direction falls back to the measured one; self is 0 ms and same-zone.
    assert_eq!(perf["c2"]["c1"], perf["c1"]["c2"]);
    assert_eq!(perf["c1"]["c1"], 0.0);
    // Unmeasured in both directions (c2 <-> c3): as slow as the slowest measured pair (40 ms).
    assert!((perf["c2"]["c3"] - (0.9 * 40.0 + 0.1 * 90.0)).abs() < 1e-9);
}

#[test]
fn optimized_fills_the_cheap_cluster_up_to_capacity_keeping_the_floor() {
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 10.0)])),
        service("ns/svc", &[("c1", 100.0)], &[("c2", 70.0), ("c3", 500.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Optimal);
    assert!((w(&sol.flows, "c1", "c2") - 70.0).abs() < 1e-9);
    assert!((w(&sol.flows, "c1", "c3") - 30.0).abs() < 1e-9);
    assert!((sol.objective - 370.0).abs() < 1e-9);

    // Plenty of capacity: the expensive one still gets the liveness floor, 1 RPS (the cap of
    // min(1 rps, 1 % of 100 rps)).
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 10.0)])),
        service("ns/svc", &[("c1", 100.0)], &[("c2", 500.0), ("c3", 500.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert!((w(&sol.flows, "c1", "c3") - 1.0).abs() < 1e-9);
    assert!((w(&sol.weights, "c1", "c2") - 0.99).abs() < 1e-12);

    let e = explain(&p, "ns/svc", "c1").expect("explains");
    let c3 = e
        .destinations
        .iter()
        .find(|d| d.destination == "c3")
        .expect("c3");
    assert!(c3.liveness_floor && c3.binding.contains(&Binding::LivenessFloor));
    assert!(!c3.capacity_full);
}

#[test]
fn explain_reports_capacity_full_and_unknown_names() {
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 10.0)])),
        service("ns/svc", &[("c1", 100.0)], &[("c2", 70.0), ("c3", 500.0)]),
    );
    let e = explain(&p, "ns/svc", "c1").expect("explains");
    let c2 = e
        .destinations
        .iter()
        .find(|d| d.destination == "c2")
        .expect("c2");
    assert!(c2.capacity_full, "{e:?}");
    assert_eq!(c2.cost, 1.0);
    assert!((c2.weight - 0.7).abs() < 1e-12);
    assert!(matches!(
        explain(&p, "nope", "c1"),
        Err(ModelError::UnknownService(_))
    ));
    assert!(matches!(
        explain(&p, "ns/svc", "c3"),
        Err(ModelError::UnknownSource { .. })
    ));
}

#[test]
fn optimized_degrades_when_demand_exceeds_capacity() {
    let p = three_clusters(
        Policy::Optimized,
        None,
        service("ns/svc", &[("c1", 300.0)], &[("c2", 100.0), ("c3", 50.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("degrades, no error")[0];
    assert_eq!(sol.status, Status::Degraded);
    let reason = sol.reason.as_deref().expect("reason");
    assert!(reason.contains("exceeds total capacity"), "{reason}");
    assert!((w(&sol.weights, "c1", "c2") - 2.0 / 3.0).abs() < 1e-12);
    assert!((w(&sol.weights, "c1", "c3") - 1.0 / 3.0).abs() < 1e-12);
}

#[test]
fn optimized_degrades_when_a_capacity_is_below_the_sources_floors() {
    // c1 at 200 rps has a floor of 1 rps to each destination; c3 serves only 0.5 rps.
    let p = three_clusters(
        Policy::Optimized,
        None,
        service(
            "ns/svc",
            &[("c1", 200.0)],
            &[("c1", 500.0), ("c2", 500.0), ("c3", 0.5)],
        ),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("degrades")[0];
    assert_eq!(sol.status, Status::Degraded);
    let reason = sol.reason.as_deref().expect("reason");
    assert!(
        reason.contains("liveness floor") && reason.contains("c3"),
        "{reason}"
    );
}

#[test]
fn the_liveness_floor_is_a_share_of_the_source_demand() {
    // min(1 rps, 1 % of demand, 10 % of demand / serving clusters)
    let cases = [
        (3.0, 3, 0.03),
        (1.5, 3, 0.015),
        (100.0, 3, 1.0),
        (1000.0, 3, 1.0),
        (100.0, 50, 0.2),
        (20.0, 20, 0.1),
        (0.0, 3, 0.0),
        (10.0, 0, 0.0),
    ];
    for (demand, serving, want) in cases {
        let got = liveness_floor_rps(demand, serving);
        assert!(
            (got - want).abs() < 1e-12,
            "{demand} rps over {serving}: {got}"
        );
    }
    assert_eq!(LIVENESS_FLOOR_RPS, 1.0);
    assert_eq!(LIVENESS_FLOOR_SHARE, 0.01);
}

#[test]
fn a_low_demand_source_moves_away_from_a_far_cluster_like_a_busy_one() {
    // c1 -> c2 raised by 150 ms each way (300 ms RTT); c1 serves itself. With the old absolute
    // floor (1 rps), a source at 1.5 rps was refused as infeasible (weights ∝ capacity: 1/3 on
    // c2); at 3 rps it had to send 1 rps — a third — to c2.
    let rtt = [("c1", "c2", 300.0), ("c1", "c3", 8.0), ("c2", "c3", 300.0)];
    for demand in [1.5, 3.0, 30.0, 300.0, 3000.0] {
        let mut p = three_clusters(
            Policy::Optimized,
            None,
            service(
                "ns/svc",
                &[("c1", demand)],
                &[("c1", 10_000.0), ("c2", 10_000.0), ("c3", 10_000.0)],
            ),
        );
        p.params = Params::Performance;
        p.rtt_ms = matrix(&rtt);
        let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
        assert_eq!(
            sol.status,
            Status::Optimal,
            "{demand} rps: {:?}",
            sol.reason
        );
        let far = w(&sol.weights, "c1", "c2");
        let floor = liveness_floor_rps(demand, 3);
        assert!(
            (far - floor / demand).abs() < 1e-9,
            "{demand} rps: c2 {far}"
        );
        assert!(
            far <= LIVENESS_FLOOR_SHARE + 1e-12,
            "{demand} rps: c2 {far}"
        );
        assert!(w(&sol.weights, "c1", "c1") >= 0.98 - 1e-12, "{demand} rps");
        let e = explain(&p, "ns/svc", "c1").expect("explains");
        assert!((e.liveness_floor_rps - floor).abs() < 1e-12);
        let c2 = e
            .destinations
            .iter()
            .find(|d| d.destination == "c2")
            .expect("c2");
        assert!(c2.liveness_floor, "{demand} rps: {e:?}");
        let c1 = e
            .destinations
            .iter()
            .find(|d| d.destination == "c1")
            .expect("c1");
        assert!(!c1.liveness_floor);
    }
}

#[test]
fn zero_demand_source_gets_weights_by_spare_capacity() {
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[
            ("c1", "c2", 1.0),
            ("c1", "c3", 10.0),
            ("c2", "c2", 1.0),
            ("c2", "c3", 1.0),
        ])),
        service(
            "ns/svc",
            &[("c1", 100.0), ("c2", 0.0)],
            &[("c2", 100.0), ("c3", 100.0)],
        ),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Optimal);
    // c1 puts 99 on c2, 1 on c3: spare is 1 and 99.
    assert!((w(&sol.weights, "c2", "c2") - 0.01).abs() < 1e-9);
    assert!((w(&sol.weights, "c2", "c3") - 0.99).abs() < 1e-9);
    assert_eq!(w(&sol.flows, "c2", "c3"), 0.0);
}

#[test]
fn no_serving_cluster_is_degraded_with_empty_rows() {
    let p = three_clusters(
        Policy::RoundRobin,
        None,
        service("ns/svc", &[("c1", 10.0)], &[("c2", 0.0)]),
    );
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Degraded);
    assert!(sol.weights["c1"].is_empty());
}

#[test]
fn per_service_policy_override_wins() {
    let mut svc = service("ns/svc", &[("c1", 30.0)], &[("c2", 10.0), ("c3", 20.0)]);
    svc.policy = Some(Policy::RoundRobin);
    let p = three_clusters(Policy::Optimized, None, svc);
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(w(&sol.weights, "c1", "c2"), 0.5);
}

#[test]
fn damping_bounds_each_weight_move_and_keeps_rows_summing_to_one() {
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 10.0)])),
        service("ns/svc", &[("c1", 100.0)], &[("c2", 500.0), ("c3", 500.0)]),
    );
    let mut options = SolveOptions {
        max_step: Some(0.1),
        ..SolveOptions::default()
    };
    options.previous.insert(
        "ns/svc".into(),
        matrix(&[("c1", "c2", 0.2), ("c1", "c3", 0.8)]),
    );
    let sol = &solve(&p, &options).expect("solves")[0];
    let (a, b) = (w(&sol.weights, "c1", "c2"), w(&sol.weights, "c1", "c3"));
    assert!(
        (a - 0.3).abs() < 1e-12 && (b - 0.7).abs() < 1e-12,
        "{a} {b}"
    );
    assert!(sol.reason.as_deref().unwrap_or("").contains("damped"));
    // Undamped the same problem jumps to 0.99.
    let free = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert!((w(&free.weights, "c1", "c2") - 0.99).abs() < 1e-12);
    // A bad step is rejected.
    options.max_step = Some(1.5);
    let err = solve(&p, &options).expect_err("bad step");
    assert!(err.to_string().starts_with("options.max_step"), "{err}");
}

fn invalid(p: &Problem) -> String {
    validate(p).expect_err("invalid").to_string()
}

#[test]
fn validation_names_the_field() {
    let base = three_clusters(
        Policy::Optimized,
        None,
        service("ns/svc", &[("c1", 10.0)], &[("c2", 10.0)]),
    );
    validate(&base).expect("valid");

    let mut p = base.clone();
    p.services[0].demand_rps.insert("c9".into(), 1.0);
    assert_eq!(
        invalid(&p),
        "services[0].demand_rps.c9: unknown cluster \"c9\""
    );

    let mut p = base.clone();
    p.services[0].capacity_rps.insert("c2".into(), -1.0);
    assert!(invalid(&p).starts_with("services[0].capacity_rps.c2: must be a finite number >= 0"));

    let mut p = base.clone();
    p.rtt_ms = matrix(&[("c1", "c2", f64::NAN)]);
    assert!(invalid(&p).starts_with("rtt_ms.c1.c2: "));

    let mut p = base.clone();
    p.rtt_ms = matrix(&[("c1", "c2", f64::INFINITY)]);
    assert!(invalid(&p).starts_with("rtt_ms.c1.c2: "));

    let mut p = base.clone();
    p.rtt_ms = matrix(&[("cx", "c2", 1.0)]);
    assert_eq!(invalid(&p), "rtt_ms.cx: unknown cluster \"cx\"");

    let mut p = base.clone();
    p.cost = Some(matrix(&[("c1", "c2", -3.0)]));
    assert!(invalid(&p).starts_with("cost.c1.c2: "));

    let mut p = base.clone();
    p.prices.internet = -0.1;
    assert!(invalid(&p).starts_with("prices.internet: "));

    let mut p = base.clone();
    p.clusters[2].id = "c1".into();
    assert!(invalid(&p).starts_with("clusters[2].id: duplicate"));

    let mut p = base.clone();
    p.clusters[1].zone = String::new();
    assert_eq!(invalid(&p), "clusters[1].zone: must not be empty");

    let mut p = base.clone();
    p.services.push(p.services[0].clone());
    assert!(invalid(&p).starts_with("services[1].name: duplicate"));

    // solve refuses what validate refuses.
    let mut p = base;
    p.services[0].demand_rps.insert("c9".into(), 1.0);
    assert!(solve(&p, &SolveOptions::default()).is_err());
}

#[test]
fn damping_keeps_the_liveness_floor_for_a_new_destination() {
    // Last round only c2 served; now c3 serves too and must get its floor at once.
    let p = three_clusters(
        Policy::Optimized,
        Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 10.0)])),
        service("ns/svc", &[("c1", 10.0)], &[("c2", 500.0), ("c3", 500.0)]),
    );
    let mut options = SolveOptions {
        max_step: Some(0.05),
        ..SolveOptions::default()
    };
    options
        .previous
        .insert("ns/svc".into(), matrix(&[("c1", "c2", 1.0)]));
    let sol = &solve(&p, &options).expect("solves")[0];
    let (a, b) = (w(&sol.weights, "c1", "c2"), w(&sol.weights, "c1", "c3"));
    // Floor min(1 rps, 1 % of 10 rps) = 0.1 rps -> weight 0.01, at once.
    assert!(
        b >= 0.01 - 1e-12,
        "floor 0.1 rps of 10 -> weight 0.01, got {b}"
    );
    assert!((a + b - 1.0).abs() < 1e-12);
    assert!((w(&sol.flows, "c1", "c3") - 10.0 * b).abs() < 1e-9);
}

#[test]
fn explain_marks_local_preference_under_wrr() {
    let p = three_clusters(
        Policy::WeightedRoundRobin,
        None,
        service("ns/svc", &[("c1", 10.0)], &[("c1", 50.0), ("c3", 50.0)]),
    );
    let e = explain(&p, "ns/svc", "c1").expect("explains");
    let local = e
        .destinations
        .iter()
        .find(|d| d.destination == "c1")
        .expect("c1");
    assert!(local.local_preference && local.binding == vec![Binding::LocalPreference]);
    assert_eq!(local.weight, 1.0);
    let remote = e
        .destinations
        .iter()
        .find(|d| d.destination == "c3")
        .expect("c3");
    assert!(!remote.local_preference && remote.weight == 0.0);
    let json = serde_json::to_value(&e).expect("serializes");
    assert_eq!(json["destinations"][0]["binding"][0], "local-preference");
}

#[test]
fn load_aware_optimized_sends_less_to_the_cluster_that_slows_down_faster() {
    use ballast_model::load_aware::LoadCurve;
    // c2 and c3 cost the same per request; c2's service time grows 10x faster with load.
    // Equal marginal cost: 2 x 0.1 x f2 = 2 x 0.01 x f3 with f2 + f3 = 100 → f2 = 9.09.
    let mut svc = service("ns/svc", &[("c1", 100.0)], &[("c2", 500.0), ("c3", 500.0)]);
    svc.service_time = [
        (
            "c2".to_owned(),
            LoadCurve {
                base_ms: 5.0,
                slope_ms_per_rps: 0.1,
            },
        ),
        (
            "c3".to_owned(),
            LoadCurve {
                base_ms: 5.0,
                slope_ms_per_rps: 0.01,
            },
        ),
    ]
    .into_iter()
    .collect();
    let equal = Some(matrix(&[("c1", "c2", 1.0), ("c1", "c3", 1.0)]));
    let p = three_clusters(Policy::Optimized, equal.clone(), svc.clone());
    let sol = &solve(&p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(sol.status, Status::Optimal);
    let (f2, f3) = (w(&sol.flows, "c1", "c2"), w(&sol.flows, "c1", "c3"));
    assert!((f2 - 100.0 / 11.0).abs() < 1.0, "c2 gets {f2}, want ~9.09");
    assert!((f2 + f3 - 100.0).abs() < 1e-6);

    // explain shows each curve, the service time at the load and the marginal cost that set
    // the split: equal on c2 and c3 (within the interpolation's tolerance).
    let e = explain(&p, "ns/svc", "c1").expect("explains");
    let d = |id: &str| {
        e.destinations
            .iter()
            .find(|d| d.destination == id)
            .expect("serves")
            .clone()
    };
    let (d2, d3) = (d("c2"), d("c3"));
    assert_eq!(d2.service_time.map(|c| c.slope_ms_per_rps), Some(0.1));
    assert!(
        (d2.service_ms - (5.0 + 0.1 * f2)).abs() < 1e-9,
        "{}",
        d2.service_ms
    );
    assert!(
        d2.marginal_cost > d2.cost + 5.0 * 0.9 * 0.5,
        "{}",
        d2.marginal_cost
    );
    assert!(
        (d2.marginal_cost - d3.marginal_cost).abs() < 0.05 * d2.marginal_cost,
        "c2 {} vs c3 {}",
        d2.marginal_cost,
        d3.marginal_cost
    );

    // A steeper c2 slope moves traffic further off it.
    svc.service_time.insert(
        "c2".into(),
        LoadCurve {
            base_ms: 5.0,
            slope_ms_per_rps: 0.4,
        },
    );
    let p = three_clusters(Policy::Optimized, equal.clone(), svc.clone());
    let steeper = w(
        &solve(&p, &SolveOptions::default()).expect("solves")[0].flows,
        "c1",
        "c2",
    );
    assert!(
        steeper < f2 - 4.0,
        "c2 {steeper} should fall well below {f2}"
    );

    // Params `cost` stays linear in $: the curves change nothing.
    let mut cost_p = three_clusters(Policy::Optimized, equal.clone(), svc.clone());
    cost_p.params = Params::Cost;
    let mut plain = svc;
    plain.service_time.clear();
    let mut plain_p = three_clusters(Policy::Optimized, equal, plain);
    plain_p.params = Params::Cost;
    let a = &solve(&cost_p, &SolveOptions::default()).expect("solves")[0];
    let b = &solve(&plain_p, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(a.flows, b.flows);
}

#[test]
fn service_time_curves_are_validated_naming_the_field() {
    use ballast_model::load_aware::LoadCurve;
    let mut svc = service("ns/svc", &[("c1", 100.0)], &[("c2", 500.0)]);
    svc.service_time.insert(
        "c2".into(),
        LoadCurve {
            base_ms: 1.0,
            slope_ms_per_rps: -0.5,
        },
    );
    let p = three_clusters(Policy::Optimized, None, svc.clone());
    assert!(
        invalid(&p).starts_with("services[0].service_time.c2.slope_ms_per_rps: "),
        "{}",
        invalid(&p)
    );
    svc.service_time.clear();
    svc.service_time.insert("cx".into(), LoadCurve::ZERO);
    let p = three_clusters(Policy::Optimized, None, svc);
    assert!(
        invalid(&p).contains("unknown cluster \"cx\""),
        "{}",
        invalid(&p)
    );
}
