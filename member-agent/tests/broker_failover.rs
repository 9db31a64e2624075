//! Agent failover between broker replicas: two real brokers (ballast-broker's server, each on
//! its own SQLite store) over real mutual TLS on loopback sockets, the agent's broker session
//! given both addresses as names (`localhost`, resolved to 127.0.0.1 and verified against the
//! name). The first broker goes away — stopped, killed (every connection and its port closed
//! at once, through a TCP proxy), or hung (connections open, nothing answered) — and the
//! session moves to the second by itself, registers, and receives weights there; the
//! failover is counted once, the replica gauge flips, and nothing reaches the installer in
//! between (the installed weights stay). While a broker is healthy the session does not move
//! (nor back to the stopped one once it is started again).
//! The real binary refuses a bad `--broker` list naming the flag. Each test prints the time
//! measured.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ballast_agent::catalog::Cluster;
use ballast_agent::metrics::Metrics;
use ballast_agent::session::{self, SessionConfig, SessionIo};
use ballast_broker::certs::{generate, Bundle};
use ballast_broker::server::{start, Running, ServeConfig};
use ballast_broker::tls::TlsFiles;
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{Ack, CapacitySample, RegisterRequest, ReportRequest, WeightsUpdate};
use ballast_store::sqlite_url;
use ballast_types::now_ms;
use tokio::sync::{mpsc, watch};

async fn broker(db: &std::path::Path, tls: TlsFiles) -> Running {
    broker_on("127.0.0.1:0".parse().unwrap(), db, tls).await
}

async fn broker_on(listen: SocketAddr, db: &std::path::Path, tls: TlsFiles) -> Running {
    let mut c = ServeConfig::new(listen, sqlite_url(db), Some(tls));
    c.solve_interval = Duration::from_secs(3600);
    c.debounce = Duration::from_millis(5);
    c.engine.max_step = None;
    start(c).await.expect("broker starts")
}

fn cap(rps: f64) -> CapacitySample {
    CapacitySample {
        service: "shop/web".into(),
        capacity_rps: rps,
        measured_at_ms: 0,
        service_time: None,
        measured_service_ms: None,
        unit: 0,
    }
}

/// West, serving shop/web, registers with and reports to the broker on `port`.
async fn west_serves(bundle: &Bundle, port: u16) {
    let west = &bundle.clusters.iter().find(|(c, _)| c == "west").unwrap().1;
    let ch = bundle
        .tls_files(west)
        .localhost_channel(port)
        .await
        .unwrap();
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
    let r = ReportRequest {
        cluster_id: "west".into(),
        node_name: "n1".into(),
        measured_at_ms: now_ms(),
        capacity: vec![cap(1000.0)],
        ..ReportRequest::default()
    };
    w.report(futures::stream::iter(vec![r])).await.unwrap();
}

/// The value of `ballast_agent_broker_replica{address}` (None: not exposed).
fn replica_gauge(m: &Metrics, address: &str) -> Option<i64> {
    let needle = format!("ballast_agent_broker_replica{{address=\"{address}\"}} ");
    m.encode()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
}

