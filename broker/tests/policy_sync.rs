//! The policy CRDs' settings written into a real broker engine (SQLite store).

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_broker::engine::{Engine, EngineConfig, PolicyChange};
use ballast_broker::metrics::Metrics;
use ballast_broker::policy::sync::apply_settings;
use ballast_broker::policy::{ClusterPolicy, PolicySettings, Rejected, ServiceOverride};
use ballast_model::{Params, Policy};
use ballast_store::Store;

async fn engine(dir: &tempfile::TempDir) -> Engine {
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());
    let store = Store::connect(&url).await.expect("sqlite store");
    Engine::load(store, EngineConfig::default(), Arc::new(Metrics::new()))
        .await
        .expect("engine")
}

fn settings(cluster: Option<Policy>, overrides: &[(&str, Policy)]) -> PolicySettings {
    let mut s = PolicySettings::defaults(ClusterPolicy {
        policy: Policy::Optimized,
        params: Params::Mixed,
    });
    if let Some(p) = cluster {
        s.cluster.policy = p;
        s.from_crd = true;
    }
    s.services = overrides
        .iter()
        .map(|(name, p)| {
            (
                (*name).to_string(),
                ServiceOverride {
                    source: format!("{name}-policy"),
                    policy: Some(*p),
                    params: None,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    s
}

#[tokio::test]
async fn crd_settings_become_the_engines_policy_and_a_deleted_override_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(&dir).await;
    assert_eq!(
        engine.policy_of("demo/web").await.expect("policy").0,
        Policy::Optimized
    );

    let s = settings(
        Some(Policy::WeightedRoundRobin),
        &[("demo/web", Policy::RoundRobin)],
    );
    let sync = apply_settings(&engine, &s).await.expect("apply");
    assert_eq!(sync.written, ["", "demo/web"]);
    assert_eq!(
        engine.policy_of("").await.expect("policy").0,
        Policy::WeightedRoundRobin
    );
    assert_eq!(
        engine.policy_of("demo/web").await.expect("policy").0,
        Policy::RoundRobin
    );
    assert_eq!(
        engine.policy_of("demo/other").await.expect("policy").0,
        Policy::WeightedRoundRobin
    );

    // The override's object is deleted: the service follows the cluster-wide policy again.
    let s = settings(Some(Policy::WeightedRoundRobin), &[]);
    let sync = apply_settings(&engine, &s).await.expect("apply");
    assert_eq!(sync.deleted, ["demo/web"]);
    assert_eq!(
        engine.policy_of("demo/web").await.expect("policy").0,
        Policy::WeightedRoundRobin
    );
}

#[tokio::test]
async fn deleting_the_default_object_falls_back_to_the_admin_record_or_the_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(&dir).await;
    let s = settings(Some(Policy::RoundRobin), &[]);
    apply_settings(&engine, &s).await.expect("apply");
    // While the `default` object exists it holds the cluster-wide scope: admin is refused.
    let e = engine
        .set_policy(
            "",
            PolicyChange::Set {
                policy: Some(Policy::Optimized),
                params: None,
            },
        )
        .await
        .expect_err("held by the CRD");
    assert!(e.to_string().contains("LoadBalancingPolicy/default"), "{e}");
    // The default object is deleted: its record goes, the flags apply again.
    apply_settings(&engine, &settings(None, &[]))
        .await
        .expect("apply");
    assert_eq!(
        engine.policy_of("").await.expect("policy").0,
        Policy::Optimized
    );
    // A cluster-wide record set through the admin API is not the CRD's to delete.
    engine
        .set_policy(
            "",
            PolicyChange::Set {
                policy: Some(Policy::WeightedRoundRobin),
                params: None,
            },
        )
        .await
        .expect("admin set");
    apply_settings(&engine, &settings(None, &[]))
        .await
        .expect("apply");
    assert_eq!(
        engine.policy_of("").await.expect("policy").0,
        Policy::WeightedRoundRobin
    );
}

#[tokio::test]
async fn an_invalid_object_keeps_its_stored_record_even_with_nothing_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(&dir).await;
    apply_settings(
        &engine,
        &settings(None, &[("demo/web", Policy::RoundRobin)]),
    )
    .await
    .expect("apply");
    // After a restart the object is invalid: nothing in memory names its last good value,
    // the store does; it stays (the object is reported rejected by the watcher).
    let mut s = settings(None, &[]);
    s.rejected.push(Rejected {
        object: "ServiceLoadBalancingPolicy/demo/web-policy".into(),
        error: "spec.serviceDiscoveryLoadBalancing: \"fastest\"".into(),
    });
    let sync = apply_settings(&engine, &s).await.expect("apply");
    assert_eq!(sync.kept, ["demo/web"]);
    assert_eq!(
        engine.policy_of("demo/web").await.expect("policy").0,
        Policy::RoundRobin
    );
    // Once the object is deleted, the record goes.
    let sync = apply_settings(&engine, &settings(None, &[]))
        .await
        .expect("apply");
    assert_eq!(sync.deleted, ["demo/web"]);
}

#[tokio::test]
async fn crd_egress_prices_are_stored_replaced_and_kept_while_the_object_is_rejected() {
    use ballast_k8s_api::policy::EgressPriceRow;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(&dir).await;
    let row = |from: &str, usd_per_gb: f64| EgressPriceRow {
        provider: "aws".into(),
        from: from.into(),
        to: "*".into(),
        usd_per_gb,
        note: None,
    };
    let mut s = settings(Some(Policy::Optimized), &[]);
    s.egress_prices = vec![row("sa-east-1", 0.018), row("ap-southeast-1", 0.04)];
    apply_settings(&engine, &s).await.expect("apply");
    let stored = engine.store().crd_prices().await.expect("rows");
    assert_eq!(
        stored
            .iter()
            .map(|r| (r.from_region.as_str(), r.usd_per_gb))
            .collect::<Vec<_>>(),
        [("sa-east-1", 0.018), ("ap-southeast-1", 0.04)]
    );
    // The object is rejected now (a bad edit): the rows last applied stay.
    let mut bad = s.clone();
    bad.egress_prices.clear();
    bad.rejected.push(Rejected {
        object: "LoadBalancingPolicy/default".into(),
        error: "spec.egressPrices[0].usdPerGb: -1 is not a finite non-negative price".into(),
    });
    apply_settings(&engine, &bad).await.expect("apply");
    assert_eq!(engine.store().crd_prices().await.expect("rows").len(), 2);
    // Accepted without prices: none any more.
    let mut none = s.clone();
    none.egress_prices.clear();
    apply_settings(&engine, &none).await.expect("apply");
    assert!(engine.store().crd_prices().await.expect("rows").is_empty());
}
