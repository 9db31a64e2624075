//! The policy watcher against kube's tower-test mock API server (the only fake allowed: the
//! Kubernetes API). The mock answers the watcher's LIST requests with scripted objects and
//! holds its WATCH requests open until a test pushes events into them.

use std::collections::HashMap;
use std::time::Duration;

use ballast_broker::policy::{spawn_policy_watcher, ClusterPolicy, PolicySettings};
use ballast_model::{Params, Policy};
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tower_test::mock;

const CLUSTER: &str = "loadbalancingpolicies";
const SERVICE: &str = "serviceloadbalancingpolicies";
const FALLBACK: ClusterPolicy = ClusterPolicy {
    policy: Policy::Optimized,
    params: Params::Mixed,
};

/// A scripted API server for the two ballast kinds.
struct MockApi {
    /// Push `(plural, watch events)`: the mock answers the open WATCH of that kind with them.
    events: mpsc::UnboundedSender<(&'static str, Vec<Value>)>,
    /// Every request path + query the watcher made.
    requests: mpsc::UnboundedReceiver<String>,
    /// Every status write: `(path, JSON body)`.
    statuses: mpsc::UnboundedReceiver<(String, Value)>,
}

fn cluster_policy(name: &str, rv: u32, spec: &Value) -> Value {
    json!({
        "apiVersion": "ballast.io/v1alpha1", "kind": "LoadBalancingPolicy",
        "metadata": {"name": name, "resourceVersion": rv.to_string(), "uid": format!("uid-{name}")},
        "spec": spec,
    })
}

fn service_policy(ns: &str, name: &str, rv: u32, spec: &Value) -> Value {
    json!({
        "apiVersion": "ballast.io/v1alpha1", "kind": "ServiceLoadBalancingPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(),
                     "uid": format!("uid-{ns}-{name}")},
        "spec": spec,
    })
}

fn list_body(plural: &str, items: &[Value]) -> Vec<u8> {
    let kind = if plural == CLUSTER {
        "LoadBalancingPolicyList"
    } else {
        "ServiceLoadBalancingPolicyList"
    };
    serde_json::to_vec(&json!({
        "apiVersion": "ballast.io/v1alpha1", "kind": kind,
        "metadata": {"resourceVersion": "10"},
        "items": items,
    }))
    .expect("list json")
}

/// The API server's answer to a status PATCH: the object with that status (the broker does
/// not use it beyond decoding).
fn status_reply(path: &str, patch: &Value) -> Vec<u8> {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // apis/ballast.io/v1alpha1/[namespaces/NS/]PLURAL/NAME/status
    let name = seg[seg.len() - 2];
    let mut obj = if seg[seg.len() - 3] == CLUSTER {
        cluster_policy(name, 20, &json!({}))
    } else {
        service_policy(seg[4], name, 20, &json!({"serviceImportName": "x"}))
    };
    obj["status"] = patch["status"].clone();
    serde_json::to_vec(&obj).expect("json")
}

/// Waits (at most 2 s) until `n` objects have had their status written; returns the last
/// status written per path.
async fn wait_statuses(api: &mut MockApi, n: usize) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for _ in 0..100 {
        while let Ok((path, patch)) = api.statuses.try_recv() {
            out.insert(path, patch["status"].clone());
        }
        if out.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// A WATCH response carrying `events`, one JSON object a line; the stream then ends and the
/// watcher re-watches from the last resourceVersion.
fn watch_body(events: Vec<Value>) -> Response<Body> {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(&e).expect("event json"));
        body.push(b'\n');
    }
    Response::new(Body::from(body))
}

