//! The Kubernetes source: the Multi-Cluster Services API.
//!
//! - `ServiceImport` (multicluster.x-k8s.io/v1alpha1): its `spec.ips` are the VIPs to steer,
//!   its `spec.ports` the ports. Headless imports (no IPs) are not steered.
//! - `EndpointSlice`s labelled `multicluster.kubernetes.io/service-name` (the import's name,
//!   same namespace) and `multicluster.kubernetes.io/source-cluster` (the cluster the
//!   endpoints run in). An endpoint is ready unless `conditions.ready` is `false`.
//! - `ServiceExport` (same API group): the annotation `ballast.io/capacity-rps-per-pod` on
//!   this cluster's export declares per-pod capacity.
//!
//! Each kind is watched with a kube-runtime reflector; any change rebuilds the catalog from
//! the three stores ([`build_catalog`], a pure function). An object that does not validate
//! is left out of the catalog and reported in [`SourceStatus`](super::SourceStatus).
//!
//! The MCS API carries no regions or gateways: peers' region/zone/provider/gateway come from
//! `static_clusters` (the agent's config file); a cluster seen only in a slice label is
//! known by id alone (not probed).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};

use super::{CatalogWatch, Discovery, DiscoveryError, SourceStatus};
use crate::catalog::{
    validate_cluster_id, Catalog, Cluster, ClusterId, Endpoint, Protocol, Service, ServiceName,
    ServicePort,
};

pub use ballast_k8s_api::mcs::{
    ClusterStatus, ServiceExport, ServiceExportSpec, ServiceExportStatus, ServiceImport,
    ServiceImportPort, ServiceImportSpec, ServiceImportStatus, CAPACITY_ANNOTATION,
    SERVICE_NAME_LABEL, SOURCE_CLUSTER_LABEL,
};

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
    for imp in imports {
        let ns = imp.namespace().unwrap_or_default();
        let n = imp.name_any();
        let object = format!("ServiceImport {ns}/{n}");
        match import_to_service(imp, &ns, &n) {
            Ok(None) => {}
            Ok(Some(mut svc)) => {
                let key = (ns, n);
                svc.capacity_rps_per_pod = capacities.get(&key).copied();
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
        },
        problems,
    )
}

