//! ballast's load-balancing settings as Kubernetes custom resources (group `ballast.io`,
//! version `v1alpha1`, the Submariner-style settings):
//!
//! - [`LoadBalancingPolicy`], **cluster-scoped, a singleton named `default`**: the cluster-wide
//!   `serviceDiscoveryLoadBalancing` (`round-robin | local-first-round-robin |
//!   weighted-round-robin | optimized`) and
//!   `optimizedLoadBalancingParams` (`cost | performance | mixed`);
//! - [`ServiceLoadBalancingPolicy`], **namespaced**: a per-service override naming a
//!   ServiceImport in its own namespace (`spec.serviceImportName`).
//!
//! Values are checked twice: the CRD schema carries the enums (the API server refuses a bad
//! value), and [`TryFrom`] into [`PolicyChoice`] checks again with the vocabulary's own
//! spelling (`ballast_types::Policy` / `Params`). [`crds`] are the definitions `crdgen`
//! prints and the broker chart carries. The broker resolves objects into settings and
//! watches them (`ballast_broker::policy`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use ballast_types::{ClusterId, Params, Policy};

/// The API group of ballast's custom resources.
pub const GROUP: &str = "ballast.io";
/// The one accepted name of the cluster-wide [`LoadBalancingPolicy`].
pub const CLUSTER_POLICY_NAME: &str = "default";

/// Field names as they appear in the objects (used in error messages).
pub const FIELD_POLICY: &str = "spec.serviceDiscoveryLoadBalancing";
/// See [`FIELD_POLICY`].
pub const FIELD_PARAMS: &str = "spec.optimizedLoadBalancingParams";
/// See [`FIELD_POLICY`].
pub const FIELD_SERVICE_IMPORT: &str = "spec.serviceImportName";

/// Declares one of the two policy kinds: the derives, group [`GROUP`] version `v1alpha1`
/// (category `ballast`, status [`PolicyStatus`]), and the printer columns both show after the
/// kind's own `columns(...)`: Policy, Params, Accepted, and Message (with `-o wide`).
macro_rules! policy_resource {
    (
        kube($($kube:tt)*),
        columns($($column:tt)*),
        $(#[$attr:meta])*
        pub struct $name:ident { $($fields:tt)* }
    ) => {
        $(#[$attr])*
        #[derive(
            CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema,
        )]
        // Each printcolumn repeats `type_ = "string"`; clippy reads them as one attribute list.
        #[allow(clippy::duplicated_attributes)]
        #[kube(
            group = "ballast.io",
            version = "v1alpha1",
            category = "ballast",
            status = "PolicyStatus",
            $($kube)*
            $($column)*
            printcolumn(
                name = "Policy",
                type_ = "string",
                json_path = ".spec.serviceDiscoveryLoadBalancing"
            ),
            printcolumn(
                name = "Params",
                type_ = "string",
                json_path = ".spec.optimizedLoadBalancingParams"
            ),
            printcolumn(name = "Accepted", type_ = "boolean", json_path = ".status.accepted"),
            printcolumn(
                name = "Message",
                type_ = "string",
                json_path = ".status.message",
                priority = 1
            )
        )]
        #[serde(rename_all = "camelCase")]
        pub struct $name { $($fields)* }
    };
}

policy_resource! {
    kube(
        kind = "LoadBalancingPolicy",
        plural = "loadbalancingpolicies",
        shortname = "lbp",
        doc = "Cluster-wide load-balancing setting for ServiceImports (singleton named `default`).",
    ),
    columns(),
    /// Cluster-wide load-balancing setting. Cluster-scoped singleton: only the object named
    /// `default` is used.
    pub struct LoadBalancingPolicySpec {
        /// How traffic to a ServiceImport is split across clusters. Left out: the broker's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["round-robin", "local-first-round-robin", "weighted-round-robin", "optimized"]))]
        pub service_discovery_load_balancing: Option<String>,
        /// What `optimized` (and `weighted-round-robin`) minimise: egress cost, latency, or both.
        /// Left out: the broker's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["cost", "performance", "mixed"]))]
        pub optimized_load_balancing_params: Option<String>,
        /// The operator's egress prices (negotiated rates), over the broker's price table and
        /// its `--egress-prices` file: a row here wins over a row of either for the same
        /// (provider, from, to). Left out: none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 1000))]
        pub egress_prices: Vec<EgressPriceRow>,
    }
}

/// One row of a LoadBalancingPolicy's `egressPrices`: the columns of the
/// broker's price table (`broker/data/region_egress_prices.csv`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPriceRow {
    /// `aws`, `gcp` or `azure`.
    #[schemars(length(min = 1, max = 32))]
    pub provider: String,
    /// The source: a region of the provider, `continent:<name>`, or `*`.
    #[schemars(length(min = 1, max = 64))]
    pub from: String,
    /// The destination: a region of the provider, `continent:<name>`, `*`, or `internet`.
    #[schemars(length(min = 1, max = 64))]
    pub to: String,
    /// USD per GB leaving `from` toward `to`.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub usd_per_gb: f64,
    /// Where the figure comes from (a contract, a quote); free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub note: Option<String>,
}

