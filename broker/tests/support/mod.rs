//! Shared helpers of the broker's store and gRPC tests: databases (SQLite in a temp dir,
//! PostgreSQL in a fresh schema per test), certificates, an in-process broker and clients.
#![allow(dead_code, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::SocketAddr;
use std::time::Duration;

use ballast_broker::certs::{Bundle, CertPair};
use ballast_broker::server::{start, Running, ServeConfig};
use ballast_broker::tls::{ConnectError, TlsFiles};
use ballast_proto::v1::admin_client::AdminClient;
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{
    CapacitySample, RegisterRequest, ReportRequest, RpsSample, RttSample, WatchRequest,
    WeightsUpdate,
};
use tonic::transport::Channel;

pub mod replicas;

#[allow(unused_imports)] // not every test file uses it
pub use ballast_store::testing::PgSchema;

pub fn tls_of(bundle: &Bundle, pair: &CertPair) -> TlsFiles {
    bundle.tls_files(pair)
}

pub fn cluster_pair<'a>(bundle: &'a Bundle, id: &str) -> &'a CertPair {
    &bundle.clusters.iter().find(|(c, _)| c == id).unwrap().1
}

/// A broker config for tests: loopback, any port, mTLS with `bundle`, metrics on, solve only
/// on triggers (long timer), short debounce, undamped unless the test says otherwise.
pub fn test_config(bundle: &Bundle, db_url: &str) -> ServeConfig {
    let mut c = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        db_url.to_string(),
        Some(tls_of(bundle, &bundle.server)),
    );
    c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    c.solve_interval = Duration::from_secs(3600);
    c.debounce = Duration::from_millis(5);
    c.engine.max_step = None;
    c
}

/// [`test_config`] on a SQLite file `b.db` in `dir`.
pub fn sqlite_test_config(bundle: &Bundle, dir: &std::path::Path) -> ServeConfig {
    test_config(bundle, &ballast_store::sqlite_url(&dir.join("b.db")))
}

pub async fn start_broker(cfg: ServeConfig) -> Running {
    start(cfg).await.expect("broker starts")
}

async fn channel(addr: SocketAddr, tls: &TlsFiles) -> Result<Channel, ConnectError> {
    tls.localhost_channel(addr.port()).await
}

pub async fn agent(
    addr: SocketAddr,
    tls: &TlsFiles,
) -> Result<BrokerClient<Channel>, ConnectError> {
    Ok(BrokerClient::new(channel(addr, tls).await?))
}

/// An agent client with cluster `id`'s certificate from `bundle`.
pub async fn cluster_agent(addr: SocketAddr, bundle: &Bundle, id: &str) -> BrokerClient<Channel> {
    agent(addr, &tls_of(bundle, cluster_pair(bundle, id)))
        .await
        .unwrap()
}

/// An agent client registered as node `n1` of cluster `id`.
pub async fn registered_agent(addr: SocketAddr, tls: &TlsFiles, id: &str) -> BrokerClient<Channel> {
    let mut c = agent(addr, tls).await.unwrap();
    c.register(register_req(id, "n1")).await.unwrap();
    c
}

/// A Watch of node `n1` of `cluster`, from `last_generation`.
pub fn watch_req(cluster: &str, last_generation: u64) -> WatchRequest {
    WatchRequest {
        cluster_id: cluster.into(),
        node_name: "n1".into(),
        last_generation,
    }
}

/// Opens [`watch_req`]'s stream.
pub async fn open_watch(
    client: &mut BrokerClient<Channel>,
    cluster: &str,
    last_generation: u64,
) -> tonic::Streaming<WeightsUpdate> {
    client
        .watch_weights(watch_req(cluster, last_generation))
        .await
        .unwrap()
        .into_inner()
}

/// An admin client on a channel with `tls` (any certificate, for identity checks).
pub async fn admin_as(addr: SocketAddr, tls: &TlsFiles) -> AdminClient<Channel> {
    AdminClient::new(channel(addr, tls).await.unwrap())
}

pub async fn admin(addr: SocketAddr, bundle: &Bundle) -> AdminClient<Channel> {
    admin_as(addr, &tls_of(bundle, &bundle.admin)).await
}

pub use ballast_types::now_ms;

/// A broker on SQLite in `dir`, with certificates for clusters `ids`.
pub async fn broker_for(dir: &std::path::Path, ids: &[&str]) -> (Bundle, Running) {
    let ids: Vec<String> = ids.iter().map(|c| (*c).to_string()).collect();
    let bundle = ballast_broker::certs::generate(&ids, &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir)).await;
    (bundle, b)
}

/// [`broker_for`] c1 and c2, with their agents (node n1) registered.
pub async fn broker_with_c1_c2(
    dir: &std::path::Path,
) -> (
    Bundle,
    Running,
    BrokerClient<Channel>,
    BrokerClient<Channel>,
) {
    let (bundle, b) = broker_for(dir, &["c1", "c2"]).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    a1.register(register_req("c1", "n1")).await.unwrap();
    a2.register(register_req("c2", "n1")).await.unwrap();
    (bundle, b, a1, a2)
}

pub fn register_req(cluster: &str, node: &str) -> RegisterRequest {
    RegisterRequest {
        cluster_id: cluster.into(),
        region: "us-east-1".into(),
        zone: format!(
            "us-east-1{}",
            if cluster.ends_with('1') { 'a' } else { 'b' }
        ),
        provider: "aws".into(),
        gateway_address: "127.0.0.1".into(),
        agent_version: "test".into(),
        node_name: node.into(),
    }
}

pub fn report(cluster: &str, node: &str) -> ReportRequest {
    ReportRequest {
        cluster_id: cluster.into(),
        node_name: node.into(),
        measured_at_ms: now_ms(),
        ..ReportRequest::default()
    }
}

pub fn rtt(peer: &str, ms: f64) -> RttSample {
    RttSample {
        peer_cluster_id: peer.into(),
        rtt_ms: ms,
        loss_ratio: 0.0,
        reachable: true,
        measured_at_ms: 0,
    }
}

pub fn rps(service: &str, dst: &str, v: f64) -> RpsSample {
    RpsSample {
        service: service.into(),
        destination_cluster_id: dst.into(),
        rps: v,
        measured_at_ms: 0,
        bytes_sent_per_second: 0.0,
        bytes_received_per_second: 0.0,
    }
}

pub fn cap(service: &str, v: f64) -> CapacitySample {
    CapacitySample {
        service: service.into(),
        capacity_rps: v,
        measured_at_ms: 0,
        service_time: None,
        measured_service_ms: None,
        unit: 0,
    }
}

/// A report of node `n1` of `cluster` declaring `capacity_rps` for `service`.
pub fn capacity_report(cluster: &str, service: &str, capacity_rps: f64) -> ReportRequest {
    let mut m = report(cluster, "n1");
    m.capacity = vec![cap(service, capacity_rps)];
    m
}

/// Sends `msgs` on one Report stream and returns the summary (or the error status).
pub async fn send_reports(
    client: &mut BrokerClient<Channel>,
    msgs: Vec<ReportRequest>,
) -> Result<ballast_proto::v1::ReportSummary, tonic::Status> {
    client
        .report(tokio_stream::iter(msgs))
        .await
        .map(tonic::Response::into_inner)
}
