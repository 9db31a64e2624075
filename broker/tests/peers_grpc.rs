//! The peer set over real gRPC with mutual TLS on a SQLite file: what `Register` answers,
//! what `WatchPeers` streams as clusters register, move and expire, and the gateway rule.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use ballast_proto::v1::{PeersUpdate, WatchPeersRequest};
use support::{
    broker_for, cluster_agent, register_req, report, send_reports, sqlite_test_config, start_broker,
};
use tonic::Code;

fn watch_peers_req(cluster: &str) -> WatchPeersRequest {
    WatchPeersRequest {
        cluster_id: cluster.into(),
        node_name: "n1".into(),
    }
}

async fn next(s: &mut tonic::Streaming<PeersUpdate>) -> PeersUpdate {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a peer update within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

fn ids_and_gateways(u: &PeersUpdate) -> Vec<(String, String)> {
    u.peers
        .iter()
        .map(|p| (p.cluster_id.clone(), p.gateway_address.clone()))
        .collect()
}

fn pair(id: &str, gw: &str) -> (String, String) {
    (id.to_string(), gw.to_string())
}

#[tokio::test]
async fn register_answers_the_peers_and_watch_streams_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b) = broker_for(dir.path(), &["c1", "c2", "c3"]).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    let mut a3 = cluster_agent(b.addr, &bundle, "c3").await;

    let mut r1 = register_req("c1", "n1");
    r1.gateway_address = "10.0.0.1".into();
    let first = a1.register(r1).await.unwrap().into_inner();
    assert_eq!(first.peers.len(), 1, "only c1 is registered: {first:?}");
    assert_eq!(first.peers[0].region, "us-east-1");

    let mut r2 = register_req("c2", "n1");
    r2.gateway_address = "10.0.0.2".into();
    let second = a2.register(r2.clone()).await.unwrap().into_inner();
    let ids: Vec<&str> = second.peers.iter().map(|p| p.cluster_id.as_str()).collect();
    assert_eq!(ids, ["c1", "c2"]);

    let mut w = a1
        .watch_peers(watch_peers_req("c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ids_and_gateways(&next(&mut w).await),
        [pair("c1", "10.0.0.1"), pair("c2", "10.0.0.2")]
    );

    // a new cluster
    let mut r3 = register_req("c3", "n1");
    r3.gateway_address = "fd00::3".into();
    a3.register(r3).await.unwrap();
    assert_eq!(
        ids_and_gateways(&next(&mut w).await),
        [
            pair("c1", "10.0.0.1"),
            pair("c2", "10.0.0.2"),
            pair("c3", "fd00::3")
        ]
    );

    // a moved gateway; a second node of c2 registering the same facts changes nothing
    r2.gateway_address = "10.0.1.2".into();
    a2.register(r2.clone()).await.unwrap();
    let u = next(&mut w).await;
    assert_eq!(u.peers[1].gateway_address, "10.0.1.2");
    r2.node_name = "n2".into();
    a2.register(r2).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.message())
            .await
            .is_err(),
        "an unchanged peer set is not sent again"
    );
    b.stop().await;
}

#[tokio::test]
async fn an_expired_cluster_leaves_the_peer_set() {
    let dir = tempfile::tempdir().unwrap();
    let bundle =
        ballast_broker::certs::generate(&["c1".to_string(), "c2".to_string()], &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.engine.cluster_expiry = Some(Duration::from_millis(400));
    let b = start_broker(cfg).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    a1.register(register_req("c1", "n1")).await.unwrap();
    a2.register(register_req("c2", "n1")).await.unwrap();
    let mut w = a1
        .watch_peers(watch_peers_req("c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut w).await.peers.len(), 2);
    // c1 keeps reporting; c2 falls silent past the expiry; a round (triggered by c1's
    // report) drops it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    send_reports(&mut a1, vec![report("c1", "n1")])
        .await
        .unwrap();
    let u = next(&mut w).await;
    let ids: Vec<&str> = u.peers.iter().map(|p| p.cluster_id.as_str()).collect();
    assert_eq!(ids, ["c1"], "c2 expired");
    // c2 comes back: it is a peer again at once
    a2.register(register_req("c2", "n1")).await.unwrap();
    assert_eq!(next(&mut w).await.peers.len(), 2);
    b.stop().await;
}

#[tokio::test]
async fn gateway_must_be_an_ip_and_watch_needs_registration_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b) = broker_for(dir.path(), &["c1", "c2"]).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    for bad in [
        "gw.example.com",
        "10.0.0.1:4500",
        "0.0.0.0",
        "224.0.0.1",
        "::",
    ] {
        let mut r = register_req("c1", "n1");
        r.gateway_address = bad.into();
        let e = a1.register(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(e.message().starts_with("gateway_address"), "{bad}: {e:?}");
    }
    let e = a1.watch_peers(watch_peers_req("c1")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "nothing was registered: {e:?}");

    let mut r = register_req("c1", "n1");
    r.gateway_address = String::new();
    let ok = a1.register(r).await.unwrap().into_inner();
    assert_eq!(ok.peers[0].gateway_address, "", "no gateway is allowed");
    let e = a1.watch_peers(watch_peers_req("c2")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "c1 watching as c2: {e:?}");
    b.stop().await;
}
