//! Broker replicas on one PostgreSQL schema, as real `ballast-broker serve` processes with
//! mTLS: one elected leader publishes, every replica serves watches; take-over after SIGKILL,
//! fencing after SIGSTOP/SIGCONT, and a replica cut off from the database (a TCP forwarder in
//! front of PostgreSQL that the test kills). Skipped with a printed reason when
//! `BALLAST_TEST_PG_URL` is unset.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_broker::certs::Bundle;
use ballast_proto::v1::broker_client::BrokerClient;
use sqlx::Connection;
use support::{
    capacity_report, cluster_agent, register_req, report, rps, rtt, send_reports, watch_req,
    PgSchema,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const LEASE: Duration = Duration::from_secs(2);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `ballast-broker serve` process.
struct Replica {
    id: String,
    child: Option<Child>,
    addr: std::net::SocketAddr,
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

fn signal(pid: u32, sig: i32) -> i32 {
    // SAFETY: sending a signal to a child process this test spawned.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), sig) }
}

impl Replica {
    fn spawn(dir: &std::path::Path, db: &str, id: &str, extra_env: &[(&str, &str)]) -> Self {
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

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (status, body) of an admin HTTP GET; (0, error) when it does not answer.
    async fn get(&self, path: &str) -> (u16, String) {
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

    async fn ready(&self) -> (u16, String) {
        self.get("/ready").await
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    async fn wait_ready(&self) {
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
async fn leader_of(replicas: &[&Replica], timeout: Duration) -> (usize, i64) {
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
async fn generations(schema_url: &str) -> Vec<(i64, i64)> {
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
fn certs(dir: &std::path::Path) -> Bundle {
    let ids: Vec<String> = ["c1", "c2", "c3"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    let bundle = ballast_broker::certs::generate(&ids, &[]).unwrap();
    bundle.write_to(&dir.join("certs")).unwrap();
    bundle
}

/// A registered agent of `cluster` on `r`.
async fn agent_on(r: &Replica, bundle: &Bundle, cluster: &str) -> BrokerClient<Channel> {
    let mut a = cluster_agent(r.addr, bundle, cluster).await;
    a.register(register_req(cluster, "n1")).await.unwrap();
    a
}

/// c2 and c3 serve ns/web (through `via`'s replicas).
async fn capacities(bundle: &Bundle, r2: &Replica, r3: &Replica) {
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
fn c1_report(i: u64) -> ballast_proto::v1::ReportRequest {
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
fn reporter(
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
struct Seen {
    generations: Vec<u64>,
    ended: Option<tonic::Code>,
}

/// Watches c1's weights on `r` (registering c1 there first), recording every generation.
async fn watcher(r: &Replica, bundle: &Bundle) -> Arc<Mutex<Seen>> {
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

fn assert_strictly_increasing(what: &str, v: &[u64]) {
    assert!(v.windows(2).all(|w| w[0] < w[1]), "{what}: {v:?}");
}

/// Stored generations: consecutive from the first kept, terms never decreasing.
fn assert_sequence(rows: &[(i64, i64)]) {
    assert!(
        rows.windows(2)
            .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 >= w[0].1),
        "generations must be consecutive, terms non-decreasing: {rows:?}"
    );
}

async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_leader_takeover_after_sigkill() {
    let Some(pg) = PgSchema::create("three_replicas_one_leader_takeover_after_sigkill").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    let mut rs: Vec<Replica> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| Replica::spawn(dir.path(), &pg.url, id, &[]))
        .collect();
    for r in &rs {
        r.wait_ready().await;
    }
    // Exactly one leader, the others followers of its term.
    let (li, term) = leader_of(&rs.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;
    for (i, r) in rs.iter().enumerate() {
        let (s, b) = r.ready().await;
        assert_eq!(s, 200, "{b}");
        if i == li {
            assert_eq!(b, format!("ready: leader term {term}"));
            assert_eq!(r.metric("ballast_broker_leader").await, Some(1.0));
        } else {
            assert_eq!(
                b,
                format!("ready: follower (leader term {term})"),
                "{}",
                r.id
            );
            assert_eq!(r.metric("ballast_broker_leader").await, Some(0.0));
        }
    }
    capacities(&bundle, &rs[1], &rs[2]).await;
    let watchers = [
        watcher(&rs[0], &bundle).await,
        watcher(&rs[1], &bundle).await,
        watcher(&rs[2], &bundle).await,
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for r in &rs {
        clients.push(agent_on(r, &bundle, "c1").await);
    }
    let rep = reporter(clients, stop.clone());
    // Generations flow to every replica's watcher.
    for w in &watchers {
        wait_until(
            "every watcher sees 3 generations",
            Duration::from_secs(20),
            || w.lock().unwrap().generations.len() >= 3,
        )
        .await;
    }
    let before = generations(&pg.url).await;
    let last_before = before.last().unwrap().0;
    // SIGKILL the leader while the agents report.
    let killed_at = Instant::now();
    rs[li].kill();
    let rest: Vec<&Replica> = rs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, r)| r)
        .collect();
    let (ni, new_term) = leader_of(&rest, Duration::from_secs(15)).await;
    let elected = killed_at.elapsed();
    assert!(new_term > term, "{new_term} > {term}");
    // ... and publishes under its term.
    let published = loop {
        let rows = generations(&pg.url).await;
        if rows.iter().any(|(_, t)| *t == new_term) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "no publish by the new leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "TAKEOVER: lease {:?}; new leader {} (term {new_term}) elected {:?} and published {:?} after SIGKILL",
        LEASE, rest[ni].id, elected, published
    );
    // Bound: the old lease's remainder (< LEASE) + one attempt period (LEASE/3) + a round.
    assert!(
        published < LEASE + LEASE / 3 + Duration::from_secs(2),
        "take-over took {published:?}"
    );
    assert_eq!(rest[ni].metric("ballast_broker_leader").await, Some(1.0));
    assert_eq!(
        rest[ni].metric("ballast_broker_term").await,
        Some(f64::from(i32::try_from(new_term).unwrap()))
    );
    assert!(rest[ni].metric("ballast_broker_leader_changes_total").await >= Some(1.0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = rep.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = generations(&pg.url).await;
    assert_sequence(&rows);
    let last = rows.last().unwrap().0;
    assert!(last > last_before, "{rows:?}");
    // Every surviving replica's watcher reaches the last generation, in order, without gaps
    // in what its replica published after the take-over beyond coalescing.
    for (i, w) in watchers.iter().enumerate() {
        if i == li {
            continue;
        }
        wait_until(
            "the watcher reaches the last generation",
            Duration::from_secs(10),
            || w.lock().unwrap().generations.last() == Some(&u64::try_from(last).unwrap()),
        )
        .await;
        let seen = w.lock().unwrap().clone();
        assert_strictly_increasing(&rs[i].id, &seen.generations);
        let after: Vec<u64> = seen
            .generations
            .iter()
            .copied()
            .filter(|g| *g > u64::try_from(last_before).unwrap())
            .collect();
        println!(
            "watcher on {}: {} generations in all, {} after the kill (of {} published after it)",
            rs[i].id,
            seen.generations.len(),
            after.len(),
            last - last_before
        );
    }
    println!(
        "reports accepted: {sent}; generations {:?}..{last}",
        rows.first()
    );
    drop(rs);
    pg.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_steps_down() {
    let Some(pg) = PgSchema::create("a_paused_leader_is_fenced_and_steps_down").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    // Rounds wait 1.5 s after checking the lease, as a slow solve: the leader is paused in
    // that window, so that when it resumes its publish meets the store's fence.
    let env = [("BALLAST_TEST_SLOW_ROUND_MS", "1500")];
    let r1 = Replica::spawn(dir.path(), &pg.url, "r1", &env);
    r1.wait_ready().await;
    let (_, term) = leader_of(&[&r1], Duration::from_secs(10)).await;
    let r2 = Replica::spawn(dir.path(), &pg.url, "r2", &env);
    r2.wait_ready().await;
    let (s, b) = r2.ready().await;
    assert_eq!(
        (s, b.as_str()),
        (
            200,
            format!("ready: follower (leader term {term})").as_str()
        )
    );
    capacities(&bundle, &r2, &r2).await;
    let mut c1 = agent_on(&r1, &bundle, "c1").await;
    let watch2 = watcher(&r2, &bundle).await;
    // r1 publishes under its term first.
    let mut i = 0;
    loop {
        send_reports(&mut c1, vec![c1_report(i)]).await.unwrap();
        i += 1;
        if generations(&pg.url).await.iter().any(|(_, t)| *t == term) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A report to the leader starts a round; pause the leader inside it, past its lease.
    send_reports(&mut c1, vec![c1_report(i)]).await.unwrap();
    i += 1;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(signal(r1.pid(), libc::SIGSTOP), 0);
    let paused_at = Instant::now();
    let (_, new_term) = leader_of(&[&r2], Duration::from_secs(15)).await;
    assert!(new_term > term);
    println!(
        "r2 took over (term {new_term}) {:?} after r1 was paused",
        paused_at.elapsed()
    );
    // r2 publishes under its term (its own reports).
    let mut c1b = agent_on(&r2, &bundle, "c1").await;
    loop {
        send_reports(&mut c1b, vec![c1_report(i)]).await.unwrap();
        i += 1;
        let rows = generations(&pg.url).await;
        if rows.iter().any(|(_, t)| *t == new_term) {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(20),
            "r2 never published"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A new service r1 never published: whatever r1's paused round read before, the store
    // now holds a change it will try to publish when it resumes.
    let mut c2 = agent_on(&r2, &bundle, "c2").await;
    let mut cap = capacity_report("c2", "ns/api", 500.0);
    cap.capacity.push(support::cap("ns/web", 1000.0));
    send_reports(&mut c2, vec![cap]).await.unwrap();
    let mut m = c1_report(i);
    m.rps.push(rps("ns/api", "c2", 10.0));
    send_reports(&mut c1b, vec![m]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = generations(&pg.url).await;
    // Resume r1: its round goes on to publish under its old term, and is fenced.
    assert_eq!(signal(r1.pid(), libc::SIGCONT), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if r1.metric("ballast_broker_fenced_publishes_total").await == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1's publish was not fenced; r1's log:\n{}",
            std::fs::read_to_string(dir.path().join("r1.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, b) = r1.ready().await;
    assert_eq!(
        (s, b.clone()),
        (200, format!("ready: follower (leader term {new_term})")),
        "{b}"
    );
    assert_eq!(r1.metric("ballast_broker_leader").await, Some(0.0));
    let log = std::fs::read_to_string(dir.path().join("r1.log")).unwrap();
    assert!(log.contains("publish fenced"), "{log}");
    // Nothing published under the old term after the take-over; numbers never reused.
    let after = generations(&pg.url).await;
    assert_sequence(&after);
    assert_eq!(&after[..before.len()], &before[..]);
    assert!(
        after.iter().skip(before.len()).all(|(_, t)| *t == new_term),
        "{after:?}"
    );
    // r2's watcher saw r2's generations in order.
    let seen = watch2.lock().unwrap().clone();
    assert_strictly_increasing("r2", &seen.generations);
    println!("generations (generation, term): {after:?}");
    drop((r1, r2));
    pg.drop_schema().await;
}

/// A TCP forwarder to PostgreSQL that the test can cut (every connection closed, the port
/// refusing) and restore on the same port.
struct Forwarder {
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Forwarder {
    async fn start(port: u16, target: std::net::SocketAddr) -> Self {
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

    async fn cut(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
            while t.join_next().await.is_some() {}
        }
    }
}

struct AbortOnDrop(Arc<Mutex<Vec<tokio::task::AbortHandle>>>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in self.0.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_the_database_is_unavailable_then_recovers() {
    let Some(pg) =
        PgSchema::create("a_replica_cut_off_from_the_database_is_unavailable_then_recovers").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    // r3 reaches PostgreSQL through the forwarder.
    // host:port of the URL (postgres://user:pass@host:port/db...).
    let hostport = pg
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let target: std::net::SocketAddr = hostport.parse().unwrap();
    let fport = free_port();
    let mut fwd = Forwarder::start(fport, target).await;
    let via = pg.url.replacen(&hostport, &format!("127.0.0.1:{fport}"), 1);
    let r1 = Replica::spawn(dir.path(), &pg.url, "r1", &[]);
    r1.wait_ready().await;
    leader_of(&[&r1], Duration::from_secs(10)).await;
    let r3 = Replica::spawn(dir.path(), &via, "r3", &[]);
    r3.wait_ready().await;
    capacities(&bundle, &r1, &r1).await;
    let w3 = watcher(&r3, &bundle).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rep = reporter(vec![agent_on(&r1, &bundle, "c1").await], stop.clone());
    wait_until(
        "r3's watcher gets generations",
        Duration::from_secs(20),
        || w3.lock().unwrap().generations.len() >= 2,
    )
    .await;
    // Cut r3 off the database.
    fwd.cut().await;
    let cut_at = Instant::now();
    // Not ready at once (its store probe fails), and partitioned after the lease.
    let (code, body) = loop {
        let (s, b) = r3.ready().await;
        assert!(
            s != 200 || cut_at.elapsed() < LEASE,
            "r3 ready after the lease: {b}"
        );
        if s == 503 && b.contains("partitioned") {
            break (s, b);
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(20),
            "r3 still ready: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "r3 not ready {:?} after the cut: {code} {body}",
        cut_at.elapsed()
    );
    assert!(body.contains("partitioned"), "{body}");
    assert!(
        cut_at.elapsed() >= LEASE,
        "unavailable before the lease: {:?}",
        cut_at.elapsed()
    );
    // Its weight stream ended with UNAVAILABLE, and a new one is refused.
    wait_until("r3's stream ends", Duration::from_secs(10), || {
        w3.lock().unwrap().ended.is_some()
    })
    .await;
    assert_eq!(w3.lock().unwrap().ended, Some(tonic::Code::Unavailable));
    let mut a3 = cluster_agent(r3.addr, &bundle, "c1").await;
    let e = a3.watch_weights(watch_req("c1", 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // r1 keeps publishing meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The database is back: r3 recovers on its own and serves the latest generation.
    let mut fwd2 = Forwarder::start(fport, target).await;
    let back_at = Instant::now();
    loop {
        let (s, b) = r3.ready().await;
        if s == 200 {
            println!(
                "r3 ready again {:?} after the database came back: {b}",
                back_at.elapsed()
            );
            assert!(b.starts_with("ready: follower (leader term "), "{b}");
            break;
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(20),
            "r3 never recovered: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rep.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = u64::try_from(generations(&pg.url).await.last().unwrap().0).unwrap();
    let w = watcher(&r3, &bundle).await;
    wait_until(
        "r3 serves the latest generation",
        Duration::from_secs(10),
        || w.lock().unwrap().generations.last() == Some(&last),
    )
    .await;
    fwd2.cut().await;
    drop(fwd);
    drop((r1, r3));
    pg.drop_schema().await;
}
