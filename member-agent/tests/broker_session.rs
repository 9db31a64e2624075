//! The agent's broker session against a real broker (ballast-broker, SQLite) over real
//! mutual TLS on loopback: register, report, receive weights, acknowledge; the broker is
//! stopped and started again on the same address and database, and the session reconnects
//! by itself and receives the current generation.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ballast_agent::catalog::Cluster;
use ballast_agent::session::{self, SessionConfig, SessionIo};
use ballast_broker::certs::generate;
use ballast_broker::server::{start, Running, ServeConfig};
use ballast_broker::tls::TlsFiles;
use ballast_proto::v1::admin_client::AdminClient;
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{
    Ack, CapacitySample, ListClustersRequest, RegisterRequest, ReportRequest, RpsSample, RttSample,
    WeightsUpdate,
};
use ballast_store::sqlite_url;
use tokio::sync::{mpsc, watch};

use ballast_types::now_ms;

async fn broker(listen: SocketAddr, db: &std::path::Path, tls: TlsFiles) -> Running {
    let mut c = ServeConfig::new(listen, sqlite_url(db), Some(tls));
    c.solve_interval = Duration::from_secs(3600);
    c.debounce = Duration::from_millis(5);
    c.engine.max_step = None;
    start(c).await.expect("broker starts")
}

fn report(cluster: &str) -> ReportRequest {
    ReportRequest {
        cluster_id: cluster.into(),
        node_name: "n1".into(),
        measured_at_ms: now_ms(),
        ..ReportRequest::default()
    }
}

fn cap(service: &str, rps: f64) -> CapacitySample {
    CapacitySample {
        service: service.into(),
        capacity_rps: rps,
        measured_at_ms: 0,
        service_time: None,
        measured_service_ms: None,
        unit: 0,
    }
}

async fn next_batch(rx: &mut mpsc::Receiver<Vec<WeightsUpdate>>, min_gen: u64) -> WeightsUpdate {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a weights batch in time")
            .expect("session alive");
        assert!(batch.last().is_some_and(|u| u.last_in_batch));
        if let Some(u) = batch
            .into_iter()
            .find(|u| u.service == "shop/web" && u.generation >= min_gen)
        {
            return u;
        }
    }
}

