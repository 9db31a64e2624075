//! The policy CRD resync against kube's tower-test mock API service (the Kubernetes API is
//! the only thing faked: the broker's engine and SQLite store are real). The mock answers
//! LIST with the objects a test puts in it (changeable between lists), holds WATCH requests
//! open until a test pushes events, and answers status PATCHes.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_broker::engine::{Engine, EngineConfig, PolicyChange};
use ballast_broker::metrics::Metrics;
use ballast_broker::policy::{spawn_policy_watcher, sync, ClusterPolicy};
use ballast_model::{Params, Policy};
use ballast_store::{PolicyOrigin, Store, StoredPolicy};
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_test::mock;

const CLUSTER: &str = "loadbalancingpolicies";
const SERVICE: &str = "serviceloadbalancingpolicies";
const FALLBACK: ClusterPolicy = ClusterPolicy {
    policy: Policy::Optimized,
    params: Params::Mixed,
};

type Lists = Arc<Mutex<HashMap<&'static str, Vec<Value>>>>;

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
        "metadata": {"resourceVersion": "10"}, "items": items,
    }))
    .unwrap()
}

fn watch_body(events: Vec<Value>) -> Response<Body> {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(&e).unwrap());
        body.push(b'\n');
    }
    Response::new(Body::from(body))
}

/// The mock API: `lists` answers every LIST (read at each request, so a relist sees edits);
/// events pushed on the returned sender answer the open WATCH of that kind.
fn mock_api(lists: Lists) -> (Client, mpsc::UnboundedSender<(&'static str, Vec<Value>)>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<(&'static str, Vec<Value>)>();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut open: HashMap<&'static str, Vec<mock::SendResponse<Response<Body>>>> =
            HashMap::new();
        let mut queued: HashMap<&'static str, Vec<Vec<Value>>> = HashMap::new();
        let mut events_open = true;
        loop {
            tokio::select! {
                req = handle.next_request() => {
                    let Some((req, send)) = req else { break };
                    let uri = req.uri().clone();
                    if uri.path().ends_with("/status") {
                        // apis/ballast.io/v1alpha1/namespaces/NS/PLURAL/NAME/status
                        let seg: Vec<String> = uri.path().split('/').map(str::to_string).collect();
                        let body = req.into_body().collect_bytes().await.unwrap();
                        let patch: Value = serde_json::from_slice(&body).unwrap();
                        let mut obj = service_policy(&seg[5], &seg[seg.len() - 2], 20,
                            &json!({"serviceImportName": "x"}));
                        obj["status"] = patch["status"].clone();
                        send.send_response(Response::new(Body::from(serde_json::to_vec(&obj).unwrap())));
                        continue;
                    }
                    let plural = match uri.path().rsplit('/').next() {
                        Some(CLUSTER) => CLUSTER,
                        Some(SERVICE) => SERVICE,
                        other => panic!("unexpected API path {other:?} in {uri}"),
                    };
                    if uri.query().unwrap_or("").contains("watch=true") {
                        match queued.get_mut(plural).filter(|q| !q.is_empty()) {
                            Some(q) => send.send_response(watch_body(q.remove(0))),
                            None => open.entry(plural).or_default().push(send),
                        }
                    } else {
                        let items = lists.lock().unwrap().get(plural).cloned().unwrap_or_default();
                        send.send_response(Response::new(Body::from(list_body(plural, &items))));
                    }
                }
                ev = events_rx.recv(), if events_open => {
                    let Some((plural, events)) = ev else { events_open = false; continue };
                    match open.get_mut(plural).and_then(Vec::pop) {
                        Some(send) => send.send_response(watch_body(events)),
                        None => queued.entry(plural).or_default().push(events),
                    }
                }
            }
        }
    });
    (Client::new(service, "default"), events_tx)
}

async fn engine_on(url: &str) -> Arc<Engine> {
    let store = Store::connect(url).await.unwrap();
    Arc::new(
        Engine::load(store, EngineConfig::default(), Arc::new(Metrics::new()))
            .await
            .unwrap(),
    )
}

/// Starts the watcher on `client` and the store sync behind it; returns the sync task.
fn start_sync(engine: &Arc<Engine>, client: Client) -> tokio::task::JoinHandle<()> {
    let rx = spawn_policy_watcher(client, FALLBACK);
    tokio::spawn(sync::follow(engine.clone(), rx))
}

/// Polls the store (10 s at most) until `pred` holds for its policy rows; returns them.
async fn wait_rows(
    engine: &Engine,
    what: &str,
    pred: impl Fn(&[StoredPolicy]) -> bool,
) -> Vec<StoredPolicy> {
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = engine.store().stored_policies().await.unwrap();
        if pred(&rows) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; rows: {rows:?}")
}

fn row<'a>(rows: &'a [StoredPolicy], scope: &str) -> Option<&'a StoredPolicy> {
    rows.iter().find(|r| r.scope == scope)
}

