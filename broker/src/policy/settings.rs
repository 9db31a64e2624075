//! From policy objects to the settings the broker applies ([`PolicySettings`]): the
//! `default` LoadBalancingPolicy over the broker's own defaults, plus per-service overrides.
//! A field left out keeps the broker's default (cluster-wide) or inherits (per service); an
//! invalid object is listed in [`PolicySettings::rejected`] with the field it got wrong and
//! the last accepted value of that object stays in force — nothing is half-applied. When two
//! overrides name the same ServiceImport, the one whose object name sorts first wins.
//! Pure: no client.

use std::collections::BTreeMap;
use std::fmt;

use ballast_k8s_api::policy::{
    CrdError, EgressPriceRow, LoadBalancingPolicy, PolicyChoice, PolicyStatus,
    ServiceLoadBalancingPolicy, ServiceOverrideSpec, CLUSTER_POLICY_NAME,
};
use ballast_model::egress_prices::{EgressPrices, PriceRow};
use ballast_model::{Params, Policy, Problem};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySettings {
    /// Cluster-wide pair: the `default` LoadBalancingPolicy over the broker's defaults.
    pub cluster: ClusterPolicy,
    /// True when `cluster` comes (at least in part) from a LoadBalancingPolicy object.
    pub from_crd: bool,
    /// Per-service overrides, keyed by ServiceImport `namespace/name` (the model's service name).
    pub services: BTreeMap<String, ServiceOverride>,
    /// Objects not accepted, with the field they got wrong.
    pub rejected: Vec<Rejected>,
    /// The `default` LoadBalancingPolicy's `spec.egressPrices` (checked against the price
    /// table's providers, regions and continents): over the broker's table and file.
    #[serde(default)]
    pub egress_prices: Vec<EgressPriceRow>,
}

/// The name `spec.egressPrices` errors and the engine's log give the CRD's price rows.
pub const EGRESS_PRICES_FIELD: &str = "spec.egressPrices";

/// The model's rows for `rows` (the CRD's).
#[must_use]
pub fn price_rows(rows: &[EgressPriceRow]) -> Vec<PriceRow> {
    rows.iter()
        .map(|r| PriceRow {
            provider: r.provider.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            usd_per_gb: r.usd_per_gb,
            source: r
                .note
                .clone()
                .unwrap_or_else(|| "LoadBalancingPolicy/default".into()),
        })
        .collect()
}

/// Checks the CRD's price rows against the built-in table's providers, regions and
/// continents (and for a negative or non-finite price, a duplicate key, `internet` as a
/// source), naming `spec.egressPrices[i].FIELD`.
///
/// # Errors
/// The first bad row.
pub fn check_egress_prices(rows: &[EgressPriceRow]) -> Result<(), CrdError> {
    if rows.is_empty() {
        return Ok(());
    }
    let base = EgressPrices::builtin().map_err(|e| CrdError::InvalidEgressPrice(e.to_string()))?;
    base.with_override_rows(EGRESS_PRICES_FIELD, &price_rows(rows))
        .map(|_| ())
        .map_err(|e| {
            let field = match e.field {
                "usd_per_gb" => "usdPerGb",
                "-" => "",
                f => f,
            };
            let dot = if field.is_empty() { "" } else { "." };
            CrdError::InvalidEgressPrice(format!(
                "{EGRESS_PRICES_FIELD}[{}]{dot}{field}: {}",
                e.line, e.message
            ))
        })
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
            egress_prices: Vec::new(),
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
            // the whole object or nothing: a bad price row keeps the policy as it was too
            let checked = PolicyChoice::try_from(&obj.spec)
                .and_then(|c| check_egress_prices(&obj.spec.egress_prices).map(|()| c));
            match checked {
                Ok(choice) => {
                    out.cluster = ClusterPolicy {
                        policy: choice.policy.unwrap_or(fallback.policy),
                        params: choice.params.unwrap_or(fallback.params),
                    };
                    out.from_crd = true;
                    out.egress_prices.clone_from(&obj.spec.egress_prices);
                }
                Err(e) => {
                    if let Some(prev) = previous.filter(|p| p.from_crd) {
                        out.cluster = prev.cluster;
                        out.from_crd = true;
                        out.egress_prices.clone_from(&prev.egress_prices);
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
