//! The store and the engine on both backends: SQLite in a temp dir, PostgreSQL in a fresh
//! schema (`BALLAST_TEST_PG_URL`; skipped with a printed reason when unset).
#![allow(clippy::unwrap_used, clippy::float_cmp)]

mod support;

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use ballast_broker::engine::{Engine, EngineConfig};
use ballast_broker::metrics::Metrics;
use ballast_model::Params;
use ballast_store::{
    sqlite_url, AckRecord, AgentRecord, CapacityRecord, ClusterRecord, PolicyRecord, PruneStats,
    ReportRecord, RpsRecord, RttRecord, SolverRunRecord, Store, WeightRecord,
};
use ballast_types::WeightsStatus;
use support::{now_ms, PgSchema};

/// Runs `scenario(url)` as two tests: `sqlite` on a file in a temp dir, `postgres` in a fresh
/// schema (skipped with a printed reason when `BALLAST_TEST_PG_URL` is unset).
macro_rules! on_both_backends {
    ($scenario:ident: $sqlite:ident, $postgres:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            let dir = tempfile::tempdir().unwrap();
            $scenario(&sqlite_url(&dir.path().join("b.db"))).await;
        }

        #[tokio::test]
        async fn $postgres() {
            let Some(pg) = PgSchema::create(stringify!($postgres)).await else {
                return;
            };
            $scenario(&pg.url).await;
            pg.drop_schema().await;
        }
    };
}

fn cluster(id: &str, region: &str) -> ClusterRecord {
    ClusterRecord {
        cluster_id: id.into(),
        region: region.into(),
        zone: format!("{region}a"),
        provider: "aws".into(),
        gateway_address: "127.0.0.1".into(),
        registered_at_ms: 1,
        updated_at_ms: 1,
    }
}

fn agent(c: &str, node: &str) -> AgentRecord {
    AgentRecord {
        cluster_id: c.into(),
        node_name: node.into(),
        agent_version: "v1".into(),
        registered_at_ms: 1,
        last_report_ms: 0,
        acked_generation: 0,
    }
}

fn run(id: i64, generation: i64) -> SolverRunRecord {
    SolverRunRecord {
        id,
        started_at_ms: 10,
        inputs_digest: format!("d{id}"),
        status: "optimal".into(),
        objective: 1.5,
        duration_ms: 0.25,
        services: 1,
        generation,
        detail: String::new(),
    }
}

fn weight(svc: &str, src: &str, dst: &str, w: f64) -> WeightRecord {
    WeightRecord {
        service: svc.into(),
        src: src.into(),
        dst: dst.into(),
        weight: w,
        status: "optimal".into(),
        reason: String::new(),
        policy: "optimized".into(),
        params: "mixed".into(),
        computed_at_ms: 5,
    }
}

