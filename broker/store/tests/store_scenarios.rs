//! Every store operation on both backends: SQLite in a temp dir, PostgreSQL in a fresh
//! schema (`BALLAST_TEST_PG_URL`; skipped with a printed reason when unset, a failure under
//! `CI=true`).
#![allow(clippy::unwrap_used, clippy::float_cmp)]

use std::num::NonZeroU64;

use ballast_store::testing::{agent, c1_n1, cluster, report_of, run, weight};
use std::collections::BTreeSet;

use ballast_store::{
    on_both_backends, AckRecord, CrdPolicy, PolicyOrigin, PolicyRecord, ReportRecord, Store,
    StoreError, WeightRecord,
};

/// Every store operation, with values that a wrong query would get wrong.
async fn store_roundtrip(url: &str) {
    let store = Store::connect(url).await.unwrap();
    // Migrations are idempotent: a second connect on the same database works.
    let again = Store::connect(url).await.unwrap();
    again.close().await;

    store
        .register(&cluster("c1", "us-east-1"), &agent("c1", "n1"))
        .await
        .unwrap();
    store
        .register(&cluster("c2", "eu-west-1"), &agent("c2", "n1"))
        .await
        .unwrap();
    // Re-registering updates the location and keeps one row.
    store
        .register(&cluster("c1", "us-west-2"), &agent("c1", "n2"))
        .await
        .unwrap();
    let cs = store.clusters().await.unwrap();
    assert_eq!(cs.len(), 2);
    assert_eq!(cs[0].region, "us-west-2");
    assert!(store.cluster_exists("c2").await.unwrap());
    assert!(!store.cluster_exists("c9").await.unwrap());

    let rep = |rtt: f64, at: i64| {
        let mut r = report_of(
            "c1",
            "n1",
            at,
            &[("c2", rtt)],
            &[("ns/web", "c2", rtt * 2.0)],
            &[("ns/web", 300.0)],
        );
        r.rtt[0].loss_ratio = 0.25;
        r
    };
    store.store_report(&rep(12.5, 100)).await.unwrap();
    store.store_report(&rep(20.0, 200)).await.unwrap();
    let rtt = store.rtt().await.unwrap();
    assert_eq!(
        rtt.len(),
        1,
        "latest value per key replaces the previous one"
    );
    assert_eq!(rtt[0].rtt_ms, 20.0);
    assert_eq!(rtt[0].loss_ratio, 0.25);
    assert!(rtt[0].reachable);
    assert_eq!(rtt[0].measured_at_ms, 200);
    let rps = store.rps().await.unwrap();
    assert_eq!((rps.len(), rps[0].rps), (1, 40.0));
    let cap = store.capacity().await.unwrap();
    assert_eq!((cap.len(), cap[0].capacity_rps), (1, 300.0));
    assert_eq!(cap[0].service_base_ms, None, "no curve declared");
    assert_eq!(c1_n1(&store).await.last_report_ms, 200);
    // A declared service-time curve is stored with its capacity sample, replaced with it, and
    // dropped when a later sample carries none.
    let mut with_curve = rep(20.0, 300);
    with_curve.capacity[0].service_base_ms = Some(12.5);
    with_curve.capacity[0].service_slope_ms_per_rps = Some(0.04);
    store.store_report(&with_curve).await.unwrap();
    let cap = store.capacity().await.unwrap();
    assert_eq!(
        (cap[0].service_base_ms, cap[0].service_slope_ms_per_rps),
        (Some(12.5), Some(0.04))
    );
    store.store_report(&rep(20.0, 400)).await.unwrap();
    let cap = store.capacity().await.unwrap();
    assert_eq!(
        (
            cap.len(),
            cap[0].service_base_ms,
            cap[0].service_slope_ms_per_rps
        ),
        (1, None, None)
    );
    // A measured service time is stored with its sample (and none is none, not 0).
    let mut measured = rep(20.0, 500);
    measured.capacity[0].measured_service_ms = Some(7.25);
    store.store_report(&measured).await.unwrap();
    assert_eq!(
        store.capacity().await.unwrap()[0].measured_service_ms,
        Some(7.25)
    );
    store.store_report(&rep(20.0, 600)).await.unwrap();
    assert_eq!(store.capacity().await.unwrap()[0].measured_service_ms, None);
    // Service-time points: recorded once per (service, cluster, time), read from a time on,
    // pruned before one.
    let point = |at: i64, load: f64| ballast_store::ServiceTimePoint {
        service: "ns/web".into(),
        cluster_id: "c2".into(),
        at_ms: at,
        load_rps: load,
        service_ms: 2.0 + load,
    };
    store
        .record_service_time_points(&[point(1_000, 10.0), point(2_000, 20.0)])
        .await
        .unwrap();
    // the same time again keeps the first point
    store
        .record_service_time_points(&[point(2_000, 99.0), point(3_000, 30.0)])
        .await
        .unwrap();
    let pts = store.service_time_points(1_500).await.unwrap();
    assert_eq!(
        pts.iter()
            .map(|p| (p.at_ms, p.load_rps))
            .collect::<Vec<_>>(),
        [(2_000, 20.0), (3_000, 30.0)]
    );
    assert_eq!(pts[1].service_ms, 32.0);
    assert_eq!(store.prune_service_time_points(2_500).await.unwrap(), 2);
    assert_eq!(store.service_time_points(0).await.unwrap().len(), 1);
    // The policy CRD's price rows: replaced as a whole, in order; unchanged is no change.
    let price = |from: &str, usd_per_gb: f64| ballast_store::CrdPriceRecord {
        provider: "aws".into(),
        from_region: from.into(),
        to_region: "*".into(),
        usd_per_gb,
        note: String::new(),
    };
    let rows = vec![price("sa-east-1", 0.018), price("ap-southeast-1", 0.04)];
    assert!(store.sync_crd_prices(&rows).await.unwrap());
    assert!(!store.sync_crd_prices(&rows).await.unwrap());
    assert_eq!(store.crd_prices().await.unwrap(), rows);
    assert!(store.sync_crd_prices(&rows[1..]).await.unwrap());
    assert_eq!(store.crd_prices().await.unwrap(), rows[1..]);

    store.set_price("cross_zone", 0.01, 1).await.unwrap();
    store.set_price("cross_zone", 0.03, 2).await.unwrap();
    assert_eq!(
        store.prices().await.unwrap(),
        vec![("cross_zone".to_string(), 0.03)]
    );

    store
        .set_policy(
            &PolicyRecord {
                scope: String::new(),
                policy: "round-robin".into(),
                params: "cost".into(),
            },
            1,
        )
        .await
        .unwrap();
    store
        .set_policy(
            &PolicyRecord {
                scope: "ns/web".into(),
                policy: "optimized".into(),
                params: "performance".into(),
            },
            1,
        )
        .await
        .unwrap();
    let ps = store.policies().await.unwrap();
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].scope, "");
    assert!(store.delete_policy("ns/web").await.unwrap());
    assert!(!store.delete_policy("ns/web").await.unwrap());

    assert_eq!(store.last_generation().await.unwrap(), 0);
    let lt = ballast_store::testing::leader(&store).await;
    store
        .publish(
            &lt,
            10,
            &[
                weight("ns/web", "c1", "c1", 0.25),
                weight("ns/web", "c1", "c2", 0.75),
            ],
            &[],
            &run(1, 1),
        )
        .await
        .unwrap();
    store
        .publish(
            &lt,
            20,
            &[weight("ns/web", "c1", "c2", 1.0)],
            &[],
            &run(2, 2),
        )
        .await
        .unwrap();
    store.record_run(&run(3, 2)).await.unwrap();
    // A fenced publish (an older term) is refused and leaves nothing behind.
    let old = ballast_store::LeaderTerm {
        holder: lt.holder.clone(),
        term: lt.term - 1,
    };
    assert!(matches!(
        store
            .publish(
                &old,
                30,
                &[weight("ns/web", "c2", "c2", 1.0)],
                &[],
                &run(4, 2)
            )
            .await,
        Err(ballast_store::StoreError::Fenced { .. })
    ));
    assert_eq!(store.last_run_id().await.unwrap(), 3);
    assert_eq!(store.last_generation().await.unwrap(), 2);
    let w1 = store.weights_of(1).await.unwrap();
    assert_eq!(w1.len(), 2);
    assert_eq!(w1[1].weight, 0.75);
    let w2 = store.weights_of(2).await.unwrap();
    assert_eq!((w2.len(), w2[0].dst.as_str()), (1, "c2"));
    let runs = store.solver_runs(10).await.unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0].id, 3);
    assert_eq!(runs[2].objective, 1.5);

    let ack = |g: i64, applied: bool| AckRecord {
        cluster_id: "c1".into(),
        node_name: "n1".into(),
        service: "ns/web".into(),
        generation: g,
        applied,
        error: if applied {
            String::new()
        } else {
            "map full".into()
        },
        acked_at_ms: 30,
    };
    store.ack(&ack(1, true)).await.unwrap();
    store.ack(&ack(2, false)).await.unwrap();
    assert_eq!(
        c1_n1(&store).await.acked_generation,
        0,
        "a failed ack replaces the applied one"
    );
    store.ack(&ack(2, true)).await.unwrap();
    assert_eq!(c1_n1(&store).await.acked_generation, 2);
    store.close().await;
}

