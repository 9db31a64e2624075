//! The Kubernetes source: the Multi-Cluster Services API.
//!
//! - `ServiceImport` (multicluster.x-k8s.io, `v1beta1` when the API server serves it, else
//!   `v1alpha1`: [`served_mcs`] asks the server's discovery once at start): its `spec.ips`
//!   are the VIPs to steer, its `spec.ports` the ports. Headless imports are not steered.
//!   A ClusterSetIP import without `spec.ips` (Lighthouse without clusterset IPs) cannot be
//!   steered either: it is listed in [`Catalog::without_vip`], logged once per change with
//!   the remedy, counted (`ballast_agent_services_without_vip`) and reported to the broker.
//! - Lighthouse's own per-cluster ("local") ServiceImports (`<svc>-<ns>-<cluster>`, in its
//!   namespace) are recognised by their labels ([`mcs::lighthouse_marker`]) and skipped with
//!   a debug log: they carry the exporting cluster's ClusterIP, not a clusterset VIP, and are
//!   not services anyone imports.
//! - `EndpointSlice`s labelled `multicluster.kubernetes.io/service-name` (the import's name,
//!   same namespace) and `multicluster.kubernetes.io/source-cluster` (the cluster the
//!   endpoints run in). An endpoint is ready unless `conditions.ready` is `false`.
//! - `ServiceExport` (same API group and version choice): the annotation
//!   `ballast.io/capacity-rps-per-pod` on this cluster's export declares per-pod capacity,
//!   and `ballast.io/service-time` (`base_ms=20,slope_ms_per_rps=0.05`) one pod's service time
//!   as a function of its load (what load-aware `optimized` weighs), and
//!   `ballast.io/load-unit` (`connections`, the default, `requests` or `bytes`) the unit that
//!   capacity counts: the service's load unit at the broker.
//!
//! Each kind is watched with a kube-runtime reflector; any change rebuilds the catalog from
//! the three stores ([`build_catalog`], a pure function). An object that does not validate
//! is left out of the catalog and reported in [`SourceStatus`](super::SourceStatus).
//!
//! The MCS API carries no regions or gateways: peers' region/zone/provider/gateway come from
//! `static_clusters` (the agent's config file); a cluster seen only in a slice label is
//! known by id alone (not probed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ballast_k8s_api::mcs;
use ballast_types::LoadUnit;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::discovery::ApiGroup;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};

use super::{CatalogWatch, Discovery, DiscoveryError, SourceStatus};
use crate::catalog::{
    validate_cluster_id, Catalog, Cluster, ClusterId, Endpoint, Protocol, Service, ServiceName,
    ServicePort, ServiceTime,
};
use crate::service_probe::{check_probe_path, PROBE_ANNOTATION};

/// The ServiceExport annotation naming the unit its declared capacity counts.
pub const LOAD_UNIT_ANNOTATION: &str = "ballast.io/load-unit";

pub use ballast_k8s_api::mcs::{
    ClusterStatus, McsVersion, ServiceExport, ServiceExportSpec, ServiceExportStatus,
    ServiceImport, ServiceImportPort, ServiceImportSpec, ServiceImportStatus, CAPACITY_ANNOTATION,
    NO_VIP_REMEDY, SERVICE_NAME_LABEL, SERVICE_TIME_ANNOTATION, SOURCE_CLUSTER_LABEL,
};

/// The MCS API versions the agent watches, per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedMcs {
    pub service_import: McsVersion,
    pub service_export: McsVersion,
}