fn failovers(m: &Metrics) -> Option<u64> {
    m.encode().lines().find_map(|l| {
        l.strip_prefix("ballast_agent_broker_failovers_total ")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The next batch holding east's shop/web weights (20 s at most).
async fn next_web(rx: &mut mpsc::Receiver<Vec<WeightsUpdate>>) -> WeightsUpdate {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("a weights batch in time")
            .expect("session alive");
        if let Some(u) = batch
            .into_iter()
            .find(|u| u.service == "shop/web" && u.source_cluster_id == "east")
        {
            return u;
        }
    }
}

/// How the first broker goes away.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `Running::stop`: the server shuts down (connections closed, listener gone).
    Stop,
    /// Every connection to it closed at once and its port closed, as the kernel does for a
    /// killed process (the broker itself, behind a proxy, never learns of it).
    Kill,
    /// It stops answering but its connections stay open (a hung process, a partition): only
    /// the HTTP/2 keepalive (10 s, 5 s timeout) can tell.
    Hang,
}

/// A TCP proxy in front of `upstream`: `kill` closes every connection and the port, `hang`
/// stops forwarding while keeping every socket open.
struct Proxy {
    port: u16,
    tasks: tokio::task::JoinSet<()>,
    hung: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (hung, hung_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    return;
                };
                let mut hung = hung_rx.clone();
                conns.spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = async { let _ = hung.wait_for(|h| *h).await; } => {
                            // keep both ends open, forward nothing
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self { port, tasks, hung }
    }

    /// Closes every connection and the listening port.
    fn kill(&mut self) {
        // the accept loop owns the connections' tasks: aborting it drops them all
        self.tasks.abort_all();
    }

    fn hang(&self) {
        self.hung.send_replace(true);
    }
}

/// Two brokers (A behind a proxy for `Kill` and `Hang`), a session given both, the first
/// weights from A; then A goes away as `fault` says. Checks the move and returns the time
/// from the fault to B's first weights.
async fn failover(fault: Fault) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["east".to_owned(), "west".to_owned()], &[]).unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let east = &bundle.clusters.iter().find(|(c, _)| c == "east").unwrap().1;
    let ca = write("ca.pem", &bundle.ca.cert_pem);
    let cert = write("east.pem", &east.cert_pem);
    let key = write("east-key.pem", &east.key_pem);
    let server_tls = bundle.tls_files(&bundle.server);
    let a = broker(&dir.path().join("a.db"), server_tls.clone()).await;
    let b = broker(&dir.path().join("b.db"), server_tls.clone()).await;
    let a_listen = a.addr;
    west_serves(&bundle, a.addr.port()).await;
    west_serves(&bundle, b.addr.port()).await;
    let mut proxy = match fault {
        Fault::Stop => None,
        Fault::Kill | Fault::Hang => Some(Proxy::start(a.addr).await),
    };
    let port_a = proxy.as_ref().map_or(a.addr.port(), |p| p.port);
    let port_b = b.addr.port();
    // the addresses dialed: localhost resolved (the certificate is verified against the name)
    let addr_a = format!("https://127.0.0.1:{port_a}");
    let addr_b = format!("https://127.0.0.1:{port_b}");

    let east_report = ReportRequest {
        cluster_id: "east".into(),
        node_name: "n1".into(),
        measured_at_ms: now_ms(),
        capacity: vec![cap(1000.0)],
        ..ReportRequest::default()
    };
    let (_reports_tx, reports_rx) = watch::channel(Some(east_report));
    let (updates_tx, mut updates_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = mpsc::channel(16);
    let (gen_tx, gen_rx) = watch::channel(0);
    let (peers_tx, _peers_rx) = watch::channel(std::sync::Arc::new(Vec::new()));
    let metrics = Metrics::new();
    let backoff_min = Duration::from_millis(200);
    let cfg = SessionConfig {
        // what `--broker https://localhost:A,https://localhost:B` resolves to
        endpoints: ballast_agent::brokers::parse_list(&[format!(
            "https://localhost:{port_a},https://localhost:{port_b}"
        )])
        .unwrap(),
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
        // the agent's own backoff (main.rs): 200 ms to 15 s
        backoff_min,
        backoff_max: Duration::from_secs(15),
    };
    let session = tokio::spawn(session::run(
        cfg,
        SessionIo {
            reports: reports_rx,
            updates: updates_tx,
            acks: acks_rx,
            installed_generation: gen_rx,
            peers: peers_tx,
            metrics: metrics.clone(),
        },
    ));

    // The test is the installer: what it holds is the data plane's weights.
    let mut installed: BTreeMap<String, WeightsUpdate> = BTreeMap::new();
    let install = |u: WeightsUpdate, installed: &mut BTreeMap<String, WeightsUpdate>| {
        let total: f64 = u.weights.values().sum();
        assert!((total - 1.0).abs() < 1e-9, "{:?}", u.weights);
        gen_tx.send_replace(u.generation);
        let ack = Ack {
            cluster_id: "east".into(),
            node_name: "n1".into(),
            generation: u.generation,
            service: u.service.clone(),
            applied: true,
            error: String::new(),
        };
        installed.insert(u.service.clone(), u);
        ack
    };
    let u = next_web(&mut updates_rx).await;
    let gen_a = u.generation;
    acks_tx.send(install(u, &mut installed)).await.unwrap();
    assert_eq!(replica_gauge(&metrics, &addr_a), Some(1));
    assert_eq!(replica_gauge(&metrics, &addr_b), Some(0));
    assert_eq!(failovers(&metrics), Some(0));

    // healthy: no move (acks, reports and the watch go on on A)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        replica_gauge(&metrics, &addr_a),
        Some(1),
        "stays while healthy"
    );
    assert_eq!(failovers(&metrics), Some(0));
    while let Ok(batch) = updates_rx.try_recv() {
        for u in batch {
            let ack = install(u, &mut installed);
            acks_tx.send(ack).await.unwrap();
        }
    }
    let before = installed.clone();
    assert!(before.contains_key("shop/web"));

    // A goes away
    let t0 = Instant::now();
    let mut a = Some(a);
    match (fault, proxy.as_mut()) {
        (Fault::Stop, _) => {
            if let Some(a) = a.take() {
                a.stop().await;
            }
        }
        (Fault::Kill, Some(p)) => p.kill(),
        (Fault::Hang, Some(p)) => p.hang(),
        _ => unreachable!("a proxy for kill and hang"),
    }
    // until B is in use, nothing reaches the installer: the installed weights stay
    let bound = match fault {
        Fault::Stop | Fault::Kill => Duration::from_secs(10),
        // keepalive: a ping every 10 s, 5 s for its answer
        Fault::Hang => Duration::from_secs(30),
    };
    let moved = loop {
        assert!(
            t0.elapsed() < bound,
            "{fault:?}: no failover within {bound:?}; metrics:\n{}",
            metrics.encode()
        );
        if replica_gauge(&metrics, &addr_b) == Some(1) {
            break t0.elapsed();
        }
        if let Ok(batch) = updates_rx.try_recv() {
            // a batch A published just before it went away may still land; it is weights,
            // never an empty set
            assert!(batch.iter().all(|u| !u.weights.is_empty()), "{batch:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        installed, before,
        "the data plane keeps its weights during the move"
    );
    assert_eq!(replica_gauge(&metrics, &addr_a), Some(0));
    assert_eq!(failovers(&metrics), Some(1));

    // weights flow again, from B
    let u = next_web(&mut updates_rx).await;
    let weights_again = t0.elapsed();
    let gen_b = u.generation;
    assert!(u.weights.contains_key("west"), "{:?}", u.weights);
    acks_tx.send(install(u, &mut installed)).await.unwrap();
    println!(
        "failover ({fault:?}): registered on B {moved:?} after the fault, weights from B after \
         {weights_again:?} (backoff min {backoff_min:?}); generations A {gen_a}, B {gen_b}"
    );

    // and it stays on B (no flapping back while B is healthy), also once A is back
    if matches!(fault, Fault::Stop) {
        a = Some(broker_on(a_listen, &dir.path().join("a.db"), server_tls).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(replica_gauge(&metrics, &addr_b), Some(1));
    assert_eq!(failovers(&metrics), Some(1));
    assert!(!session.is_finished());
    session.abort();
    drop(proxy);
    if let Some(a) = a {
        a.stop().await;
    }
    b.stop().await;
    weights_again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_broker_the_session_moves_to_the_next_and_keeps_its_weights() {
    let took = failover(Fault::Stop).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_broker_the_session_moves_to_the_next_and_keeps_its_weights() {
    let took = failover(Fault::Kill).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_broker_is_left_after_the_keepalive_timeout() {
    let took = failover(Fault::Hang).await;
    // detected by the keepalive: at most 10 s + 5 s, then the backoff and a new session
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn the_binary_refuses_a_bad_broker_list_naming_the_flag() {
    let cg = tempfile::tempdir().unwrap();
    for (list, bad) in [
        ("https://a:7443,http://b:7443", "http://b:7443"),
        ("https://a:7443,https://a b:7443", "a b"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
            .args(["--cluster-id", "east", "--node-name", "n1", "--cgroup"])
            .arg(cg.path())
            .args(["--broker", list])
            .env_remove("BALLAST_BROKER")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{list} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--broker") && err.contains(bad), "{err}");
    }
}

/// A resolved address is dialed by IP while the certificate is verified against the name it
/// was resolved from: the same IP with another name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_verified_against_the_name_not_the_ip() {
    use ballast_agent::brokers::{self, Target};
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["east".to_owned()], &[]).unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let east = &bundle.clusters[0].1;
    let b = broker(&dir.path().join("b.db"), bundle.tls_files(&bundle.server)).await;
    let port = b.addr.port();
    let cfg = SessionConfig {
        endpoints: brokers::parse_list(&[format!("https://localhost:{port}")]).unwrap(),
        server_name: None,
        ca: write("ca.pem", &bundle.ca.cert_pem),
        cert: write("east.pem", &east.cert_pem),
        key: write("east-key.pem", &east.key_pem),
        cluster: Cluster {
            id: "east".into(),
            region: None,
            zone: None,
            provider: None,
            gateway: None,
        },
        node_name: "n1".into(),
        report_interval: Duration::from_secs(1),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
    };
    let targets = brokers::resolve(&cfg.endpoints).await;
    let target = targets
        .iter()
        .find(|t| t.uri == format!("https://127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("localhost resolves to 127.0.0.1: {targets:?}"));
    assert_eq!(target.domain, "localhost");
    let mut client = BrokerClient::new(session::connect(&cfg, target).await.unwrap());
    client
        .register(RegisterRequest {
            cluster_id: "east".into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            provider: "aws".into(),
            agent_version: "test".into(),
            node_name: "n1".into(),
            ..RegisterRequest::default()
        })
        .await
        .expect("the name is in the certificate");
    let wrong = Target {
        uri: target.uri.clone(),
        domain: "elsewhere.example".into(),
    };
    let chain = |e: &dyn std::error::Error| {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(&format!(": {s}"));
            cur = s.source();
        }
        out
    };
    let refused = match session::connect(&cfg, &wrong).await {
        Err(e) => chain(&e),
        Ok(ch) => BrokerClient::new(ch)
            .register(RegisterRequest::default())
            .await
            .expect_err("a name not in the certificate")
            .to_string(),
    };
    println!("another name on the same IP: {refused}");
    assert!(
        refused.contains("NotValidForName") || refused.contains("certificate"),
        "{refused}"
    );
    b.stop().await;
}
