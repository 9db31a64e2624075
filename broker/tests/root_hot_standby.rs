//! Hot standby on one host, with real processes, real mTLS and the real `sk_reuseport` program
//! (root, bpffs, kernel >= 5.14; skipped with the reason otherwise).
//!
//! Two `ballast-broker serve --reuseport` on one port and one SQLite file: the second waits
//! for the database lock as a standby. Clients connect in a tight loop (TCP connect + TLS
//! handshake, 4 threads); the primary is stopped (SIGSTOP) while 50 more connections queue on
//! its listener, then SIGKILLed. Counted: refused, reset and timed-out connects and
//! handshakes, before and after the kill, and the time from the kill to the first handshake
//! the standby completes. The same run without the program (plain SO_REUSEPORT) shows what
//! the program buys. Agents (tonic, WatchWeights) reconnect to the standby, which stores a new
//! Register and continues the generation sequence.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_broker::certs::Bundle;
use ballast_proto::v1::ListClustersRequest;
use support::{
    admin, agent, capacity_report, cluster_pair, open_watch, register_req, report, rps, rtt,
    send_reports, tls_of,
};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the test's pin dir on drop.
struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn skip_reason() -> Option<String> {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the sk_reuseport program needs CAP_BPF + CAP_NET_ADMIN)".into());
    }
    if !Path::new("/sys/fs/bpf").is_dir()
        || !std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Some("bpffs is not mounted at /sys/fs/bpf".into());
    }
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.trim().split(['.', '-']);
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 14) {
        return Some(format!(
            "kernel {} has no BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (needs >= 5.14)",
            rel.trim()
        ));
    }
    None
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `GET path` over HTTP/1.0: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let status = r.split_whitespace().nth(1)?.parse().ok()?;
    let body = r.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    dir: tempfile::TempDir,
    bundle: Bundle,
    port: u16,
    pins: Pins,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = ["c1", "c2", "c3"].iter().map(|s| (*s).into()).collect();
        let bundle = ballast_broker::certs::generate(&ids, &[]).unwrap();
        bundle.write_to(&dir.path().join("certs")).unwrap();
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/ballast-test-standby-{tag}-{}",
            std::process::id()
        )));
        let _ = std::fs::remove_dir_all(&pins.0);
        Self {
            dir,
            bundle,
            port: free_port(),
            pins,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn serve(&self, name: &str, metrics: SocketAddr, program: bool) -> Kill {
        let certs = self.dir.path().join("certs");
        let p = |f: &str| certs.join(f).display().to_string();
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-broker"));
        cmd.args(["serve", "--listen", &self.addr().to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args([
                "--database",
                &format!("sqlite://{}/b.db?mode=rwc", self.dir.path().display()),
            ])
            .args(["--ca", &p("ca.pem"), "--cert", &p("server.pem")])
            .args(["--key", &p("server-key.pem")])
            .args([
                "--solve-interval",
                "1h",
                "--debounce",
                "5ms",
                "--max-step",
                "1",
            ])
            .args(["--reuseport", "--reuseport-pin-dir"])
            .arg(&self.pins.0)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        if !program {
            cmd.arg("--reuseport-no-program");
        }
        Kill(cmd.spawn().unwrap())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn client_tls(bundle: &Bundle) -> Arc<rustls::ClientConfig> {
    let pair = cluster_pair(bundle, "c1");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut bundle.ca.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut pair.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut pair.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

const THREADS: usize = 4;
const QUEUED: usize = 50;

#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    attempts: u64,
    refused: u64,
    reset: u64,
    timeout: u64,
    other: u64,
    tls_ok: u64,
    tls_reset: u64,
    tls_timeout: u64,
    tls_other: u64,
}

impl Phase {
    fn tcp_failed(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.other
    }
    fn tls_failed(&self) -> u64 {
        self.tls_reset + self.tls_timeout + self.tls_other
    }
    fn add(&mut self, o: &Phase) {
        self.attempts += o.attempts;
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.other += o.other;
        self.tls_ok += o.tls_ok;
        self.tls_reset += o.tls_reset;
        self.tls_timeout += o.tls_timeout;
        self.tls_other += o.tls_other;
    }
    fn line(&self) -> String {
        format!(
            "{} attempts: TCP connect refused {}, reset {}, timed out {}, other {}; TLS handshake ok {}, reset {}, timed out {}, other {}",
            self.attempts,
            self.refused,
            self.reset,
            self.timeout,
            self.other,
            self.tls_ok,
            self.tls_reset,
            self.tls_timeout,
            self.tls_other
        )
    }
}

#[derive(Debug, Default)]
struct Tally {
    before: Phase,
    after: Phase,
    first_ok_after_kill: Option<Instant>,
}

enum Outcome {
    Refused,
    Reset,
    Timeout,
    Other,
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Outcome::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            Outcome::Reset
        }
        K::TimedOut | K::WouldBlock => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// A TLS handshake on `tcp`, to completion (the server's Finished read).
fn handshake(tcp: TcpStream, cfg: &Arc<rustls::ClientConfig>) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(3)))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    Ok(())
}

/// One TCP connect (unless `pre` is an already connected stream) and TLS handshake, counted
/// in `phase`; true when the handshake completed.
fn attempt(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    pre: Option<TcpStream>,
    phase: &mut Phase,
) -> bool {
    phase.attempts += 1;
    let tcp = match pre {
        Some(s) => s,
        None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) => {
                match classify(&e) {
                    Outcome::Refused => phase.refused += 1,
                    Outcome::Reset => phase.reset += 1,
                    Outcome::Timeout => phase.timeout += 1,
                    Outcome::Other => phase.other += 1,
                }
                return false;
            }
        },
    };
    match handshake(tcp, cfg) {
        Ok(()) => {
            phase.tls_ok += 1;
            true
        }
        Err(e) => {
            match classify(&e) {
                Outcome::Refused | Outcome::Reset => phase.tls_reset += 1,
                Outcome::Timeout => phase.tls_timeout += 1,
                Outcome::Other => phase.tls_other += 1,
            }
            false
        }
    }
}