/// Starts the mock: `lists` maps a plural to the objects its LIST returns.
fn start(lists: HashMap<&'static str, Vec<Value>>) -> (Client, MockApi) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<(&'static str, Vec<Value>)>();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut open_watches: HashMap<&'static str, Vec<mock::SendResponse<Response<Body>>>> =
            HashMap::new();
        let mut queued: HashMap<&'static str, Vec<Vec<Value>>> = HashMap::new();
        let mut events_open = true;
        loop {
            tokio::select! {
                req = handle.next_request() => {
                    let Some((req, send)) = req else { break };
                    let uri = req.uri().clone();
                    let _ = req_tx.send(uri.to_string());
                    if uri.path().ends_with("/status") {
                        assert_eq!(req.method(), http::Method::PATCH, "{uri}");
                        let body = req.into_body().collect_bytes().await.expect("body");
                        let patch: Value = serde_json::from_slice(&body).expect("patch json");
                        let reply = status_reply(uri.path(), &patch);
                        let _ = status_tx.send((uri.path().to_string(), patch));
                        send.send_response(Response::new(Body::from(reply)));
                        continue;
                    }
                    let plural = match uri.path().rsplit('/').next() {
                        Some(CLUSTER) => CLUSTER,
                        Some(SERVICE) => SERVICE,
                        other => panic!("unexpected API path {other:?} in {uri}"),
                    };
                    assert_eq!(req.method(), http::Method::GET, "{uri}");
                    if uri.query().unwrap_or("").contains("watch=true") {
                        match queued.get_mut(plural).filter(|q| !q.is_empty()) {
                            Some(q) => send.send_response(watch_body(q.remove(0))),
                            None => open_watches.entry(plural).or_default().push(send),
                        }
                    } else {
                        let items = lists.get(plural).cloned().unwrap_or_default();
                        send.send_response(Response::new(Body::from(list_body(plural, &items))));
                    }
                }
                ev = events_rx.recv(), if events_open => {
                    let Some((plural, events)) = ev else { events_open = false; continue };
                    match open_watches.get_mut(plural).and_then(Vec::pop) {
                        Some(send) => send.send_response(watch_body(events)),
                        None => queued.entry(plural).or_default().push(events),
                    }
                }
            }
        }
    });
    (
        Client::new(service, "default"),
        MockApi {
            events: events_tx,
            requests: req_rx,
            statuses: status_rx,
        },
    )
}

async fn wait_for(
    rx: &mut watch::Receiver<PolicySettings>,
    what: &str,
    pred: impl FnMut(&PolicySettings) -> bool,
) -> PolicySettings {
    let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(pred))
        .await
        .map(|r| r.map(|s| s.clone()));
    match waited {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("watcher task ended while waiting for {what}"),
        Err(_) => panic!(
            "timed out waiting for {what}; last settings: {:?}",
            *rx.borrow()
        ),
    }
}

