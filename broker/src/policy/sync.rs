//! Applies the policy CRDs (see [`ballast_k8s_api::policy`]) to a running broker.
//!
//! When the broker runs in a cluster, the `LoadBalancingPolicy` / `ServiceLoadBalancingPolicy`
//! objects are the declared source of truth. Every [`PolicySettings`] the watcher publishes —
//! after each complete (re)list of both kinds (broker start, every watch restart) and on
//! every change after that — is written as a whole: the store's CRD-made policy records
//! (scope `""` for the cluster-wide pair, the service name for an override; origin `crd`) are
//! made equal to the settings in one transaction ([`Store::sync_crd_policies`]), so an
//! override whose object was deleted while the broker was down or the watch was broken is
//! removed, and nothing is half-applied. Then a solver round is triggered.
//!
//! Precedence: the CRD wins. A CRD record replaces an admin record of its scope, and
//! `admin policy set/clear` on a scope a CRD holds is refused, naming the object. Records
//! set through the admin API for scopes no object names are never touched. With no
//! `default` LoadBalancingPolicy object the cluster-wide record is the admin one (or the
//! broker's flags). An object that exists but is invalid is reported (log, its `status`)
//! and its last accepted record stays — also across a broker restart, when only the store
//! remembers it.
//!
//! [`Store::sync_crd_policies`]: ballast_store::Store::sync_crd_policies

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::settings::PolicySettings;
use crate::engine::{now_ms, Engine};
use ballast_k8s_api::policy::CLUSTER_POLICY_NAME;
use ballast_store::{CrdPolicy, CrdPriceRecord, CrdSync, StoreError};

/// The `source` of the cluster-wide record: the `default` LoadBalancingPolicy.
#[must_use]
pub fn cluster_source() -> String {
    format!("LoadBalancingPolicy/{CLUSTER_POLICY_NAME}")
}

/// The `source` of a per-service record: `ServiceLoadBalancingPolicy/NAMESPACE/NAME` (the
/// spelling of [`Rejected::object`](super::Rejected::object)).
#[must_use]
pub fn service_source(namespace_name: &str) -> String {
    format!("ServiceLoadBalancingPolicy/{namespace_name}")
}

/// The CRD records `settings` ask for, and the objects whose stored records stay although
/// not asked for (rejected now: their last accepted value stays in force).
#[must_use]
pub fn desired_records(settings: &PolicySettings) -> (Vec<CrdPolicy>, BTreeSet<String>) {
    let mut desired = Vec::new();
    if settings.from_crd {
        desired.push(CrdPolicy {
            scope: String::new(),
            policy: settings.cluster.policy.to_string(),
            params: settings.cluster.params.to_string(),
            source: cluster_source(),
        });
    }
    for (service, ov) in &settings.services {
        let (policy, params) = settings.for_service(service);
        desired.push(CrdPolicy {
            scope: service.clone(),
            policy: policy.to_string(),
            params: params.to_string(),
            source: service_source(&ov.source),
        });
    }
    let keep = settings.rejected.iter().map(|r| r.object.clone()).collect();
    (desired, keep)
}

/// Makes the engine's CRD-made policy records equal `settings` (one transaction) and asks
/// for a solver round when anything changed.
///
/// # Errors
/// A store error; then nothing was changed.
pub async fn apply_settings(
    engine: &Engine,
    settings: &PolicySettings,
) -> Result<CrdSync, StoreError> {
    let (desired, keep) = desired_records(settings);
    let sync = engine
        .store()
        .sync_crd_policies(&desired, &keep, now_ms())
        .await?;
    // The price rows of the `default` object, unless it is rejected now (then the rows last
    // applied stay, as its policy does).
    let default_rejected = settings
        .rejected
        .iter()
        .any(|r| r.object == cluster_source());
    let prices_changed = if default_rejected {
        false
    } else {
        let rows: Vec<CrdPriceRecord> = settings
            .egress_prices
            .iter()
            .map(|r| CrdPriceRecord {
                provider: r.provider.clone(),
                from_region: r.from.clone(),
                to_region: r.to.clone(),
                usd_per_gb: r.usd_per_gb,
                note: r.note.clone().unwrap_or_default(),
            })
            .collect();
        engine.store().sync_crd_prices(&rows).await?
    };
    if prices_changed {
        info!(
            rows = settings.egress_prices.len(),
            "egress prices of the LoadBalancingPolicy applied"
        );
    }
    for r in &settings.rejected {
        warn!(object = %r.object, error = %r.error, "policy object rejected; last accepted value stays");
    }
    for scope in &sync.replaced_admin {
        warn!(scope = %scope, "a policy CRD replaced the override set through the admin API (the CRD wins)");
    }
    if !sync.kept.is_empty() {
        info!(scopes = ?sync.kept, "invalid policy objects: their last accepted records stay");
    }
    info!(
        policy = %settings.cluster.policy,
        params = %settings.cluster.params,
        overrides = settings.services.len(),
        written = sync.written.len(),
        deleted = ?sync.deleted,
        "policy CRDs applied"
    );
    if prices_changed || !sync.written.is_empty() || !sync.deleted.is_empty() {
        engine.trigger();
    }
    Ok(sync)
}

/// Longest wait between retries of a failed apply.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Follows the watcher's channel until it closes, applying every value the watcher sends.
///
/// The channel's initial value (before the watcher has listed both kinds) is never applied:
/// writing it would delete every CRD record until the list completes. A failed apply (store
/// unreachable) is retried with backoff from 1 s to 30 s, or at the next value, whichever
/// comes first.
pub async fn follow(engine: Arc<Engine>, mut rx: watch::Receiver<PolicySettings>) {
    if rx.changed().await.is_err() {
        return;
    }
    loop {
        let settings = rx.borrow_and_update().clone();
        let mut delay = Duration::from_secs(1);
        let newer = loop {
            match apply_settings(&engine, &settings).await {
                Ok(_) => break false,
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "applying policy CRDs failed; nothing was changed");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => delay = (delay * 2).min(MAX_RETRY),
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A newer value (already marked seen): apply that one instead.
                    break true;
                }
            }
        };
        if !newer && rx.changed().await.is_err() {
            return;
        }
    }
}
