//! The in-cluster watcher: reflects LoadBalancingPolicy and ServiceLoadBalancingPolicy
//! objects, resolves them into [`PolicySettings`] on every change, publishes them on a
//! `watch` channel, and writes the broker's verdict to each object's `status`.

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use ballast_k8s_api::policy::{LoadBalancingPolicy, ServiceLoadBalancingPolicy};

use super::settings::{ClusterPolicy, PolicySettings};

/// The environment variable the broker chart sets (`policyCrd.watch`) to turn the watcher on.
pub const WATCH_ENV: &str = "BALLAST_WATCH_POLICY_CRDS";

/// Why the in-cluster watcher could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WatchSetupError {
    #[error("{WATCH_ENV}: invalid value {0:?}, expected true or false")]
    InvalidEnv(String),
    #[error("{WATCH_ENV}=true but no Kubernetes API is reachable (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[from] kube::Error),
}

/// Whether the watcher is wanted, from the value of [`WATCH_ENV`] (unset or empty: no).
///
/// # Errors
/// A value other than `true`/`false`/`1`/`0` (any case), naming the variable.
pub fn watch_enabled(value: Option<&str>) -> Result<bool, WatchSetupError> {
    match value.map(str::trim) {
        None | Some("") => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
        Some(v) => Err(WatchSetupError::InvalidEnv(v.to_string())),
    }
}

/// The broker's entry point: when [`WATCH_ENV`] says so, connects to the Kubernetes API
/// (in-cluster service account, else `KUBECONFIG`) and starts [`spawn_policy_watcher`];
/// `Ok(None)` when the variable is unset or false (the broker then uses `fallback` alone).
///
/// ```no_run
/// # async fn f() -> anyhow::Result<()> {
/// use ballast_broker::policy::{spawn_policy_watcher_from_env, ClusterPolicy};
/// use ballast_model::{Params, Policy};
/// let fallback = ClusterPolicy { policy: Policy::Optimized, params: Params::Mixed };
/// if let Some(mut rx) = spawn_policy_watcher_from_env(fallback).await? {
///     while rx.changed().await.is_ok() {
///         let settings = rx.borrow_and_update().clone();
///         // settings.apply_to(&mut problem) before each solve
///         # let _ = settings;
///     }
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
/// An invalid [`WATCH_ENV`] value, or no reachable API when it is true.
pub async fn spawn_policy_watcher_from_env(
    fallback: ClusterPolicy,
) -> Result<Option<watch::Receiver<PolicySettings>>, WatchSetupError> {
    if !watch_enabled(std::env::var(WATCH_ENV).ok().as_deref())? {
        return Ok(None);
    }
    let client = Client::try_default().await?;
    Ok(Some(spawn_policy_watcher(client, fallback)))
}

/// Writes each object's [`PolicyStatus`] where it differs from what the object carries (so
/// the status update's own watch event writes nothing). Failures (RBAC, conflicts) are
/// logged: status is a report, the settings do not depend on it.
async fn write_statuses(
    client: &Client,
    settings: &PolicySettings,
    cluster: &[LoadBalancingPolicy],
    services: &[ServiceLoadBalancingPolicy],
) {
    let params = PatchParams::default();
    for obj in cluster {
        let name = obj.name_any();
        let note = if settings.from_crd {
            "applied cluster-wide"
        } else {
            "not applied"
        };
        let want = settings.status_of(
            &format!("LoadBalancingPolicy/{name}"),
            obj.metadata.generation,
            note,
        );
        if obj.status.as_ref() != Some(&want) {
            let api = Api::<LoadBalancingPolicy>::all(client.clone());
            let patch = Patch::Merge(serde_json::json!({ "status": want }));
            if let Err(e) = api.patch_status(&name, &params, &patch).await {
                tracing::warn!(object = %name, error = %e, "writing LoadBalancingPolicy status failed");
            }
        }
    }
    for obj in services {
        let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
            continue;
        };
        let note = format!(
            "applied to ServiceImport {ns}/{}",
            obj.spec.service_import_name
        );
        let want = settings.status_of(
            &format!("ServiceLoadBalancingPolicy/{ns}/{name}"),
            obj.metadata.generation,
            &note,
        );
        if obj.status.as_ref() != Some(&want) {
            let api = Api::<ServiceLoadBalancingPolicy>::namespaced(client.clone(), &ns);
            let patch = Patch::Merge(serde_json::json!({ "status": want }));
            if let Err(e) = api.patch_status(&name, &params, &patch).await {
                tracing::warn!(object = %format!("{ns}/{name}"), error = %e, "writing ServiceLoadBalancingPolicy status failed");
            }
        }
    }
}