on_both_backends!(store_roundtrip: store_sqlite_roundtrip, store_postgres_roundtrip);

/// Generations store what changed: a pair not written keeps its rows, a written pair's rows
/// are replaced, a removed pair reads as absent until written again; pruning keeps exactly
/// the rows the kept generations read.
async fn changes_only_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let a = |w: &[(&str, f64)]| -> Vec<WeightRecord> {
        w.iter().map(|(d, v)| weight("ns/a", "c1", d, *v)).collect()
    };
    let b = |w: &[(&str, f64)]| -> Vec<WeightRecord> {
        w.iter().map(|(d, v)| weight("ns/b", "c1", d, *v)).collect()
    };
    let b_pair = [("ns/b".to_string(), "c1".to_string())];
    let g1 = [a(&[("c2", 0.5), ("c3", 0.5)]), b(&[("c2", 1.0)])].concat();
    let lt = ballast_store::testing::leader(&store).await;
    store.publish(&lt, 10, &g1, &[], &run(1, 1)).await.unwrap();
    // 2: a changes, b is carried over
    store
        .publish(&lt, 20, &a(&[("c2", 1.0)]), &[], &run(2, 2))
        .await
        .unwrap();
    // 3: b removed
    store
        .publish(&lt, 30, &[], &b_pair, &run(3, 3))
        .await
        .unwrap();
    // 4: b back, elsewhere
    store
        .publish(&lt, 40, &b(&[("c3", 1.0)]), &[], &run(4, 4))
        .await
        .unwrap();
    let g2 = [a(&[("c2", 1.0)]), b(&[("c2", 1.0)])].concat();
    let g3 = a(&[("c2", 1.0)]);
    let g4 = [a(&[("c2", 1.0)]), b(&[("c3", 1.0)])].concat();
    for (g, want) in [(1, &g1), (2, &g2), (3, &g3), (4, &g4)] {
        assert_eq!(&store.weights_of(g).await.unwrap(), want, "generation {g}");
    }
    assert!(
        store.weights_of(5).await.unwrap().is_empty(),
        "never published"
    );
    assert_eq!(store.weight_rows().await.unwrap(), 3 + 1 + 1 + 1);

    // keep 3 and 4: a's row of 2 is read by both; b's rows of 1 are not (3 rewrote b)
    let s = store
        .prune_generations(NonZeroU64::new(2).unwrap())
        .await
        .unwrap();
    assert_eq!((s.up_to_generation, s.generations, s.weights), (2, 2, 3));
    assert!(store.weights_of(2).await.unwrap().is_empty(), "pruned");
    assert_eq!(store.weights_of(3).await.unwrap(), g3);
    assert_eq!(store.weights_of(4).await.unwrap(), g4);
    assert_eq!(store.weight_rows().await.unwrap(), 3);
    // keep 4: the tombstone goes, a's row of 2 stays (4 did not rewrite a)
    let s = store
        .prune_generations(NonZeroU64::new(1).unwrap())
        .await
        .unwrap();
    assert_eq!((s.up_to_generation, s.weights), (3, 1));
    assert_eq!(store.weights_of(4).await.unwrap(), g4);
    assert_eq!(store.weight_rows().await.unwrap(), 2);
    store.close().await;
}

