//! The engine on both backends (its store-free scenarios are unit tests of `engine`): SQLite in a temp dir, PostgreSQL in a fresh
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
use ballast_store::on_both_backends;
use ballast_store::testing::{agent, c1_n1, cluster, report_of, run};
use ballast_store::{sqlite_url, AckRecord, PruneStats, ReportRecord, Store, WeightRecord};
use ballast_types::WeightsStatus;
use support::now_ms;

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
    assert_eq!(
        svc.demand_rps["c1"], 60.0,
        "sum over the agents (a node fact)"
    );
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
/// A report of c1/n1, now: RTT `a` to c2 and `b` to c3, 100 rps of `ns/web` to c2.
fn c1_rtts(a: f64, b: f64) -> ReportRecord {
    report_of(
        "c1",
        "n1",
        now_ms(),
        &[("c2", a), ("c3", b)],
        &[("ns/web", "c2", 100.0)],
        &[],
    )
}

async fn sources_of(engine: &Engine, svc: &str) -> Option<Vec<String>> {
    let inputs = engine.inputs(now_ms()).await.unwrap();
    inputs
        .services
        .get(svc)
        .map(|p| p.problem.services[0].demand_rps.keys().cloned().collect())
}

/// Asserts the sources of `ns/web` and `ns/api`.
async fn assert_web_api_sources(engine: &Engine, web: &[&str], api: &[&str]) {
    for (svc, want) in [("ns/web", web), ("ns/api", api)] {
        let want: Vec<String> = want.iter().map(|c| (*c).to_string()).collect();
        assert_eq!(sources_of(engine, svc).await, Some(want), "{svc}");
    }
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
    assert_web_api_sources(&engine, &["c3"], &["c1"]).await;
    store_reports(&store, &[imports_of("c1", "n2", old, &["ns/api"])]).await;
    assert_eq!(
        sources_of(&engine, "ns/web").await,
        Some(vec!["c1".to_string(), "c3".into()])
    );
    // agents send imports only when they change: a later report without them keeps n2's
    // declaration fresh
    store_reports(&store, &[report_of("c1", "n2", now_ms(), &[], &[], &[])]).await;
    assert_web_api_sources(&engine, &["c3"], &["c1"]).await;

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
    let rtts = c1_rtts;
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
        c1_rtts(a, b)
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

/// Acks are coalesced in memory: [`Engine::ack`] writes nothing, a newer ack of the same
/// (cluster, node, service) replaces the pending one, and every read of acked generations
/// ([`Engine::cluster_status`], the Admin ListClusters) sees them at once (it flushes
/// first; no flusher task runs here). A failed flush keeps them for the next one.
async fn ack_coalescing_scenario(url: &str) {
    let store = store_with_three_clusters(url).await;
    let engine = engine_on(&store, EngineConfig::default()).await;
    let ack = |node: &str, service: &str, generation: i64| AckRecord {
        cluster_id: "c1".into(),
        node_name: node.into(),
        service: service.into(),
        generation,
        applied: true,
        error: String::new(),
        acked_at_ms: generation,
    };
    engine.ack(&ack("n1", "ns/web", 1)).await.unwrap();
    engine.ack(&ack("n1", "ns/web", 3)).await.unwrap();
    engine.ack(&ack("n1", "ns/api", 2)).await.unwrap();
    assert_eq!(engine.pending_acks(), 2, "one per (cluster, node, service)");
    assert!(
        store.acks().await.unwrap().is_empty(),
        "nothing written yet"
    );

    // The Admin read flushes first: the acked generation is exact.
    let report = engine.cluster_status(false).await.unwrap();
    let c1 = report
        .clusters
        .iter()
        .find(|c| c.cluster.cluster_id == "c1")
        .unwrap();
    assert_eq!(c1.nodes[0].acked_generation, 3);
    assert_eq!(engine.pending_acks(), 0);
    assert_eq!(
        store.acks().await.unwrap(),
        vec![ack("n1", "ns/api", 2), ack("n1", "ns/web", 3)]
    );
    assert_eq!(engine.flush_acks().await.unwrap(), 0, "nothing pending");

    // The newest ack of a key wins across flushes too.
    engine.ack(&ack("n1", "ns/web", 4)).await.unwrap();
    assert_eq!(engine.flush_acks().await.unwrap(), 1);
    assert_eq!(c1_n1(&store).await.acked_generation, 4);

    // A failed flush (the store is closed) keeps the acks.
    engine.ack(&ack("n1", "ns/web", 5)).await.unwrap();
    store.close().await;
    assert!(engine.flush_acks().await.is_err());
    assert_eq!(engine.pending_acks(), 1, "kept for the next flush");
    engine.ack(&ack("n1", "ns/web", 6)).await.unwrap();
    assert_eq!(engine.pending_acks(), 1, "the newer ack replaced it");
}

on_both_backends!(ack_coalescing_scenario: ack_coalescing_sqlite, ack_coalescing_postgres);
