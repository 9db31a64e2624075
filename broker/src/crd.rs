//! The load-balancing settings as Kubernetes custom resources, and the watcher that turns them
//! into the broker's policy.
//!
//! Two kinds in group `ballast.io`, version `v1alpha1` (the Submariner-style settings):
//!
//! - [`LoadBalancingPolicy`], **cluster-scoped, a singleton named `default`**: the cluster-wide
//!   `serviceDiscoveryLoadBalancing` (`round-robin | weighted-round-robin | optimized`) and
//!   `optimizedLoadBalancingParams` (`cost | performance | mixed`). A field left out keeps the
//!   broker's own default (its `--policy` / `--params` flags). Objects with another name are
//!   rejected (`metadata.name`).
//! - [`ServiceLoadBalancingPolicy`], **namespaced**: a per-service override naming a
//!   ServiceImport in its own namespace (`spec.serviceImportName`). A field left out inherits
//!   the cluster-wide value. When two overrides name the same ServiceImport, the one whose
//!   object name sorts first wins and the others are rejected.
//!
//! ```yaml
//! apiVersion: ballast.io/v1alpha1
//! kind: LoadBalancingPolicy
//! metadata: {name: default}
//! spec: {serviceDiscoveryLoadBalancing: optimized, optimizedLoadBalancingParams: mixed}
//! ---
//! apiVersion: ballast.io/v1alpha1
//! kind: ServiceLoadBalancingPolicy
//! metadata: {name: echo, namespace: demo}
//! spec: {serviceImportName: echo, serviceDiscoveryLoadBalancing: round-robin}
//! ```
//!
//! Values are checked twice: the CRD schema carries the enums (the API server refuses a bad
//! value), and [`TryFrom`] into the model's [`Policy`] / [`Params`] checks again (a CRD
//! installed without its schema, an older version): an invalid object is reported in
//! [`PolicySettings::rejected`] with the field it got wrong, and the last accepted value of that
//! object stays in force — nothing is half-applied. The broker writes its verdict to each
//! object's `status` ([`PolicyStatus`]: accepted, and the message naming the field).
//!
//! Consumer API: [`spawn_policy_watcher_from_env`] (what `serve` calls: on when the chart sets
//! `BALLAST_WATCH_POLICY_CRDS=true`) or [`spawn_policy_watcher`] (given a client) return a
//! `tokio::sync::watch::Receiver` of [`PolicySettings`]; [`PolicySettings::for_service`]
//! answers per service, [`PolicySettings::apply_to`] writes it into a [`Problem`].

use std::collections::BTreeMap;
use std::fmt;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use ballast_model::{Params, Policy, Problem};

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
        #[schemars(extend("enum" = ["round-robin", "weighted-round-robin", "optimized"]))]
        pub service_discovery_load_balancing: Option<String>,
        /// What `optimized` (and `weighted-round-robin`) minimise: egress cost, latency, or both.
        /// Left out: the broker's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["cost", "performance", "mixed"]))]
        pub optimized_load_balancing_params: Option<String>,
    }
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
        #[schemars(extend("enum" = ["round-robin", "weighted-round-robin", "optimized"]))]
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

fn parse_field<T: serde::de::DeserializeOwned>(
    field: &'static str,
    expected: &'static str,
    value: Option<&String>,
) -> Result<Option<T>, CrdError> {
    value
        .map(|v| {
            serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                CrdError::InvalidValue {
                    field,
                    value: v.clone(),
                    expected,
                }
            })
        })
        .transpose()
}

const POLICY_VALUES: &str = "round-robin | weighted-round-robin | optimized";
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

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| ok(c) || *c == b'-')
        && b.first().is_some_and(ok)
        && b.last().is_some_and(ok)
}

impl TryFrom<&ServiceLoadBalancingPolicySpec> for ServiceOverrideSpec {
    type Error = CrdError;
    fn try_from(spec: &ServiceLoadBalancingPolicySpec) -> Result<Self, CrdError> {
        if !is_dns_label(&spec.service_import_name) {
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

/// The cluster-wide pair in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub policy: Policy,
    pub params: Params,
}

/// One per-service override in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOverride {
    /// The ServiceLoadBalancingPolicy it came from, `namespace/name`.
    pub source: String,
    pub policy: Option<Policy>,
    pub params: Option<Params>,
}

/// An object that was not accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// `LoadBalancingPolicy/NAME` or `ServiceLoadBalancingPolicy/NAMESPACE/NAME`.
    pub object: String,
    /// The error, naming the field.
    pub error: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// The policy the broker applies: cluster-wide pair plus per-service overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySettings {
    /// Cluster-wide pair: the `default` LoadBalancingPolicy over the broker's defaults.
    pub cluster: ClusterPolicy,
    /// True when `cluster` comes (at least in part) from a LoadBalancingPolicy object.
    pub from_crd: bool,
    /// Per-service overrides, keyed by ServiceImport `namespace/name` (the model's service name).
    pub services: BTreeMap<String, ServiceOverride>,
    /// Objects not accepted, with the field they got wrong.
    pub rejected: Vec<Rejected>,
}

impl PolicySettings {
    /// Settings with no objects: the broker's defaults alone.
    #[must_use]
    pub fn defaults(fallback: ClusterPolicy) -> Self {
        Self {
            cluster: fallback,
            from_crd: false,
            services: BTreeMap::new(),
            rejected: Vec::new(),
        }
    }

