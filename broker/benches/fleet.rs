//! Fleet simulator: N simulated agents over C clusters (N/C nodes each) against real
//! `ballast-broker serve` processes (one, or R replicas on one PostgreSQL schema), over mTLS
//! on loopback. Every agent does what a real one does (`member-agent/src/session.rs`):
//! Register, WatchPeers, a Report stream with one report per report interval (RTT to its
//! peers, RPS per imported service and destination, the capacity of what its cluster serves,
//! the imports on the first report, `full_set`), WatchWeights, and an Ack per update received.
//!
//! Measured per run: propagation of a capacity change (one serving cluster of service
//! `fleet/svc-0` goes to 0 and back; every cluster imports it, so every agent's weights move)
//! from the moment the report is handed to the report stream to each agent receiving the
//! first update that reflects it: per change the last agent, and over all agents; CPU
//! seconds (user+sys, `/proc/<pid>/stat`) of each broker and of the simulator over the
//! measured phase; peak RSS (`VmHWM`) of each broker; solve round time from
//! `ballast_broker_solve_duration_seconds`; weight rows stored per generation (the
//! `weights` rows of the generations published during the phase).
//!
//! ```sh
//! cargo bench -p ballast-broker --bench fleet -- --agents 1000 --clusters 100 \
//!     --services 100 --replicas 1 --database sqlite --rounds 30
//! ```
//! Every flag also reads `BALLAST_FLEET_<FLAG>` (e.g. `BALLAST_FLEET_AGENTS=1000`); flags win.
//! See `broker/BENCHMARKS.md` (fleet) for all flags and the figures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::missing_panics_doc
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_broker::certs::generate;
use ballast_broker::tls::TlsFiles;
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{
    Ack, CapacitySample, ImportedServices, RegisterRequest, ReportRequest, RpsSample, RttSample,
    WatchPeersRequest, WatchRequest,
};
use ballast_store::testing::PgSchema;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

const TARGET: &str = "fleet/svc-0";
const CAPACITY: f64 = 100_000.0;

#[derive(Debug, Clone)]
struct Opts {
    agents: usize,
    clusters: usize,
    services: usize,
    replicas: usize,
    postgres: bool,
    rounds: usize,
    /// Clusters serving each service.
    serving: usize,
    /// Peers each node reports RTT to (default: every other cluster).
    rtt_peers: usize,
    /// Imported services each node reports RPS for (default: all).
    rps_services: usize,
    /// Agents sharing one mTLS channel (1: one connection per agent).
    agents_per_channel: usize,
    report_interval: String,
    debounce: String,
    gap_ms: u64,
    lease_time: String,
    /// Ack every update received (a real agent does); `--acks false` to isolate their cost.
    acks: bool,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Option<String> {
        let flag = format!("--{name}");
        let mut found = None;
        let mut i = 0;
        while i < args.len() {
            if args[i] == flag {
                found = args.get(i + 1).cloned();
                i += 1;
            } else if let Some(v) = args[i].strip_prefix(&format!("{flag}=")) {
                found = Some(v.to_string());
            }
            i += 1;
        }
        found.or_else(|| {
            std::env::var(format!(
                "BALLAST_FLEET_{}",
                name.to_uppercase().replace('-', "_")
            ))
            .ok()
        })
    };
    let num = |name: &str, default: usize| -> usize {
        get(name).map_or(default, |v| {
            v.parse().unwrap_or_else(|e| panic!("--{name} {v:?}: {e}"))
        })
    };
    for a in &args {
        if let Some(f) = a.strip_prefix("--") {
            let f = f.split('=').next().unwrap();
            assert!(
                [
                    "agents",
                    "clusters",
                    "services",
                    "replicas",
                    "database",
                    "rounds",
                    "serving",
                    "rtt-peers",
                    "rps-services",
                    "agents-per-channel",
                    "report-interval",
                    "debounce",
                    "gap-ms",
                    "lease-time",
                    "acks",
                    "bench",
                ]
                .contains(&f),
                "unknown flag --{f}"
            );
        }
    }
    let clusters = num("clusters", 100);
    let services = num("services", 100);
    let o = Opts {
        agents: num("agents", 1000),
        clusters,
        services,
        replicas: num("replicas", 1),
        postgres: match get("database").as_deref() {
            None | Some("sqlite") => false,
            Some("postgres") => true,
            Some(o) => panic!("--database {o:?}: sqlite or postgres"),
        },
        rounds: num("rounds", 30),
        serving: num("serving", 3).clamp(2, clusters),
        rtt_peers: num("rtt-peers", clusters - 1).min(clusters - 1),
        rps_services: num("rps-services", services).min(services),
        agents_per_channel: num("agents-per-channel", 1).max(1),
        report_interval: get("report-interval").unwrap_or_else(|| "10s".into()),
        debounce: get("debounce").unwrap_or_else(|| "20ms".into()),
        gap_ms: num("gap-ms", 1000) as u64,
        lease_time: get("lease-time").unwrap_or_else(|| "5s".into()),
        acks: get("acks").is_none_or(|v| v != "false"),
    };
    assert!(
        o.agents >= o.clusters && o.agents.is_multiple_of(o.clusters),
        "--agents must be a multiple of --clusters"
    );
    assert!(o.replicas >= 1);
    assert!(
        o.replicas == 1 || o.postgres,
        "--replicas > 1 needs --database postgres"
    );
    o
}

