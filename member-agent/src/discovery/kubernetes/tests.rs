//! Kubernetes discovery against kube's tower-test mock API service (the one fake allowed:
//! the Kubernetes API), with object shapes recorded from Lighthouse and mcs-api
//! (`tests/fixtures/mcs/`, see its README).
#![allow(clippy::unwrap_used)]

use crate::service_probe::PROBE_ANNOTATION;
use std::io::Write;
use std::sync::Mutex;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use crate::metrics::Metrics;
use crate::probe::PeerTable;
use crate::steering::report::build_report;

/// A fixture from `tests/fixtures/mcs/`, as JSON.
/// The report node-1 of east sends for catalog `c`, no peers, no RPS, with `measured`
/// service times.
fn report_of(
    c: &Catalog,
    measured: &crate::service_probe::ServiceTimes,
) -> ballast_proto::v1::ReportRequest {
    build_report(
        "east",
        "node-1",
        c,
        &PeerTable::new(),
        &BTreeMap::new(),
        measured,
    )
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/mcs/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn import() -> Value {
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

fn slice(name: &str, cluster: &str, eps: &[(&str, Option<bool>)]) -> Value {
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

fn export() -> Value {
    json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {
            "name": "web", "namespace": "shop", "resourceVersion": "7",
            "annotations": {
                CAPACITY_ANNOTATION: "120",
                SERVICE_TIME_ANNOTATION: "base_ms=12,slope_ms_per_rps=0.3",
                PROBE_ANNOTATION: "/healthz"
            }
        }
    })
}

fn default_slices() -> Vec<Value> {
    vec![
        slice(
            "web-east",
            "east",
            &[("10.1.0.1", Some(true)), ("10.1.0.2", Some(false))],
        ),
        slice("web-west", "west", &[("10.2.0.1", None)]),
    ]
}

/// The API server the mock plays: which MCS versions it serves, what each LIST returns, and
/// watch events released by phase (`phase.send(n)` releases the events of phase `n`).
struct MockApi {
    /// Served versions of `multicluster.x-k8s.io`, most preferred first (as a server lists
    /// them); empty: the group is not served.
    versions: Vec<&'static str>,
    imports: Vec<Value>,
    exports: Vec<Value>,
    slices: Vec<Value>,
    /// `(phase, resource plural, event)`: sent on that resource's watch once the phase is
    /// reached, each phase's events of one resource as one watch response.
    events: Vec<(u32, &'static str, Value)>,
}

fn list(kind: &str, api_version: &str, items: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": "10"},
        "items": items
    }))
    .unwrap()
}

/// What `GET /apis/multicluster.x-k8s.io/<v>` returns for the MCS CRDs (with their status
/// subresources, as the API server lists them).
fn mcs_resources(version: &str) -> Vec<u8> {
    let res = |plural: &str, singular: &str, kind: &str, short: &[&str]| {
        json!({
            "name": plural, "singularName": singular, "namespaced": true, "kind": kind,
            "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"],
            "shortNames": short, "categories": ["multicluster"],
            "storageVersionHash": "x2mYbcCPyJ0="
        })
    };
    let status = |plural: &str, kind: &str| {
        json!({"name": format!("{plural}/status"), "singularName": "", "namespaced": true,
               "kind": kind, "verbs": ["get", "patch", "update"]})
    };
    serde_json::to_vec(&json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("multicluster.x-k8s.io/{version}"),
        "resources": [
            res("serviceexports", "serviceexport", "ServiceExport", &["svcex"]),
            status("serviceexports", "ServiceExport"),
            res("serviceimports", "serviceimport", "ServiceImport", &["svcim", "svcimport"]),
            status("serviceimports", "ServiceImport"),
        ]
    }))
    .unwrap()
}