struct Run {
    tally: Tally,
    queued: Phase,
    takeover: Option<Duration>,
    standby_log: String,
    stats: Option<ballast_bpf::reuseport::ReuseportStats>,
}

impl Run {
    fn print(&self, label: &str) {
        println!("== {label}");
        println!("  loop before the kill: {}", self.tally.before.line());
        println!("  loop after the kill:  {}", self.tally.after.line());
        println!(
            "  {QUEUED} connects queued on the stopped primary, handshaken after its kill: {}",
            self.queued.line()
        );
        match self.takeover {
            Some(d) => println!(
                "  takeover: first handshake completed by the standby {:.1} ms after SIGKILL",
                d.as_secs_f64() * 1e3
            ),
            None => println!("  takeover: no handshake completed after SIGKILL"),
        }
        for l in self
            .standby_log
            .lines()
            .filter(|l| l.contains("taking over") || l.contains("broker serving"))
        {
            println!("  standby log: {}", l.trim());
        }
        if let Some(s) = self.stats {
            println!("  program selections: {s:?}");
        }
    }
}

/// The client loop, the SIGSTOP + queued connects, the SIGKILL of `primary`, until the
/// standby completes a handshake and 1 s more.
fn kill_under_load(setup: &Setup, mut primary: Kill, program: bool) -> Run {
    let addr = setup.addr();
    let cfg = client_tls(&setup.bundle);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let killed: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (cfg, tally, killed, stop) =
                (cfg.clone(), tally.clone(), killed.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let mut p = Phase::default();
                    let ok = attempt(addr, &cfg, None, &mut p);
                    let k = *killed.lock().unwrap();
                    let after = k.is_some_and(|k| start >= k);
                    let mut t = tally.lock().unwrap();
                    if after {
                        t.after.add(&p);
                        if ok && t.first_ok_after_kill.is_none() {
                            t.first_ok_after_kill = Some(Instant::now());
                        }
                    } else {
                        t.before.add(&p);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // The primary stops accepting; new connections queue on its listener (with the program)
    // or on either listener by hash (without).
    let pid = libc::pid_t::try_from(primary.0.id()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut queued = Phase::default();
    let mut held = Vec::new();
    for _ in 0..QUEUED {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(e) => {
                queued.attempts += 1;
                match classify(&e) {
                    Outcome::Refused => queued.refused += 1,
                    Outcome::Reset => queued.reset += 1,
                    Outcome::Timeout => queued.timeout += 1,
                    Outcome::Other => queued.other += 1,
                }
            }
        }
    }
    let t_kill = Instant::now();
    *killed.lock().unwrap() = Some(t_kill);
    let _ = primary.0.kill();
    let _ = primary.0.wait();
    for s in held {
        attempt(addr, &cfg, Some(s), &mut queued);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.lock().unwrap().first_ok_after_kill.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let takeover = tally.first_ok_after_kill.map(|t| t - t_kill);
    let stats = program
        .then(|| ballast_bpf::reuseport::ReuseportGroup::open(&setup.pins.0).ok())
        .flatten()
        .and_then(|g| g.stats().ok());
    Run {
        tally,
        queued,
        takeover,
        standby_log: setup.log("standby"),
        stats,
    }
}

fn start_pair(setup: &Setup, program: bool) -> (Kill, SocketAddr) {
    let m1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let m2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let primary = setup.serve("primary", m1, program);
    wait_for("the primary's /ready", Duration::from_secs(30), || {
        http_get(m1, "/ready").is_some_and(|(s, _)| s == 200)
    });
    (primary, m2)
}

fn start_standby(setup: &Setup, m2: SocketAddr, program: bool) -> Kill {
    let standby = setup.serve("standby", m2, program);
    wait_for(
        "the standby's ballast_broker_standby 1",
        Duration::from_secs(30),
        || {
            metric(m2, "ballast_broker_standby") == Some(1.0)
                && setup
                    .log("standby")
                    .contains("waiting for the database lock held by pid")
        },
    );
    let (status, body) = http_get(m2, "/ready").unwrap();
    assert_eq!(status, 503, "a waiting standby is not ready: {body}");
    assert!(body.contains("hot standby"), "{body}");
    assert!(
        setup
            .log("standby")
            .contains("waiting for the database lock held by pid"),
        "{}",
        setup.log("standby")
    );
    standby
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_standby_takes_over_with_no_refused_or_reset_connect() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let migrate_req = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .unwrap_or_default()
        .trim()
        .to_string();
    println!("net.ipv4.tcp_migrate_req = {migrate_req}");

    // ---- with the program
    let setup = Setup::new("bpf");
    let addr = setup.addr();
    let (primary, m2) = start_pair(&setup, true);
    let c1_tls = tls_of(&setup.bundle, cluster_pair(&setup.bundle, "c1"));
    let c2_tls = tls_of(&setup.bundle, cluster_pair(&setup.bundle, "c2"));
    let c3_tls = tls_of(&setup.bundle, cluster_pair(&setup.bundle, "c3"));
    let mut a1 = agent(addr, &c1_tls).await.unwrap();
    let mut a2 = agent(addr, &c2_tls).await.unwrap();
    a1.register(register_req("c1", "n1")).await.unwrap();
    a2.register(register_req("c2", "n1")).await.unwrap();
    let mut watch = open_watch(&mut a1, "c1", 0).await;
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 1000.0)])
        .await
        .unwrap();
    let mut m = report("c1", "n1");
    m.rtt = vec![rtt("c2", 5.0)];
    m.rps = vec![rps("ns/web", "c2", 100.0)];
    send_reports(&mut a1, vec![m]).await.unwrap();
    let g1 = loop {
        let u = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("an update within 10 s")
            .unwrap()
            .unwrap();
        if u.service == "ns/web" && u.weights.contains_key("c2") {
            break u.generation;
        }
    };

    let standby = start_standby(&setup, m2, true);
    let run = tokio::task::block_in_place(|| kill_under_load(&setup, primary, true));
    run.print("SO_REUSEPORT + sk_reuseport/migrate program");
    let tcp_failed =
        run.tally.before.tcp_failed() + run.tally.after.tcp_failed() + run.queued.tcp_failed();
    assert_eq!(tcp_failed, 0, "no connect refused, reset or timed out");
    assert_eq!(
        run.queued.tls_ok, QUEUED as u64,
        "the connections queued on the dead primary migrated to the standby"
    );
    assert!(
        run.tally.before.tls_failed() + run.tally.after.tls_failed() <= THREADS as u64,
        "only handshakes the primary had accepted itself may die with it"
    );
    assert!(run.takeover.is_some(), "the standby took over");
    assert!(
        run.standby_log.contains("taking over"),
        "{}",
        run.standby_log
    );
    assert_eq!(metric(m2, "ballast_broker_standby"), Some(0.0));

    // Agents: the watch ends with the primary; the same clients reconnect (to the standby,
    // the only process left), a new cluster's Register is stored and the generation goes on.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await;
    assert!(end.is_ok(), "the watch stream ended with the primary");
    let mut watch = open_watch(&mut a1, "c1", g1).await;
    let mut a3 = agent(addr, &c3_tls).await.unwrap();
    a3.register(register_req("c3", "n1")).await.unwrap();
    send_reports(&mut a3, vec![capacity_report("c3", "ns/web", 1000.0)])
        .await
        .unwrap();
    let mut m = report("c1", "n1");
    m.rtt = vec![rtt("c2", 5.0), rtt("c3", 80.0)];
    m.rps = vec![rps("ns/web", "c2", 100.0)];
    send_reports(&mut a1, vec![m]).await.unwrap();
    let g2 = loop {
        let u = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("an update from the standby within 10 s")
            .unwrap()
            .unwrap();
        if u.service == "ns/web" && u.weights.contains_key("c3") {
            break u.generation;
        }
    };
    assert!(g2 > g1, "the generation sequence continues: {g1} then {g2}");
    let mut op = admin(addr, &setup.bundle).await;
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list
        .clusters
        .iter()
        .map(|c| c.cluster_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["c1", "c2", "c3"],
        "c3's Register after the takeover is stored"
    );
    assert!(metric(m2, "ballast_broker_watchers").unwrap_or(0.0) >= 1.0);
    println!(
        "  agents: watch ended with the primary, reopened on the standby; generation {g1} before, {g2} after (c3 registered after the takeover)"
    );
    drop((a1, a2, a3, op, watch, standby));

    // ---- without the program: plain SO_REUSEPORT
    let plain = Setup::new("plain");
    let (primary, m2) = start_pair(&plain, false);
    let standby = start_standby(&plain, m2, false);
    let run_plain = tokio::task::block_in_place(|| kill_under_load(&plain, primary, false));
    run_plain.print("plain SO_REUSEPORT (no program)");
    drop(standby);
}