    /// The (policy, params) that apply to one service (`namespace/name`).
    #[must_use]
    pub fn for_service(&self, service: &str) -> (Policy, Params) {
        let o = self.services.get(service);
        (
            o.and_then(|o| o.policy).unwrap_or(self.cluster.policy),
            o.and_then(|o| o.params).unwrap_or(self.cluster.params),
        )
    }

    /// Writes the settings into a solver problem: the cluster-wide pair into
    /// `problem.policy` / `problem.params`, the overrides into each matching service's
    /// `policy` / `params` (services without an override get `None`, i.e. inherit).
    pub fn apply_to(&self, problem: &mut Problem) {
        problem.policy = self.cluster.policy;
        problem.params = self.cluster.params;
        for s in &mut problem.services {
            let o = self.services.get(&s.name);
            s.policy = o.and_then(|o| o.policy);
            s.params = o.and_then(|o| o.params);
        }
    }

    /// Builds the settings from the objects in the cluster.
    ///
    /// `fallback` is the broker's own default (flags). `previous` is the settings in force:
    /// an object that is now invalid keeps the value it had there (last accepted), so a bad
    /// edit never changes the policy half-way; it is listed in `rejected` either way.
    #[must_use]
    pub fn from_objects(
        cluster_objects: &[LoadBalancingPolicy],
        service_objects: &[ServiceLoadBalancingPolicy],
        fallback: ClusterPolicy,
        previous: Option<&PolicySettings>,
    ) -> Self {
        let mut out = Self::defaults(fallback);

        let mut cluster_objects: Vec<&LoadBalancingPolicy> = cluster_objects.iter().collect();
        cluster_objects.sort_by_key(|o| o.name_any());
        for obj in cluster_objects {
            let name = obj.name_any();
            let object = format!("LoadBalancingPolicy/{name}");
            if name != CLUSTER_POLICY_NAME {
                out.reject(object, &CrdError::NotSingleton(name));
                continue;
            }
            match PolicyChoice::try_from(&obj.spec) {
                Ok(choice) => {
                    out.cluster = ClusterPolicy {
                        policy: choice.policy.unwrap_or(fallback.policy),
                        params: choice.params.unwrap_or(fallback.params),
                    };
                    out.from_crd = true;
                }
                Err(e) => {
                    if let Some(prev) = previous.filter(|p| p.from_crd) {
                        out.cluster = prev.cluster;
                        out.from_crd = true;
                    }
                    out.reject(object, &e);
                }
            }
        }

        let mut service_objects: Vec<&ServiceLoadBalancingPolicy> =
            service_objects.iter().collect();
        service_objects.sort_by_key(|o| (o.namespace(), o.name_any()));
        for obj in service_objects {
            let name = obj.name_any();
            let Some(ns) = obj.namespace() else {
                out.reject(
                    format!("ServiceLoadBalancingPolicy/{name}"),
                    &CrdError::MissingNamespace,
                );
                continue;
            };
            let source = format!("{ns}/{name}");
            let object = format!("ServiceLoadBalancingPolicy/{source}");
            let accepted = match ServiceOverrideSpec::try_from(&obj.spec) {
                Ok(spec) => Some((
                    format!("{ns}/{}", spec.service_import_name),
                    ServiceOverride {
                        source: source.clone(),
                        policy: spec.choice.policy,
                        params: spec.choice.params,
                    },
                )),
                Err(e) => {
                    out.reject(object.clone(), &e);
                    // Last accepted value of this same object, if any.
                    previous.and_then(|p| {
                        p.services
                            .iter()
                            .find(|(_, o)| o.source == source)
                            .map(|(k, o)| (k.clone(), o.clone()))
                    })
                }
            };
            if let Some((service, ov)) = accepted {
                if let Some(winner) = out.services.get(&service) {
                    let e = CrdError::Conflict {
                        service: service.clone(),
                        winner: winner.source.clone(),
                    };
                    out.reject(object, &e);
                } else {
                    out.services.insert(service, ov);
                }
            }
        }
        out
    }

    /// The status the broker reports for one object: rejected (with its error) when it is
    /// in [`rejected`](Self::rejected), accepted otherwise.
    #[must_use]
    pub fn status_of(
        &self,
        object: &str,
        generation: Option<i64>,
        accepted_note: &str,
    ) -> PolicyStatus {
        let rejection = self.rejected.iter().find(|r| r.object == object);
        PolicyStatus {
            accepted: rejection.is_none(),
            message: Some(rejection.map_or_else(|| accepted_note.to_string(), |r| r.error.clone())),
            observed_generation: generation,
        }
    }

    fn reject(&mut self, object: String, error: &CrdError) {
        tracing::warn!(%object, %error, "load-balancing policy object rejected");
        self.rejected.push(Rejected {
            object,
            error: error.to_string(),
        });
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
/// use ballast_broker::crd::{spawn_policy_watcher_from_env, ClusterPolicy};
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

enum Update {
    Cluster(bool),
    Service(bool),
}

/// Starts the watcher task: it watches every [`LoadBalancingPolicy`] and
/// [`ServiceLoadBalancingPolicy`] (kube-rs reflectors) and publishes the resulting
/// [`PolicySettings`] on the returned channel whenever they change.
///
/// The channel starts at [`PolicySettings::defaults`]`(fallback)`; the first update comes once
/// both kinds have been listed (never a half-listed state). Watch errors (API down, RBAC) are
/// logged and retried with kube's default backoff; the settings in force stay as they are.
/// The task ends when every receiver is dropped.
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
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watching load-balancing policies failed; retrying");
                continue;
            }
            Some(Ok(Update::Cluster(done))) => cluster_ready |= done,
            Some(Ok(Update::Service(done))) => service_ready |= done,
        }
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
                false
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