fn import_to_service(imp: &ServiceImport, ns: &str, n: &str) -> Result<Option<Service>, String> {
    let name = ServiceName::parse(&format!("{ns}/{n}")).map_err(|e| format!("metadata: {e}"))?;
    if imp.spec.type_ == "Headless" || imp.spec.ips.is_empty() {
        return Ok(None);
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
    Ok(Some(Service {
        name,
        vips,
        ports,
        capacity_rps_per_pod: None,
        endpoints: vec![],
    }))
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
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
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
        let changed = Arc::new(Notify::new());
        let (status_tx, status_rx) = watch::channel(SourceStatus::default());
        let (imports, t1) = spawn_reflector(
            Api::<ServiceImport>::all(self.client.clone()),
            watcher::Config::default(),
            "serviceimports",
            changed.clone(),
            status_tx.clone(),
        );
        let (exports, t2) = spawn_reflector(
            Api::<ServiceExport>::all(self.client.clone()),
            watcher::Config::default(),
            "serviceexports",
            changed.clone(),
            status_tx.clone(),
        );
        let (slices, t3) = spawn_reflector(
            Api::<EndpointSlice>::all(self.client.clone()),
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
            clusters = first.clusters.len(),
            "kubernetes discovery ready"
        );
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
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    fn import() -> serde_json::Value {
        json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "5"},
            "spec": {
                "type": "ClusterSetIP",
                "ips": ["127.96.0.10"],
                "ports": [{"name": "http", "protocol": "TCP", "port": 80}]
            },
            "status": {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}
        })
    }

    fn slice(name: &str, cluster: &str, eps: &[(&str, Option<bool>)]) -> serde_json::Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name, "namespace": "shop", "resourceVersion": "6",
                "labels": {SERVICE_NAME_LABEL: "web", SOURCE_CLUSTER_LABEL: cluster}
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps.iter().map(|(ip, ready)| json!({
                "addresses": [ip],
                "conditions": ready.map(|r| json!({"ready": r})).unwrap_or(json!({}))
            })).collect::<Vec<_>>()
        })
    }

    fn export() -> serde_json::Value {
        json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceExport",
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "7",
                "annotations": {CAPACITY_ANNOTATION: "120"}
            }
        })
    }

    fn list(kind: &str, api_version: &str, items: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": "10"},
            "items": items
        }))
        .expect("json")
    }

    /// The fake API server (kube's tower-test mock): answers the three LIST calls, holds the
    /// WATCH calls open, and returns the paths it was asked for.
    async fn serve(
        handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        go: Arc<Notify>,
    ) -> Vec<String> {
        let mut handle = std::pin::pin!(handle);
        let mut held = Vec::new();
        let mut seen = Vec::new();
        let mut slice_event_sent = false;
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            seen.push(uri.clone());
            if uri.contains("watch=true") {
                if uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices") && !slice_event_sent
                {
                    // one change on the watch: west's endpoint goes unready
                    slice_event_sent = true;
                    let mut obj = slice("web-west", "west", &[("10.2.0.1", Some(false))]);
                    obj["metadata"]["resourceVersion"] = json!("11");
                    let ev = json!({"type": "MODIFIED", "object": obj});
                    let mut body = serde_json::to_vec(&ev).expect("json");
                    body.push(b'\n');
                    // once the test has checked the first catalog
                    let go = go.clone();
                    tokio::spawn(async move {
                        go.notified().await;
                        send.send_response(Response::new(Body::from(body)));
                    });
                } else {
                    held.push(send); // never answered: the watch stays open
                }
                continue;
            }
            let body = if uri.starts_with("/apis/multicluster.x-k8s.io/v1alpha1/serviceimports") {
                list(
                    "ServiceImportList",
                    "multicluster.x-k8s.io/v1alpha1",
                    vec![import()],
                )
            } else if uri.starts_with("/apis/multicluster.x-k8s.io/v1alpha1/serviceexports") {
                list(
                    "ServiceExportList",
                    "multicluster.x-k8s.io/v1alpha1",
                    vec![export()],
                )
            } else if uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices") {
                assert!(
                    uri.contains("labelSelector=multicluster.kubernetes.io%2Fservice-name"),
                    "{uri}"
                );
                list(
                    "EndpointSliceList",
                    "discovery.k8s.io/v1",
                    vec![
                        slice(
                            "web-east",
                            "east",
                            &[("10.1.0.1", Some(true)), ("10.1.0.2", Some(false))],
                        ),
                        slice("web-west", "west", &[("10.2.0.1", None)]),
                    ],
                )
            } else {
                panic!("unexpected request {uri}");
            };
            send.send_response(Response::new(Body::from(body)));
        }
        drop(held);
        seen
    }

    #[tokio::test]
    async fn kube_mock_api_service_import_and_slices_become_service() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let go = Arc::new(Notify::new());
        let server = tokio::spawn(serve(handle, go.clone()));
        let client = Client::new(svc, "default");
        let d = KubernetesDiscovery {
            client,
            local: "east".into(),
            static_clusters: vec![Cluster {
                id: "west".into(),
                region: Some("eu-west-1".into()),
                zone: None,
                provider: None,
                gateway: Some("127.0.0.2".parse().expect("ip")),
            }],
            init_timeout: Duration::from_secs(5),
            debounce: Duration::from_millis(10),
        };
        let mut w = d
            .start()
            .await
            .expect("discovery starts against the mock API");
        let c = w.current();
        let web = &c.services[&ServiceName::parse("shop/web").expect("name")];
        assert_eq!(web.vips, vec!["127.96.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            web.ports,
            vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Protocol::Tcp
            }]
        );
        assert_eq!(web.capacity_rps_per_pod, Some(120.0));
        let ready: Vec<(String, String)> = web
            .ready_endpoints_for(&web.ports[0])
            .iter()
            .map(|e| (e.address.to_string(), e.cluster.clone()))
            .collect();
        assert_eq!(
            ready,
            vec![
                ("10.1.0.1:8080".to_owned(), "east".to_owned()),
                ("10.2.0.1:8080".to_owned(), "west".to_owned())
            ]
        );
        // the unready endpoint is known but not ready
        assert!(web
            .endpoints
            .iter()
            .any(|e| e.address.to_string() == "10.1.0.2:8080" && !e.ready));
        assert_eq!(c.clusters["west"].region.as_deref(), Some("eu-west-1"));
        assert!(c.clusters.contains_key("east"));
        assert_eq!(
            c.probe_targets(),
            vec![("west".to_owned(), "127.0.0.2".parse().expect("ip"))]
        );
        // the watch reports west's endpoint unready: the catalog follows
        go.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::timeout_at(deadline, w.catalog.changed())
                .await
                .expect("catalog updated from the watch")
                .expect("alive");
            let c = w.current();
            let web = &c.services[&ServiceName::parse("shop/web").expect("name")];
            if web.ready_endpoints_for(&web.ports[0]).len() == 1 {
                assert_eq!(
                    web.ready_endpoints_for(&web.ports[0])[0]
                        .address
                        .to_string(),
                    "10.1.0.1:8080"
                );
                break;
            }
        }
        drop(w);
        server.abort();
    }

    #[test]
    fn invalid_objects_are_left_out_and_named() {
        let mut bad: ServiceImport = serde_json::from_value(import()).expect("import");
        bad.spec.ips = vec!["not-an-ip".into()];
        bad.metadata.name = Some("bad".into());
        let good: ServiceImport = serde_json::from_value(import()).expect("import");
        let mut headless = good.clone();
        headless.metadata.name = Some("headless".into());
        headless.spec.type_ = "Headless".into();
        headless.spec.ips.clear();
        let mut ex: ServiceExport = serde_json::from_value(export()).expect("export");
        ex.metadata
            .annotations
            .get_or_insert_default()
            .insert(CAPACITY_ANNOTATION.into(), "lots".into());
        let s: EndpointSlice =
            serde_json::from_value(slice("x", "Not_A_Label", &[("10.0.0.1", None)]))
                .expect("slice");
        let (c, problems) = build_catalog(
            "east",
            &[],
            &[Arc::new(bad), Arc::new(good), Arc::new(headless)],
            &[Arc::new(ex)],
            &[Arc::new(s)],
        );
        assert_eq!(c.services.len(), 1, "only the good import");
        let msgs: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.message))
            .collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("ServiceImport shop/bad: spec.ips[0]")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("ServiceExport shop/web") && m.contains(CAPACITY_ANNOTATION)),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("EndpointSlice shop/x") && m.contains(SOURCE_CLUSTER_LABEL)),
            "{msgs:?}"
        );
        assert_eq!(problems.len(), 3);
    }
}