on_both_backends!(
    changes_only_scenario: changes_only_sqlite_carries_unwritten_pairs,
    changes_only_postgres_carries_unwritten_pairs
);

/// A generation of more rows than one INSERT statement carries is stored whole, in order.
async fn bulk_publish_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let rows: Vec<WeightRecord> = (0..1234)
        .flat_map(|i| {
            let svc = format!("ns/svc-{i:04}");
            [
                weight(&svc, "c1", "c2", 0.25),
                weight(&svc, "c1", "c3", 0.75),
            ]
        })
        .collect();
    let lt = ballast_store::testing::leader(&store).await;
    store
        .publish(&lt, 10, &rows, &[], &run(1, 1))
        .await
        .unwrap();
    let back = store.weights_of(1).await.unwrap();
    assert_eq!(back.len(), 2468);
    assert_eq!(back, rows);
    // a failing publish (fenced: another holder took the lease) leaves nothing of itself behind
    let other = ballast_store::testing::leader(&store).await;
    assert!(other.term > lt.term);
    assert!(store
        .publish(&lt, 11, &rows[..10], &[], &run(2, 1))
        .await
        .is_err());
    assert_eq!(store.weights_of(1).await.unwrap().len(), 2468);
    assert_eq!(store.last_run_id().await.unwrap(), 1);
    store.close().await;
}

