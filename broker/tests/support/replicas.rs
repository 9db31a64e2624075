//! Broker replicas as real `ballast-broker serve` processes for the HA tests: spawning,
//! `/ready` and `/metrics`, simulated agents (reporters, watchers), the stored generations,
//! and a TCP forwarder in front of PostgreSQL that a test can cut.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_broker::certs::Bundle;
use ballast_proto::v1::broker_client::BrokerClient;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::{
    capacity_report, cluster_agent, register_req, report, rps, rtt, send_reports, watch_req,
};

pub const LEASE: Duration = Duration::from_secs(2);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `ballast-broker serve` process.
pub struct Replica {
    pub id: String,
    child: Option<Child>,
    pub addr: std::net::SocketAddr,
    mport: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = signal(c.id(), libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: i32) -> i32 {
    // SAFETY: sending a signal to a child process this test spawned.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), sig) }
}

impl Replica {
    pub fn spawn(dir: &std::path::Path, db: &str, id: &str, extra_env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mport = free_port();
        let certs = dir.join("certs");
        let p = |f: &str| certs.join(f).display().to_string();
        let log = std::fs::File::create(dir.join(format!("{id}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-broker"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{mport}")])
            .args(["--database", db])
            .args(["--ca", &p("ca.pem"), "--cert", &p("server.pem")])
            .args(["--key", &p("server-key.pem")])
            .args(["--replica-id", id, "--replicas", "3"])
            .args(["--lease-time", &format!("{}ms", LEASE.as_millis())])
            .args([
                "--solve-interval",
                "1s",
                "--debounce",
                "10ms",
                "--max-step",
                "1",
            ])
            .args(["--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Self {
            id: id.into(),
            child: Some(child),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            mport,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (status, body) of an admin HTTP GET; (0, error) when it does not answer.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let io = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.mport)).await?;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(Duration::from_secs(5), io).await {
            Ok(Ok(out)) => {
                let status = out
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let body = out
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string();
                (status, body)
            }
            Ok(Err(e)) => (0, e.to_string()),
            Err(_) => (0, "timeout".into()),
        }
    }

    pub async fn ready(&self) -> (u16, String) {
        self.get("/ready").await
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, b) = self.ready().await;
            if s == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never ready: {s} {b}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The replica whose `/ready` says `leader term N`, waiting for one; (index, term).
pub async fn leader_of(replicas: &[&Replica], timeout: Duration) -> (usize, i64) {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, r) in replicas.iter().enumerate() {
            let (s, b) = r.ready().await;
            if let Some(t) = b.strip_prefix("ready: leader term ") {
                assert_eq!(s, 200);
                return (i, t.parse().unwrap());
            }
        }
        assert!(Instant::now() < deadline, "no leader within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(generation, term)` of every stored generation, ascending.
pub async fn generations(schema_url: &str) -> Vec<(i64, i64)> {
    let mut c = sqlx::PgConnection::connect(schema_url).await.unwrap();
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT generation, term FROM generations ORDER BY generation")
            .fetch_all(&mut c)
            .await
            .unwrap();
    c.close().await.unwrap();
    rows
}

/// Certificates for c1..c3 and the server, written to `dir/certs`.
pub fn certs(dir: &std::path::Path) -> Bundle {
    let ids: Vec<String> = ["c1", "c2", "c3"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    let bundle = ballast_broker::certs::generate(&ids, &[]).unwrap();
    bundle.write_to(&dir.join("certs")).unwrap();
    bundle
}

/// A registered agent of `cluster` on `r`.
pub async fn agent_on(r: &Replica, bundle: &Bundle, cluster: &str) -> BrokerClient<Channel> {
    let mut a = cluster_agent(r.addr, bundle, cluster).await;
    a.register(register_req(cluster, "n1")).await.unwrap();
    a
}

/// c2 and c3 serve ns/web (through `via`'s replicas).
pub async fn capacities(bundle: &Bundle, r2: &Replica, r3: &Replica) {
    let mut a2 = agent_on(r2, bundle, "c2").await;
    let mut a3 = agent_on(r3, bundle, "c3").await;
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 1000.0)])
        .await
        .unwrap();
    send_reports(&mut a3, vec![capacity_report("c3", "ns/web", 1000.0)])
        .await
        .unwrap();
}

/// c1's report number `i`: its RTTs swap every report, so every round moves its weights.
pub fn c1_report(i: u64) -> ballast_proto::v1::ReportRequest {
    let mut m = report("c1", "n1");
    let (a, b) = if i.is_multiple_of(2) {
        (5.0, 80.0)
    } else {
        (80.0, 5.0)
    };
    m.rtt = vec![rtt("c2", a), rtt("c3", b)];
    m.rps = vec![rps("ns/web", "c2", 60.0), rps("ns/web", "c3", 40.0)];
    m
}

/// Reports from c1 every 200 ms through each of `clients` in turn (a failed one is
/// skipped), until the flag is set.
pub fn reporter(
    mut clients: Vec<BrokerClient<Channel>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut i = 0u64;
        let mut sent = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let n = clients.len();
            let c = &mut clients[usize::try_from(i).unwrap() % n];
            let call = send_reports(c, vec![c1_report(i)]);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                sent += 1;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sent
    })
}

/// What a watcher saw: generations in order, and how its stream ended.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub generations: Vec<u64>,
    pub ended: Option<tonic::Code>,
}

/// Watches c1's weights on `r` (registering c1 there first), recording every generation.
pub async fn watcher(r: &Replica, bundle: &Bundle) -> Arc<Mutex<Seen>> {
    let mut a = agent_on(r, bundle, "c1").await;
    let mut stream = a
        .watch_weights(watch_req("c1", 0))
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        let _keep = a;
        loop {
            match stream.message().await {
                Ok(Some(u)) => {
                    let mut g = s.lock().unwrap();
                    if g.generations.last() != Some(&u.generation) {
                        g.generations.push(u.generation);
                    }
                }
                Ok(None) => {
                    s.lock().unwrap().ended = Some(tonic::Code::Ok);
                    return;
                }
                Err(e) => {
                    s.lock().unwrap().ended = Some(e.code());
                    return;
                }
            }
        }
    });
    seen
}

pub fn assert_strictly_increasing(what: &str, v: &[u64]) {
    assert!(v.windows(2).all(|w| w[0] < w[1]), "{what}: {v:?}");
}

/// Stored generations: consecutive from the first kept, terms never decreasing.
pub fn assert_sequence(rows: &[(i64, i64)]) {
    assert!(
        rows.windows(2)
            .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1),
        "generations must be consecutive, terms non-decreasing: {rows:?}"
    );
}

pub async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP forwarder to PostgreSQL that the test can cut (every connection closed, the port
/// refusing) and restore on the same port.
pub struct Forwarder {
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Forwarder {
    pub async fn start(port: u16, target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        let conns = Arc::new(Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let c = conns.clone();
        tasks.spawn(async move {
            let _conns = AbortOnDrop(c.clone());
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Self { tasks: Some(tasks) }
    }

    pub async fn cut(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
            while t.join_next().await.is_some() {}
        }
    }
}

pub struct AbortOnDrop(Arc<Mutex<Vec<tokio::task::AbortHandle>>>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in self.0.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}
