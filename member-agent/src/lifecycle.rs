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
//! Known race (not yet handled): `helm uninstall` deletes the ServiceAccount, Role and
//! RoleBinding right after the DaemonSet, while the pods get SIGTERM only once the garbage
//! collector reaches them; if the agent's token or grant is gone by then its look-up fails
//! (401/403) and it keeps steering. The fix is to learn the owner's deletion before SIGTERM
//! (a watch on the one DaemonSet from start, `list`/`watch` on it); until then the chart
//! should keep the agent's RBAC objects alive across the uninstall of the DaemonSet.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};

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

/// The decision for `mode`; `kubernetes` says whether the agent runs with Kubernetes
/// discovery (without it `auto` is `never`). Reads `POD_NAME`/`POD_NAMESPACE` and the
/// in-cluster configuration for `auto`.
pub async fn decide(mode: DetachMode, kubernetes: bool) -> Decision {
    match mode {
        DetachMode::Always => Decision::Detach("--detach-on-exit always".into()),
        DetachMode::Never => Decision::Keep("--detach-on-exit never".into()),
        DetachMode::Auto if !kubernetes => {
            Decision::Keep("--detach-on-exit auto without Kubernetes discovery".into())
        }
        DetachMode::Auto => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let (Some(pod), Some(ns)) = (env("POD_NAME"), env("POD_NAMESPACE")) else {
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
