//! The Multi-Cluster Services API objects the agent reads (`multicluster.x-k8s.io/v1alpha1`),
//! with the labels and the annotation ballast uses. Shapes follow the upstream mcs-api
//! types; only the fields ballast reads are typed, the rest kept opaque.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label on an EndpointSlice: the ServiceImport it belongs to.
pub const SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// Label on an EndpointSlice: the cluster its endpoints run in.
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// Annotation on a ServiceExport: requests per second one pod can serve.
pub const CAPACITY_ANNOTATION: &str = "ballast.io/capacity-rps-per-pod";

/// `ServiceImport` spec (MCS API v1alpha1).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceImport",
    namespaced,
    status = "ServiceImportStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The VIPs (ClusterSetIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceImportPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
}

/// A port of a ServiceImport.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

/// `ServiceImport` status: the clusters exporting the service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceImportStatus {
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
}

/// One exporting cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ClusterStatus {
    pub cluster: String,
}

/// `ServiceExport` (MCS API v1alpha1): no spec; its name and namespace select the Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    namespaced,
    no_spec,
    status = "ServiceExportStatus"
)]
pub struct ServiceExportSpec {}

/// `ServiceExport` status (conditions, kept opaque).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<serde_json::Value>,
}