/// `GET /apis`: the MCS group (when served) beside the built-in groups.
fn api_groups(versions: &[&str]) -> Vec<u8> {
    let mut groups = vec![json!({
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
    })];
    if let Some(first) = versions.first() {
        groups.push(json!({
            "name": "multicluster.x-k8s.io",
            "versions": versions.iter().map(|v| json!({
                "groupVersion": format!("multicluster.x-k8s.io/{v}"), "version": v
            })).collect::<Vec<_>>(),
            "preferredVersion": {"groupVersion": format!("multicluster.x-k8s.io/{first}"), "version": first}
        }));
    }
    serde_json::to_vec(&json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        .unwrap()
}

/// The object as the server returns it at `version` (the API server converts between
/// versions of the same schema by rewriting `apiVersion`).
fn at_version(mut obj: Value, version: &str) -> Value {
    obj["apiVersion"] = json!(format!("multicluster.x-k8s.io/{version}"));
    obj
}

impl MockApi {
    /// Serves requests until the client goes away; returns the paths asked for.
    async fn serve(
        self,
        handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        phase: watch::Receiver<u32>,
    ) -> Vec<String> {
        let mut handle = std::pin::pin!(handle);
        let mut held = Vec::new();
        let mut seen = Vec::new();
        let mut events = self.events.clone();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            seen.push(uri.clone());
            let path = req.uri().path().to_owned();
            let resource = path.rsplit('/').next().unwrap_or_default().to_owned();
            if uri.contains("watch=true") {
                let next = events
                    .iter()
                    .filter(|(_, r, _)| *r == resource)
                    .map(|(p, _, _)| *p)
                    .min();
                let Some(p) = next else {
                    held.push(send); // never answered: the watch stays open
                    continue;
                };
                let mut body = Vec::new();
                events.retain(|(ep, r, ev)| {
                    if *ep == p && *r == resource {
                        body.extend(serde_json::to_vec(ev).unwrap());
                        body.push(b'\n');
                        false
                    } else {
                        true
                    }
                });
                let mut phase = phase.clone();
                tokio::spawn(async move {
                    let _ = phase.wait_for(|n| *n >= p).await;
                    send.send_response(Response::new(Body::from(body)));
                });
                continue;
            }
            let mcs_version = path
                .strip_prefix("/apis/multicluster.x-k8s.io/")
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned);
            let body = match (path.as_str(), mcs_version.as_deref()) {
                ("/apis", _) => api_groups(&self.versions),
                (_, Some(v)) if !self.versions.contains(&v) => {
                    panic!("asked for an MCS version the server does not serve: {uri}")
                }
                (p, Some(v)) if p == format!("/apis/multicluster.x-k8s.io/{v}") => mcs_resources(v),
                (_, Some(v)) if resource == "serviceimports" => list(
                    "ServiceImportList",
                    &format!("multicluster.x-k8s.io/{v}"),
                    &self
                        .imports
                        .iter()
                        .map(|o| at_version(o.clone(), v))
                        .collect::<Vec<_>>(),
                ),
                (_, Some(v)) if resource == "serviceexports" => list(
                    "ServiceExportList",
                    &format!("multicluster.x-k8s.io/{v}"),
                    &self
                        .exports
                        .iter()
                        .map(|o| at_version(o.clone(), v))
                        .collect::<Vec<_>>(),
                ),
                ("/apis/discovery.k8s.io/v1/endpointslices", _) => {
                    assert!(
                        uri.contains("labelSelector=multicluster.kubernetes.io%2Fservice-name"),
                        "{uri}"
                    );
                    list("EndpointSliceList", "discovery.k8s.io/v1", &self.slices)
                }
                _ => panic!("unexpected request {uri}"),
            };
            send.send_response(Response::new(Body::from(body)));
        }
        drop(held);
        seen
    }
}

fn discovery(client: Client) -> KubernetesDiscovery {
    KubernetesDiscovery {
        client,
        local: "east".into(),
        static_clusters: vec![Cluster {
            id: "west".into(),
            region: Some("eu-west-1".into()),
            zone: None,
            provider: None,
            gateway: Some("127.0.0.2".parse().unwrap()),
        }],
        init_timeout: Duration::from_secs(5),
        debounce: Duration::from_millis(10),
    }
}

/// Starts discovery against `api`: the running watch, the phase sender and the mock's task.
async fn start_against(
    api: MockApi,
) -> (
    Result<CatalogWatch, DiscoveryError>,
    watch::Sender<u32>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (phase_tx, phase_rx) = watch::channel(0);
    let server = tokio::spawn(api.serve(handle, phase_rx));
    let w = discovery(Client::new(svc, "default")).start().await;
    (w, phase_tx, server)
}

/// Waits for the next catalog that satisfies `done`.
async fn next_catalog(w: &mut CatalogWatch, done: impl Fn(&Catalog) -> bool) -> Arc<Catalog> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::timeout_at(deadline, w.catalog.changed())
            .await
            .expect("catalog updated from the watch")
            .expect("alive");
        let c = w.current();
        if done(&c) {
            return c;
        }
    }
}

/// Stops the mock and returns the request paths it served.
async fn paths(w: CatalogWatch, server: tokio::task::JoinHandle<Vec<String>>) -> Vec<String> {
    drop(w);
    // the client (and its mock service) lives in the aborted tasks; the mock ends when the
    // last clone is dropped, which the abort does
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("mock API ends when the client is dropped")
        .unwrap()
}

