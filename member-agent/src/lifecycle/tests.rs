//! `auto`'s owner look-up through kube's tower-test mock API service (the Kubernetes API is
//! faked; the objects have the shapes a real API server returns for a DaemonSet's pod).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

const NS: &str = "ballast-system";
const POD: &str = "ballast-agent-x7k2p";
const DS_UID: &str = "5f0c3a8e-4a8b-4e0e-9d1c-2b7f6a1e9c33";

/// A pod created by the DaemonSet controller (recorded shape, trimmed of status).
fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD,
            "generateName": "ballast-agent-",
            "namespace": NS,
            "uid": "b1e2c3d4-0000-4000-8000-000000000001",
            "resourceVersion": "48213",
            "creationTimestamp": "2026-11-30T10:00:00Z",
            "labels": {
                "app.kubernetes.io/name": "ballast-agent",
                "controller-revision-hash": "6d9f7c8b5",
                "pod-template-generation": "1"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "name": "ballast-agent",
                "uid": DS_UID,
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "nodeName": "worker-1",
            "hostNetwork": true,
            "containers": [{"name": "agent", "image": "ghcr.io/ballast/agent:0.1.0"}]
        }
    })
}

fn daemonset(uid: &str, deleting: bool) -> Value {
    let mut ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": "ballast-agent",
            "namespace": NS,
            "uid": uid,
            "resourceVersion": "48100",
            "generation": 1,
            "creationTimestamp": "2026-11-30T09:59:58Z",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": "ballast-agent"}
        },
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "ballast-agent"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "ballast-agent"}},
                "spec": {"containers": [{"name": "agent", "image": "ghcr.io/ballast/agent:0.1.0"}]}
            }
        }
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2026-11-30T11:00:00Z");
        ds["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    }
    ds
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(serde_json::to_vec(&s).unwrap()))
        .unwrap()
}

const POD_PATH: &str = "/api/v1/namespaces/ballast-system/pods/ballast-agent-x7k2p";
const DS_PATH: &str = "/apis/apps/v1/namespaces/ballast-system/daemonsets/ballast-agent";

/// Runs the look-up against a mock API answering the DaemonSet path with `ds`.
async fn decide_with(ds: Response<Body>) -> (Decision, Vec<String>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut ds = Some(ds);
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut asked = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            assert_eq!(req.method(), http::Method::GET, "only reads");
            let resp = match path.as_str() {
                POD_PATH => ok(&pod()),
                DS_PATH => ds.take().expect("the DaemonSet is read once"),
                _ => status(404, "NotFound", "unexpected path"),
            };
            send.send_response(resp);
            asked.push(path);
        }
        asked
    });
    let client = Client::new(svc, "default");
    let d = owner_decision(&client, NS, POD).await;
    drop(client);
    (d, server.await.unwrap())
}

#[tokio::test]
async fn detach_against_mock_api_daemonset_present_keeps_steering() {
    let (d, asked) = decide_with(ok(&daemonset(DS_UID, false))).await;
    assert!(!d.detach(), "{d:?}");
    assert_eq!(asked, [POD_PATH, DS_PATH]);
}

#[tokio::test]
async fn detach_against_mock_api_daemonset_gone_detaches() {
    let (d, _) = decide_with(status(
        404,
        "NotFound",
        "daemonsets.apps \"ballast-agent\" not found",
    ))
    .await;
    assert!(d.detach(), "{d:?}");
    assert!(
        matches!(&d, Decision::Detach(why) if why.contains("gone")),
        "{d:?}"
    );
}

#[tokio::test]
async fn detach_against_mock_api_daemonset_being_deleted_detaches() {
    let (d, _) = decide_with(ok(&daemonset(DS_UID, true))).await;
    assert!(
        matches!(&d, Decision::Detach(why) if why.contains("being deleted")),
        "{d:?}"
    );
}

