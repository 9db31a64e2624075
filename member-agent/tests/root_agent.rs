//! The real `ballast-agent` binary steering real connections (root: BPF, cgroups).
//!
//! Two loopback backends (clusters east and west) behind VIP 127.96.0.77:80; a bash client in
//! the test's own cgroup connects to the VIP in a loop (an unsteered connect goes to the VIP,
//! where nothing listens, and fails). While it runs the agent is killed with SIGKILL and
//! started again, then west's backend is marked not ready in the topology file and stopped.
//! No connect may fail, and the split must follow: both backends before, east only after.
//! A second test runs the agent against a real broker and checks that weights sent before
//! discovery knew their service are installed once it does.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    ballast_bpf::sys::root_for_tests()
}

/// A backend answering every connection with its name.
fn backend(name: &'static str, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(format!("{name}\n").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    (port, h)
}

fn topology(pa: u16, pb: u16, west_ready: bool) -> String {
    format!(
        "local_cluster: east
clusters:
  - id: east
  - id: west
services:
  - name: t/web
    vips: [127.96.0.77]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 127.0.0.1:{pa}, cluster: east }}
      - {{ address: 127.0.0.1:{pb}, cluster: west, ready: {west_ready} }}
"
    )
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Cleanup {
    cgroup: PathBuf,
    pin_dir: PathBuf,
    agent: Option<Child>,
}