fn cluster_id(c: usize) -> String {
    format!("c{c}")
}

fn service(k: usize) -> String {
    format!("fleet/svc-{k}")
}

/// The clusters serving service `k`, spread evenly.
fn servers(k: usize, o: &Opts) -> Vec<usize> {
    let mut v: Vec<usize> = (0..o.serving)
        .map(|r| (k + r * (o.clusters / o.serving).max(1)) % o.clusters)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Symmetric, deterministic, 2..152 ms.
fn rtt_ms(a: usize, b: usize) -> f64 {
    let (a, b) = (a.min(b), a.max(b));
    2.0 + ((a * 31 + b * 17) % 150) as f64
}

const REGIONS: [&str; 6] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
    "ap-northeast-1",
];

/// utime + stime of `pid` ("self" for this process), seconds.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// A field of `/proc/<pid>/status` in MB (`VmHWM`, `VmRSS`).
fn status_mb(pid: &str, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

/// One `ballast-broker serve` process, killed on drop.
struct Broker {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Broker {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ballast-broker"))
}

fn spawn_broker(o: &Opts, i: usize, dir: &Path, certs: &Path, db: &str) -> Broker {
    let port = free_port();
    let mport = free_port();
    let log = dir.join(format!("broker-{i}.log"));
    let p = |f: &str| certs.join(f).display().to_string();
    // Every simulated agent connects from 127.0.0.1: room for all of them, twice over.
    let cap = (o.agents * 2 + 100).to_string();
    let mut cmd = Command::new(broker_exe());
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{mport}")])
        .args(["--database", db])
        .args(["--ca", &p("ca.pem"), "--cert", &p("server.pem")])
        .args(["--key", &p("server-key.pem")])
        .args(["--max-connections", &cap])
        .args(["--max-connections-per-peer", &cap])
        .args(["--report-interval", &o.report_interval])
        .args(["--debounce", &o.debounce])
        .args([
            "--log-level",
            &std::env::var("BALLAST_FLEET_LOG").unwrap_or_else(|_| "warn".into()),
        ]);
    // Replica flags exist only with the replicas change: passed only when asked for.
    if o.replicas > 1 {
        cmd.args(["--replicas", &o.replicas.to_string()])
            .args(["--lease-time", &o.lease_time])
            .args(["--replica-id", &format!("fleet-{i}")]);
    }
    // The broker dies with the simulator, even when it is killed (timeout, Ctrl-C).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", broker_exe().display()));
    Broker {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        metrics: format!("127.0.0.1:{mport}").parse().unwrap(),
        log,
    }
}

async fn wait_ready(b: &mut Broker) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = http_get(b.metrics, "/ready").await {
            return;
        }
        if let Ok(Some(st)) = b.child.try_wait() {
            panic!(
                "broker exited ({st}): {}",
                std::fs::read_to_string(&b.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "broker not ready within 60 s: {}",
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The solve histogram and counters of one `/metrics` text.
#[derive(Debug, Clone, Default)]
struct Scrape {
    /// (upper bound s, cumulative count)
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
    generation: f64,
    reports: f64,
    refused: f64,
}

fn parse_metrics(text: &str) -> Scrape {
    let mut s = Scrape::default();
    let val = |l: &str| -> f64 {
        l.split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("ballast_broker_solve_duration_seconds_bucket{le=\"") {
            let le = rest.split('"').next().unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            s.buckets.push((le, val(l)));
        } else if l.starts_with("ballast_broker_solve_duration_seconds_sum") {
            s.sum = val(l);
        } else if l.starts_with("ballast_broker_solve_duration_seconds_count") {
            s.count = val(l);
        } else if l.starts_with("ballast_broker_generation ") {
            s.generation = val(l);
        } else if l.starts_with("ballast_broker_reports_total") {
            s.reports = val(l);
        } else if l.starts_with("ballast_broker_connections_refused_total") {
            s.refused = val(l);
        }
    }
    s
}

async fn scrape(b: &Broker) -> Scrape {
    http_get(b.metrics, "/metrics")
        .await
        .map(|(_, t)| parse_metrics(&t))
        .unwrap_or_default()
}

/// Solve rounds between two scrapes summed over replicas: (rounds, mean ms, p50 and p99 as
/// bucket upper bounds in ms).
fn solve_stats(before: &[Scrape], after: &[Scrape]) -> (f64, f64, f64, f64) {
    let mut count = 0.0;
    let mut sum = 0.0;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (b, a) in before.iter().zip(after) {
        count += a.count - b.count;
        sum += a.sum - b.sum;
        for (i, (le, n)) in a.buckets.iter().enumerate() {
            let prev = b.buckets.get(i).map_or(0.0, |x| x.1);
            if buckets.len() <= i {
                buckets.push((*le, 0.0));
            }
            buckets[i].1 += n - prev;
        }
    }
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= p * count)
            .map_or(f64::NAN, |(le, _)| le * 1000.0)
    };
    if count == 0.0 {
        return (0.0, f64::NAN, f64::NAN, f64::NAN);
    }
    (count, sum / count * 1000.0, q(0.5), q(0.99))
}

/// What one agent is, and the shared state it reads.
struct AgentSpec {
    idx: usize,
    cluster: usize,
    node: String,
}

/// Per cluster: the capacity it states for [`TARGET`] (f64 bits), read by all its nodes.
struct Shared {
    target_cap: Vec<AtomicU64>,
    opts: Opts,
}

fn report_of(a: &AgentSpec, sh: &Shared, first: bool) -> ReportRequest {
    let o = &sh.opts;
    let c = a.cluster;
    let rtt = (1..=o.rtt_peers)
        .map(|k| (c + k) % o.clusters)
        .map(|j| RttSample {
            peer_cluster_id: cluster_id(j),
            rtt_ms: rtt_ms(c, j),
            loss_ratio: 0.0,
            reachable: true,
            measured_at_ms: 0,
        })
        .collect();
    let mut rps = Vec::new();
    for k in 0..o.rps_services {
        let dst = servers(k, o);
        for d in &dst {
            rps.push(RpsSample {
                service: service(k),
                destination_cluster_id: cluster_id(*d),
                rps: 10.0 / dst.len() as f64,
                measured_at_ms: 0,
                bytes_sent_per_second: 0.0,
                bytes_received_per_second: 0.0,
            });
        }
    }
    let capacity = (0..o.services)
        .filter(|k| servers(*k, o).contains(&c))
        .map(|k| CapacitySample {
            service: service(k),
            capacity_rps: if k == 0 {
                f64::from_bits(sh.target_cap[c].load(Ordering::SeqCst))
            } else {
                CAPACITY
            },
            measured_at_ms: 0,
            service_time: None,
            measured_service_ms: None,
            unit: 0,
        })
        .collect();
    ReportRequest {
        cluster_id: cluster_id(c),
        node_name: a.node.clone(),
        measured_at_ms: ballast_types::now_ms(),
        rtt,
        rps,
        capacity,
        imports: first.then(|| ImportedServices {
            services: (0..o.services).map(service).collect(),
        }),
        full_set: true,
        services_without_vip: Vec::new(),
    }
}

/// (agent, the changing cluster is among the target's destinations, generation, arrival).
type Event = (usize, bool, u64, Instant);

/// Counters of the simulator's own traffic.
#[derive(Default)]
struct Counters {
    reports: AtomicU64,
    updates: AtomicU64,
    acks: AtomicU64,
    peer_updates: AtomicU64,
    errors: AtomicU64,
}

fn register_req(c: usize, node: &str) -> RegisterRequest {
    let region = REGIONS[c % REGIONS.len()];
    RegisterRequest {
        cluster_id: cluster_id(c),
        region: region.into(),
        zone: format!("{region}{}", ["a", "b", "c"][(c / REGIONS.len()) % 3]),
        provider: "aws".into(),
        gateway_address: "127.0.0.1".into(),
        agent_version: "fleet-bench".into(),
        node_name: node.into(),
    }
}

/// Runs one agent until the process ends: Register, then WatchPeers, Report, WatchWeights
/// and acks. Returns the sender of extra (immediate) reports.
async fn start_agent(
    a: AgentSpec,
    mut client: BrokerClient<Channel>,
    sh: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    change_dst: usize,
) -> mpsc::UnboundedSender<()> {
    let cid = cluster_id(a.cluster);
    let resp = client
        .register(register_req(a.cluster, &a.node))
        .await
        .unwrap_or_else(|e| panic!("register {cid}/{}: {e}", a.node))
        .into_inner();
    let interval = Duration::from_millis(u64::try_from(resp.report_interval_ms).unwrap_or(10_000));

    // WatchPeers
    {
        let mut c = client.clone();
        let (cid, node, counters) = (cid.clone(), a.node.clone(), counters.clone());
        tokio::spawn(async move {
            let Ok(s) = c
                .watch_peers(WatchPeersRequest {
                    cluster_id: cid,
                    node_name: node,
                })
                .await
            else {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut s = s.into_inner();
            while let Ok(Some(_)) = s.message().await {
                counters.peer_updates.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    // Report: one per interval from a random phase, plus one at once per `now` message. A
    // stream the broker ends is reopened a second later (imports declared again), as the
    // agent's session does.
    let (now_tx, mut now_rx) = mpsc::unbounded_channel::<()>();
    {
        let c = client.clone();
        let sh = sh.clone();
        let counters = counters.clone();
        let spec = AgentSpec {
            idx: a.idx,
            cluster: a.cluster,
            node: a.node.clone(),
        };
        tokio::spawn(async move {
            let phase = Duration::from_millis(
                (spec.idx as u64).wrapping_mul(7919) % (interval.as_millis() as u64).max(1),
            );
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let (rtx, rrx) = mpsc::channel::<ReportRequest>(4);
                let mut c = c.clone();
                let counters2 = counters.clone();
                tokio::spawn(async move {
                    if let Err(e) = c
                        .report(tokio_stream::wrappers::ReceiverStream::new(rrx))
                        .await
                    {
                        counters2.errors.fetch_add(1, Ordering::Relaxed);
                        if std::env::var_os("BALLAST_FLEET_VERBOSE").is_some() {
                            eprintln!("report stream: {e}");
                        }
                    }
                });
                // The first report at once (imports declared), as an agent does on
                // connecting.
                let mut first = true;
                loop {
                    if rtx.send(report_of(&spec, &sh, first)).await.is_err() {
                        break;
                    }
                    first = false;
                    counters.reports.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = now_rx.recv() => if r.is_none() { return },
                        () = rtx.closed() => break,
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    // Acks: sent in order from a queue, as the agent's installer does.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
    {
        let mut c = client.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Some(ack) = ack_rx.recv().await {
                if c.ack_weights(ack).await.is_err() {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                counters.acks.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    // WatchWeights
    {
        let dst = cluster_id(change_dst);
        let acks = sh.opts.acks;
        let node = a.node.clone();
        let idx = a.idx;
        tokio::spawn(async move {
            let mut s = client
                .watch_weights(WatchRequest {
                    cluster_id: cid.clone(),
                    node_name: node.clone(),
                    last_generation: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("watch {cid}/{node}: {e}"))
                .into_inner();
            loop {
                match s.message().await {
                    Ok(Some(u)) => {
                        let at = Instant::now();
                        counters.updates.fetch_add(1, Ordering::Relaxed);
                        if u.service == TARGET {
                            let has = u.weights.get(&dst).is_some_and(|w| *w > 0.0);
                            let _ = events.send((idx, has, u.generation, at));
                        }
                        if !acks {
                            continue;
                        }
                        let _ = ack_tx.send(Ack {
                            cluster_id: cid.clone(),
                            node_name: node.clone(),
                            generation: u.generation,
                            service: u.service,
                            applied: true,
                            error: String::new(),
                        });
                    }
                    Ok(None) | Err(_) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    now_tx
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Records an agent's update of the target: its state and, when the state flipped, when.
fn note(state: &mut [(bool, Instant, u64)], (i, has, g, at): Event) {
    if g < state[i].2 {
        return;
    }
    if has == state[i].0 {
        state[i].2 = g;
    } else {
        state[i] = (has, at, g);
    }
}

/// Waits until every agent's latest state of the target is `want`; each agent's arrival of
/// it after `t0` in ms (an agent already there before `t0` counts 0).
async fn wait_state(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    state: &mut [(bool, Instant, u64)],
    want: bool,
    t0: Instant,
    timeout: Duration,
) -> Option<Vec<f64>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        while let Ok(e) = rx.try_recv() {
            note(state, e);
        }
        if state.iter().all(|s| s.0 == want) {
            return Some(
                state
                    .iter()
                    .map(|s| s.1.saturating_duration_since(t0).as_secs_f64() * 1000.0)
                    .collect(),
            );
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => note(state, e),
            _ => return None,
        }
    }
}

async fn db_counts(url: &str, since: i64) -> (i64, i64) {
    sqlx::any::install_default_drivers();
    let Ok(pool) = sqlx::AnyPool::connect(url).await else {
        return (-1, -1);
    };
    let g: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(generation), 0) FROM generations")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM weights WHERE generation > {since}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap_or(-1);
    pool.close().await;
    (g, rows)
}

async fn run(o: Opts) {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..o.clusters).map(cluster_id).collect();
    let bundle = generate(&ids, &[]).unwrap();
    let certs = dir.path().join("certs");
    bundle.write_to(&certs).unwrap();
    let pg = if o.postgres {
        Some(
            PgSchema::create("fleet")
                .await
                .expect("--database postgres needs BALLAST_TEST_PG_URL"),
        )
    } else {
        None
    };
    let db = pg.as_ref().map_or_else(
        || ballast_store::sqlite_url(&dir.path().join("fleet.db")),
        |p| p.url.clone(),
    );
    let mut brokers = Vec::new();
    for i in 0..o.replicas {
        let mut b = spawn_broker(&o, i, dir.path(), &certs, &db);
        // The first one alone migrates the schema; the others join it.
        wait_ready(&mut b).await;
        brokers.push(b);
    }
    let nodes = o.agents / o.clusters;
    let change_dst = servers(0, &o)[0];
    let sh = Arc::new(Shared {
        target_cap: (0..o.clusters)
            .map(|_| AtomicU64::new(CAPACITY.to_bits()))
            .collect(),
        opts: o.clone(),
    });
    let counters = Arc::new(Counters::default());
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let tls: Vec<TlsFiles> = bundle
        .clusters
        .iter()
        .map(|(_, p)| bundle.tls_files(p))
        .collect();

    // Connect and start the agents, 32 at a time. Agent i: cluster i / nodes, node
    // i % nodes, replica i % R; `agents_per_channel` consecutive agents of one cluster
    // share a channel.
    let cpu_sim0 = cpu_secs("self");
    let cpu_b0: Vec<f64> = brokers.iter().map(|b| cpu_secs(&b.pid())).collect();
    let t_setup = Instant::now();
    let mut channels: std::collections::HashMap<(usize, usize), Channel> =
        std::collections::HashMap::new();
    let mut now_txs: Vec<Option<mpsc::UnboundedSender<()>>> = vec![None; o.agents];
    let specs: Vec<(usize, usize, usize)> = (0..o.agents)
        .map(|i| (i, i / nodes, i % o.replicas))
        .collect();
    // Every cluster is registered (by its node n0) before any agent reports: a report
    // naming a cluster the broker does not know is refused whole.
    for (c, t) in tls.iter().enumerate() {
        let mut cl = BrokerClient::new(t.localhost_channel(brokers[0].addr.port()).await.unwrap());
        cl.register(register_req(c, "n0")).await.unwrap();
    }
    for chunk in specs.chunks(32) {
        let mut starts = Vec::new();
        for &(i, c, r) in chunk {
            let key = (c * o.replicas + r, (i % nodes) / o.agents_per_channel);
            let ch = if let Some(ch) = channels.get(&key) {
                ch.clone()
            } else {
                let ch = tls[c]
                    .localhost_channel(brokers[r].addr.port())
                    .await
                    .unwrap_or_else(|e| panic!("connect agent {i}: {e:?}"));
                channels.insert(key, ch.clone());
                ch
            };
            let spec = AgentSpec {
                idx: i,
                cluster: c,
                node: format!("n{}", i % nodes),
            };
            starts.push(start_agent(
                spec,
                BrokerClient::new(ch).max_decoding_message_size(64 * 1024 * 1024),
                sh.clone(),
                ev_tx.clone(),
                counters.clone(),
                change_dst,
            ));
        }
        for (k, tx) in futures::future::join_all(starts)
            .await
            .into_iter()
            .enumerate()
        {
            now_txs[chunk[k].0] = Some(tx);
        }
    }
    let connected = t_setup.elapsed();
    eprintln!(
        "fleet: {} agents connected and registered in {:.1} s ({} channels)",
        o.agents,
        connected.as_secs_f64(),
        channels.len()
    );
    // Every agent holds the target's weights with the changing cluster among its
    // destinations.
    let mut state = vec![(false, t_setup, 0u64); o.agents];
    let initial = wait_state(
        &mut ev_rx,
        &mut state,
        true,
        t_setup,
        Duration::from_secs(120 + o.agents as u64 / 10),
    )
    .await;
    let Some(_) = initial else {
        let missing = state.iter().filter(|s| !s.0).count();
        let never = state.iter().filter(|s| s.2 == 0).count();
        panic!(
            "{missing} agents do not hold the target's weights with c{change_dst} ({never} got none); simulator: {} reports, {} updates, {} errors; logs in {}",
            counters.reports.load(Ordering::Relaxed),
            counters.updates.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            dir.keep().display()
        );
    };
    let settled = t_setup.elapsed();
    eprintln!(
        "fleet: every agent holds the weights {:.1} s after the start; warming up one report interval",
        settled.as_secs_f64()
    );
    let interval = humantime::parse_duration(&o.report_interval).unwrap();
    tokio::time::sleep(interval).await;
    let setup_cpu_b: Vec<f64> = brokers
        .iter()
        .zip(&cpu_b0)
        .map(|(b, c)| cpu_secs(&b.pid()) - c)
        .collect();
    let setup_cpu_sim = cpu_secs("self") - cpu_sim0;

    // The measured phase.
    let scrape0: Vec<Scrape> = futures::future::join_all(brokers.iter().map(scrape)).await;
    let g0 = scrape0.iter().map(|s| s.generation).fold(0.0, f64::max) as i64;
    let cpu_b1: Vec<f64> = brokers.iter().map(|b| cpu_secs(&b.pid())).collect();
    let cpu_sim1 = cpu_secs("self");
    let acks0 = counters.acks.load(Ordering::Relaxed);
    let t_phase = Instant::now();
    let mut last_agent = Vec::new();
    let mut all = Vec::new();
    let mut missed = 0;
    // The change goes out through node 0 of the changing cluster, replica round-robin as
    // the agent's.
    let changer = change_dst * nodes;
    for round in 0..o.rounds {
        tokio::time::sleep(Duration::from_millis(o.gap_ms)).await;
        let want = round % 2 == 1;
        let cap = if want { CAPACITY } else { 0.0 };
        // Every node of the cluster states the new figure from now on.
        sh.target_cap[change_dst].store(cap.to_bits(), Ordering::SeqCst);
        while let Ok(e) = ev_rx.try_recv() {
            note(&mut state, e);
        }
        let t0 = Instant::now();
        now_txs[changer].as_ref().unwrap().send(()).unwrap();
        match wait_state(&mut ev_rx, &mut state, want, t0, Duration::from_secs(60)).await {
            Some(mut ms) => {
                ms.sort_by(f64::total_cmp);
                let last = *ms.last().unwrap();
                if std::env::var_os("BALLAST_FLEET_VERBOSE").is_some() {
                    eprintln!(
                        "round {round}: last agent {last:.1} ms, median agent {:.1} ms",
                        pct(&ms, 50.0)
                    );
                }
                last_agent.push(last);
                all.extend(ms);
            }
            None => {
                missed += 1;
                eprintln!("round {round}: not every agent got the change within 60 s");
            }
        }
    }
    let phase = t_phase.elapsed().as_secs_f64();
    let cpu_b: Vec<f64> = brokers
        .iter()
        .zip(&cpu_b1)
        .map(|(b, c)| cpu_secs(&b.pid()) - c)
        .collect();
    let cpu_sim = cpu_secs("self") - cpu_sim1;
    let scrape1: Vec<Scrape> = futures::future::join_all(brokers.iter().map(scrape)).await;
    let hwm: Vec<f64> = brokers
        .iter()
        .map(|b| status_mb(&b.pid(), "VmHWM"))
        .collect();
    let rss: Vec<f64> = brokers
        .iter()
        .map(|b| status_mb(&b.pid(), "VmRSS"))
        .collect();
    let sim_hwm = status_mb("self", "VmHWM");
    let (g1, rows) = db_counts(&db, g0).await;
    let (rounds_n, solve_mean, solve_p50, solve_p99) = solve_stats(&scrape0, &scrape1);
    let reports: f64 = scrape1
        .iter()
        .zip(&scrape0)
        .map(|(a, b)| a.reports - b.reports)
        .sum();
    let refused: f64 = scrape1.iter().map(|s| s.refused).sum();
    let acks = counters.acks.load(Ordering::Relaxed) - acks0;

    last_agent.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    let gens = (g1 - g0).max(0);
    let fmt_list = |v: &[f64], prec: usize| {
        v.iter()
            .map(|x| format!("{x:.prec$}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!();
    println!(
        "fleet: {} agents, {} clusters x {} nodes, {} services ({} serving each), {} replica(s), {}, report interval {}, {} changes ({} missed), {} channels",
        o.agents,
        o.clusters,
        nodes,
        o.services,
        o.serving,
        o.replicas,
        if o.postgres { "PostgreSQL" } else { "SQLite" },
        o.report_interval,
        o.rounds,
        missed,
        channels.len()
    );
    println!(
        "per node and report: {} RTT, {} RPS samples; setup: connected in {:.1} s, weights everywhere after {:.1} s",
        o.rtt_peers,
        o.rps_services * o.serving,
        connected.as_secs_f64(),
        settled.as_secs_f64()
    );
    println!();
    println!("| agents | clusters | services | replicas | store | last agent p50 / p99 / max ms | all agents p50 / p99 / max ms | broker CPU s (phase {phase:.0} s), per replica | broker peak RSS MB, per replica | solve rounds / mean / p50 / p99 ms | generations / weight rows per generation | reports/s | acks/s | simulator CPU s / peak RSS MB |");
    println!("|---:|---:|---:|---:|---|---|---|---|---|---|---|---:|---:|---|");
    println!(
        "| {} | {} | {} | {} | {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {} | {} | {} / {:.1} / ≤{:.1} / ≤{:.1} | {} / {:.0} | {:.0} | {:.0} | {:.1} / {:.0} |",
        o.agents,
        o.clusters,
        o.services,
        o.replicas,
        if o.postgres { "postgres" } else { "sqlite" },
        pct(&last_agent, 50.0),
        pct(&last_agent, 99.0),
        last_agent.last().copied().unwrap_or(f64::NAN),
        pct(&all, 50.0),
        pct(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN),
        fmt_list(&cpu_b, 1),
        fmt_list(&hwm, 0),
        rounds_n,
        solve_mean,
        solve_p50,
        solve_p99,
        gens,
        if gens > 0 { rows as f64 / gens as f64 } else { f64::NAN },
        reports / phase,
        acks as f64 / phase,
        cpu_sim,
        sim_hwm,
    );
    println!();
    println!(
        "setup (connect, register, first reports, initial weights, one interval): broker CPU s {}, simulator CPU s {:.1}; broker RSS now MB {}; connections refused {}; simulator: {} reports, {} weight updates, {} acks, {} peer updates, {} stream errors",
        fmt_list(&setup_cpu_b, 1),
        setup_cpu_sim,
        fmt_list(&rss, 0),
        refused,
        counters.reports.load(Ordering::Relaxed),
        counters.updates.load(Ordering::Relaxed),
        counters.acks.load(Ordering::Relaxed),
        counters.peer_updates.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
    );
    println!(
        "targets: p99 (last agent) < 100 ms at 1,000 agents / 1 replica, < 250 ms at 5,000 / 3 replicas: {:.1} ms; peak RSS < 500 MB per replica at 5,000: max {:.0} MB",
        pct(&last_agent, 99.0),
        hwm.iter().copied().fold(0.0, f64::max)
    );
    drop(now_txs);
    drop(brokers);
    if let Some(pg) = pg {
        pg.drop_schema().await;
    }
}

fn main() {
    let o = parse_opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(o));
    rt.shutdown_timeout(Duration::from_secs(1));
}