on_both_backends!(
    bulk_publish_scenario: bulk_publish_sqlite_in_chunks,
    bulk_publish_postgres_in_chunks
);

/// A full-set report withdraws the node's samples it does not state (in the same
/// transaction); a partial one replaces samples by key and withdraws nothing; other nodes'
/// samples are untouched either way.
async fn withdrawal_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    for c in ["c1", "c2", "c3"] {
        store
            .register(&cluster(c, "us-east-1"), &agent(c, "n1"))
            .await
            .unwrap();
    }
    let full = |r: ReportRecord| ReportRecord {
        full_set: true,
        ..r
    };
    let both = report_of(
        "c2",
        "n1",
        100,
        &[("c1", 5.0), ("c3", 7.0)],
        &[("ns/web", "c1", 3.0), ("ns/api", "c1", 4.0)],
        &[("ns/web", 50.0), ("ns/api", 60.0)],
    );
    store.store_report(&both).await.unwrap();
    let other_node = report_of("c2", "n2", 100, &[("c1", 9.0)], &[], &[("ns/web", 50.0)]);
    store.store_report(&other_node).await.unwrap();
    // partial: nothing withdrawn
    let partial = report_of("c2", "n1", 200, &[("c1", 6.0)], &[], &[("ns/web", 55.0)]);
    store.store_report(&partial).await.unwrap();
    assert_eq!(store.capacity().await.unwrap().len(), 3);
    assert_eq!(store.rtt().await.unwrap().len(), 3);
    assert_eq!(store.rps().await.unwrap().len(), 2);
    // full set without ns/api and without c3: those of n1 go, n2's stay
    store
        .store_report(&full(report_of(
            "c2",
            "n1",
            300,
            &[("c1", 6.0)],
            &[("ns/web", "c1", 3.0)],
            &[("ns/web", 55.0)],
        )))
        .await
        .unwrap();
    let caps: Vec<(String, String, f64)> = store
        .capacity()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.service, c.node_name, c.capacity_rps))
        .collect();
    assert_eq!(
        caps,
        [
            ("ns/web".to_string(), "n1".to_string(), 55.0),
            ("ns/web".to_string(), "n2".to_string(), 50.0)
        ]
    );
    let rtts: Vec<(String, String)> = store
        .rtt()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.dst, r.node_name))
        .collect();
    assert_eq!(
        rtts,
        [
            ("c1".to_string(), "n1".to_string()),
            ("c1".to_string(), "n2".to_string())
        ]
    );
    let rps = store.rps().await.unwrap();
    assert_eq!(rps.len(), 1);
    assert_eq!(rps[0].service, "ns/web");
    // an empty full set withdraws everything of the node
    store
        .store_report(&full(report_of("c2", "n1", 400, &[], &[], &[])))
        .await
        .unwrap();
    assert!(store.rps().await.unwrap().is_empty());
    assert_eq!(store.capacity().await.unwrap().len(), 1, "n2's stays");
}

