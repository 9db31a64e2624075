//! What to do with the data plane on exit (`--detach-on-exit`).
//!
//! `always` and `never` are what they say. `auto` (the chart's default) tells an uninstall
//! from a restart: on SIGTERM it reads this pod (`POD_NAME`, `POD_NAMESPACE` from the
//! downward API), follows its `DaemonSet` ownerReference and detaches only when that
//! DaemonSet is gone (404; `helm uninstall` deletes it with background propagation, before
//! the garbage collector deletes the pods) or carries a `deletionTimestamp` (foreground
//! deletion). A rolling update, a restart, an eviction or a node drain keep the DaemonSet, so
//! steering stays pinned for the next agent. Whenever the answer is not certain (no
//! Kubernetes, no pod identity, an API error, a DaemonSet of the same name with another uid)
//! the agent keeps steering: leaving hooks attached for a moment is recoverable (the next agent
//! adopts them), detaching under a live install drops traffic steering on the node.
//!
//! RBAC this needs: `get` on `pods` and on `daemonsets` (group `apps`) in the agent's
//! namespace.
//!
//! The race with the uninstall: `helm uninstall` deletes the ServiceAccount, Role and
//! RoleBinding right after the DaemonSet, while the pods get SIGTERM only once the garbage
//! collector reaches them, so a look-up at SIGTERM may find its token or grant gone (401/403).
//! So the agent also watches its one DaemonSet from the start ([`OwnerWatch`]: `list`/`watch`
//! on `daemonsets` with a field selector on its name) and remembers a deletion it saw; at
//! SIGTERM a remembered deletion decides, the live look-up only confirms otherwise.
//! RBAC: `get` on `pods`; `get`, `list`, `watch` on `daemonsets` (group `apps`).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::DetachMode;

/// How long the owner look-up may take on shutdown before the agent keeps steering.
pub const OWNER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The decision, with why (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Detach(String),
    Keep(String),
}

impl Decision {
    #[must_use]
    pub fn detach(&self) -> bool {
        matches!(self, Self::Detach(_))
    }
}

/// `auto`'s look-up: pod `namespace/pod` → its DaemonSet owner → gone or being deleted?
pub async fn owner_decision(client: &Client, namespace: &str, pod: &str) -> Decision {
    let p = match Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod)
        .await
    {
        Ok(p) => p,
        Err(e) => return Decision::Keep(format!("cannot read pod {namespace}/{pod}: {e}")),
    };
    let Some(owner) = p
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|o| o.kind == "DaemonSet" && o.api_version.starts_with("apps/"))
    else {
        return Decision::Keep(format!("pod {namespace}/{pod} is not owned by a DaemonSet"));
    };
    match Api::<DaemonSet>::namespaced(client.clone(), namespace)
        .get_opt(&owner.name)
        .await
    {
        Ok(None) => Decision::Detach(format!("DaemonSet {namespace}/{} is gone", owner.name)),
        Ok(Some(ds)) if ds.metadata.uid.as_deref() != Some(owner.uid.as_str()) => {
            Decision::Keep(format!(
                "DaemonSet {namespace}/{} was replaced (uid {:?}, this pod's owner {}): the \
                 new one adopts the pins",
                owner.name, ds.metadata.uid, owner.uid
            ))
        }
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => Decision::Detach(format!(
            "DaemonSet {namespace}/{} is being deleted",
            owner.name
        )),
        Ok(Some(_)) => Decision::Keep(format!(
            "DaemonSet {namespace}/{} stays (restart, update or drain)",
            owner.name
        )),
        Err(e) => Decision::Keep(format!(
            "cannot read DaemonSet {namespace}/{}: {e}",
            owner.name
        )),
    }
}