#[tokio::test]
async fn detach_against_mock_api_error_keeps_steering() {
    let (d, _) = decide_with(status(
        403,
        "Forbidden",
        "daemonsets.apps \"ballast-agent\" is forbidden: User \"system:serviceaccount:ballast-system:ballast-agent\" cannot get resource \"daemonsets\"",
    ))
    .await;
    assert!(
        matches!(&d, Decision::Keep(why) if why.contains("cannot read DaemonSet")),
        "{d:?}"
    );
    let (d, _) = decide_with(status(
        500,
        "InternalError",
        "etcdserver: request timed out",
    ))
    .await;
    assert!(!d.detach(), "{d:?}");
}

#[tokio::test]
async fn detach_against_mock_api_a_replaced_daemonset_keeps_steering() {
    let (d, _) = decide_with(ok(&daemonset("0000aaaa-new-install", false))).await;
    assert!(
        matches!(&d, Decision::Keep(why) if why.contains("replaced")),
        "{d:?}"
    );
}

#[tokio::test]
async fn modes_always_never_and_auto_without_kubernetes_need_no_api() {
    assert!(decide(DetachMode::Always, false, None).await.detach());
    assert!(decide(DetachMode::Always, true, None).await.detach());
    assert!(!decide(DetachMode::Never, true, None).await.detach());
    assert!(!decide(DetachMode::Auto, false, None).await.detach());
}

/// The owner watch: the pod read, the DaemonSet listed (present), then the watch reports it
/// deleted — remembered before any SIGTERM, so a later look-up that fails (RBAC deleted by the
/// same uninstall) cannot keep the hooks attached.
#[tokio::test]
async fn owner_watch_against_mock_api_remembers_the_daemonset_deletion() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut asked = Vec::new();
        let mut pending = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            asked.push(format!("{path}?{query}"));
            if path == POD_PATH {
                send.send_response(ok(&pod()));
            } else if path == "/apis/apps/v1/namespaces/ballast-system/daemonsets"
                && !query.contains("watch=true")
            {
                let list = json!({"apiVersion": "apps/v1", "kind": "DaemonSetList",
                    "metadata": {"resourceVersion": "48100"},
                    "items": [daemonset(DS_UID, false)]});
                send.send_response(ok(&list));
            } else if query.contains("watch=true") && pending.is_empty() {
                let mut body = serde_json::to_vec(&json!({"type": "DELETED",
                    "object": daemonset(DS_UID, false)}))
                .unwrap();
                body.push(b'\n');
                send.send_response(Response::builder().body(Body::from(body)).unwrap());
                pending.push(());
            } else {
                // later watches: 403 as once the uninstall removed the agent's Role
                send.send_response(status(403, "Forbidden", "forbidden"));
            }
        }
        asked
    });
    let client = Client::new(svc, "default");
    let mut w = OwnerWatch::start(client, NS.into(), POD.into(), Duration::from_millis(50));
    let why = tokio::time::timeout(Duration::from_secs(5), w.wait_gone())
        .await
        .expect("the deletion is seen")
        .expect("gone");
    assert!(why.contains("was deleted"), "{why}");
    assert!(decide(DetachMode::Auto, true, Some(&w)).await.detach());
    drop(w);
    let asked = server.await.unwrap();
    assert_eq!(asked[0], format!("{POD_PATH}?"));
    assert!(
        asked[1].contains("fieldSelector=metadata.name%3Dballast-agent"),
        "{asked:?}"
    );
}

#[tokio::test]
async fn owner_watch_against_mock_api_a_present_daemonset_is_not_gone() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let _server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            if path == POD_PATH {
                send.send_response(ok(&pod()));
            } else if !query.contains("watch=true") {
                let list = json!({"apiVersion": "apps/v1", "kind": "DaemonSetList",
                    "metadata": {"resourceVersion": "48100"},
                    "items": [daemonset(DS_UID, false)]});
                send.send_response(ok(&list));
            } else {
                held.push(send); // a watch with no events yet
            }
        }
    });
    let client = Client::new(svc, "default");
    let mut w = OwnerWatch::start(client, NS.into(), POD.into(), Duration::from_millis(50));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), w.wait_gone())
            .await
            .is_err(),
        "nothing seen"
    );
    assert_eq!(w.gone(), None);
}