/// Picks, per kind, the most preferred version (`v1beta1`, then `v1alpha1`) that the group
/// `multicluster.x-k8s.io` serves it at, from the server's discovery answer.
///
/// # Errors
/// [`DiscoveryError::McsNotServed`] naming the kind no known version serves.
pub fn pick_mcs_versions(group: &ApiGroup) -> Result<ServedMcs, DiscoveryError> {
    let pick = |kind: &'static str| {
        McsVersion::PREFERENCE
            .into_iter()
            .find(|v| {
                group
                    .versioned_resources(v.as_str())
                    .iter()
                    .any(|(ar, _)| ar.kind == kind)
            })
            .ok_or_else(|| DiscoveryError::McsNotServed {
                message: format!(
                    "{kind} is not served at v1beta1 or v1alpha1 (served versions: {})",
                    group.versions().collect::<Vec<_>>().join(", ")
                ),
            })
    };
    Ok(ServedMcs {
        service_import: pick("ServiceImport")?,
        service_export: pick("ServiceExport")?,
    })
}

/// Asks the API server which MCS API versions it serves ([`pick_mcs_versions`]).
///
/// # Errors
/// [`DiscoveryError::McsNotServed`] when the group is not served (the MCS CRDs are not
/// installed) or serves neither version; a discovery request that fails.
pub async fn served_mcs(client: &Client) -> Result<ServedMcs, DiscoveryError> {
    let group = kube::discovery::group(client, mcs::GROUP)
        .await
        .map_err(|e| match e {
            kube::Error::Discovery(e) => DiscoveryError::McsNotServed {
                message: e.to_string(),
            },
            other => DiscoveryError::Kube(other),
        })?;
    pick_mcs_versions(&group)
}

/// A problem with one object, which is left out of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectProblem {
    /// `Kind ns/name`.
    pub object: String,
    /// What is wrong, naming the field.
    pub message: String,
}

