//! The policy CRDs' settings written into a real broker engine (SQLite store).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ballast_broker::engine::{Engine, EngineConfig};
use ballast_broker::metrics::Metrics;
use ballast_broker::policy::sync::apply_settings;
use ballast_broker::policy::{ClusterPolicy, PolicySettings, ServiceOverride};
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
    let applied = apply_settings(&engine, &s, &BTreeSet::new())
        .await
        .expect("apply");
    assert_eq!(applied, BTreeSet::from(["demo/web".to_string()]));
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
    let applied = apply_settings(&engine, &s, &applied).await.expect("apply");
    assert!(applied.is_empty());
    assert_eq!(
        engine.policy_of("demo/web").await.expect("policy").0,
        Policy::WeightedRoundRobin
    );
}

#[tokio::test]
async fn no_cluster_object_leaves_the_cluster_wide_policy_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(&dir).await;
    let s = settings(Some(Policy::RoundRobin), &[]);
    apply_settings(&engine, &s, &BTreeSet::new())
        .await
        .expect("apply");
    // The default object is deleted: settings fall back to the flags, but the store keeps the
    // last cluster-wide record (an operator may also have set it with `admin policy set`).
    let s = settings(None, &[]);
    apply_settings(&engine, &s, &BTreeSet::new())
        .await
        .expect("apply");
    assert_eq!(
        engine.policy_of("").await.expect("policy").0,
        Policy::RoundRobin
    );
}