impl Cleanup {
    /// A cgroup and a pin directory named `ballast-agent-<what>-<pid>`, or `None` (with a
    /// printed skip) when not root.
    fn new(test: &str, what: &str) -> Option<Self> {
        if !is_root() {
            println!("skipped {test}: needs root (BPF, cgroups)");
            return None;
        }
        let (Some(cg_root), Some(bpffs)) = (
            ballast_bpf::sys::cgroup2_mount(),
            ballast_bpf::sys::bpffs_mount(),
        ) else {
            panic!("needs cgroup2 and bpffs mounted (kind-tests/setup.sh mounts bpffs)");
        };
        let unique = format!("ballast-agent-{what}-{}", std::process::id());
        let env = Cleanup {
            cgroup: cg_root.join(&unique),
            pin_dir: bpffs.join(&unique),
            agent: None,
        };
        std::fs::create_dir_all(&env.cgroup).unwrap();
        Some(env)
    }
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

fn start_agent(topology: &Path, cgroup: &Path, pin_dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
        .args(["--cluster-id", "east", "--node-name", "test", "--topology"])
        .arg(topology)
        .args(["--topology-poll-interval", "50ms", "--cgroup"])
        .arg(cgroup)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(["--metrics-addr", "127.0.0.1:0", "--report-interval", "1s"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the kernel holds t/web with exactly `backends` healthy backends.
fn wait_installed(pin_dir: &Path, backends: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(dp) = ballast_bpf::Dataplane::open(pin_dir) {
            if let Ok(s) = dp.service("t/web") {
                if s.spec.backends.iter().filter(|b| b.healthy).count() == backends {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "agent did not install t/web with {backends} backends"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_agent_restart_and_backend_drain_lose_no_connection() {
    let Some(mut env) = Cleanup::new(
        "root_agent_restart_and_backend_drain_lose_no_connection",
        "e2e",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.yaml");

    let stop_a = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let (pa, ha) = backend("A", stop_a.clone());
    let (pb, hb) = backend("B", stop_b.clone());
    write_atomic(&topo, &topology(pa, pb, true));
    env.agent = Some(start_agent(&topo, &env.cgroup, &env.pin_dir));
    wait_installed(&env.pin_dir, 2);

    // the client: joins the cgroup, connects in a loop, prints each answer (or FAIL)
    let script = format!(
        "echo $$ > {}/cgroup.procs
for i in $(seq 1 4000); do
  if exec 3<>/dev/tcp/127.96.0.77/80; then
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
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let take = |n: usize, lines: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while lines.len() < n {
            let l = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("client output");
            lines.push(l);
        }
    };
    let drain = |lines: &mut Vec<String>| {
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
    };

    // phase 1: steady, then the agent is killed and restarted mid-stream
    take(500, &mut lines);
    let mut a = env.agent.take().unwrap();
    a.kill().unwrap(); // SIGKILL: no clean-up at all
    a.wait().unwrap();
    take(lines.len() + 300, &mut lines); // steering continues with no agent
    env.agent = Some(start_agent(&topo, &env.cgroup, &env.pin_dir));
    take(lines.len() + 500, &mut lines);
    let phase1 = lines.len();

    // phase 2: west's backend goes unready (drain), then stops
    write_atomic(&topo, &topology(pa, pb, false));
    wait_installed(&env.pin_dir, 1);
    // what the client printed up to now may predate the install
    std::thread::sleep(Duration::from_millis(100));
    drain(&mut lines);
    let drained_at = lines.len();
    stop_b.store(true, Ordering::Relaxed);
    hb.join().unwrap();
    take(4000, &mut lines);
    client.wait().unwrap();
    reader.join().unwrap();
    stop_a.store(true, Ordering::Relaxed);
    ha.join().unwrap();

    let fails: Vec<(usize, &String)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FAIL"))
        .collect();
    assert!(
        fails.is_empty(),
        "failed connects: {} e.g. {:?}",
        fails.len(),
        &fails[..fails.len().min(5)]
    );
    let count = |range: &[String], who: &str| range.iter().filter(|l| *l == who).count();
    let (a1, b1) = (count(&lines[..phase1], "A"), count(&lines[..phase1], "B"));
    println!(
        "phase 1 (restart): A {a1}, B {b1}; phase 2 (after drain): A {}, B {}",
        count(&lines[drained_at..], "A"),
        count(&lines[drained_at..], "B")
    );
    // even split (no broker): 50/50 within a wide tolerance
    let share = a1 as f64 / (a1 + b1) as f64;
    assert!((0.4..=0.6).contains(&share), "A share {share}");
    assert_eq!(
        count(&lines[drained_at..], "B"),
        0,
        "no connection to the drained backend"
    );
}

/// The agent's `/metrics` text (plain HTTP on loopback).
fn metrics_text(addr: std::net::SocketAddr) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Polls the agent's metrics until a line starts with `prefix`; panics after 20 s.
fn wait_metric(addr: std::net::SocketAddr, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(addr);
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no {prefix} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A broker client over mTLS with `cluster`'s certificate from `bundle`, registered as `node`.
async fn registered_client(
    bundle: &ballast_broker::certs::Bundle,
    port: u16,
    cluster: &str,
    node: &str,
    region: &str,
) -> ballast_proto::v1::broker_client::BrokerClient<tonic::transport::Channel> {
    let creds = bundle.clusters.iter().find(|(c, _)| c == cluster).unwrap();
    let tls = bundle.tls_files(&creds.1);
    let ch = tls.localhost_channel(port).await.unwrap();
    let mut client = ballast_proto::v1::broker_client::BrokerClient::new(ch);
    client
        .register(ballast_proto::v1::RegisterRequest {
            cluster_id: cluster.into(),
            region: region.into(),
            zone: format!("{region}a"),
            provider: "aws".into(),
            gateway_address: "127.0.0.2".into(),
            agent_version: "test".into(),
            node_name: node.into(),
        })
        .await
        .unwrap();
    client
}

/// The broker sends a service's weights again only when they change, so weights that arrive
/// before discovery knows the service (another node of the cluster imports it already) are
/// kept and installed once the service appears: the real agent binary, a real broker over
/// mTLS, a topology file that gains the service later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_agent_installs_weights_that_came_before_discovery() {
    use ballast_broker::certs::generate;
    use ballast_broker::server::{start, ServeConfig};
    use ballast_proto::v1::{CapacitySample, ReportRequest};
    use ballast_store::sqlite_url;

    let Some(mut env) = Cleanup::new(
        "root_agent_installs_weights_that_came_before_discovery",
        "pending",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // broker with mTLS; west serves t/web and t/late
    let bundle = generate(&["east".to_string(), "west".to_string()], &[]).unwrap();
    let certs = dir.path().join("certs");
    bundle.write_to(&certs).unwrap();
    let mut cfg = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        sqlite_url(&dir.path().join("broker.db")),
        Some(bundle.tls_files(&bundle.server)),
    );
    cfg.solve_interval = Duration::from_secs(3600);
    cfg.debounce = Duration::from_millis(5);
    cfg.metrics_addr = None;
    let broker = start(cfg).await.unwrap();
    let mut w = registered_client(&bundle, broker.addr.port(), "west", "n1", "eu-west-1").await;
    let cap = |service: &str| CapacitySample {
        service: service.into(),
        capacity_rps: 1000.0,
        measured_at_ms: 0,
        service_time: None,
        measured_service_ms: None,
        unit: 0,
    };
    w.report(futures::stream::iter(vec![ReportRequest {
        cluster_id: "west".into(),
        node_name: "n1".into(),
        measured_at_ms: ballast_types::now_ms(),
        capacity: vec![cap("t/web"), cap("t/late")],
        ..ReportRequest::default()
    }]))
    .await
    .unwrap();

    // another node of east already imports t/late (its discovery is ahead): the broker
    // computes t/late's weights for east, and sends them to every east agent
    let mut e0 = registered_client(&bundle, broker.addr.port(), "east", "n0", "us-east-1").await;
    e0.report(futures::stream::iter(vec![ReportRequest {
        cluster_id: "east".into(),
        node_name: "n0".into(),
        measured_at_ms: ballast_types::now_ms(),
        imports: Some(ballast_proto::v1::ImportedServices {
            services: vec!["t/late".into(), "t/web".into()],
        }),
        ..ReportRequest::default()
    }]))
    .await
    .unwrap();

    // this node's agent knows t/web only
    let stop = Arc::new(AtomicBool::new(false));
    let (pa, ha) = backend("A", stop.clone());
    let (pb, hb) = backend("B", stop.clone());
    let topo = dir.path().join("topology.yaml");
    let late = format!(
        "  - name: t/late
    vips: [127.96.0.78]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 127.0.0.1:{pb}, cluster: west }}
"
    );
    write_atomic(&topo, &topology(pa, pb, true));
    let metrics_addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pem = |name: &str| certs.join(name).display().to_string();
    env.agent = Some(
        Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
            .args(["--cluster-id", "east", "--node-name", "test"])
            .args([
                "--region",
                "us-east-1",
                "--zone",
                "us-east-1a",
                "--provider",
                "aws",
            ])
            .args([
                "--broker",
                &format!("https://localhost:{}", broker.addr.port()),
            ])
            .args(["--ca", &pem("ca.pem")])
            .args(["--cert", &pem("cluster-east.pem")])
            .args(["--key", &pem("cluster-east-key.pem")])
            .args(["--discovery", "topology", "--topology"])
            .arg(&topo)
            .args(["--topology-poll-interval", "50ms", "--cgroup"])
            .arg(&env.cgroup)
            .arg("--pin-dir")
            .arg(&env.pin_dir)
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(["--report-interval", "1s"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // the first batch: t/web installed, t/late refused (unknown to discovery)
    wait_metric(
        metrics_addr,
        "ballast_agent_installed_generation{service=\"t/web\"}",
    );
    wait_metric(
        metrics_addr,
        "ballast_agent_updates_refused_total{service=\"t/late\"}",
    );
    assert!(
        !metrics_text(metrics_addr)
            .contains("ballast_agent_installed_generation{service=\"t/late\"}"),
        "t/late cannot be installed before discovery knows it"
    );
    let generation = broker.engine().current().generation;
    let refused = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("ballast_agent_updates_refused_total{service=\"t/late\"}"))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(refused(&metrics_text(metrics_addr)).as_deref(), Some("1"));

    // discovery changes without t/late: the update is offered again, refused the same way,
    // and neither counted nor logged nor acknowledged a second time
    let other = format!(
        "  - name: t/other
    vips: [127.96.0.79]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 127.0.0.1:{pa}, cluster: east }}
"
    );
    write_atomic(&topo, &format!("{}{other}", topology(pa, pb, true)));
    let deadline = Instant::now() + Duration::from_secs(20);
    // a fresh handle each time: a handle knows the service names of when it was opened
    while ballast_bpf::Dataplane::open(&env.pin_dir)
        .and_then(|dp| dp.service("t/other"))
        .is_err()
    {
        assert!(Instant::now() < deadline, "t/other never installed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        refused(&metrics_text(metrics_addr)).as_deref(),
        Some("1"),
        "a repeated refusal must not be counted again"
    );

    // discovery learns t/late: its weights are installed with no new generation
    write_atomic(&topo, &format!("{}{late}", topology(pa, pb, true)));
    let line = wait_metric(
        metrics_addr,
        "ballast_agent_installed_generation{service=\"t/late\"}",
    );
    assert!(line.ends_with(&format!(" {generation}")), "{line}");
    assert_eq!(broker.engine().current().generation, generation);
    let dp = ballast_bpf::Dataplane::open(&env.pin_dir).unwrap();
    let s = dp.service("t/late").unwrap();
    assert_eq!(s.spec.backends.len(), 1, "{:?}", s.spec.backends);

    stop.store(true, Ordering::Relaxed);
    ha.join().unwrap();
    hb.join().unwrap();
    drop(env);
    broker.stop().await;
}
