//! Discovery: one trait, two sources. A source loads a first [`Catalog`] (or fails), then
//! keeps it current in the background and publishes every changed snapshot on a
//! `tokio::sync::watch` channel. A source that fails to refresh keeps publishing the last
//! good catalog and reports the failure in [`SourceStatus`].
//!
//! - [`topology::TopologyDiscovery`]: a YAML file (the one-host lab, hosts without Kubernetes)
//! - [`kubernetes::KubernetesDiscovery`]: MCS `ServiceImport`/`ServiceExport` and
//!   `EndpointSlice`s watched with kube-runtime reflectors

pub mod kubernetes;
pub mod node;
pub mod topology;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::{Catalog, Cluster};
use crate::config::DiscoveryConfig;

/// Errors of the discovery sources.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("no Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    NoClient(kube::Error),
    #[error("kubernetes watch of {resource}: {message}")]
    Watch {
        resource: &'static str,
        message: String,
    },
    #[error("kubernetes object {object}: {message}")]
    InvalidObject { object: String, message: String },
    #[error(
        "the API server does not serve the MCS API ({group} v1beta1 or v1alpha1; install the \
         MCS CRDs, e.g. with Submariner Lighthouse or Cilium's MCS-API support): {message}",
        group = ballast_k8s_api::mcs::GROUP
    )]
    McsNotServed { message: String },
    #[error("this cluster's topology from its Node: {0}")]
    Node(#[from] node::NodeError),
}

/// How a source is doing: counts of refreshes and the last failure (cleared on success).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    pub last_error: Option<String>,
}

/// A running source: the catalog channel, its status and the background task (aborted on
/// drop).
#[derive(Debug)]
pub struct CatalogWatch {
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub status: watch::Receiver<SourceStatus>,
    task: JoinHandle<()>,
}

impl CatalogWatch {
    pub(crate) fn new(
        catalog: watch::Receiver<Arc<Catalog>>,
        status: watch::Receiver<SourceStatus>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            catalog,
            status,
            task,
        }
    }

    /// The current catalog.
    pub fn current(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }
}

impl Drop for CatalogWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A discovery source.
pub trait Discovery: Send + 'static {
    /// Short name for logs (`topology`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// Loads the first catalog — failing if it cannot — then keeps it current in a
    /// background task.
    fn start(self) -> impl Future<Output = Result<CatalogWatch, DiscoveryError>> + Send;
}

/// Starts the source `cfg` names for cluster `local`.
pub async fn start(
    cfg: &DiscoveryConfig,
    local: &Cluster,
    node_name: &str,
) -> Result<CatalogWatch, DiscoveryError> {
    match cfg {
        DiscoveryConfig::Topology {
            path,
            poll_interval,
        } => {
            topology::TopologyDiscovery {
                path: path.clone(),
                local: local.id.clone(),
                poll_interval: *poll_interval,
            }
            .start()
            .await
        }
        DiscoveryConfig::Kubernetes { clusters } => {
            let client = kube::Client::try_default()
                .await
                .map_err(DiscoveryError::NoClient)?;
            // This cluster's region/zone/provider: flags, then the config file, then the Node.
            let filed = clusters.iter().find(|c| c.id == local.id);
            let unset = |flag: &Option<String>, file: Option<&Option<String>>| {
                flag.is_none() && file.is_none_or(Option::is_none)
            };
            let static_clusters = if unset(&local.region, filed.map(|c| &c.region))
                || unset(&local.zone, filed.map(|c| &c.zone))
                || unset(&local.provider, filed.map(|c| &c.provider))
            {
                let topo = node::read(&client, node_name).await?;
                tracing::info!(
                    node = node_name,
                    ?topo,
                    "this cluster's topology from its Node"
                );
                node::with_node_topology(clusters.clone(), local, topo)?
            } else {
                clusters.clone()
            };
            kubernetes::KubernetesDiscovery {
                client,
                local: local.id.clone(),
                static_clusters,
                init_timeout: Duration::from_secs(60),
                debounce: Duration::from_millis(200),
            }
            .start()
            .await
        }
    }
}
