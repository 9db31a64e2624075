//! The real `ballast-agent` binary failing over between two real brokers (root: BPF,
//! cgroups). Brokers A and B (ballast-broker's server, each on its own SQLite store, mTLS on
//! loopback); A is reached through a TCP proxy so that it can be "killed" the way the kernel
//! ends a killed process's connections (all closed at once, the port refused). The agent is
//! given `--broker https://localhost:A --broker https://localhost:B`; it installs A's weights,
//! A is killed while a client in the agent's cgroup connects through the VIP in a loop. The
//! agent must move to B (its metrics: failovers 1, the replica gauge flipped; its log: the
//! failover at warn with from and to), the kernel must hold the same weights for t/web at
//! every sample during the move, and no connect may fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_broker::certs::{generate, Bundle};
use ballast_broker::server::{start, Running, ServeConfig};
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{CapacitySample, RegisterRequest, ReportRequest};
use ballast_store::sqlite_url;

const VIP: &str = "127.96.0.81";

struct Cleanup {
    cgroup: std::path::PathBuf,
    pin_dir: std::path::PathBuf,
    agent: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        if let Ok(mut dp) = ballast_bpf::Dataplane::open(&self.pin_dir) {
            let _ = dp.detach(&self.cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(root) = ballast_bpf::sys::cgroup2_mount() {
            if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(root.join("cgroup.procs"), p);
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A backend answering every connection with its name.
fn backend(name: &'static str, stop: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(format!("{name}\n").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    port
}

async fn broker(db: &Path, bundle: &Bundle) -> Running {
    let mut c = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        sqlite_url(db),
        Some(bundle.tls_files(&bundle.server)),
    );
    c.solve_interval = Duration::from_secs(3600);
    c.debounce = Duration::from_millis(5);
    c.metrics_addr = None;
    // an even split between east and west: both backends carry weight in the kernel
    c.engine.policy = ballast_types::Policy::RoundRobin;
    // no damping: the first round is the split, the same on A and B
    c.engine.max_step = None;
    start(c).await.expect("broker starts")
}

/// West, serving t/web, registers with and reports to the broker on `port`.
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
    w.report(futures::stream::iter(vec![ReportRequest {
        cluster_id: "west".into(),
        node_name: "n1".into(),
        measured_at_ms: ballast_types::now_ms(),
        capacity: vec![CapacitySample {
            service: "t/web".into(),
            capacity_rps: 1000.0,
            measured_at_ms: 0,
            service_time: None,
            measured_service_ms: None,
            unit: 0,
        }],
        ..ReportRequest::default()
    }]))
    .await
    .unwrap();
}

/// A TCP proxy to `upstream`; aborting the returned task closes every connection and the port.
async fn proxy(upstream: SocketAddr) -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut down, _)) = l.accept().await {
            conns.spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    (port, task)
}

/// The agent's `/metrics` text.
fn metrics_text(addr: SocketAddr) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
}

/// t/web's backends in the kernel as (address, weight, healthy), sorted.
fn kernel_web(pin_dir: &Path) -> Option<Vec<(SocketAddr, u32, bool)>> {
    web_of(&ballast_bpf::Dataplane::open(pin_dir).ok()?)
}