/// Builds a catalog from the reflectors' contents. Pure: no I/O.
pub fn build_catalog(
    local: &str,
    static_clusters: &[Cluster],
    imports: &[Arc<ServiceImport>],
    exports: &[Arc<ServiceExport>],
    slices: &[Arc<EndpointSlice>],
) -> (Catalog, Vec<ObjectProblem>) {
    let mut problems = Vec::new();
    let mut clusters: BTreeMap<ClusterId, Cluster> = static_clusters
        .iter()
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
    clusters.entry(local.to_owned()).or_insert_with(|| Cluster {
        id: local.to_owned(),
        region: None,
        zone: None,
        provider: None,
        gateway: None,
    });

    // capacities of this cluster's exports
    let mut capacities: BTreeMap<(String, String), f64> = BTreeMap::new();
    for ex in exports {
        let (ns, name) = (ex.namespace().unwrap_or_default(), ex.name_any());
        if let Some(v) = ex.annotations().get(CAPACITY_ANNOTATION) {
            match v.trim().parse::<f64>() {
                Ok(c) if c.is_finite() && c > 0.0 => {
                    capacities.insert((ns, name), c);
                }
                _ => problems.push(ObjectProblem {
                    object: format!("ServiceExport {ns}/{name}"),
                    message: format!(
                        "metadata.annotations[{CAPACITY_ANNOTATION}]: {v:?} is not a positive number"
                    ),
                }),
            }
        }
    }

    // declared service times of this cluster's exports
    let mut service_times: BTreeMap<(String, String), ServiceTime> = BTreeMap::new();
    for ex in exports {
        let (ns, name) = (ex.namespace().unwrap_or_default(), ex.name_any());
        if let Some(v) = ex.annotations().get(SERVICE_TIME_ANNOTATION) {
            match ServiceTime::parse(v) {
                Ok(c) => {
                    service_times.insert((ns, name), c);
                }
                Err(e) => problems.push(ObjectProblem {
                    object: format!("ServiceExport {ns}/{name}"),
                    message: format!("metadata.annotations[{SERVICE_TIME_ANNOTATION}]: {e}"),
                }),
            }
        }
    }

    // probe paths of this cluster's exports (service time measured by the agents)
    let mut probes: BTreeMap<(String, String), String> = BTreeMap::new();
    for ex in exports {
        let (ns, name) = (ex.namespace().unwrap_or_default(), ex.name_any());
        if let Some(v) = ex.annotations().get(PROBE_ANNOTATION) {
            match check_probe_path(v) {
                Ok(()) => {
                    probes.insert((ns, name), v.clone());
                }
                Err(e) => problems.push(ObjectProblem {
                    object: format!("ServiceExport {ns}/{name}"),
                    message: format!("metadata.annotations[{PROBE_ANNOTATION}]: {e}"),
                }),
            }
        }
    }

    // load units of this cluster's exports (what their capacity counts)
    let mut units: BTreeMap<(String, String), LoadUnit> = BTreeMap::new();
    for ex in exports {
        let (ns, name) = (ex.namespace().unwrap_or_default(), ex.name_any());
        if let Some(v) = ex.annotations().get(LOAD_UNIT_ANNOTATION) {
            match v.parse::<LoadUnit>() {
                Ok(u) => {
                    units.insert((ns, name), u);
                }
                Err(e) => problems.push(ObjectProblem {
                    object: format!("ServiceExport {ns}/{name}"),
                    message: format!("metadata.annotations[{LOAD_UNIT_ANNOTATION}]: {e}"),
                }),
            }
        }
    }

    // endpoints by (namespace, service name)
    let mut endpoints: BTreeMap<(String, String), Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        let ns = slice.namespace().unwrap_or_default();
        let object = format!("EndpointSlice {ns}/{}", slice.name_any());
        let labels = slice.labels();
        let (Some(svc), Some(cluster)) = (
            labels.get(SERVICE_NAME_LABEL),
            labels.get(SOURCE_CLUSTER_LABEL),
        ) else {
            problems.push(ObjectProblem {
                object,
                message: format!(
                    "metadata.labels: needs both {SERVICE_NAME_LABEL} and {SOURCE_CLUSTER_LABEL}"
                ),
            });
            continue;
        };
        if let Err(e) = validate_cluster_id(cluster) {
            problems.push(ObjectProblem {
                object,
                message: format!("metadata.labels[{SOURCE_CLUSTER_LABEL}]: {e}"),
            });
            continue;
        }
        if slice.address_type == "FQDN" {
            continue; // nothing to steer to
        }
        let ports: Vec<(Option<String>, u16)> = match slice
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| match p.port.and_then(|p| u16::try_from(p).ok()) {
                Some(port) if port > 0 => Ok((p.name.clone().filter(|n| !n.is_empty()), port)),
                _ => Err(format!("ports[{i}].port: {:?} is not in 1..=65535", p.port)),
            })
            .collect::<Result<_, _>>()
        {
            Ok(p) => p,
            Err(message) => {
                problems.push(ObjectProblem { object, message });
                continue;
            }
        };
        let mut eps = Vec::new();
        let mut bad = None;
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            for (j, a) in ep.addresses.iter().enumerate() {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    bad = Some(format!("endpoints[{i}].addresses[{j}]: {a:?} is not an IP"));
                    break;
                };
                for (name, port) in &ports {
                    eps.push(Endpoint {
                        address: SocketAddr::new(ip, *port),
                        cluster: cluster.clone(),
                        ready,
                        port_name: name.clone(),
                    });
                }
            }
        }
        if let Some(message) = bad {
            problems.push(ObjectProblem { object, message });
            continue;
        }
        clusters.entry(cluster.clone()).or_insert_with(|| Cluster {
            id: cluster.clone(),
            region: None,
            zone: None,
            provider: None,
            gateway: None,
        });
        endpoints.entry((ns, svc.clone())).or_default().extend(eps);
    }

    let mut services = BTreeMap::new();
    let mut without_vip = BTreeSet::new();
    for imp in imports {
        let ns = imp.namespace().unwrap_or_default();
        let n = imp.name_any();
        let object = format!("ServiceImport {ns}/{n}");
        if let Some(marker) = mcs::lighthouse_marker(imp.labels(), imp.annotations()) {
            tracing::debug!(
                object,
                marker,
                "skipped: a Lighthouse per-cluster ServiceImport, not a service to steer"
            );
            continue;
        }
        match import_to_service(imp, &ns, &n) {
            Ok(Imported::Headless) => {
                tracing::debug!(object, "skipped: headless (no VIP to steer, by design)");
            }
            Ok(Imported::WithoutVip(name)) => {
                without_vip.insert(name);
            }
            Ok(Imported::Service(mut svc)) => {
                let key = (ns, n);
                svc.capacity_rps_per_pod = capacities.get(&key).copied();
                svc.service_time_per_pod = service_times.get(&key).copied();
                svc.service_time_probe = probes.get(&key).cloned();
                svc.load_unit = units.get(&key).copied().unwrap_or_default();
                let mut eps = endpoints.remove(&key).unwrap_or_default();
                eps.sort();
                eps.dedup();
                svc.endpoints = eps;
                services.insert(svc.name.clone(), svc);
            }
            Err(message) => problems.push(ObjectProblem { object, message }),
        }
    }
    (
        Catalog {
            local: local.to_owned(),
            clusters,
            services,
            without_vip,
        },
        problems,
    )
}