#[tokio::test]
async fn import_and_slices_become_service_at_v1alpha1_against_mock_api() {
    let mut ev = slice("web-west", "west", &[("10.2.0.1", Some(false))]);
    ev["metadata"]["resourceVersion"] = json!("11");
    let api = MockApi {
        versions: vec!["v1alpha1"], // an API server with mcs-api before v0.5 (Lighthouse's)
        imports: vec![import()],
        exports: vec![export()],
        slices: default_slices(),
        events: vec![(
            1,
            "endpointslices",
            json!({"type": "MODIFIED", "object": ev}),
        )],
    };
    let (w, phase, server) = start_against(api).await;
    let mut w = w.expect("discovery starts against the mock API");
    let c = w.current();
    let web = &c.services[&ServiceName::parse("shop/web").unwrap()];
    assert_eq!(web.vips, vec!["127.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        web.ports,
        vec![ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp
        }]
    );
    assert_eq!(web.capacity_rps_per_pod, Some(120.0));
    assert_eq!(web.service_time_probe.as_deref(), Some("/healthz"));
    assert_eq!(
        web.service_time_per_pod,
        Some(ServiceTime {
            base_ms: 12.0,
            slope_ms_per_rps: 0.3
        })
    );
    // ... and reported with the capacity as the cluster's curve (one ready pod in east here).
    let report = report_of(&c, &BTreeMap::from([(web.name.clone(), 17.5)]));
    let curve = report.capacity[0].service_time.expect("declared");
    assert_eq!((curve.base_ms, curve.slope_ms_per_rps), (12.0, 0.3));
    // what the service probe measured goes with it
    assert_eq!(report.capacity[0].measured_service_ms, Some(17.5));
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
        vec![("west".to_owned(), "127.0.0.2".parse().unwrap())]
    );
    assert!(c.without_vip.is_empty());
    // the watch reports west's endpoint unready: the catalog follows
    phase.send_replace(1);
    let c = next_catalog(&mut w, |c| {
        let web = &c.services[&ServiceName::parse("shop/web").unwrap()];
        web.ready_endpoints_for(&web.ports[0]).len() == 1
    })
    .await;
    let web = &c.services[&ServiceName::parse("shop/web").unwrap()];
    assert_eq!(
        web.ready_endpoints_for(&web.ports[0])[0]
            .address
            .to_string(),
        "10.1.0.1:8080"
    );
    // only v1alpha1 is served: that is what is watched
    let seen = paths(w, server).await;
    assert!(
        seen.iter()
            .any(|p| p.starts_with("/apis/multicluster.x-k8s.io/v1alpha1/serviceimports?")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|p| p.starts_with("/apis/multicluster.x-k8s.io/v1alpha1/serviceexports?")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|p| p.contains("v1beta1")), "{seen:?}");
}

/// Captures the formatted log lines of the current thread (the tests run on tokio's
/// current-thread runtime, so spawned tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn lines(&self, level: &str, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(level) && l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .without_time()
        .finish();
    (logs, tracing::subscriber::set_default(sub))
}