/// The agent record of node n1 of c1.
async fn c1_n1(store: &Store) -> AgentRecord {
    store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.cluster_id == "c1" && a.node_name == "n1")
        .unwrap()
}

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
    assert_eq!(c1_n1(&store).await.last_report_ms, 200);

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
    store
        .publish(
            1,
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
        .publish(2, 20, &[weight("ns/web", "c1", "c2", 1.0)], &[], &run(2, 2))
        .await
        .unwrap();
    store.record_run(&run(3, 2)).await.unwrap();
    // A generation cannot be published twice, and the failed publish leaves nothing behind.
    assert!(store
        .publish(2, 30, &[weight("ns/web", "c2", "c2", 1.0)], &[], &run(4, 2))
        .await
        .is_err());
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
    store.publish(1, 10, &g1, &[], &run(1, 1)).await.unwrap();
    // 2: a changes, b is carried over
    store
        .publish(2, 20, &a(&[("c2", 1.0)]), &[], &run(2, 2))
        .await
        .unwrap();
    // 3: b removed
    store
        .publish(3, 30, &[], &b_pair, &run(3, 3))
        .await
        .unwrap();
    // 4: b back, elsewhere
    store
        .publish(4, 40, &b(&[("c3", 1.0)]), &[], &run(4, 4))
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
    store.publish(1, 10, &rows, &[], &run(1, 1)).await.unwrap();
    let back = store.weights_of(1).await.unwrap();
    assert_eq!(back.len(), 2468);
    assert_eq!(back, rows);
    // a failing publish (generation 1 again) leaves nothing of itself behind
    assert!(store
        .publish(1, 11, &rows[..10], &[], &run(2, 1))
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

fn report_of(
    c: &str,
    node: &str,
    at: i64,
    rtt: &[(&str, f64)],
    rps: &[(&str, &str, f64)],
    cap: &[(&str, f64)],
) -> ReportRecord {
    ReportRecord {
        cluster_id: c.into(),
        node_name: node.into(),
        received_at_ms: at,
        rtt: rtt
            .iter()
            .map(|(d, v)| RttRecord {
                src: c.into(),
                dst: (*d).into(),
                node_name: node.into(),
                rtt_ms: *v,
                loss_ratio: 0.0,
                reachable: true,
                measured_at_ms: at,
            })
            .collect(),
        rps: rps
            .iter()
            .map(|(s, d, v)| RpsRecord {
                src: c.into(),
                service: (*s).into(),
                dst: (*d).into(),
                node_name: node.into(),
                rps: *v,
                measured_at_ms: at,
            })
            .collect(),
        capacity: cap
            .iter()
            .map(|(s, v)| CapacityRecord {
                cluster_id: c.into(),
                service: (*s).into(),
                node_name: node.into(),
                capacity_rps: *v,
                measured_at_ms: at,
            })
            .collect(),
        imports: None,
    }
}

/// An engine on `store` with its own metrics.
async fn engine_on(store: &Store, cfg: EngineConfig) -> Engine {
    Engine::load(store.clone(), cfg, Arc::new(Metrics::new()))
        .await
        .unwrap()
}

/// A report of node n1 of `c` with only its capacity for ns/web.
fn web_capacity(c: &str, at: i64, capacity_rps: f64) -> ReportRecord {
    report_of(c, "n1", at, &[], &[], &[("ns/web", capacity_rps)])
}

/// Stores each report, in order.
async fn store_reports(store: &Store, reports: &[ReportRecord]) {
    for r in reports {
        store.store_report(r).await.unwrap();
    }
}

/// A store on `url` with c1, c2, c3 (us-east-1) registered, one agent `n1` each.
async fn store_with_three_clusters(url: &str) -> Store {
    let store = Store::connect(url).await.unwrap();
    for c in ["c1", "c2", "c3"] {
        store
            .register(&cluster(c, "us-east-1"), &agent(c, "n1"))
            .await
            .unwrap();
    }
    store
}

/// ns/web's entry for source c1 in a published generation's key.
fn web_c1() -> (String, String) {
    ("ns/web".to_string(), "c1".to_string())
}

/// Aggregation across the agents of one cluster, generations, staleness, restart.
async fn engine_scenario(url: &str) {
    let store = store_with_three_clusters(url).await;
    let cfg = EngineConfig {
        stale_after: Duration::from_secs(30),
        max_step: None,
        ..EngineConfig::default()
    };
    let engine = engine_on(&store, cfg.clone()).await;
    let now = now_ms();
    // Three agents of c1: RTT to c2 is their median (20), RPS is their sum (60).
    let c1 = |node, r| {
        report_of(
            "c1",
            node,
            now,
            &[("c2", r)],
            &[("ns/web", "c2", 20.0)],
            &[],
        )
    };
    store_reports(
        &store,
        &[
            c1("n1", 10.0),
            c1("n2", 30.0),
            c1("n3", 20.0),
            web_capacity("c2", now, 100.0),
            web_capacity("c3", now, 50.0),
        ],
    )
    .await;
    let inputs = engine.inputs(now_ms()).await.unwrap();
    let plan = &inputs.services["ns/web"];
    assert!(plan.stale.is_empty());
    assert_eq!(
        plan.problem.rtt_ms["c1"]["c2"], 20.0,
        "median of 10, 30, 20"
    );
    let svc = &plan.problem.services[0];
    assert_eq!(svc.demand_rps["c1"], 60.0, "sum over the agents");
    assert_eq!(
        svc.demand_rps["c2"], 10.0,
        "no RPS reported: the default demand"
    );
    assert_eq!(svc.capacity_rps.len(), 2);

    assert_eq!(engine.current().generation, 0);
    let g1 = engine.run_round().await.unwrap();
    assert_eq!(g1, 1);
    let p = engine.current();
    let e = &p.entries[&web_c1()];
    assert_eq!(e.status, WeightsStatus::Optimal);
    assert!((e.weights.values().sum::<f64>() - 1.0).abs() < 1e-9);
    // Unchanged inputs: no new generation.
    assert_eq!(engine.run_round().await.unwrap(), 1);

    // c3's capacity goes stale: the service keeps its weights, flagged stale.
    store
        .store_report(&web_capacity("c3", now - 120_000, 50.0))
        .await
        .unwrap();
    let g2 = engine.run_round().await.unwrap();
    assert_eq!(g2, 2);
    let p2 = engine.current();
    let e2 = &p2.entries[&web_c1()];
    assert_eq!(e2.status, WeightsStatus::Stale);
    assert!(
        e2.reason.contains("capacity of ns/web in c3"),
        "{}",
        e2.reason
    );
    assert_eq!(e2.weights, e.weights, "previous good weights kept");

    // A new engine on the same store continues the sequence.
    let engine2 = engine_on(&store, cfg).await;
    assert_eq!(engine2.current().generation, 2);
    assert_eq!(
        engine2.current().entries[&web_c1()].status,
        WeightsStatus::Stale
    );
    store
        .store_report(&web_capacity("c3", now_ms(), 50.0))
        .await
        .unwrap();
    assert_eq!(engine2.run_round().await.unwrap(), 3);
    assert_eq!(
        engine2.current().entries[&web_c1()].status,
        WeightsStatus::Optimal
    );
    assert_eq!(store.last_generation().await.unwrap(), 3);
    store.close().await;
}

on_both_backends!(engine_scenario: engine_sqlite_scenario, engine_postgres_scenario);

/// Cluster expiry: a cluster not heard from within the expiry is left out as source and
/// destination, so the others are solved again (fresh, not stale), while with expiry off the
/// same inputs leave the service stale; registering again brings the cluster back.
async fn expiry_scenario(url: &str) {
    let store = store_with_three_clusters(url).await;
    let now = now_ms();
    let long_ago = now - 20 * 60_000;
    // c3 (the nearest for c1) last reported 20 minutes ago.
    store_reports(
        &store,
        &[
            report_of(
                "c1",
                "n1",
                now,
                &[("c2", 10.0), ("c3", 5.0)],
                &[("ns/web", "c2", 20.0)],
                &[],
            ),
            web_capacity("c2", now, 100.0),
            web_capacity("c3", long_ago, 100.0),
        ],
    )
    .await;
    let cfg = |cluster_expiry| EngineConfig {
        stale_after: Duration::from_secs(30),
        max_step: None,
        cluster_expiry,
        ..EngineConfig::default()
    };

    // Expiry off: c3's capacity is only stale, so ns/web cannot be solved.
    let never = engine_on(&store, cfg(None)).await;
    let inputs = never.inputs(now_ms()).await.unwrap();
    assert!(inputs.expired.is_empty());
    assert!(
        inputs.services["ns/web"]
            .stale
            .iter()
            .any(|r| r.contains("capacity of ns/web in c3")),
        "{:?}",
        inputs.services["ns/web"].stale
    );
    never.run_round().await.unwrap();
    assert!(!never.current().entries.contains_key(&web_c1()));
    drop(never);

    // Expiry 10 min: c3 is gone, ns/web is solved over c1 and c2.
    let engine = engine_on(&store, cfg(Some(Duration::from_secs(600)))).await;
    let inputs = engine.inputs(now_ms()).await.unwrap();
    assert_eq!(
        inputs
            .expired
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        vec!["c3"]
    );
    assert_eq!(inputs.clusters, 2);
    let plan = &inputs.services["ns/web"];
    assert!(plan.stale.is_empty(), "{:?}", plan.stale);
    assert!(plan.problem.clusters.iter().all(|c| c.id != "c3"));
    assert!(!plan.problem.services[0].demand_rps.contains_key("c3"));
    engine.run_round().await.unwrap();
    let p = engine.current();
    let e = &p.entries[&web_c1()];
    assert_eq!(e.status, WeightsStatus::Optimal);
    assert_eq!(e.weights.keys().collect::<Vec<_>>(), vec!["c2"]);
    assert!(!p.entries.keys().any(|(_, src)| src == "c3"));

    // c3 registers again and reports: it is a destination again, and the near one.
    let mut c3 = cluster("c3", "us-east-1");
    c3.updated_at_ms = now_ms();
    let mut a3 = agent("c3", "n1");
    a3.registered_at_ms = now_ms();
    store.register(&c3, &a3).await.unwrap();
    store
        .store_report(&web_capacity("c3", now_ms(), 100.0))
        .await
        .unwrap();
    assert!(engine.expired_clusters(now_ms()).await.unwrap().is_empty());
    engine.run_round().await.unwrap();
    let w = engine.current().entries[&web_c1()].weights.clone();
    assert!(w.get("c3").copied().unwrap_or(0.0) > 0.5, "{w:?}");
    store.close().await;
}

on_both_backends!(
    expiry_scenario: expiry_sqlite_drops_silent_clusters,
    expiry_postgres_drops_silent_clusters
);

/// A report of node `node` of `c` received at `at` that only declares its imports.
fn imports_of(c: &str, node: &str, at: i64, services: &[&str]) -> ReportRecord {
    ReportRecord {
        imports: Some(services.iter().map(|s| (*s).to_string()).collect()),
        ..report_of(c, node, at, &[], &[], &[])
    }
}

/// The sources of `svc` in the engine's current inputs (None: no plan for it).
async fn sources_of(engine: &Engine, svc: &str) -> Option<Vec<String>> {
    let inputs = engine.inputs(now_ms()).await.unwrap();
    inputs
        .services
        .get(svc)
        .map(|p| p.problem.services[0].demand_rps.keys().cloned().collect())
}

/// Imports: a cluster is a source only of the services its agents say it imports; one that
/// never said is a source of every service; stale declarations give way to fresh ones of
/// other nodes; a cluster that stops importing a service loses its weights (a tombstone).
async fn imports_scenario(url: &str) {
    let store = store_with_three_clusters(url).await;
    let now = now_ms();
    let mut reports = Vec::new();
    for (c, peers) in [
        ("c1", [("c2", 10.0), ("c3", 5.0)]),
        ("c2", [("c1", 10.0), ("c3", 7.0)]),
        ("c3", [("c1", 5.0), ("c2", 7.0)]),
    ] {
        reports.push(report_of(c, "n1", now, &peers, &[], &[]));
    }
    reports.push(report_of("c2", "n1", now, &[], &[], &[("ns/web", 1000.0)]));
    reports.push(report_of(
        "c3",
        "n1",
        now,
        &[],
        &[],
        &[("ns/web", 1000.0), ("ns/api", 1000.0)],
    ));
    store_reports(&store, &reports).await;
    let engine = engine_on(
        &store,
        EngineConfig {
            stale_after: Duration::from_secs(30),
            max_step: None,
            ..EngineConfig::default()
        },
    )
    .await;
    let all = Some(vec!["c1".to_string(), "c2".into(), "c3".into()]);
    assert_eq!(sources_of(&engine, "ns/web").await, all, "nobody declared");

    // c1 imports ns/web only, c2 nothing, c3 does not say
    store_reports(
        &store,
        &[
            imports_of("c1", "n1", now_ms(), &["ns/web"]),
            imports_of("c2", "n1", now_ms(), &[]),
        ],
    )
    .await;
    assert_eq!(
        sources_of(&engine, "ns/web").await,
        Some(vec!["c1".to_string(), "c3".into()])
    );
    assert_eq!(
        sources_of(&engine, "ns/api").await,
        Some(vec!["c3".to_string()])
    );
    engine.run_round().await.unwrap();
    let p = engine.current();
    let sources: Vec<(&str, &str)> = p
        .entries
        .keys()
        .map(|(s, c)| (s.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        sources,
        vec![("ns/api", "c3"), ("ns/web", "c1"), ("ns/web", "c3")]
    );
    let generation = p.generation;

    // nobody imports ns/api: no plan, its weights are removed
    store_reports(&store, &[imports_of("c3", "n1", now_ms(), &["ns/web"])]).await;
    assert_eq!(sources_of(&engine, "ns/api").await, None);

    // a second node of c1 declares ns/api while n1's declaration is stale: only the fresh
    // one counts; when both are stale, their union does
    let old = now_ms() - 60_000;
    store_reports(
        &store,
        &[
            imports_of("c1", "n1", old, &["ns/web"]),
            imports_of("c1", "n2", now_ms(), &["ns/api"]),
        ],
    )
    .await;
    assert_eq!(
        sources_of(&engine, "ns/api").await,
        Some(vec!["c1".to_string()])
    );
    assert_eq!(
        sources_of(&engine, "ns/web").await,
        Some(vec!["c3".to_string()])
    );
    store_reports(&store, &[imports_of("c1", "n2", old, &["ns/api"])]).await;
    assert_eq!(
        sources_of(&engine, "ns/web").await,
        Some(vec!["c1".to_string(), "c3".into()])
    );
    // agents send imports only when they change: a later report without them keeps n2's
    // declaration fresh
    store_reports(&store, &[report_of("c1", "n2", now_ms(), &[], &[], &[])]).await;
    assert_eq!(
        sources_of(&engine, "ns/web").await,
        Some(vec!["c3".to_string()])
    );
    assert_eq!(
        sources_of(&engine, "ns/api").await,
        Some(vec!["c1".to_string()])
    );

    // c1 stops importing anything: its ns/web weights go, in memory and in the store
    store_reports(
        &store,
        &[
            imports_of("c1", "n1", now_ms(), &[]),
            imports_of("c1", "n2", now_ms(), &[]),
        ],
    )
    .await;
    engine.run_round().await.unwrap();
    let p = engine.current();
    assert!(p.generation > generation);
    assert_eq!(
        p.entries.keys().cloned().collect::<Vec<_>>(),
        vec![("ns/web".to_string(), "c3".to_string())]
    );
    let stored = store
        .weights_of(i64::try_from(p.generation).unwrap())
        .await
        .unwrap();
    assert!(stored.iter().all(|w| w.src == "c3"), "{stored:?}");
    assert!(!stored.is_empty());

    // a node not heard from for the cluster expiry (10 min) is forgotten at the next round
    let long_ago = now_ms() - 20 * 60_000;
    store_reports(&store, &[imports_of("c1", "n3", long_ago, &["ns/api"])]).await;
    let nodes = |d: Vec<ballast_store::ImportDeclaration>| {
        d.into_iter()
            .map(|d| format!("{}/{}", d.cluster_id, d.node_name))
            .collect::<Vec<_>>()
    };
    assert!(nodes(store.imports().await.unwrap()).contains(&"c1/n3".to_string()));
    engine.run_round().await.unwrap();
    assert_eq!(
        nodes(store.imports().await.unwrap()),
        vec!["c1/n1", "c1/n2", "c2/n1", "c3/n1"]
    );
    store.close().await;
}

on_both_backends!(
    imports_scenario: imports_sqlite_limit_sources,
    imports_postgres_limit_sources
);

/// Herd damping in the server: one round moves no weight by more than `max_step`, and
/// further rounds converge to the undamped answer.
#[tokio::test]
async fn engine_damps_weight_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_three_clusters(&sqlite_url(&dir.path().join("b.db"))).await;
    let cfg = EngineConfig {
        max_step: Some(0.2),
        ..EngineConfig::default()
    };
    let engine = engine_on(&store, cfg).await;
    let now = now_ms();
    let rtts = |a: f64, b: f64| {
        report_of(
            "c1",
            "n1",
            now_ms(),
            &[("c2", a), ("c3", b)],
            &[("ns/web", "c2", 100.0)],
            &[],
        )
    };
    store.store_report(&rtts(5.0, 80.0)).await.unwrap();
    for c in ["c2", "c3"] {
        store
            .store_report(&web_capacity(c, now, 1000.0))
            .await
            .unwrap();
    }
    let key = web_c1();
    // Converge on c2 first.
    for _ in 0..10 {
        engine.run_round().await.unwrap();
    }
    let before = engine.current().entries[&key].weights.clone();
    assert!(before["c2"] > 0.9, "{before:?}");
    // Now c3 is the near one: the first round moves at most 0.2.
    store.store_report(&rtts(80.0, 5.0)).await.unwrap();
    engine.run_round().await.unwrap();
    let after = engine.current().entries[&key].weights.clone();
    for (dst, w) in &after {
        let moved = (w - before.get(dst).copied().unwrap_or(0.0)).abs();
        assert!(
            moved <= 0.2 + 1e-9,
            "{dst} moved {moved}: {before:?} -> {after:?}"
        );
    }
    assert!(after["c3"] > before["c3"] + 0.1, "{before:?} -> {after:?}");
    // Further rounds (each new generation changes the inputs' digest) converge.
    for _ in 0..10 {
        engine.run_round().await.unwrap();
    }
    let end = engine.current().entries[&key].weights.clone();
    assert!(end["c3"] > 0.9, "{end:?}");
    store.close().await;
}

/// Retention with `keep_generations` = K: after K + 5 published generations only the newest K
/// remain (weights, generation rows and their solver runs), the kept snapshots and the latest
/// weights are intact, acks are untouched, and an engine restarted on a reconnected store
/// continues the generation and run sequences.
async fn retention_scenario(url: &str) {
    const K: i64 = 3;
    let keep = NonZeroU64::new(3).unwrap();
    let store = store_with_three_clusters(url).await;
    assert_eq!(
        store.prune_generations(keep).await.unwrap(),
        PruneStats::default(),
        "empty store: nothing to prune"
    );
    let cfg = EngineConfig {
        max_step: None,
        params: Params::Performance,
        keep_generations: keep,
        ..EngineConfig::default()
    };
    let engine = engine_on(&store, cfg.clone()).await;
    for c in ["c2", "c3"] {
        store
            .store_report(&web_capacity(c, now_ms(), 1000.0))
            .await
            .unwrap();
    }
    // Round i makes c2 (even i) or c3 (odd i) the near one, so every round publishes.
    let flip = |i: i64| {
        let (a, b) = if i % 2 == 0 { (5.0, 80.0) } else { (80.0, 5.0) };
        report_of(
            "c1",
            "n1",
            now_ms(),
            &[("c2", a), ("c3", b)],
            &[("ns/web", "c2", 100.0)],
            &[],
        )
    };
    let ack1 = AckRecord {
        cluster_id: "c1".into(),
        node_name: "n1".into(),
        service: "ns/web".into(),
        generation: 1,
        applied: true,
        error: String::new(),
        acked_at_ms: 1,
    };
    let mut snapshots: BTreeMap<i64, Vec<WeightRecord>> = BTreeMap::new();
    for i in 0..K + 5 {
        store.store_report(&flip(i)).await.unwrap();
        let g = i64::try_from(engine.run_round().await.unwrap()).unwrap();
        assert_eq!(g, i + 1, "every round publishes");
        if g == 1 {
            store.ack(&ack1).await.unwrap();
        }
        let w = store.weights_of(g).await.unwrap();
        assert!(!w.is_empty());
        snapshots.insert(g, w);
        let oldest = (g - K + 1).max(1);
        assert_eq!(
            store.generations().await.unwrap(),
            (oldest..=g).collect::<Vec<_>>(),
            "after publishing {g}: the newest {K} at most"
        );
    }
    let last = K + 5;
    let oldest = last - K + 1;
    for g in 1..=last {
        let w = store.weights_of(g).await.unwrap();
        if g < oldest {
            assert!(w.is_empty(), "generation {g} was pruned: {w:?}");
        } else {
            assert_eq!(w, snapshots[&g], "kept generation {g} is intact");
        }
    }
    // The latest weights in the store are the engine's current ones (what `admin weights`
    // and watchers are served) and flipped from the previous generation.
    let current = engine.current();
    assert_eq!(current.generation, u64::try_from(last).unwrap());
    let stored: BTreeMap<(String, String, String), f64> = snapshots[&last]
        .iter()
        .map(|w| ((w.service.clone(), w.src.clone(), w.dst.clone()), w.weight))
        .collect();
    let served: BTreeMap<(String, String, String), f64> = current
        .entries
        .iter()
        .flat_map(|((svc, src), e)| {
            e.weights
                .iter()
                .map(move |(dst, w)| ((svc.clone(), src.clone(), dst.clone()), *w))
        })
        .collect();
    assert_eq!(stored, served);
    let c1 = &current.entries[&web_c1()].weights;
    assert!(
        c1["c3"] > 0.9,
        "round {} made c3 the near one: {c1:?}",
        last - 1
    );
    assert_ne!(snapshots[&last], snapshots[&(last - 1)]);
    // One solver run per round; the runs of pruned generations are gone.
    let runs = store.solver_runs(100).await.unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| (r.id, r.generation))
            .collect::<Vec<_>>(),
        (oldest..=last).rev().map(|g| (g, g)).collect::<Vec<_>>()
    );
    assert_eq!(store.last_run_id().await.unwrap(), last);
    assert_eq!(store.last_generation().await.unwrap(), last);
    assert_eq!(
        c1_n1(&store).await.acked_generation,
        1,
        "acks are not pruned (one row per agent and service)"
    );
    assert_eq!(
        store.prune_generations(keep).await.unwrap(),
        PruneStats::default(),
        "already pruned"
    );

    // Restart: a new store connection and engine continue both sequences.
    drop(engine);
    store.close().await;
    let store = Store::connect(url).await.unwrap();
    let engine = engine_on(&store, cfg).await;
    assert_eq!(engine.current().generation, u64::try_from(last).unwrap());
    assert_eq!(engine.current().entries, current.entries);
    store.store_report(&flip(last)).await.unwrap();
    assert_eq!(
        engine.run_round().await.unwrap(),
        u64::try_from(last + 1).unwrap()
    );
    assert_eq!(
        store.generations().await.unwrap(),
        (oldest + 1..=last + 1).collect::<Vec<_>>()
    );
    assert_eq!(store.solver_runs(1).await.unwrap()[0].id, last + 1);

    // Generations store only the pairs that changed: fewer rows than whole snapshots.
    let rows_before = store.weight_rows().await.unwrap();
    let snapshot_rows: usize = (oldest + 1..=last).map(|g| snapshots[&g].len()).sum();
    assert!(
        rows_before < i64::try_from(snapshot_rows).unwrap() + 6,
        "{rows_before} rows for {K} generations of 6"
    );
    // Pruning to one generation: the counts of what went, and the newest stays whole, with
    // nothing else left in the table.
    let newest = store.weights_of(last + 1).await.unwrap();
    let stats = store
        .prune_generations(NonZeroU64::new(1).unwrap())
        .await
        .unwrap();
    let rows_after = store.weight_rows().await.unwrap();
    assert_eq!(rows_after, i64::try_from(newest.len()).unwrap());
    assert_eq!(
        stats,
        PruneStats {
            up_to_generation: last,
            generations: 2,
            weights: u64::try_from(rows_before - rows_after).unwrap(),
            solver_runs: 2,
        }
    );
    assert!(stats.weights > 0);
    assert_eq!(store.generations().await.unwrap(), vec![last + 1]);
    assert_eq!(store.weights_of(last + 1).await.unwrap(), newest);
    assert_eq!(store.last_generation().await.unwrap(), last + 1);

    // Rounds that publish nothing record runs of the current generation, which generation
    // pruning never reaches: they are bounded to the newest K runs too.
    let first = store.last_run_id().await.unwrap() + 1;
    for id in first..first + 5 {
        store.record_run(&run(id, last + 1)).await.unwrap();
    }
    assert_eq!(store.solver_runs(100).await.unwrap().len(), 6);
    assert_eq!(store.prune_solver_runs(keep).await.unwrap(), 3);
    assert_eq!(
        store
            .solver_runs(100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        vec![first + 4, first + 3, first + 2],
        "the newest {K} runs stay"
    );
    assert_eq!(store.last_run_id().await.unwrap(), first + 4);
    assert_eq!(store.prune_solver_runs(keep).await.unwrap(), 0);
    assert_eq!(store.generations().await.unwrap(), vec![last + 1]);
    store.close().await;
}

on_both_backends!(
    retention_scenario: retention_sqlite_keeps_newest_generations,
    retention_postgres_keeps_newest_generations
);