/// What one ServiceImport is to the agent.
enum Imported {
    /// A service to steer.
    Service(Service),
    /// Headless: nothing to steer, by design.
    Headless,
    /// ClusterSetIP without `spec.ips`: would be steered if it had a VIP.
    WithoutVip(ServiceName),
}

fn import_to_service(imp: &ServiceImport, ns: &str, n: &str) -> Result<Imported, String> {
    let name = ServiceName::parse(&format!("{ns}/{n}")).map_err(|e| format!("metadata: {e}"))?;
    if imp.spec.type_ == "Headless" {
        return Ok(Imported::Headless);
    }
    if imp.spec.ips.is_empty() {
        return Ok(Imported::WithoutVip(name));
    }
    let vips = imp
        .spec
        .ips
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("spec.ips[{i}]: {s:?} is not an IP"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = imp
        .spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("spec.ports[{i}].port: {} is not in 1..=65535", p.port))?;
            let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))
                .map_err(|e| format!("spec.ports[{i}].protocol: {e}"))?;
            Ok(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if ports.is_empty() {
        return Err("spec.ports: no port".into());
    }
    Ok(Imported::Service(Service {
        name,
        vips,
        ports,
        capacity_rps_per_pod: None,
        service_time_per_pod: None,
        service_time_probe: None,
        load_unit: LoadUnit::default(),
        endpoints: vec![],
    }))
}

/// Logs what changed in the set of imports without a VIP: a `warn` with the remedy for each
/// import newly without one, an `info` for each that got one (or went away). Called with
/// every catalog that changed, so a resync that changes nothing logs nothing.
pub fn log_without_vip_changes(before: &BTreeSet<ServiceName>, now: &BTreeSet<ServiceName>) {
    for name in now.difference(before) {
        tracing::warn!(
            service = %name,
            remedy = NO_VIP_REMEDY,
            "ServiceImport without a VIP: not steered"
        );
    }
    for name in before.difference(now) {
        tracing::info!(service = %name, "ServiceImport no longer without a VIP");
    }
}

/// The Kubernetes source.
#[derive(Clone)]
pub struct KubernetesDiscovery {
    pub client: Client,
    pub local: ClusterId,
    /// Region/zone/provider/gateway of known clusters (this one included), from config.
    pub static_clusters: Vec<Cluster>,
    /// How long `start` waits for the first complete listing.
    pub init_timeout: Duration,
    /// Changes arriving within this window are folded into one rebuild.
    pub debounce: Duration,
}

fn spawn_reflector<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    config: watcher::Config,
    resource: &'static str,
    changed: Arc<Notify>,
    status: watch::Sender<SourceStatus>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    tracing::warn!(resource, error = %e, "kubernetes watch failed; retrying");
                    status.send_modify(|s| {
                        s.refreshes_failed += 1;
                        s.last_error = Some(format!("watch of {resource}: {e}"));
                    });
                }
            }
        }
    });
    (reader, task)
}