/// A watch on this pod's owning DaemonSet, started with the agent: remembers its deletion
/// (or a `deletionTimestamp`) as soon as the API server reports it. The task stops on drop.
#[derive(Debug)]
pub struct OwnerWatch {
    gone: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OwnerWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OwnerWatch {
    /// Starts watching the DaemonSet owning pod `namespace/pod` (read first; retried every
    /// `retry` while it cannot be read).
    #[must_use]
    pub fn start(client: Client, namespace: String, pod: String, retry: Duration) -> Self {
        let (tx, gone) = watch::channel(None);
        let task = tokio::spawn(async move {
            let owner = loop {
                match Api::<Pod>::namespaced(client.clone(), &namespace)
                    .get(&pod)
                    .await
                {
                    Ok(p) => {
                        break p
                            .metadata
                            .owner_references
                            .unwrap_or_default()
                            .into_iter()
                            .find(|o| o.kind == "DaemonSet" && o.api_version.starts_with("apps/"));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read this pod for its owner; retrying");
                        tokio::time::sleep(retry).await;
                    }
                }
            };
            let Some(owner) = owner else {
                tracing::info!(
                    "this pod has no DaemonSet owner: --detach-on-exit auto keeps steering"
                );
                return;
            };
            let api = Api::<DaemonSet>::namespaced(client, &namespace);
            let cfg = watcher::Config::default().fields(&format!("metadata.name={}", owner.name));
            let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
            while let Some(ev) = events.next().await {
                let ours = |ds: &DaemonSet| ds.metadata.uid.as_deref() == Some(owner.uid.as_str());
                let why = match ev {
                    Ok(watcher::Event::Delete(ds)) if ours(&ds) => {
                        format!("DaemonSet {namespace}/{} was deleted", owner.name)
                    }
                    Ok(watcher::Event::Apply(ds) | watcher::Event::InitApply(ds))
                        if ours(&ds) && ds.metadata.deletion_timestamp.is_some() =>
                    {
                        format!("DaemonSet {namespace}/{} is being deleted", owner.name)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "watching this pod's DaemonSet");
                        continue;
                    }
                };
                tracing::info!(%why, "owner going away: the data plane will be detached on exit");
                let _ = tx.send(Some(why));
                return;
            }
        });
        Self { gone, task }
    }

    /// Why the owner is going away, if the watch saw it.
    #[must_use]
    pub fn gone(&self) -> Option<String> {
        self.gone.borrow().clone()
    }

    /// Waits until the watch saw the owner go (for tests and a short grace at exit).
    pub async fn wait_gone(&mut self) -> Option<String> {
        self.gone
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|g| g.clone())
    }
}

/// `auto` with Kubernetes: the owner watch, when `POD_NAME`/`POD_NAMESPACE` and a client are
/// there (else `None`: the exit decision then has only its look-up).
pub async fn start_owner_watch(mode: DetachMode, kubernetes: bool) -> Option<OwnerWatch> {
    if mode != DetachMode::Auto || !kubernetes {
        return None;
    }
    let (pod, ns) = pod_identity()?;
    let client = Client::try_default().await.ok()?;
    Some(OwnerWatch::start(client, ns, pod, Duration::from_secs(10)))
}

fn pod_identity() -> Option<(String, String)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Some((env("POD_NAME")?, env("POD_NAMESPACE")?))
}

/// The decision for `mode`; `kubernetes` says whether the agent runs with Kubernetes
/// discovery (without it `auto` is `never`). Reads `POD_NAME`/`POD_NAMESPACE` and the
/// in-cluster configuration for `auto`.
pub async fn decide(mode: DetachMode, kubernetes: bool, owner: Option<&OwnerWatch>) -> Decision {
    if let Some(why) = owner.and_then(OwnerWatch::gone) {
        return Decision::Detach(why);
    }
    match mode {
        DetachMode::Always => Decision::Detach("--detach-on-exit always".into()),
        DetachMode::Never => Decision::Keep("--detach-on-exit never".into()),
        DetachMode::Auto if !kubernetes => {
            Decision::Keep("--detach-on-exit auto without Kubernetes discovery".into())
        }
        DetachMode::Auto => {
            let Some((pod, ns)) = pod_identity() else {
                return Decision::Keep(
                    "--detach-on-exit auto: POD_NAME and POD_NAMESPACE are not set (downward API)"
                        .into(),
                );
            };
            let client = match Client::try_default().await {
                Ok(c) => c,
                Err(e) => return Decision::Keep(format!("no Kubernetes client: {e}")),
            };
            match tokio::time::timeout(OWNER_LOOKUP_TIMEOUT, owner_decision(&client, &ns, &pod))
                .await
            {
                Ok(d) => d,
                Err(_) => Decision::Keep(format!(
                    "owner look-up took more than {}s",
                    OWNER_LOOKUP_TIMEOUT.as_secs()
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests;