#[tokio::test]
async fn lighthouse_and_v1beta1_objects_against_mock_api() {
    let (logs, _guard) = capture_logs();
    let cart = fixture("lighthouse-aggregated-serviceimport-no-vip.yaml");
    // a resync: the same object again (new resourceVersion), nothing changed
    let mut cart_again = cart.clone();
    cart_again["metadata"]["resourceVersion"] = json!("2400");
    // the operator enables clusterset IPs: Lighthouse fills spec.ips
    let mut cart_vip = cart.clone();
    cart_vip["metadata"]["resourceVersion"] = json!("2401");
    cart_vip["metadata"]["annotations"]["lighthouse.submariner.io/use-clusterset-ip"] =
        json!("true");
    cart_vip["spec"]["ips"] = json!(["127.96.0.11"]);
    let mut west_unready = slice("web-west", "west", &[("10.2.0.1", Some(false))]);
    west_unready["metadata"]["resourceVersion"] = json!("2402");
    let api = MockApi {
        versions: vec!["v1beta1", "v1alpha1"], // mcs-api v0.5: both served, v1beta1 stored
        imports: vec![
            fixture("v1beta1-serviceimport.yaml"),
            fixture("lighthouse-local-serviceimport.yaml"),
            fixture("lighthouse-legacy-serviceimport.yaml"),
            fixture("lighthouse-broker-aggregated-serviceimport.yaml"),
            cart,
        ],
        exports: vec![fixture("v1beta1-serviceexport.yaml")],
        slices: default_slices(),
        events: vec![
            (
                1,
                "serviceimports",
                json!({"type": "MODIFIED", "object": cart_again}),
            ),
            (
                1,
                "endpointslices",
                json!({"type": "MODIFIED", "object": west_unready}),
            ),
            (
                2,
                "serviceimports",
                json!({"type": "MODIFIED", "object": cart_vip}),
            ),
        ],
    };
    let (w, phase, server) = start_against(api).await;
    let mut w = w.expect("discovery starts against the mock API");
    let metrics = Metrics::new();
    let gauge_task = metrics.follow_catalog(w.catalog.clone());

    // Lighthouse's per-cluster ServiceImports are not services; the v1beta1 import is
    let c = w.current();
    let names: Vec<String> = c.services.keys().map(ToString::to_string).collect();
    assert_eq!(names, ["shop/web"], "only the aggregated import with a VIP");
    let web = &c.services[&ServiceName::parse("shop/web").unwrap()];
    assert_eq!(web.vips, vec!["127.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        web.capacity_rps_per_pod,
        Some(120.0),
        "from the v1beta1 export"
    );
    let skipped = logs.lines("DEBUG", "Lighthouse per-cluster ServiceImport");
    for name in [
        "submariner-operator/web-shop-east",
        "submariner-operator/web-shop-west",
        "submariner-k8s-broker/web-shop",
    ] {
        assert!(
            skipped.iter().any(|l| l.contains(name)),
            "{name}: {skipped:?}"
        );
    }
    // the import without spec.ips: listed, counted, reported, warned about once
    let cart = ServiceName::parse("shop/cart").unwrap();
    assert_eq!(c.without_vip, [cart.clone()].into());
    tokio::task::yield_now().await;
    assert!(
        metrics
            .encode()
            .contains("ballast_agent_services_without_vip 1\n"),
        "{}",
        metrics.encode()
    );
    let report = report_of(&c, &BTreeMap::new());
    assert_eq!(report.services_without_vip, ["shop/cart"]);
    assert_eq!(
        report.imports.map(|i| i.services),
        Some(vec!["shop/web".to_owned()]),
        "neither Lighthouse's per-cluster imports nor the one without a VIP are declared"
    );
    let warned = || logs.lines("WARN", "ServiceImport without a VIP");
    assert_eq!(warned().len(), 1, "{:?}", warned());
    assert!(warned()[0].contains("shop/cart"), "{:?}", warned());
    assert!(
        warned()[0].contains("--clusterset-ip-enabled")
            && warned()[0].contains("lighthouse.submariner.io/use-clusterset-ip"),
        "the remedy: {:?}",
        warned()
    );

    // a resync of the import plus an unrelated change: no second warning
    phase.send_replace(1);
    let c = next_catalog(&mut w, |c| {
        let web = &c.services[&ServiceName::parse("shop/web").unwrap()];
        web.ready_endpoints_for(&web.ports[0]).len() == 1
    })
    .await;
    assert_eq!(c.without_vip, [cart.clone()].into());
    assert_eq!(warned().len(), 1, "once per change: {:?}", warned());

    // clusterset IPs enabled: the import is steered, the gauge drops, an info line says so
    phase.send_replace(2);
    let c = next_catalog(&mut w, |c| c.without_vip.is_empty()).await;
    assert_eq!(
        c.services[&cart].vips,
        vec!["127.96.0.11".parse::<IpAddr>().unwrap()]
    );
    tokio::task::yield_now().await;
    assert!(
        metrics
            .encode()
            .contains("ballast_agent_services_without_vip 0\n"),
        "{}",
        metrics.encode()
    );
    let report = report_of(&c, &BTreeMap::new());
    assert!(report.services_without_vip.is_empty());
    assert_eq!(warned().len(), 1);
    assert_eq!(
        logs.lines("INFO", "no longer without a VIP").len(),
        1,
        "{:?}",
        logs.lines("INFO", "VIP")
    );
    gauge_task.abort();

    // both v1beta1 and v1alpha1 are served: v1beta1 is watched, v1alpha1 never asked for
    let seen = paths(w, server).await;
    for r in ["serviceimports", "serviceexports"] {
        assert!(
            seen.iter()
                .any(|p| p.starts_with(&format!("/apis/multicluster.x-k8s.io/v1beta1/{r}?"))),
            "{r}: {seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|p| p.starts_with(&format!("/apis/multicluster.x-k8s.io/v1alpha1/{r}"))),
            "{r}: {seen:?}"
        );
    }
}

#[tokio::test]
async fn mcs_api_not_served_is_a_clear_error_against_mock_api() {
    let api = MockApi {
        versions: vec![],
        imports: vec![],
        exports: vec![],
        slices: vec![],
        events: vec![],
    };
    let (w, _phase, server) = start_against(api).await;
    let e = w.expect_err("no MCS API, no discovery").to_string();
    assert!(
        e.contains("multicluster.x-k8s.io") && e.contains("install the MCS CRDs"),
        "{e}"
    );
    server.abort();
}

#[test]
fn lighthouse_per_cluster_imports_are_recognised_and_aggregated_ones_are_not() {
    let parse = |name: &str| -> ServiceImport { serde_json::from_value(fixture(name)).unwrap() };
    for (file, marker) in [
        (
            "lighthouse-local-serviceimport.yaml",
            mcs::LIGHTHOUSE_SOURCE_NAMESPACE,
        ),
        (
            "lighthouse-legacy-serviceimport.yaml",
            mcs::LIGHTHOUSE_SOURCE_NAMESPACE,
        ),
        (
            "lighthouse-broker-aggregated-serviceimport.yaml",
            mcs::LIGHTHOUSE_SOURCE_NAMESPACE,
        ),
    ] {
        let si = parse(file);
        assert_eq!(
            mcs::lighthouse_marker(si.labels(), si.annotations()),
            Some(marker),
            "{file}"
        );
    }
    // the legacy labels alone, and a source-cluster label alone, mark one too
    let mut legacy = parse("lighthouse-legacy-serviceimport.yaml");
    legacy.labels_mut().remove(mcs::LIGHTHOUSE_SOURCE_NAMESPACE);
    assert_eq!(
        mcs::lighthouse_marker(legacy.labels(), legacy.annotations()),
        Some(mcs::LIGHTHOUSE_LEGACY_SOURCE_NAME)
    );
    let mut local = parse("lighthouse-local-serviceimport.yaml");
    local.labels_mut().remove(mcs::LIGHTHOUSE_SOURCE_NAMESPACE);
    assert_eq!(
        mcs::lighthouse_marker(local.labels(), local.annotations()),
        Some(SOURCE_CLUSTER_LABEL)
    );
    for file in [
        "lighthouse-aggregated-serviceimport-no-vip.yaml",
        "v1beta1-serviceimport.yaml",
    ] {
        let si = parse(file);
        assert_eq!(
            mcs::lighthouse_marker(si.labels(), si.annotations()),
            None,
            "{file}"
        );
    }
    // pure: the catalog built from all of them
    let all: Vec<Arc<ServiceImport>> = [
        "lighthouse-local-serviceimport.yaml",
        "lighthouse-legacy-serviceimport.yaml",
        "lighthouse-broker-aggregated-serviceimport.yaml",
        "lighthouse-aggregated-serviceimport-no-vip.yaml",
        "v1beta1-serviceimport.yaml",
    ]
    .into_iter()
    .map(|f| Arc::new(parse(f)))
    .collect();
    let (c, problems) = build_catalog("east", &[], &all, &[], &[]);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        c.services
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["shop/web"]
    );
    assert_eq!(
        c.without_vip
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["shop/cart"]
    );
}