policy_resource! {
    kube(
        kind = "ServiceLoadBalancingPolicy",
        plural = "serviceloadbalancingpolicies",
        shortname = "slbp",
        namespaced,
        doc = "Per-ServiceImport override of the cluster-wide LoadBalancingPolicy.",
    ),
    columns(
        printcolumn(
            name = "ServiceImport",
            type_ = "string",
            json_path = ".spec.serviceImportName"
        ),
    ),
    /// Per-service override of the cluster-wide `LoadBalancingPolicy`, for the ServiceImport
    /// named in `serviceImportName` in the same namespace.
    pub struct ServiceLoadBalancingPolicySpec {
        /// Name of the ServiceImport (same namespace) this override applies to.
        #[schemars(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )]
        pub service_import_name: String,
        /// Override of the cluster-wide `serviceDiscoveryLoadBalancing`. Left out: inherited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["round-robin", "local-first-round-robin", "weighted-round-robin", "optimized"]))]
        pub service_discovery_load_balancing: Option<String>,
        /// Override of the cluster-wide `optimizedLoadBalancingParams`. Left out: inherited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["cost", "performance", "mixed"]))]
        pub optimized_load_balancing_params: Option<String>,
    }
}

/// What the broker made of an object, written back to its `status` (`kubectl get lbp,slbp`
/// shows `Accepted`; `-o wide` the message).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Whether the broker applies this object as it is now.
    pub accepted: bool,
    /// Why it is not applied (naming the field), or what it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Why an object was not accepted. Every variant names the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdError {
    #[error("{field}: invalid value {value:?}, expected one of {expected}")]
    InvalidValue {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("metadata.name: a LoadBalancingPolicy must be named {CLUSTER_POLICY_NAME:?} (it is a cluster-wide singleton), got {0:?}")]
    NotSingleton(String),
    #[error("{FIELD_SERVICE_IMPORT}: {value:?} is not a valid ServiceImport name (DNS label: 1-63 of [a-z0-9-], alphanumeric at both ends)")]
    InvalidServiceImport { value: String },
    #[error("{FIELD_SERVICE_IMPORT}: ServiceImport {service:?} already has an override ({winner}); this one is ignored")]
    Conflict { service: String, winner: String },
    #[error("metadata.namespace: a ServiceLoadBalancingPolicy is namespaced, but this object has no namespace")]
    MissingNamespace,
    /// A row of `spec.egressPrices` the broker's price table refuses (the message names
    /// `spec.egressPrices[i].FIELD`).
    #[error("{0}")]
    InvalidEgressPrice(String),
}

/// A policy / params pair with either half optional: what one object says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PolicyChoice {
    pub policy: Option<Policy>,
    pub params: Option<Params>,
}

/// A validated per-service override: the ServiceImport it applies to and what it sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceOverrideSpec {
    pub service_import_name: String,
    pub choice: PolicyChoice,
}

fn parse_field<T: std::str::FromStr>(
    field: &'static str,
    expected: &'static str,
    value: Option<&String>,
) -> Result<Option<T>, CrdError> {
    value
        .map(|v| {
            v.parse().map_err(|_| CrdError::InvalidValue {
                field,
                value: v.clone(),
                expected,
            })
        })
        .transpose()
}

const POLICY_VALUES: &str =
    "round-robin | local-first-round-robin | weighted-round-robin | optimized";
const PARAMS_VALUES: &str = "cost | performance | mixed";

fn parse_choice(
    policy: Option<&String>,
    params: Option<&String>,
) -> Result<PolicyChoice, CrdError> {
    Ok(PolicyChoice {
        policy: parse_field(FIELD_POLICY, POLICY_VALUES, policy)?,
        params: parse_field(FIELD_PARAMS, PARAMS_VALUES, params)?,
    })
}

impl TryFrom<&LoadBalancingPolicySpec> for PolicyChoice {
    type Error = CrdError;
    fn try_from(spec: &LoadBalancingPolicySpec) -> Result<Self, CrdError> {
        parse_choice(
            spec.service_discovery_load_balancing.as_ref(),
            spec.optimized_load_balancing_params.as_ref(),
        )
    }
}

impl TryFrom<&ServiceLoadBalancingPolicySpec> for ServiceOverrideSpec {
    type Error = CrdError;
    fn try_from(spec: &ServiceLoadBalancingPolicySpec) -> Result<Self, CrdError> {
        // A ServiceImport name is a DNS label: the rule of a cluster id.
        if ClusterId::validate(&spec.service_import_name).is_err() {
            return Err(CrdError::InvalidServiceImport {
                value: spec.service_import_name.clone(),
            });
        }
        Ok(Self {
            service_import_name: spec.service_import_name.clone(),
            choice: parse_choice(
                spec.service_discovery_load_balancing.as_ref(),
                spec.optimized_load_balancing_params.as_ref(),
            )?,
        })
    }
}

/// The CRDs of ballast, in the order `crdgen` prints them.
///
/// The cluster-wide kind also gets a CEL rule on the root (`self.metadata.name == 'default'`),
/// so the API server refuses a second cluster-wide object up front.
#[must_use]
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut cluster = LoadBalancingPolicy::crd();
    for version in &mut cluster.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema.x_kubernetes_validations = Some(vec![ValidationRule {
                rule: format!("self.metadata.name == '{CLUSTER_POLICY_NAME}'"),
                message: Some(format!(
                    "LoadBalancingPolicy is a cluster-wide singleton: metadata.name must be '{CLUSTER_POLICY_NAME}'"
                )),
                ..ValidationRule::default()
            }]);
        }
    }
    vec![cluster, ServiceLoadBalancingPolicy::crd()]
}

/// The CRDs as one multi-document YAML text (what `crdgen` prints and the chart carries).
///
/// # Errors
/// When serialisation fails (it does not for these types).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The CRDs as `(file name, YAML)` pairs, one file per CRD named `<plural>.<group>.yaml`:
/// the layout of the chart's `crds/` directory.
///
/// # Errors
/// When serialisation fails (it does not for these types).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            Ok((name, serde_yaml::to_string(&crd)?))
        })
        .collect()
}