on_both_backends!(
    withdrawal_scenario: store_sqlite_full_set_withdraws,
    store_postgres_full_set_withdraws
);

fn crd(scope: &str, policy: &str, source: &str) -> CrdPolicy {
    CrdPolicy {
        scope: scope.into(),
        policy: policy.into(),
        params: "mixed".into(),
        source: source.into(),
    }
}

fn admin(scope: &str, policy: &str) -> PolicyRecord {
    PolicyRecord {
        scope: scope.into(),
        policy: policy.into(),
        params: "cost".into(),
    }
}

/// `(scope, policy, origin, source)` of every stored policy.
async fn rows(store: &Store) -> Vec<(String, String, PolicyOrigin, String)> {
    store
        .stored_policies()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.scope, p.policy, p.origin, p.source))
        .collect()
}

/// The policy CRD resync: CRD rows become exactly the desired set (deleted objects removed,
/// invalid ones kept), admin rows of other scopes survive, the CRD wins a shared scope, and
/// admin writes to a CRD-held scope are refused naming the object.
async fn crd_policy_sync(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let web = "ServiceLoadBalancingPolicy/demo/web-rr";
    let cart = "ServiceLoadBalancingPolicy/shop/cart";
    let default = "LoadBalancingPolicy/default";
    store
        .set_policy(&admin("ops/db", "round-robin"), 1)
        .await
        .unwrap();
    store
        .set_policy(&admin("shop/cart", "round-robin"), 1)
        .await
        .unwrap();

    let s = store
        .sync_crd_policies(
            &[
                crd("", "optimized", default),
                crd("demo/web", "round-robin", web),
                crd("shop/cart", "weighted-round-robin", cart),
            ],
            &BTreeSet::new(),
            2,
        )
        .await
        .unwrap();
    assert_eq!(s.written, ["", "demo/web", "shop/cart"]);
    assert_eq!(
        s.replaced_admin,
        ["shop/cart"],
        "the CRD wins a shared scope"
    );
    assert!(s.deleted.is_empty());
    assert_eq!(
        rows(&store).await,
        [
            (
                "".into(),
                "optimized".into(),
                PolicyOrigin::Crd,
                default.into()
            ),
            (
                "demo/web".into(),
                "round-robin".into(),
                PolicyOrigin::Crd,
                web.into()
            ),
            (
                "ops/db".into(),
                "round-robin".into(),
                PolicyOrigin::Admin,
                String::new()
            ),
            (
                "shop/cart".into(),
                "weighted-round-robin".into(),
                PolicyOrigin::Crd,
                cart.into()
            ),
        ]
    );

    // Admin writes and clears on CRD-held scopes are refused, naming the object; the row stays.
    let e = store
        .set_policy(&admin("demo/web", "optimized"), 3)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::PolicyHeldByCrd { .. }), "{e}");
    assert!(e.to_string().contains(web), "{e}");
    let e = store.delete_policy("").await.unwrap_err();
    assert!(
        e.to_string().contains(default) && e.to_string().contains("cluster-wide"),
        "{e}"
    );
    let e = store.delete_policy("shop/cart").await.unwrap_err();
    assert!(e.to_string().contains(cart), "{e}");
    assert_eq!(rows(&store).await.len(), 4);

    // A relist (after a restart): demo/web's object is gone, the default object is invalid
    // now (kept at its last accepted value), cart unchanged.
    let s = store
        .sync_crd_policies(
            &[crd("shop/cart", "weighted-round-robin", cart)],
            &BTreeSet::from([default.to_string()]),
            4,
        )
        .await
        .unwrap();
    assert_eq!(s.written, Vec::<String>::new());
    assert_eq!(s.unchanged, ["shop/cart"]);
    assert_eq!(s.deleted, ["demo/web"]);
    assert_eq!(s.kept, [""]);
    let now = rows(&store).await;
    let scopes: Vec<&str> = now.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(scopes, ["", "ops/db", "shop/cart"]);
    // The admin override survived every sync; with the CRD gone, admin owns the scope again.
    store
        .set_policy(&admin("demo/web", "optimized"), 5)
        .await
        .unwrap();
    assert!(store.delete_policy("demo/web").await.unwrap());

    // Nothing half-applied: a sync that fails (two rows for one scope) changes nothing.
    let e = store
        .sync_crd_policies(
            &[crd("x/a", "optimized", "a"), crd("x/a", "optimized", "b")],
            &BTreeSet::new(),
            6,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::DuplicateScope(_)), "{e}");
    assert_eq!(rows(&store).await, now);

    // No CRD at all: every CRD row goes, admin rows stay.
    let s = store
        .sync_crd_policies(&[], &BTreeSet::new(), 7)
        .await
        .unwrap();
    assert_eq!(s.deleted, ["", "shop/cart"]);
    assert_eq!(
        rows(&store).await,
        [(
            "ops/db".into(),
            "round-robin".into(),
            PolicyOrigin::Admin,
            String::new()
        )]
    );
    store.ping().await.unwrap();
    store.close().await;
    assert!(store.ping().await.is_err(), "a closed pool does not answer");
}