fn web() -> Value {
    service_policy(
        "demo",
        "web-rr",
        4,
        &json!({"serviceImportName": "web", "serviceDiscoveryLoadBalancing": "round-robin"}),
    )
}

fn cart(policy: &str) -> Value {
    service_policy(
        "shop",
        "cart",
        5,
        &json!({"serviceImportName": "cart", "serviceDiscoveryLoadBalancing": policy}),
    )
}

async fn admin_override(engine: &Engine, service: &str) {
    engine
        .set_policy(
            service,
            PolicyChange::Set {
                policy: Some(Policy::WeightedRoundRobin),
                params: Some(Params::Cost),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn crd_deleted_while_broker_down_is_removed_on_resync_against_mock_api() {
    let dir = tempfile::tempdir().unwrap();
    let url = ballast_store::sqlite_url(&dir.path().join("b.db"));

    // First life: two overrides from CRDs, one set by an operator through the admin API.
    let engine = engine_on(&url).await;
    admin_override(&engine, "ops/db").await;
    let lists: Lists = Arc::new(Mutex::new(HashMap::from([
        (CLUSTER, vec![]),
        (SERVICE, vec![web(), cart("optimized")]),
    ])));
    let (client, _events) = mock_api(lists);
    let task = start_sync(&engine, client);
    let rows = wait_rows(&engine, "both CRD overrides stored", |r| {
        row(r, "demo/web").is_some() && row(r, "shop/cart").is_some()
    })
    .await;
    let w = row(&rows, "demo/web").unwrap();
    assert_eq!(
        (w.origin, w.source.as_str(), w.policy.as_str()),
        (
            PolicyOrigin::Crd,
            "ServiceLoadBalancingPolicy/demo/web-rr",
            "round-robin"
        )
    );

    // The broker stops.
    task.abort();
    let _ = task.await;
    engine.store().close().await;
    drop(engine);

    // While it is down, demo/web-rr is deleted and shop/cart is edited into an invalid value
    // (a CRD without its schema would let that through). The broker starts again.
    let engine = engine_on(&url).await;
    assert!(
        row(&engine.store().stored_policies().await.unwrap(), "demo/web").is_some(),
        "before the list, the last synced CRD records stay in force"
    );
    let lists: Lists = Arc::new(Mutex::new(HashMap::from([
        (CLUSTER, vec![]),
        (SERVICE, vec![cart("fastest")]),
    ])));
    let (client, _events) = mock_api(lists);
    let task = start_sync(&engine, client);
    let rows = wait_rows(&engine, "the deleted object's override removed", |r| {
        row(r, "demo/web").is_none()
    })
    .await;
    // The admin override survives the resync.
    let db = row(&rows, "ops/db").expect("admin override kept");
    assert_eq!(
        (db.origin, db.policy.as_str()),
        (PolicyOrigin::Admin, "weighted-round-robin")
    );
    // The invalid object is not silently dropped: its last accepted record stays.
    let c = row(&rows, "shop/cart").expect("invalid object's last good record kept");
    assert_eq!(
        (c.origin, c.policy.as_str()),
        (PolicyOrigin::Crd, "optimized")
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        engine.policy_of("demo/web").await.unwrap().0,
        Policy::Optimized,
        "demo/web follows the cluster-wide policy again"
    );
    task.abort();
}

#[tokio::test]
async fn watch_restart_relist_removes_deleted_crd_against_mock_api() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_on(&ballast_store::sqlite_url(&dir.path().join("b.db"))).await;
    admin_override(&engine, "ops/db").await;
    let lists: Lists = Arc::new(Mutex::new(HashMap::from([
        (CLUSTER, vec![]),
        (SERVICE, vec![web(), cart("optimized")]),
    ])));
    let (client, events) = mock_api(lists.clone());
    let task = start_sync(&engine, client);
    wait_rows(&engine, "both CRD overrides stored", |r| {
        row(r, "demo/web").is_some() && row(r, "shop/cart").is_some()
    })
    .await;

    // The watch breaks with 410 Gone (its resourceVersion expired) and the DELETED event of
    // shop/cart was never seen; the watcher relists, and the relist no longer holds it.
    lists.lock().unwrap().insert(SERVICE, vec![web()]);
    events
        .send((
            SERVICE,
            vec![json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version: 10 (20)", "reason": "Expired", "code": 410}})],
        ))
        .unwrap();
    let rows = wait_rows(&engine, "the relist's deletion applied", |r| {
        row(r, "shop/cart").is_none()
    })
    .await;
    assert!(row(&rows, "demo/web").is_some(), "{rows:?}");
    assert_eq!(
        row(&rows, "ops/db").map(|r| r.origin),
        Some(PolicyOrigin::Admin),
        "{rows:?}"
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    task.abort();
}