#[tokio::test]
async fn kube_mock_api_policy_crd_listed_objects_become_settings() {
    let lists = HashMap::from([
        (
            CLUSTER,
            vec![cluster_policy(
                "default",
                3,
                &json!({"serviceDiscoveryLoadBalancing": "weighted-round-robin",
                "optimizedLoadBalancingParams": "cost",
                "egressPrices": [
                    {"provider": "aws", "from": "sa-east-1", "to": "*",
                     "usdPerGb": 0.018, "note": "contract 2026"},
                    {"provider": "gcp", "from": "continent:europe", "to": "internet",
                     "usdPerGb": 0.05}
                ]}),
            )],
        ),
        (
            SERVICE,
            vec![
                service_policy(
                    "demo",
                    "echo-rr",
                    4,
                    &json!({"serviceImportName": "echo",
                            "serviceDiscoveryLoadBalancing": "round-robin"}),
                ),
                service_policy(
                    "shop",
                    "cart",
                    5,
                    &json!({"serviceImportName": "cart",
                            "optimizedLoadBalancingParams": "performance"}),
                ),
            ],
        ),
    ]);
    let (client, mut api) = start(lists);
    let mut rx = spawn_policy_watcher(client, FALLBACK);
    let s = wait_for(&mut rx, "listed objects", |s| {
        s.from_crd && s.services.len() == 2
    })
    .await;

    assert_eq!(
        s.cluster,
        ClusterPolicy {
            policy: Policy::WeightedRoundRobin,
            params: Params::Cost
        }
    );
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    // The negotiated prices as the API server serves them (camelCase, optional note).
    assert_eq!(s.egress_prices.len(), 2);
    assert_eq!(
        (
            s.egress_prices[0].from.as_str(),
            s.egress_prices[0].usd_per_gb,
            s.egress_prices[0].note.as_deref()
        ),
        ("sa-east-1", 0.018, Some("contract 2026"))
    );
    assert_eq!(s.egress_prices[1].to, "internet");
    // Overrides apply per service and inherit what they leave out.
    assert_eq!(
        s.for_service("demo/echo"),
        (Policy::RoundRobin, Params::Cost)
    );
    assert_eq!(
        s.for_service("shop/cart"),
        (Policy::WeightedRoundRobin, Params::Performance)
    );
    assert_eq!(
        s.for_service("demo/other"),
        (Policy::WeightedRoundRobin, Params::Cost)
    );
    assert_eq!(s.services["demo/echo"].source, "demo/echo-rr");

    // The watcher listed both kinds cluster-wide (every namespace).
    let mut paths = Vec::new();
    while let Ok(p) = api.requests.try_recv() {
        paths.push(p);
    }
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("/apis/ballast.io/v1alpha1/loadbalancingpolicies?")),
        "{paths:?}"
    );
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("/apis/ballast.io/v1alpha1/serviceloadbalancingpolicies?")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn kube_mock_api_policy_crd_invalid_value_rejected_naming_field() {
    let lists = HashMap::from([
        (
            CLUSTER,
            vec![
                cluster_policy(
                    "default",
                    3,
                    &json!({"serviceDiscoveryLoadBalancing": "fastest"}),
                ),
                cluster_policy(
                    "second",
                    4,
                    &json!({"serviceDiscoveryLoadBalancing": "round-robin"}),
                ),
            ],
        ),
        (
            SERVICE,
            vec![
                service_policy(
                    "demo",
                    "echo",
                    5,
                    &json!({"serviceImportName": "echo",
                            "optimizedLoadBalancingParams": "cheapest"}),
                ),
                service_policy(
                    "demo",
                    "good",
                    6,
                    &json!({"serviceImportName": "web",
                            "serviceDiscoveryLoadBalancing": "round-robin"}),
                ),
            ],
        ),
    ]);
    let (client, mut api) = start(lists);
    let mut rx = spawn_policy_watcher(client, FALLBACK);
    let s = wait_for(&mut rx, "rejections", |s| s.rejected.len() == 3).await;

    let errors: HashMap<&str, &str> = s
        .rejected
        .iter()
        .map(|r| (r.object.as_str(), r.error.as_str()))
        .collect();
    let e = errors["LoadBalancingPolicy/default"];
    assert!(
        e.contains("spec.serviceDiscoveryLoadBalancing") && e.contains("fastest"),
        "{e}"
    );
    let e = errors["LoadBalancingPolicy/second"];
    assert!(e.contains("metadata.name"), "{e}");
    let e = errors["ServiceLoadBalancingPolicy/demo/echo"];
    assert!(
        e.contains("spec.optimizedLoadBalancingParams") && e.contains("cheapest"),
        "{e}"
    );

    // Nothing of the bad objects applied: the broker's defaults stay, the bad override is
    // absent, the good override is in force.
    assert_eq!(s.cluster, FALLBACK);
    assert!(!s.from_crd);
    assert!(!s.services.contains_key("demo/echo"));
    assert_eq!(
        s.for_service("demo/web"),
        (Policy::RoundRobin, Params::Mixed)
    );

    // Each object's verdict is written back to its status, naming the field.
    let statuses = wait_statuses(&mut api, 4).await;
    let base = "/apis/ballast.io/v1alpha1";
    let st = &statuses[&format!("{base}/loadbalancingpolicies/default/status")];
    assert_eq!(st["accepted"], false);
    let msg = st["message"].as_str().expect("message");
    assert!(msg.contains("spec.serviceDiscoveryLoadBalancing"), "{msg}");
    assert_eq!(
        statuses[&format!("{base}/loadbalancingpolicies/second/status")]["accepted"],
        false
    );
    let st = &statuses[&format!("{base}/namespaces/demo/serviceloadbalancingpolicies/echo/status")];
    assert_eq!(st["accepted"], false);
    let msg = st["message"].as_str().expect("message");
    assert!(msg.contains("spec.optimizedLoadBalancingParams"), "{msg}");
    let st = &statuses[&format!("{base}/namespaces/demo/serviceloadbalancingpolicies/good/status")];
    assert_eq!(st["accepted"], true);
    assert_eq!(st["message"], "applied to ServiceImport demo/web");
    assert_eq!(statuses.len(), 4, "{statuses:?}");
}