on_both_backends!(crd_policy_sync: store_sqlite_crd_policy_sync, store_postgres_crd_policy_sync);
/// Imports without a VIP are a node's full list, replaced with every full-set report in the
/// report's transaction (an empty list clears it), ignored without `full_set`, kept apart per
/// node, and forgotten with the node's import declaration when it is pruned.
async fn without_vip_scenario(url: &str) {
    use ballast_store::WithoutVipRecord;
    let store = Store::connect(url).await.unwrap();
    store
        .register(&cluster("c1", "us-east-1"), &agent("c1", "n1"))
        .await
        .unwrap();
    let report = |node: &str, at: i64, full_set: bool, services: &[&str]| ReportRecord {
        full_set,
        services_without_vip: services.iter().map(|s| (*s).to_string()).collect(),
        imports: Some(vec![]),
        ..report_of("c1", node, at, &[], &[], &[])
    };
    let rows = |rows: &[(&str, &str)]| -> Vec<WithoutVipRecord> {
        rows.iter()
            .map(|(n, s)| WithoutVipRecord {
                cluster_id: "c1".into(),
                node_name: (*n).into(),
                service: (*s).into(),
            })
            .collect()
    };
    store
        .store_report(&report("n1", 100, true, &["shop/cart", "shop/db"]))
        .await
        .unwrap();
    store
        .store_report(&report("n2", 100, true, &["shop/cart"]))
        .await
        .unwrap();
    assert_eq!(
        store.services_without_vip().await.unwrap(),
        rows(&[("n1", "shop/cart"), ("n1", "shop/db"), ("n2", "shop/cart")])
    );
    // replaced, not merged
    store
        .store_report(&report("n1", 200, true, &["shop/db"]))
        .await
        .unwrap();
    // without full_set the list is not read: nothing changes
    store
        .store_report(&report("n2", 200, false, &[]))
        .await
        .unwrap();
    assert_eq!(
        store.services_without_vip().await.unwrap(),
        rows(&[("n1", "shop/db"), ("n2", "shop/cart")])
    );
    // an empty full list clears the node's rows
    store
        .store_report(&report("n1", 300, true, &[]))
        .await
        .unwrap();
    assert_eq!(
        store.services_without_vip().await.unwrap(),
        rows(&[("n2", "shop/cart")])
    );
    // many rows (more than one INSERT carries) are stored whole
    let many: Vec<String> = (0..1500).map(|i| format!("shop/svc-{i:04}")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    store
        .store_report(&report("n1", 400, true, &many_refs))
        .await
        .unwrap();
    assert_eq!(store.services_without_vip().await.unwrap().len(), 1501);
    // n2 not heard from since 200: pruned with its import declaration
    assert_eq!(store.prune_import_declarations(250).await.unwrap(), 1);
    let left = store.services_without_vip().await.unwrap();
    assert_eq!(left.len(), 1500);
    assert!(left.iter().all(|r| r.node_name == "n1"));
    store.close().await;
}

on_both_backends!(
    without_vip_scenario: without_vip_sqlite_replaced_per_node,
    without_vip_postgres_replaced_per_node
);