#[test]
fn a_headless_import_is_not_reported_without_vip() {
    let mut headless: ServiceImport = serde_json::from_value(import()).unwrap();
    headless.spec.type_ = "Headless".into();
    headless.spec.ips.clear();
    let (c, problems) = build_catalog("east", &[], &[Arc::new(headless)], &[], &[]);
    assert!(problems.is_empty() && c.services.is_empty() && c.without_vip.is_empty());
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
    ex.metadata.annotations.get_or_insert_default().insert(
        SERVICE_TIME_ANNOTATION.into(),
        "base_ms=-1,slope_ms_per_rps=0".into(),
    );
    ex.metadata
        .annotations
        .get_or_insert_default()
        .insert(PROBE_ANNOTATION.into(), "/a b".into());
    let s: EndpointSlice =
        serde_json::from_value(slice("x", "Not_A_Label", &[("10.0.0.1", None)])).expect("slice");
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
        msgs.iter().any(|m| m.contains("ServiceExport shop/web")
            && m.contains(&format!("[{SERVICE_TIME_ANNOTATION}]: base_ms: -1"))),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("ServiceExport shop/web")
            && m.contains(&format!("[{PROBE_ANNOTATION}]: \"/a b\" holds ' '"))),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("EndpointSlice shop/x") && m.contains(SOURCE_CLUSTER_LABEL)),
        "{msgs:?}"
    );
    assert_eq!(problems.len(), 5);
}