fn web_of(dp: &ballast_bpf::Dataplane) -> Option<Vec<(SocketAddr, u32, bool)>> {
    let s = dp.service("t/web").ok()?;
    let mut b: Vec<_> = s
        .spec
        .backends
        .iter()
        .map(|b| (b.addr, b.weight, b.healthy))
        .collect();
    b.sort();
    Some(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_agent_fails_over_to_the_next_broker_keeping_its_weights() {
    if !ballast_bpf::sys::root_for_tests() {
        println!("skipped root_agent_fails_over_to_the_next_broker_keeping_its_weights: needs root (BPF, cgroups)");
        return;
    }
    let (Some(cg_root), Some(bpffs)) = (
        ballast_bpf::sys::cgroup2_mount(),
        ballast_bpf::sys::bpffs_mount(),
    ) else {
        panic!("needs cgroup2 and bpffs mounted (kind-tests/setup.sh mounts bpffs)");
    };
    let unique = format!("ballast-agent-failover-{}", std::process::id());
    let mut env = Cleanup {
        cgroup: cg_root.join(&unique),
        pin_dir: bpffs.join(&unique),
        agent: None,
    };
    std::fs::create_dir_all(&env.cgroup).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let bundle = generate(&["east".to_owned(), "west".to_owned()], &[]).unwrap();
    let certs = dir.path().join("certs");
    bundle.write_to(&certs).unwrap();
    let a = broker(&dir.path().join("a.db"), &bundle).await;
    let b = broker(&dir.path().join("b.db"), &bundle).await;
    west_serves(&bundle, a.addr.port()).await;
    west_serves(&bundle, b.addr.port()).await;
    let (port_a, proxy_a) = proxy(a.addr).await;
    let port_b = b.addr.port();

    let stop = Arc::new(AtomicBool::new(false));
    let pe = backend("east", stop.clone());
    let pw = backend("west", stop.clone());
    let topo = dir.path().join("topology.yaml");
    std::fs::write(
        &topo,
        format!(
            "local_cluster: east
clusters:
  - id: east
  - id: west
services:
  - name: t/web
    vips: [{VIP}]
    ports: [{{ port: 80 }}]
    capacity_rps_per_pod: 1000
    endpoints:
      - {{ address: 127.0.0.1:{pe}, cluster: east }}
      - {{ address: 127.0.0.1:{pw}, cluster: west }}
"
        ),
    )
    .unwrap();
    let metrics_addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("agent.log");
    let pem = |name: &str| certs.join(name).display().to_string();
    env.agent = Some(
        Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
            .args(["--cluster-id", "east", "--node-name", "n1"])
            .args(["--region", "us-east-1", "--zone", "us-east-1a"])
            .args(["--provider", "aws", "--gateway", "127.0.0.1"])
            // the flag repeated: one replica each
            .args(["--broker", &format!("https://localhost:{port_a}")])
            .args(["--broker", &format!("https://localhost:{port_b}")])
            .args(["--ca", &pem("ca.pem")])
            .args(["--cert", &pem("cluster-east.pem")])
            .args(["--key", &pem("cluster-east-key.pem")])
            .args(["--discovery", "topology", "--topology"])
            .arg(&topo)
            .args(["--cgroup"])
            .arg(&env.cgroup)
            .arg("--pin-dir")
            .arg(&env.pin_dir)
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(["--report-interval", "500ms"])
            .env("RUST_LOG", "warn")
            .env_remove("BALLAST_BROKER")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let replica_a =
        format!("ballast_agent_broker_replica{{address=\"https://127.0.0.1:{port_a}\"}}");
    let replica_b =
        format!("ballast_agent_broker_replica{{address=\"https://127.0.0.1:{port_b}\"}}");
    // A's weights installed
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics_text(metrics_addr);
        if metric(&m, "ballast_agent_installed_generation{service=\"t/web\"}").is_some()
            && metric(&m, &replica_a).as_deref() == Some("1")
        {
            assert_eq!(metric(&m, &replica_b).as_deref(), Some("0"), "{m}");
            assert_eq!(
                metric(&m, "ballast_agent_broker_failovers_total").as_deref(),
                Some("0")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's weights never installed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = kernel_web(&env.pin_dir).expect("t/web in the kernel");
    assert!(before.iter().all(|(_, _, healthy)| *healthy), "{before:?}");
    assert!(
        before.len() == 2 && before.iter().all(|(_, w, _)| *w > 0),
        "the broker's split over both backends: {before:?}"
    );

    // a client in the agent's cgroup, connecting through the VIP in a loop
    let script = format!(
        "echo $$ > {}/cgroup.procs
for i in $(seq 1 1500); do
  if exec 3<>/dev/tcp/{VIP}/80; then
    if read -r line <&3; then echo \"$line\"; else echo FAIL-READ; fi
    exec 3<&-
  else
    echo FAIL-CONNECT
  fi
done",
        env.cgroup.display()
    );
    let mut client = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(client.stdout.take().unwrap());
    let reader = std::thread::spawn(move || out.lines().map_while(Result::ok).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // the kernel's t/web sampled without pause from just before the kill until B is in use
    let sampling = Arc::new(AtomicBool::new(true));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let sampler = {
        let (pin_dir, sampling, before) = (env.pin_dir.clone(), sampling.clone(), before.clone());
        std::thread::spawn(move || {
            let (mut samples, mut changed) = (0usize, Vec::new());
            // one handle (opening is slow; t/web exists already, and reads are then cheap)
            let dp = ballast_bpf::Dataplane::open(&pin_dir).expect("the pinned data plane");
            while sampling.load(Ordering::Relaxed) {
                let k = web_of(&dp);
                if k.as_ref() != Some(&before) {
                    changed.push(k);
                }
                samples += 1;
                if samples == 1 {
                    let _ = first_tx.send(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (samples, changed)
        })
    };

    tokio::task::spawn_blocking(move || first_rx.recv())
        .await
        .unwrap()
        .expect("the sampler runs");

    // A is killed: its connections closed at once, its port refused
    let t0 = Instant::now();
    proxy_a.abort();
    let _ = proxy_a.await;
    let moved = loop {
        let m = metrics_text(metrics_addr);
        if metric(&m, &replica_b).as_deref() == Some("1") {
            assert_eq!(metric(&m, &replica_a).as_deref(), Some("0"), "{m}");
            assert_eq!(
                metric(&m, "ballast_agent_broker_failovers_total").as_deref(),
                Some("1"),
                "{m}"
            );
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no failover within 20 s:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    sampling.store(false, Ordering::Relaxed);
    let (samples, changed) = sampler.join().unwrap();
    assert!(
        changed.is_empty(),
        "the kernel's weights changed during the failover: {changed:?}"
    );

    // B's weights: acknowledged by the agent (B's store has them installed by east)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = metrics_text(metrics_addr);
    assert_eq!(metric(&m, &replica_b).as_deref(), Some("1"), "stays on B");
    assert_eq!(
        metric(&m, "ballast_agent_broker_failovers_total").as_deref(),
        Some("1")
    );
    let after = kernel_web(&env.pin_dir).expect("t/web in the kernel");
    assert_eq!(after.len(), before.len(), "{after:?}");

    let st = tokio::task::spawn_blocking(move || client.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success());
    let lines = reader.join().unwrap();
    let fails = lines.iter().filter(|l| l.starts_with("FAIL")).count();
    let (east, west) = (
        lines.iter().filter(|l| *l == "east").count(),
        lines.iter().filter(|l| *l == "west").count(),
    );
    println!(
        "agent failover: on B {moved:?} after A was killed ({samples} kernel samples, all equal \
         to the weights before: {before:?}); client: {} connects, east {east}, west {west}, failed {fails}",
        lines.len()
    );
    assert_eq!(fails, 0, "failed connects during the failover");
    assert!(
        east > 0 && west > 0,
        "both backends served: east {east}, west {west}"
    );
    assert_eq!(lines.len(), 1500);

    // the failover logged at warn, naming both replicas (the colours taken out)
    let raw = std::fs::read_to_string(&log).unwrap();
    let mut text = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    let line = text
        .lines()
        .find(|l| l.contains("failed over to another broker replica"))
        .unwrap_or_else(|| panic!("no failover in the log:\n{text}"));
    assert!(
        line.contains("WARN")
            && line.contains(&format!("from=https://127.0.0.1:{port_a}"))
            && line.contains(&format!("to=https://127.0.0.1:{port_b}")),
        "{line}"
    );

    stop.store(true, Ordering::Relaxed);
    drop(env);
    a.stop().await;
    b.stop().await;
}