#[tokio::test]
async fn kube_mock_api_policy_crd_watch_events_move_policy_and_keep_last_good() {
    let lists = HashMap::from([
        (
            CLUSTER,
            vec![cluster_policy(
                "default",
                3,
                &json!({"serviceDiscoveryLoadBalancing": "optimized",
                        "optimizedLoadBalancingParams": "performance"}),
            )],
        ),
        (SERVICE, vec![]),
    ]);
    let (client, api) = start(lists);
    let mut rx = spawn_policy_watcher(client, FALLBACK);
    let s = wait_for(&mut rx, "listed default", |s| s.from_crd).await;
    assert_eq!(s.cluster.params, Params::Performance);

    // An operator switches the cluster to round-robin and adds an override.
    api.events
        .send((
            CLUSTER,
            vec![
                json!({"type": "MODIFIED", "object": cluster_policy("default", 11,
                &json!({"serviceDiscoveryLoadBalancing": "round-robin",
                        "optimizedLoadBalancingParams": "performance"}))}),
            ],
        ))
        .expect("mock alive");
    let s = wait_for(&mut rx, "round-robin", |s| {
        s.cluster.policy == Policy::RoundRobin
    })
    .await;
    assert_eq!(s.cluster.params, Params::Performance);

    api.events
        .send((
            SERVICE,
            vec![json!({"type": "ADDED", "object": service_policy("demo", "echo", 12,
                &json!({"serviceImportName": "echo", "serviceDiscoveryLoadBalancing": "optimized"}))})],
        ))
        .expect("mock alive");
    let s = wait_for(&mut rx, "override", |s| {
        s.services.contains_key("demo/echo")
    })
    .await;
    assert_eq!(
        s.for_service("demo/echo"),
        (Policy::Optimized, Params::Performance)
    );

    // A bad edit (a CRD without its schema would let it through) is rejected, naming the
    // field, and the last accepted value stays in force.
    api.events
        .send((
            CLUSTER,
            vec![
                json!({"type": "MODIFIED", "object": cluster_policy("default", 13,
                &json!({"serviceDiscoveryLoadBalancing": "round-robin",
                        "optimizedLoadBalancingParams": "bogus"}))}),
            ],
        ))
        .expect("mock alive");
    let s = wait_for(&mut rx, "rejection", |s| !s.rejected.is_empty()).await;
    assert!(
        s.rejected[0]
            .error
            .contains("spec.optimizedLoadBalancingParams"),
        "{:?}",
        s.rejected
    );
    assert_eq!(
        s.cluster,
        ClusterPolicy {
            policy: Policy::RoundRobin,
            params: Params::Performance
        }
    );

    // Deleting the override falls back to the cluster-wide policy.
    api.events
        .send((
            SERVICE,
            vec![json!({"type": "DELETED", "object": service_policy("demo", "echo", 14,
                &json!({"serviceImportName": "echo", "serviceDiscoveryLoadBalancing": "optimized"}))})],
        ))
        .expect("mock alive");
    let s = wait_for(&mut rx, "override gone", |s| s.services.is_empty()).await;
    assert_eq!(
        s.for_service("demo/echo"),
        (Policy::RoundRobin, Params::Performance)
    );
}
