//! This cluster's own topology from the agent's Node (Kubernetes source): region and zone
//! from the well-known labels `topology.kubernetes.io/region` and `/zone`, the provider from
//! the scheme of `spec.providerID` (`aws://` -> aws, `gce://` -> gcp, `azure://` -> azure,
//! `kind://` -> kind). Decisions:
//! - flags (and the config file's entry for this cluster) win; the Node only fills what they
//!   leave unset, and `spec.providerID` is parsed only when the provider is unset, so an
//!   unknown scheme is an error only where nothing else names the provider;
//! - the Node is read once at start (`get` on `nodes`: the chart's RBAC); topology labels do
//!   not change while a node lives;
//! - a Node without the labels (kubeadm without a cloud provider) leaves the fields unset,
//!   and the broker refuses the registration naming the missing field: set the flag.

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

use crate::catalog::{Cluster, ClusterId};

/// Node label: the cloud region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Node label: the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Why the Node gave no usable topology.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "spec.providerID {0:?} of this Node: unknown provider scheme (known: aws://, gce://, \
         azure://, kind://); set --provider"
    )]
    UnknownProvider(String),
    #[error("reading Node {name:?} (the agent's ServiceAccount needs get on nodes): {source}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What a Node says about where it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTopology {
    pub region: Option<String>,
    pub zone: Option<String>,
    /// `spec.providerID`, unparsed (see [`provider_of`]).
    pub provider_id: Option<String>,
}

/// The provider named by a `spec.providerID`'s scheme.
///
/// # Errors
/// [`NodeError::UnknownProvider`] for a scheme ballast has no prices for.
pub fn provider_of(provider_id: &str) -> Result<&'static str, NodeError> {
    let scheme = provider_id.split_once("://").map_or("", |(s, _)| s);
    match scheme {
        "aws" => Ok("aws"),
        "gce" => Ok("gcp"),
        "azure" => Ok("azure"),
        "kind" => Ok("kind"),
        _ => Err(NodeError::UnknownProvider(provider_id.to_owned())),
    }
}

/// The topology a Node object states (empty labels count as unset).
#[must_use]
pub fn topology_of(node: &Node) -> NodeTopology {
    let labels = node.metadata.labels.as_ref();
    let label = |k: &str| {
        labels
            .and_then(|l| l.get(k))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    NodeTopology {
        region: label(REGION_LABEL),
        zone: label(ZONE_LABEL),
        provider_id: node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .filter(|p| !p.is_empty()),
    }
}

/// Reads Node `name`'s topology.
///
/// # Errors
/// [`NodeError::Get`] when the Node cannot be read.
pub async fn read(client: &Client, name: &str) -> Result<NodeTopology, NodeError> {
    let node = Api::<Node>::all(client.clone())
        .get(name)
        .await
        .map_err(|source| NodeError::Get {
            name: name.to_owned(),
            source,
        })?;
    Ok(topology_of(&node))
}

/// `clusters` with this cluster's entry (`local`, as flags give it, over the config file's
/// entry) completed from the Node: only the fields both leave unset are taken from `node`.
///
/// # Errors
/// An unknown `spec.providerID` scheme when nothing else names the provider.
pub fn with_node_topology(
    mut clusters: Vec<Cluster>,
    local: &Cluster,
    node: NodeTopology,
) -> Result<Vec<Cluster>, NodeError> {
    let idx = match clusters.iter().position(|c| c.id == local.id) {
        Some(i) => i,
        None => {
            clusters.push(Cluster {
                id: ClusterId::clone(&local.id),
                region: None,
                zone: None,
                provider: None,
                gateway: None,
            });
            clusters.len() - 1
        }
    };
    let entry = &mut clusters[idx];
    let fill = |slot: &mut Option<String>, flag: &Option<String>, from_node: Option<String>| {
        if flag.is_none() && slot.is_none() {
            *slot = from_node;
        }
    };
    fill(&mut entry.region, &local.region, node.region);
    fill(&mut entry.zone, &local.zone, node.zone);
    if local.provider.is_none() && entry.provider.is_none() {
        if let Some(id) = node.provider_id {
            entry.provider = Some(provider_of(&id)?.to_owned());
        }
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests;