/// Waits (20 s at most) until the session's peer set satisfies `ok`.
async fn wait_for_peers(
    rx: &mut watch::Receiver<std::sync::Arc<Vec<Cluster>>>,
    ok: impl Fn(&[Cluster]) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|p| ok(p)))
        .await
        .expect("the peer set in time")
        .expect("session alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_broker_mtls_weights_ack_and_reconnect_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["east".to_owned(), "west".to_owned()], &[]).unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let east = &bundle.clusters.iter().find(|(c, _)| c == "east").unwrap().1;
    let west = &bundle.clusters.iter().find(|(c, _)| c == "west").unwrap().1;
    let ca = write("ca.pem", &bundle.ca.cert_pem);
    let cert = write("east.pem", &east.cert_pem);
    let key = write("east-key.pem", &east.key_pem);
    let server_tls = bundle.tls_files(&bundle.server);
    let db = dir.path().join("broker.db");
    let b = broker("127.0.0.1:0".parse().unwrap(), &db, server_tls.clone()).await;
    let addr = b.addr;

    // west serves shop/web (a raw client with west's certificate)
    let west_tls = bundle.tls_files(west);
    let ch = west_tls.localhost_channel(addr.port()).await.unwrap();
    let mut w = BrokerClient::new(ch);
    w.register(RegisterRequest {
        cluster_id: "west".into(),
        region: "eu-west-1".into(),
        zone: "eu-west-1a".into(),
        provider: "aws".into(),
        gateway_address: "127.0.0.2".into(),
        agent_version: "test".into(),
        node_name: "n1".into(),
    })
    .await
    .unwrap();
    let mut m = report("west");
    m.capacity = vec![cap("shop/web", 1000.0)];
    w.report(futures::stream::iter(vec![m])).await.unwrap();

    // east is the agent under test
    // east also measures "south", which never registers: the broker refuses samples about
    // it, and the session must leave them out rather than lose every report
    let mut east_report = report("east");
    let rtt = |peer: &str| RttSample {
        peer_cluster_id: peer.into(),
        rtt_ms: 5.0,
        loss_ratio: 0.0,
        reachable: true,
        measured_at_ms: 0,
    };
    east_report.rtt = vec![rtt("south"), rtt("west")];
    east_report.rps = vec![RpsSample {
        service: "shop/web".into(),
        destination_cluster_id: "west".into(),
        rps: 10.0,
        measured_at_ms: 0,
        bytes_sent_per_second: 0.0,
        bytes_received_per_second: 0.0,
    }];
    east_report.capacity = vec![cap("shop/web", 1000.0)];
    let (reports_tx, reports_rx) = watch::channel(Some(east_report.clone()));
    let (updates_tx, mut updates_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = mpsc::channel(16);
    let (_gen_tx, gen_rx) = watch::channel(0);
    let (peers_tx, mut peers_rx) = watch::channel(std::sync::Arc::new(Vec::new()));
    let cfg = SessionConfig {
        endpoints: vec![format!("https://localhost:{}", addr.port())
            .parse()
            .unwrap()],
        server_name: None,
        ca,
        cert,
        key,
        cluster: Cluster {
            id: "east".into(),
            region: Some("us-east-1".into()),
            zone: Some("us-east-1a".into()),
            provider: Some("aws".into()),
            gateway: Some("127.0.0.1".parse().unwrap()),
        },
        node_name: "n1".into(),
        report_interval: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    };
    let session = tokio::spawn(session::run(
        cfg,
        SessionIo {
            reports: reports_rx,
            updates: updates_tx,
            acks: acks_rx,
            installed_generation: gen_rx,
            peers: peers_tx,
            metrics: ballast_agent::metrics::Metrics::new(),
        },
    ));

    let u = next_batch(&mut updates_rx, 1).await;
    assert_eq!(u.source_cluster_id, "east");
    let total: f64 = u.weights.values().sum();
    assert!((total - 1.0).abs() < 1e-9, "{:?}", u.weights);
    assert!(u.weights.contains_key("west"), "{:?}", u.weights);
    acks_tx
        .send(Ack {
            cluster_id: "east".into(),
            node_name: "n1".into(),
            generation: u.generation,
            service: u.service.clone(),
            applied: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let first_gen = u.generation;

    // the peer set: both clusters as they registered; west moving its gateway reaches the
    // session on the WatchPeers stream
    let gateway_of = |peers: &[Cluster], id: &str| {
        peers
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.gateway)
            .map(|g| g.to_string())
    };
    wait_for_peers(&mut peers_rx, |p| {
        gateway_of(p, "west").as_deref() == Some("127.0.0.2") && p.len() == 2
    })
    .await;
    w.register(RegisterRequest {
        cluster_id: "west".into(),
        region: "eu-west-1".into(),
        zone: "eu-west-1a".into(),
        provider: "aws".into(),
        gateway_address: "127.0.0.3".into(),
        agent_version: "test".into(),
        node_name: "n1".into(),
    })
    .await
    .unwrap();
    wait_for_peers(&mut peers_rx, |p| {
        gateway_of(p, "west").as_deref() == Some("127.0.0.3")
    })
    .await;

    // east's reports are stored in spite of the unknown peer
    let admin_tls = bundle.tls_files(&bundle.admin);
    let ch = admin_tls.localhost_channel(addr.port()).await.unwrap();
    let mut admin = AdminClient::new(ch);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = admin
            .list_clusters(ListClustersRequest::default())
            .await
            .unwrap()
            .into_inner();
        let east = list
            .clusters
            .iter()
            .find(|c| c.cluster_id == "east")
            .unwrap();
        if east.last_report_age_ms >= 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "east's reports never stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // the broker goes away; the session keeps retrying without delivering anything
    b.stop().await;
    // Batches the live broker published before it stopped (a report can start a new round
    // after the first batch) may still be on their way or sit in the channel: let them land,
    // then take them out.
    tokio::time::sleep(Duration::from_millis(150)).await;
    while updates_rx.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        updates_rx.try_recv().is_err(),
        "nothing arrives while the broker is down"
    );
    assert!(!session.is_finished());

    // back on the same address and database: the session reconnects by itself and gets the
    // current state (generation at least the one it had)
    let b2 = broker(addr, &db, server_tls).await;
    reports_tx.send_replace(Some(ReportRequest {
        measured_at_ms: now_ms(),
        ..east_report
    }));
    let u2 = next_batch(&mut updates_rx, first_gen).await;
    assert_eq!(u2.source_cluster_id, "east");
    assert!(u2.generation >= first_gen);
    session.abort();
    b2.stop().await;
}