/// One watcher event of either kind; `true` when it is `InitDone`: a (re)list of that kind
/// is complete and its reflector store now holds exactly the listed objects.
enum Update {
    Cluster(bool),
    Service(bool),
}

/// Starts the watcher task: it watches every [`LoadBalancingPolicy`] and
/// [`ServiceLoadBalancingPolicy`] (kube-rs reflectors) and publishes the resulting
/// [`PolicySettings`] on the returned channel whenever they change.
///
/// The channel starts at [`PolicySettings::defaults`]`(fallback)`; the first update comes once
/// both kinds have been listed (never a half-listed state). After that, a value is sent on
/// every change, and after every completed relist (`watcher::Event::InitDone`: kube's
/// reflector swaps in the relisted objects only then) even when nothing changed, so that
/// [`sync::follow`](super::sync::follow) makes the store equal the objects that exist after
/// each watch restart. During a relist (`Init`, `InitApply`) the settings stay those of the
/// previous list. Watch errors (API down, RBAC, `410 Gone`) are logged and retried with
/// kube's default backoff, relisting when the API says so; the settings in force stay as
/// they are. The task ends when every receiver is dropped.
#[must_use]
pub fn spawn_policy_watcher(
    client: Client,
    fallback: ClusterPolicy,
) -> watch::Receiver<PolicySettings> {
    let (tx, rx) = watch::channel(PolicySettings::defaults(fallback));
    tokio::spawn(run_policy_watcher(client, fallback, tx));
    rx
}

/// The watcher loop behind [`spawn_policy_watcher`], for callers that manage the task.
pub async fn run_policy_watcher(
    client: Client,
    fallback: ClusterPolicy,
    tx: watch::Sender<PolicySettings>,
) {
    let (cluster_store, cluster_writer) = reflector::store::<LoadBalancingPolicy>();
    let (service_store, service_writer) = reflector::store::<ServiceLoadBalancingPolicy>();
    let cfg = watcher::Config::default();

    let cluster_events = reflector(
        cluster_writer,
        watcher(Api::<LoadBalancingPolicy>::all(client.clone()), cfg.clone()),
    )
    .default_backoff()
    .map(move |r| r.map(|ev| Update::Cluster(matches!(ev, watcher::Event::InitDone))));
    let service_events = reflector(
        service_writer,
        watcher(Api::<ServiceLoadBalancingPolicy>::all(client.clone()), cfg),
    )
    .default_backoff()
    .map(move |r| r.map(|ev| Update::Service(matches!(ev, watcher::Event::InitDone))));
    let mut events = std::pin::pin!(futures::stream::select(cluster_events, service_events));

    let (mut cluster_ready, mut service_ready) = (false, false);
    loop {
        let next = tokio::select! {
            () = tx.closed() => break,
            next = events.next() => next,
        };
        let relisted = match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching load-balancing policies failed; retrying (a relist resyncs the store)");
                continue;
            }
            Some(Ok(Update::Cluster(done))) => {
                cluster_ready |= done;
                done
            }
            Some(Ok(Update::Service(done))) => {
                service_ready |= done;
                done
            }
        };
        if !(cluster_ready && service_ready) {
            continue;
        }
        let cluster: Vec<LoadBalancingPolicy> = cluster_store
            .state()
            .iter()
            .map(|o| (**o).clone())
            .collect();
        let services: Vec<ServiceLoadBalancingPolicy> = service_store
            .state()
            .iter()
            .map(|o| (**o).clone())
            .collect();
        let next = {
            let current = tx.borrow();
            PolicySettings::from_objects(&cluster, &services, fallback, Some(&current))
        };
        let settings = next.clone();
        tx.send_if_modified(|cur| {
            if *cur == next {
                if relisted {
                    tracing::info!(
                        overrides = next.services.len(),
                        "load-balancing policies relisted; resyncing the store"
                    );
                }
                relisted
            } else {
                tracing::info!(
                    policy = ?next.cluster.policy,
                    params = ?next.cluster.params,
                    overrides = next.services.len(),
                    rejected = next.rejected.len(),
                    "load-balancing settings changed"
                );
                *cur = next;
                true
            }
        });
        write_statuses(&client, &settings, &cluster, &services).await;
    }
}
