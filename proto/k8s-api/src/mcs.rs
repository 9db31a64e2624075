//! The Multi-Cluster Services API objects the agent reads (group `multicluster.x-k8s.io`),
//! with the labels and the annotation ballast uses, and the labels by which Submariner
//! Lighthouse marks its own per-cluster ServiceImports.
//!
//! **Versions.** The API server may serve `v1alpha1` and/or `v1beta1` (mcs-api v0.5 serves
//! both and stores `v1beta1`; Cilium's MCS-API support uses `v1beta1`, Lighthouse writes
//! `v1alpha1`). The fields ballast reads have the same shape in both (checked against the
//! Go types of kubernetes-sigs/mcs-api v0.5.0, `pkg/apis/v1alpha1` and `pkg/apis/v1beta1`:
//! `spec.type`, `spec.ips`, `spec.ports[]` with `name`/`protocol`/`appProtocol`/`port`,
//! `status.clusters[].cluster`; v1beta1 adds `status.conditions` and
//! `status.endpointSliceObjects`, which ballast does not read). So there is one Rust shape
//! per kind, [`ServiceImport`] and [`ServiceExport`], a [`kube::core::Object`] whose API
//! version is chosen at run time ([`McsVersion::service_import`] /
//! [`McsVersion::service_export`] give the `ApiResource` to watch); unknown fields are
//! ignored on read.

use kube::core::{ApiResource, GroupVersionKind, Object};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The MCS API group.
pub const GROUP: &str = "multicluster.x-k8s.io";

/// Label on an EndpointSlice: the ServiceImport it belongs to.
pub const SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// Label on an EndpointSlice: the cluster its endpoints run in.
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
/// Annotation on a ServiceExport: requests per second one pod can serve.
pub const CAPACITY_ANNOTATION: &str = "ballast.io/capacity-rps-per-pod";
/// Annotation on a ServiceExport: one pod's service time per request as a function of the
/// load on that pod, `base_ms=<ms>,slope_ms_per_rps=<ms per RPS>` (both finite, >= 0).
pub const SERVICE_TIME_ANNOTATION: &str = "ballast.io/service-time";

/// Lighthouse (Submariner): label (and, on its broker-side aggregated copies, annotation) with
/// the namespace of the exported Service. Lighthouse puts it on the per-cluster "local"
/// ServiceImports it creates for every export (`<svc>-<ns>-<cluster>`, in its own namespace),
/// never on the aggregated ServiceImport applications use (`<svc>` in `<ns>`). Source:
/// submariner-io/lighthouse `pkg/constants/constants.go` (`LabelSourceNamespace`).
pub const LIGHTHOUSE_SOURCE_NAMESPACE: &str = "lighthouse.submariner.io/sourceNamespace";
/// Lighthouse before 0.15: label with the exported Service's name on the per-cluster
/// ServiceImports (`LegacySourceNameLabel` in `pkg/agent/controller/service_import_migrator.go`).
pub const LIGHTHOUSE_LEGACY_SOURCE_NAME: &str = "lighthouse.submariner.io/sourceName";
/// Lighthouse before 0.15: label with the exporting cluster on the per-cluster ServiceImports
/// (`LegacySourceClusterLabel`).
pub const LIGHTHOUSE_LEGACY_SOURCE_CLUSTER: &str = "lighthouse.submariner.io/sourceCluster";
/// Lighthouse: annotation on a ServiceExport asking for a clusterset IP (a VIP in the
/// aggregated ServiceImport's `spec.ips`) for that service (`UseClustersetIP`).
pub const LIGHTHOUSE_USE_CLUSTERSET_IP: &str = "lighthouse.submariner.io/use-clusterset-ip";

/// What an operator does about a ServiceImport without `spec.ips`, for logs and `admin`.
pub const NO_VIP_REMEDY: &str = "ServiceImport has no spec.ips (no clusterset VIP), so \
    connect() has no address to steer; with Submariner Lighthouse enable clusterset IPs \
    (`subctl join --clusterset-ip-enabled`, or the annotation \
    lighthouse.submariner.io/use-clusterset-ip: \"true\" on the ServiceExport)";

/// A `ServiceImport` of either served version.
pub type ServiceImport = Object<ServiceImportSpec, ServiceImportStatus>;

/// A `ServiceExport` of either served version; `spec` is absent in most v1alpha1 objects.
pub type ServiceExport = Object<Option<ServiceExportSpec>, ServiceExportStatus>;

/// The MCS API versions ballast reads, most preferred first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum McsVersion {
    V1beta1,
    V1alpha1,
}

