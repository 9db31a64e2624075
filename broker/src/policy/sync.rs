//! Applies the policy CRDs (see [`ballast_k8s_api::policy`]) to a running broker.
//!
//! When the broker runs in a cluster, the `LoadBalancingPolicy` / `ServiceLoadBalancingPolicy`
//! objects are the source of truth: each change of the watcher's [`PolicySettings`] is
//! written to the store as policy records (scope `""` for the cluster-wide pair, the service
//! name for an override) — the same records `admin policy set` writes — and a solver round is
//! triggered. With no `default` LoadBalancingPolicy object the cluster-wide record is left as
//! it is (the broker's flags or `admin policy set`). An override whose object was deleted is removed from the store, so the service
//! falls back to the cluster-wide pair. Overrides set through the admin API for services no
//! object names are left alone.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use super::settings::PolicySettings;
use crate::engine::{now_ms, Engine};
use ballast_store::{PolicyRecord, StoreError};

/// Writes `settings` into the engine's store. `applied` is the set of services the previous
/// call wrote overrides for; the set written by this call is returned (pass it to the next).
///
/// # Errors
/// A store error; the records already written stay (each is a whole record).
pub async fn apply_settings(
    engine: &Engine,
    settings: &PolicySettings,
    applied: &BTreeSet<String>,
) -> Result<BTreeSet<String>, StoreError> {
    let store = engine.store();
    let now = now_ms();
    if settings.from_crd {
        store
            .set_policy(
                &PolicyRecord {
                    scope: String::new(),
                    policy: settings.cluster.policy.to_string(),
                    params: settings.cluster.params.to_string(),
                },
                now,
            )
            .await?;
    }
    let mut written = BTreeSet::new();
    for service in settings.services.keys() {
        let (policy, params) = settings.for_service(service);
        store
            .set_policy(
                &PolicyRecord {
                    scope: service.clone(),
                    policy: policy.to_string(),
                    params: params.to_string(),
                },
                now,
            )
            .await?;
        written.insert(service.clone());
    }
    for gone in applied.difference(&written) {
        store.delete_policy(gone).await?;
    }
    for r in &settings.rejected {
        warn!(object = %r.object, error = %r.error, "policy object rejected; last accepted value stays");
    }
    info!(
        policy = %settings.cluster.policy,
        params = %settings.cluster.params,
        overrides = written.len(),
        "policy CRDs applied"
    );
    engine.trigger();
    Ok(written)
}

/// Follows the watcher's channel until it closes, applying every change.
pub async fn follow(engine: Arc<Engine>, mut rx: watch::Receiver<PolicySettings>) {
    let mut applied = BTreeSet::new();
    loop {
        let settings = rx.borrow_and_update().clone();
        match apply_settings(&engine, &settings, &applied).await {
            Ok(now) => applied = now,
            Err(e) => warn!(error = %e, "applying policy CRDs failed; retried on the next change"),
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
