//! The policy watcher against kube's tower-test mock API server (the only fake allowed: the
//! Kubernetes API). The mock answers the watcher's LIST requests with scripted objects and
//! holds its WATCH requests open until a test pushes events into them.

use std::collections::HashMap;
use std::time::Duration;

use ballast_broker::crd::{spawn_policy_watcher, ClusterPolicy, PolicySettings};
use ballast_broker::model::{Params, Policy};
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
                        "optimizedLoadBalancingParams": "cost"}),
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
    let (client, _api) = start(lists);
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