struct Stores {
    imports: Store<ServiceImport>,
    exports: Store<ServiceExport>,
    slices: Store<EndpointSlice>,
}

impl Stores {
    fn build(&self, local: &str, static_clusters: &[Cluster]) -> Catalog {
        let (catalog, problems) = build_catalog(
            local,
            static_clusters,
            &self.imports.state(),
            &self.exports.state(),
            &self.slices.state(),
        );
        for p in &problems {
            tracing::warn!(object = %p.object, problem = %p.message, "object left out of the catalog");
        }
        catalog
    }
}

impl Discovery for KubernetesDiscovery {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn start(self) -> Result<CatalogWatch, DiscoveryError> {
        let served = served_mcs(&self.client).await?;
        tracing::info!(
            serviceimports = %served.service_import,
            serviceexports = %served.service_export,
            "watching the MCS API at the versions the API server serves"
        );
        let changed = Arc::new(Notify::new());
        let (status_tx, status_rx) = watch::channel(SourceStatus::default());
        let import_ar = served.service_import.service_import();
        let (imports, t1) = spawn_reflector(
            Api::<ServiceImport>::all_with(self.client.clone(), &import_ar),
            import_ar,
            watcher::Config::default(),
            "serviceimports",
            changed.clone(),
            status_tx.clone(),
        );
        let export_ar = served.service_export.service_export();
        let (exports, t2) = spawn_reflector(
            Api::<ServiceExport>::all_with(self.client.clone(), &export_ar),
            export_ar,
            watcher::Config::default(),
            "serviceexports",
            changed.clone(),
            status_tx.clone(),
        );
        let (slices, t3) = spawn_reflector(
            Api::<EndpointSlice>::all(self.client.clone()),
            (),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            "endpointslices",
            changed.clone(),
            status_tx.clone(),
        );
        let abort_all = || {
            t1.abort();
            t2.abort();
            t3.abort();
        };
        let ready = async {
            imports.wait_until_ready().await?;
            exports.wait_until_ready().await?;
            slices.wait_until_ready().await
        };
        match tokio::time::timeout(self.init_timeout, ready).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                abort_all();
                return Err(DiscoveryError::Watch {
                    resource: "stores",
                    message: e.to_string(),
                });
            }
            Err(_) => {
                abort_all();
                let last = status_rx.borrow().last_error.clone();
                return Err(DiscoveryError::Watch {
                    resource: "serviceimports/serviceexports/endpointslices",
                    message: format!(
                        "no complete listing within {:?}{}",
                        self.init_timeout,
                        last.map(|l| format!(" (last error: {l})"))
                            .unwrap_or_default()
                    ),
                });
            }
        }
        let stores = Stores {
            imports,
            exports,
            slices,
        };
        let first = stores.build(&self.local, &self.static_clusters);
        tracing::info!(
            services = first.services.len(),
            without_vip = first.without_vip.len(),
            clusters = first.clusters.len(),
            "kubernetes discovery ready"
        );
        log_without_vip_changes(&BTreeSet::new(), &first.without_vip);
        let (tx, rx) = watch::channel(Arc::new(first));
        status_tx.send_modify(|s| s.refreshes_ok += 1);
        let task = tokio::spawn(async move {
            let _reflectors = AbortOnDrop(vec![t1, t2, t3]);
            loop {
                changed.notified().await;
                tokio::time::sleep(self.debounce).await;
                let catalog = stores.build(&self.local, &self.static_clusters);
                let modified = tx.send_if_modified(|cur| {
                    if **cur == catalog {
                        false
                    } else {
                        log_without_vip_changes(&cur.without_vip, &catalog.without_vip);
                        *cur = Arc::new(catalog);
                        true
                    }
                });
                if modified {
                    status_tx.send_modify(|s| {
                        s.refreshes_ok += 1;
                        s.last_error = None;
                    });
                }
            }
        });
        Ok(CatalogWatch::new(rx, status_rx, task))
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;