impl McsVersion {
    /// Every version ballast reads, most preferred first.
    pub const PREFERENCE: [McsVersion; 2] = [McsVersion::V1beta1, McsVersion::V1alpha1];

    /// `v1beta1` / `v1alpha1`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1beta1 => "v1beta1",
            Self::V1alpha1 => "v1alpha1",
        }
    }

    /// `multicluster.x-k8s.io/<version>`.
    #[must_use]
    pub fn api_version(self) -> String {
        format!("{GROUP}/{}", self.as_str())
    }

    /// The version named `s`, if ballast reads it.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::PREFERENCE.into_iter().find(|v| v.as_str() == s)
    }

    fn resource(self, kind: &str, plural: &str) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, self.as_str(), kind),
            plural,
        )
    }

    /// `serviceimports` at this version.
    #[must_use]
    pub fn service_import(self) -> ApiResource {
        self.resource("ServiceImport", "serviceimports")
    }

    /// `serviceexports` at this version.
    #[must_use]
    pub fn service_export(self) -> ApiResource {
        self.resource("ServiceExport", "serviceexports")
    }
}

impl std::fmt::Display for McsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ServiceImport` spec (v1alpha1 and v1beta1 alike).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The VIPs (ClusterSetIP); absent under Lighthouse unless clusterset IPs are enabled.
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

/// `ServiceExport` spec: absent in v1alpha1 before mcs-api v0.5; its name and namespace
/// select the Service either way.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportSpec {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub exported_labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub exported_annotations: std::collections::BTreeMap<String, String>,
}

/// `ServiceExport` status (conditions, kept opaque).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<serde_json::Value>,
}

/// Why `labels`/`annotations` mark a ServiceImport as one of Lighthouse's per-cluster
/// ("local") ServiceImports rather than a service to consume: the label or annotation that
/// says so, or `None` for an ordinary ServiceImport.
///
/// The aggregated ServiceImport Lighthouse syncs into each member cluster (`<svc>` in `<ns>`)
/// carries none of these (Lighthouse strips its annotations when it syncs it from the
/// broker); the per-cluster ones carry `lighthouse.submariner.io/sourceNamespace` (0.15 and
/// later, with `multicluster.kubernetes.io/service-name` and `/source-cluster`) or the
/// legacy `lighthouse.submariner.io/sourceName` / `sourceCluster` labels (before 0.15). A
/// ServiceImport labelled with a source cluster is per-cluster by definition.
#[must_use]
pub fn lighthouse_marker(
    labels: &std::collections::BTreeMap<String, String>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<&'static str> {
    const LABELS: [&str; 4] = [
        LIGHTHOUSE_SOURCE_NAMESPACE,
        LIGHTHOUSE_LEGACY_SOURCE_NAME,
        LIGHTHOUSE_LEGACY_SOURCE_CLUSTER,
        SOURCE_CLUSTER_LABEL,
    ];
    LABELS
        .into_iter()
        .find(|l| labels.contains_key(*l))
        .or_else(|| {
            annotations
                .contains_key(LIGHTHOUSE_SOURCE_NAMESPACE)
                .then_some(LIGHTHOUSE_SOURCE_NAMESPACE)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_name_their_resources() {
        let ar = McsVersion::V1beta1.service_import();
        assert_eq!(ar.api_version, "multicluster.x-k8s.io/v1beta1");
        assert_eq!(ar.plural, "serviceimports");
        assert_eq!(ar.kind, "ServiceImport");
        let ar = McsVersion::V1alpha1.service_export();
        assert_eq!(ar.api_version, "multicluster.x-k8s.io/v1alpha1");
        assert_eq!(ar.plural, "serviceexports");
        assert_eq!(McsVersion::parse("v1beta1"), Some(McsVersion::V1beta1));
        assert_eq!(McsVersion::parse("v1alpha2"), None);
    }

    #[test]
    fn a_v1alpha1_export_without_spec_and_a_v1beta1_export_with_one_read() {
        let old: ServiceExport = serde_json::from_value(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"}
        }))
        .expect("v1alpha1 export");
        assert_eq!(old.spec, None);
        let new: ServiceExport = serde_json::from_value(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"exportedLabels": {"tier": "web"}},
            "status": {"conditions": [{"type": "Valid", "status": "True"}]}
        }))
        .expect("v1beta1 export");
        assert_eq!(
            new.spec.map(|s| s.exported_labels.len()),
            Some(1),
            "spec read"
        );
    }
}
