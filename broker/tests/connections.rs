//! Connection hygiene of the gRPC listener, against a real broker with real mutual TLS:
//! sockets that never start the handshake are closed after the handshake timeout; one peer
//! cannot hold more than its share of connections while another still registers at once;
//! a `ballast-broker serve` process out of file descriptors backs off instead of spinning,
//! and serves again when descriptors are freed.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ballast_proto::v1::broker_client::BrokerClient;
use support::{cluster_pair, register_req, sqlite_test_config, start_broker, tls_of};
use tonic::transport::Endpoint;

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
        && {
            // a timeout is an Err too: tell them apart
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            !matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
        }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pre_handshake_sockets_are_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = ballast_broker::certs::generate(&["c1".to_string()], &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.connections.tls_handshake_timeout = Duration::from_millis(500);
    let b = start_broker(cfg).await;
    let addr = b.addr;
    let (closed, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let c = closed_within(&mut s, Duration::from_secs(5));
        (c, t.elapsed())
    })
    .await
    .unwrap();
    assert!(closed, "an idle socket is closed");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after about the 500 ms timeout, not {took:?}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_cap_and_another_still_registers() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = ballast_broker::certs::generate(&["c1".to_string()], &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.connections.tls_handshake_timeout = Duration::from_secs(60);
    cfg.connections.limits.max_per_peer = 8;
    let b = start_broker(cfg).await;
    let addr = b.addr;
    // The "attacker" on 127.0.0.1 opens 8 idle sockets (held) and 4 more (closed at once).
    let (held, refused) = tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let refused = (0..4)
            .filter(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                closed_within(&mut s, Duration::from_secs(2))
            })
            .count();
        (held, refused)
    })
    .await
    .unwrap();
    assert_eq!(refused, 4, "connections over the per-peer cap are closed");
    let metrics = reqwest_metrics(b.metrics_addr.unwrap()).await;
    assert!(
        metrics.contains("ballast_broker_connections_refused_total 4"),
        "{metrics}"
    );
    // A legitimate agent from another address registers within 1 s.
    let tls = tls_of(&bundle, cluster_pair(&bundle, "c1"));
    let started = Instant::now();
    let ch = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .local_address(Some("127.0.0.2".parse::<IpAddr>().unwrap()))
        .tls_config(tls.client_config("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    BrokerClient::new(ch)
        .register(register_req("c1", "n1"))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    drop(held);
    b.stop().await;
}

async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_process_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(env!("CARGO_BIN_EXE_ballast-broker"))
        .args([
            "certs",
            "--out",
            certs.to_str().unwrap(),
            "--clusters",
            "c1",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mport = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = |f: &str| certs.join(f).display().to_string();
    // 64 descriptors in all: the store, the listeners and the runtime take some; idle
    // connections take the rest.
    let child = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_ballast-broker"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{mport}")])
        .args([
            "--database",
            &format!("sqlite://{}/b.db?mode=rwc", dir.path().display()),
        ])
        .args([
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("server.pem"),
            "--key",
            &p("server-key.pem"),
        ])
        .args(["--tls-handshake-timeout", "60s", "--solve-interval", "1h"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Kill(child);
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the broker never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Exhaust its descriptors with idle connections (the kernel queues the rest).
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns ~200 ticks (100 Hz) in 2 s; backing off, a few.
    assert!(
        used < 40,
        "{used} ticks of CPU in 2 s while out of descriptors"
    );
    drop(idle);
    // Freed: it serves again (metrics prove the back-off happened).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let m = tokio::task::spawn_blocking(move || -> Option<String> {
            use std::io::Write;
            let mut s = TcpStream::connect(("127.0.0.1", mport)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
        .await
        .unwrap();
        if let Some(m) = m.filter(|m| m.contains("accept_fd_exhausted_total")) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never answered after recovery"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let n: f64 = text
        .lines()
        .find(|l| l.starts_with("ballast_broker_accept_fd_exhausted_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 1.0, "descriptor exhaustion was counted: {text}");
    drop(child);
}
