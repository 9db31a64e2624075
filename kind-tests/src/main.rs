//! `ballast-lab`: the one-host multi-cluster lab (see the crate docs and `--help`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ballast_lab::lab::{self, Lab, UpOptions};
use ballast_lab::load::{self, LoadOptions};
use ballast_types::{Params, Policy, ServiceTime};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ballast-lab",
    version,
    about = "The one-host multi-cluster lab of ballast"
)]
struct Cli {
    /// Prefix of every name the lab makes (namespaces PREFIX-cN, cgroup PREFIX-lab, ...).
    #[arg(
        long,
        global = true,
        env = "BALLAST_LAB_PREFIX",
        default_value = "ballast"
    )]
    prefix: String,
    /// Where the lab keeps its state (default /run/PREFIX-lab).
    #[arg(long, global = true, env = "BALLAST_LAB_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Action {
    Stop,
    Start,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring the lab up (idempotent).
    Up {
        /// Number of clusters c1..cN.
        #[arg(long, env = "BALLAST_LAB_CLUSTERS", default_value_t = 3)]
        clusters: usize,
        /// Regions of c1..cN, comma-separated (default us-east-1,us-west-2,eu-west-1,...).
        #[arg(long, env = "BALLAST_LAB_REGIONS", value_delimiter = ',')]
        regions: Vec<String>,
        /// Nodes per cluster, 1..=8: one agent each, with its own cgroup (the node's pods),
        /// pins and metrics port (default: as the lab is up, else 1; changing it needs `down`).
        #[arg(long, env = "BALLAST_LAB_NODES")]
        nodes: Option<usize>,
        /// Broker replicas, 1..=5. More than 1: replicas on the lab's own PostgreSQL (started
        /// in the wan namespace), one leader solving, agents given every replica's address
        /// (default: as the lab is up, else 1; between 1 and more needs `down`).
        #[arg(long, env = "BALLAST_LAB_BROKERS")]
        brokers: Option<usize>,
        /// Network, backends and load only: no broker, no agents.
        #[arg(long, env = "BALLAST_LAB_NO_CONTROL_PLANE")]
        no_control_plane: bool,
        /// The broker's policy.
        #[arg(long, env = "BALLAST_LAB_POLICY", value_enum, default_value_t = Policy::Optimized)]
        policy: Policy,
        /// How long to wait for every agent to install weights, in seconds.
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Switch the broker's policy live and wait for the agents to install the new weights.
    Policy {
        #[arg(value_enum)]
        policy: Policy,
        /// The optimized policy's params (unchanged when not given).
        #[arg(long, value_enum)]
        params: Option<Params>,
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Remove everything the lab made (idempotent, safe after a crash).
    Down,
    /// Broker replicas: each one's address, pid, role (leader/follower) and term.
    Brokers {
        #[arg(long)]
        json: bool,
    },
    /// Kill the leading broker replica (SIGKILL), measure how long until another leads with
    /// a higher term, and start the killed one again (needs `up --brokers 2` or more).
    Failover {
        /// How long to wait for a new leader, in seconds.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Clusters, services, weights, links.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a cluster's network namespace, in one node's cgroup (steered by
    /// that node's agent).
    Exec {
        cluster: String,
        /// The node (`c1-n2`, `n2` or `2`; default the first).
        #[arg(long)]
        node: Option<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Set the one-way delay (both directions) between two clusters, live.
    Delay {
        a: String,
        b: String,
        /// One-way delay in ms (the RTT between A and B becomes 2 x MS).
        #[arg(required_unless_present = "default")]
        ms: Option<f64>,
        /// Back to the default: half the RTT between the clusters' regions.
        #[arg(long, conflicts_with = "ms")]
        default: bool,
        /// Share of packets dropped on the link, in percent.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
    },
    /// Stop or start a service's backends in one cluster.
    Backends {
        cluster: String,
        service: String,
        action: Action,
        /// How long to wait for the agents to install the new weights, in seconds.
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 30)]
        wait_secs: u64,
    },
    /// Open connections to a service from inside a cluster (one node's cgroup) and show
    /// where they landed.
    Load {
        #[arg(long)]
        from: String,
        /// The node of --from whose cgroup the client runs in (`c1-n2`, `n2` or `2`; default
        /// the first): that node's agent steers it.
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Per-connection timeout in ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Pace the connections: at most this many per second (default: unpaced).
        #[arg(long)]
        rate: Option<f64>,
        /// HTTP/1.1 keep-alive: --concurrency long-lived connections carrying --connections
        /// requests (--rate paces requests); a request whose held connection failed is retried
        /// once on a new one (a reconnect, not a failure)
        #[arg(long)]
        keepalive: bool,
        /// Ask the backends to pad each answer to about this many bytes (egress volume).
        #[arg(long, default_value_t = 0)]
        response_bytes: usize,
        #[arg(long)]
        json: bool,
        /// Connect here instead of the service VIP (tests, no steering needed).
        #[arg(long, hide = true)]
        target: Option<SocketAddr>,
    },
    /// ICMP echo from inside a cluster to an address (e.g. another cluster's gateway).
    Ping {
        #[arg(long)]
        from: String,
        /// The node of --from to ping from (default the first).
        #[arg(long)]
        node: Option<String>,
        target: std::net::IpAddr,
        #[arg(long, default_value_t = 5)]
        count: u32,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Wait until the broker's weights stop moving and every agent installed them,
    /// printing each new generation's weights.
    Settle {
        /// Print only the weights from this source cluster.
        #[arg(long)]
        from: Option<String>,
        /// The weights count as settled after this long without a new generation (s).
        #[arg(long, default_value_t = 4)]
        stable_secs: u64,
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Compare policies from one cluster: for each, switch, settle, run a load, and print
    /// the split, mean RTT (connect time) and egress price per GB of the observed split.
    Compare {
        #[arg(long, default_value = "c1")]
        from: String,
        /// The node of --from whose cgroup the loads run in (default the first).
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "demo/echo")]
        service: String,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "optimized,round-robin"
        )]
        policies: Vec<Policy>,
        #[arg(long, default_value_t = 400)]
        connections: usize,
        /// Connections per second of each policy's load (paced, so the agents' reported
        /// rates settle while it runs).
        #[arg(long, default_value_t = 40.0)]
        rate: f64,
        /// Bytes each backend answer is padded to (the volume egress is billed on).
        #[arg(long, default_value_t = 65_536)]
        response_bytes: usize,
        /// Fail unless optimized measurably spends less than round-robin (see the docs).
        #[arg(long)]
        check: bool,
        #[arg(long)]
        json: bool,
    },
    /// Capacity per (service, cluster): the declaration (per pod), ready pods, nodes, and the
    /// broker's figure in its last solve, which must be per-pod x ready pods whatever the
    /// number of nodes. With --cluster/--service and --per-pod or --none: change or withdraw
    /// one cluster's declaration (its topology file) and wait for the broker to solve with it.
    #[command(group(clap::ArgGroup::new("declaration").args(["per_pod", "none"])))]
    Capacity {
        #[arg(long, requires = "service", requires = "declaration")]
        cluster: Option<String>,
        #[arg(long, requires = "cluster")]
        service: Option<String>,
        /// Declared capacity per pod (RPS).
        #[arg(long)]
        per_pod: Option<f64>,
        /// Declare none: the cluster withdraws its capacity for the service.
        #[arg(long)]
        none: bool,
        /// The unit the declared capacity counts (topology `load_unit`; the broker refuses
        /// a unit other than the one another serving cluster states).
        #[arg(long, value_enum, requires = "cluster")]
        unit: Option<ballast_types::LoadUnit>,
        /// Exit non-zero unless every broker figure is per-pod x ready pods (waiting up to
        /// --wait-secs for it).
        #[arg(long, conflicts_with = "cluster")]
        check: bool,
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 30)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// A service's service time in one cluster: how its backends really slow under load
    /// (--backends: restarts them, through readiness) and the curve the cluster declares in
    /// its topology file (--declare: what the broker's load-aware optimized solves with).
    /// A curve is `base_ms=<ms>,slope_ms_per_rps=<ms per RPS>` per pod, or `none`.
    #[command(group(clap::ArgGroup::new("change").args(["backends", "declare", "probe"]).multiple(true).required(true)))]
    ServiceTime {
        cluster: String,
        service: String,
        /// The backends wait base + slope x (the pod's requests in the last second) per request.
        #[arg(long, value_parser = parse_curve_or_none)]
        backends: Option<CurveArg>,
        /// The curve the cluster declares (ServiceExport annotation `ballast.io/service-time`).
        #[arg(long, value_parser = parse_curve_or_none)]
        declare: Option<CurveArg>,
        /// The HTTP path the cluster's agents probe on its backends to measure the service
        /// time (ServiceExport annotation `ballast.io/service-time-probe`), or `none`; the
        /// broker fits the curve from what they measure.
        #[arg(long)]
        probe: Option<String>,
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 30)]
        wait_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Why the broker gives a source these weights for a service: per destination the cost,
    /// flow, weight and notes (binding constraints, the service-time curve and its origin,
    /// the marginal cost).
    Explain {
        #[arg(long)]
        from: String,
        #[arg(long, default_value = "demo/echo")]
        service: String,
    },
    /// (internal) The WAN emulator; `up` starts it in the wan namespace.
    #[command(hide = true)]
    WanForwarder,
    /// (internal) A demo backend; `up` starts them in the clusters.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Answer after base + slope x (this backend's requests in the last second) ms.
        #[arg(long, value_parser = parse_curve)]
        service_time: Option<ServiceTime>,
    },
}

/// A service-time curve, or `none` (`CurveArg(None)`).
#[derive(Debug, Clone, Copy)]
struct CurveArg(Option<ServiceTime>);

fn parse_curve(s: &str) -> std::result::Result<ServiceTime, String> {
    ServiceTime::parse(s)
}

fn parse_curve_or_none(s: &str) -> std::result::Result<CurveArg, String> {
    if s == "none" {
        return Ok(CurveArg(None));
    }
    parse_curve(s).map(|c| CurveArg(Some(c)))
}

fn runtime(multi: bool) -> Result<tokio::runtime::Runtime> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().context("building the tokio runtime")
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("ballast-lab: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let lab = Lab::new(&cli.prefix, cli.state_dir.clone())?;
    match cli.cmd {
        Cmd::Up {
            clusters,
            regions,
            nodes,
            brokers,
            no_control_plane,
            policy,
            wait_secs,
        } => {
            init_tracing("warn");
            let state = lab.up(&UpOptions {
                clusters,
                regions,
                control_plane: !no_control_plane,
                policy,
                nodes,
                brokers,
            })?;
            // `up` returns once every agent has installed weights; when they do not within
            // --wait-secs, the table is still printed (it shows who is missing) and `up` fails.
            let installed = if state.control.is_some() {
                lab.wait_installed(0, Duration::from_secs(wait_secs))
                    .map(|_| ())
            } else {
                Ok(())
            };
            let status = lab.status()?;
            print!("{}", lab::render_up(&state, &status));
            installed.map_err(|e| {
                anyhow::anyhow!(
                    "{e}; the agents' and broker's logs are in {}",
                    lab.state_dir.join("logs").display()
                )
            })?;
        }
        Cmd::Policy {
            policy,
            params,
            wait_secs,
        } => {
            init_tracing("warn");
            let v = lab.set_policy(policy, params, Duration::from_secs(wait_secs))?;
            println!(
                "policy {policy}: generation {} installed by every agent",
                v.generation
            );
        }
        Cmd::Down => {
            init_tracing("warn");
            let r = lab.down()?;
            println!(
                "down: {} processes ended, namespaces removed: [{}], cgroups {}, pinned maps {}, state {}",
                r.processes,
                r.netns.join(", "),
                if r.cgroups { "removed" } else { "absent" },
                if r.bpf_dir { "removed" } else { "absent" },
                if r.state_dir { "removed" } else { "absent" },
            );
        }
        Cmd::Explain { from, service } => {
            init_tracing("warn");
            let rows = lab.explain(&service, &from)?;
            println!("{service} from {from}:");
            for d in rows {
                println!(
                    "  {:<6} cost {:>8.2}  flow {:>7.2} rps  weight {:>5.1}%  {}",
                    d.cluster_id,
                    d.cost,
                    d.flow_rps,
                    d.weight * 100.0,
                    d.notes.join("; ")
                );
            }
        }
        Cmd::Brokers { json } => {
            init_tracing("warn");
            let b = lab.brokers()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                for x in &b {
                    println!(
                        "broker-{}  {}  pid {}  {}  term {}  ({})",
                        x.index,
                        x.address,
                        x.pid.map_or("-".to_string(), |p| p.to_string()),
                        x.role,
                        x.term.map_or("-".to_string(), |t| t.to_string()),
                        x.detail
                    );
                }
            }
        }
        Cmd::Failover { wait_secs, json } => {
            init_tracing("warn");
            let r = lab.failover(Duration::from_secs(wait_secs))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "failover: killed broker-{} (pid {}, leader term {}); broker-{} leads term {} after {:.0} ms; broker-{} started again (pid {})",
                    r.killed.index,
                    r.killed.pid.unwrap_or(0),
                    r.killed.term.unwrap_or(0),
                    r.new_leader.index,
                    r.new_leader.term.unwrap_or(0),
                    r.takeover_ms,
                    r.killed.index,
                    r.restarted_pid
                );
            }
        }
        Cmd::Status { json } => {
            init_tracing("warn");
            let state = lab.load_state()?;
            let status = lab.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", lab::render_up(&state, &status));
            }
        }
        Cmd::Exec { cluster, node, cmd } => {
            let placement = lab.placement(&cluster, node.as_deref())?;
            placement.enter_current()?;
            let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
            bail!("running {}: {err}", cmd[0]);
        }
        Cmd::Delay {
            a,
            b,
            ms,
            default,
            loss,
        } => {
            init_tracing("warn");
            let ms = match ms {
                Some(ms) if !default => ms,
                _ => lab.default_delay(&a, &b)?,
            };
            lab.set_delay(&a, &b, ms, loss / 100.0)?;
            println!("delay {a} <-> {b}: {ms} ms one way, loss {loss}%");
        }
        Cmd::Backends {
            cluster,
            service,
            action,
            wait_secs,
        } => {
            init_tracing("warn");
            let start = matches!(action, Action::Start);
            let (n, note) =
                lab.backends(&cluster, &service, start, Duration::from_secs(wait_secs))?;
            println!(
                "{service} in {cluster}: {n} backends {}",
                if start { "started" } else { "stopped" }
            );
            if let Some(note) = note {
                eprintln!("ballast-lab backends: warning: {note}");
            }
        }
        Cmd::Load {
            from,
            node,
            service,
            connections,
            concurrency,
            timeout_ms,
            rate,
            keepalive,
            response_bytes,
            json,
            target,
        } => {
            init_tracing("warn");
            let state = lab.load_state()?;
            let svc = state.service(&service)?;
            let target = target.unwrap_or(SocketAddr::from((svc.vip, svc.port)));
            let weights = lab.weights(&service, &from);
            // Enter the cluster before any thread exists: the runtime's threads inherit it.
            let placement = lab.placement(&from, node.as_deref())?;
            let node_name = state.cluster(&from)?.node(node.as_deref())?.name.clone();
            placement.enter_current()?;
            let opts = LoadOptions {
                target,
                host: service.clone(),
                connections,
                concurrency,
                timeout: Duration::from_millis(timeout_ms),
                progress: !json && std::io::stdout().is_terminal(),
                rate,
                keepalive,
                response_bytes,
            };
            let mut report = runtime(true)?.block_on(load::run(opts))?;
            report.weights_end = lab.weights(&service, &from);
            report.from = Some(from);
            report.node = Some(node_name);
            report.service = Some(service);
            report.weights = weights;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", load::render(&report));
            }
        }
        Cmd::Ping {
            from,
            node,
            target,
            count,
            interval_ms,
            json,
        } => {
            init_tracing("warn");
            lab.placement(&from, node.as_deref())?.enter_current()?;
            let r = runtime(false)?.block_on(ballast_lab::probe::ping(
                target,
                count,
                Duration::from_millis(interval_ms),
                Duration::from_secs(2),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let rtts: Vec<String> = r.rtts_ms.iter().map(|x| format!("{x:.1}")).collect();
                println!(
                    "ping {target} from {from}: {}/{} answered, rtt ms [{}], avg {}",
                    r.received,
                    r.sent,
                    rtts.join(" "),
                    r.avg_ms
                        .map(|a| format!("{a:.1} ms"))
                        .unwrap_or_else(|| "-".into())
                );
            }
            if r.received == 0 {
                bail!("no answer from {target}");
            }
        }
        Cmd::Settle {
            from,
            stable_secs,
            wait_secs,
        } => {
            init_tracing("warn");
            let v = lab.settle(
                Duration::from_secs(stable_secs),
                Duration::from_secs(wait_secs),
                |v| print_generation(v, from.as_deref()),
            )?;
            println!("settled at generation {}", v.generation);
        }
        Cmd::Compare {
            from,
            node,
            service,
            policies,
            connections,
            rate,
            response_bytes,
            check,
            json,
        } => {
            init_tracing("warn");
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate: want a number > 0, got {rate}");
            }
            let rows = compare(
                &lab,
                &from,
                node.as_deref(),
                &service,
                &policies,
                CompareLoad {
                    connections,
                    rate,
                    response_bytes,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let same_price = rows
                    .windows(2)
                    .all(|w| (w[0].egress_usd_per_gb - w[1].egress_usd_per_gb).abs() < 1e-9);
                for r in &rows {
                    println!(
                        "{:<21} mean RTT {:6.1} ms  egress ${:.4}/GB  failed {}  split {}",
                        r.policy.as_str(),
                        r.mean_rtt_ms,
                        r.egress_usd_per_gb,
                        r.failed,
                        ballast_lab::control::fmt_weights(&r.observed)
                    );
                }
                println!("measured by the agents' BPF byte counters, priced by the broker:");
                for r in &rows {
                    let per_dst = |m: &std::collections::BTreeMap<String, f64>| {
                        m.iter()
                            .map(|(d, v)| format!("{d} {:.0} kB/s", v / 1e3))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    println!(
                        "{:<21} sent {}  received {}  spent ${:.4}/h  round-robin on the same \
                         bytes ${:.4}/h  saved ${:.4}/h",
                        r.policy.as_str(),
                        per_dst(&r.bytes_sent_per_second),
                        per_dst(&r.bytes_received_per_second),
                        r.usd_per_hour,
                        r.round_robin_usd_per_hour,
                        r.round_robin_usd_per_hour - r.usd_per_hour
                    );
                }
                if same_price && rows.len() > 1 {
                    println!(
                        "(every destination from {from} has the same egress list price, so the \
                         policies differ in RTT only; give clusters other providers with \
                         `up --regions` to see the price matter)"
                    );
                }
            }
            if check {
                check_compare(&rows)?;
                println!("check passed: optimized spends less than round-robin, measured");
            }
        }
        Cmd::Capacity {
            cluster,
            service,
            per_pod,
            none: _,
            unit,
            check,
            wait_secs,
            json,
        } => {
            init_tracing("warn");
            let wait = Duration::from_secs(wait_secs);
            let rows = match (cluster, service) {
                (Some(cluster), Some(service)) => {
                    // clap: --cluster needs --service and one of --per-pod / --none
                    let (row, took) = lab.set_capacity(&cluster, &service, per_pod, unit, wait)?;
                    if !json {
                        println!(
                            "{service} in {cluster}: {} per pod; the broker solves with {} ({:.1} s)",
                            per_pod.map_or("none declared".to_string(), |x| format!("{x}")),
                            row.broker
                                .map_or("no capacity there".to_string(), |x| format!("{x:.0} RPS")),
                            took.as_secs_f64()
                        );
                    }
                    vec![row]
                }
                _ if check => lab.wait_capacity(wait)?,
                _ => lab.capacity()?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", lab::render_capacity(&rows));
            }
        }
        Cmd::WanForwarder => {
            init_tracing("info");
            runtime(true)?.block_on(ballast_lab::wan::run_forwarder(lab.state_dir.clone()))?;
        }
        Cmd::ServiceTime {
            cluster,
            service,
            backends,
            declare,
            probe,
            wait_secs,
            json,
        } => {
            init_tracing("warn");
            let change = lab.set_service_time(
                &cluster,
                &service,
                backends.map(|c| c.0),
                declare.map(|c| c.0),
                probe.map(|p| (p != "none").then_some(p)),
                Duration::from_secs(wait_secs),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&change)?);
            } else {
                let show = |c: Option<ServiceTime>| c.map_or("none".to_string(), |c| c.to_string());
                println!(
                    "{service} in {cluster}: backends {}, declared {} per pod, probe {}; the broker solves with {}{}",
                    show(change.backends),
                    show(change.declared),
                    change.probe.as_deref().unwrap_or("none"),
                    change.broker.map_or("no curve".to_string(), |c| format!(
                        "{:.3} + {:.4} x load ms",
                        c.base_ms, c.slope_ms_per_rps
                    )),
                    change.took_s.map_or(String::new(), |t| format!(" ({t:.1} s)"))
                );
            }
        }
        Cmd::EchoServer {
            cluster,
            listen,
            service_time,
        } => {
            init_tracing("info");
            runtime(false)?.block_on(ballast_lab::echo::serve(&cluster, listen, service_time))?;
        }
    }
    Ok(())
}

fn print_generation(v: &ballast_lab::control::BrokerView, from: Option<&str>) {
    for (svc, sources) in &v.weights {
        for (src, w) in sources {
            if from.is_none_or(|f| f == src) {
                println!(
                    "  generation {:>3}  {svc} from {src}: {}",
                    v.generation,
                    ballast_lab::control::fmt_weights(w)
                );
            }
        }
    }
}

#[derive(serde::Serialize)]
struct CompareRow {
    policy: Policy,
    observed: std::collections::BTreeMap<String, f64>,
    weights: Option<std::collections::BTreeMap<String, f64>>,
    mean_rtt_ms: f64,
    /// List price per GB of the observed split (broker/data), for reference.
    egress_usd_per_gb: f64,
    failed: u64,
    /// What the broker measured from the source while the load ran (agents' BPF byte
    /// counters): payload bytes per second each way, per destination.
    bytes_sent_per_second: std::collections::BTreeMap<String, f64>,
    bytes_received_per_second: std::collections::BTreeMap<String, f64>,
    /// USD per hour those bytes cost (the broker's `admin savings`), and what round-robin
    /// would spend on the same bytes.
    usd_per_hour: f64,
    round_robin_usd_per_hour: f64,
}

/// The paced load `compare` runs per policy: long enough for the agents to report its rates.
#[derive(Debug, Clone, Copy)]
struct CompareLoad {
    connections: usize,
    rate: f64,
    response_bytes: usize,
}

/// For each policy: switch, settle, run a paced load from `from` (a child `ballast-lab
/// load`, which enters the cluster) and, halfway through, ask the broker what the source's
/// traffic measured and cost (`admin savings`: bytes from the agents' BPF counters x the
/// price of each direction) and what round-robin would spend on it; also price the observed
/// split with broker/data's list prices.
fn compare(
    lab: &Lab,
    from: &str,
    node: Option<&str>,
    service: &str,
    policies: &[Policy],
    load: CompareLoad,
) -> Result<Vec<CompareRow>> {
    let state = lab.load_state()?;
    let src = state.cluster(from)?.region.clone();
    let regions: std::collections::BTreeMap<String, String> = state
        .clusters
        .iter()
        .map(|c| (c.id.clone(), c.region.clone()))
        .collect();
    let data = ballast_lab::config::RegionData::embedded()?;
    let mut rows = Vec::new();
    for &p in policies {
        lab.set_policy(p, None, Duration::from_secs(60))?;
        lab.settle(Duration::from_secs(4), Duration::from_secs(90), |_| {})?;
        let child = std::process::Command::new(&lab.exe)
            .args(["--prefix", &lab.naming.prefix, "--state-dir"])
            .arg(&lab.state_dir)
            .args(["load", "--from", from, "--service", service, "--json"])
            .args(node.map(|n| ["--node", n]).into_iter().flatten())
            .args(["--connections", &load.connections.to_string()])
            .args(["--rate", &load.rate.to_string()])
            .args(["--response-bytes", &load.response_bytes.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running ballast-lab load")?;
        // halfway: several report intervals of steady traffic behind the agents' rates
        let run = Duration::from_secs_f64(load.connections as f64 / load.rate);
        std::thread::sleep(run / 2);
        let measured = lab.savings(service)?;
        let out = child
            .wait_with_output()
            .context("waiting for ballast-lab load")?;
        if !out.status.success() {
            bail!("load: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: load::LoadReport =
            serde_json::from_slice(&out.stdout).context("parsing the load report")?;
        let mut egress = 0.0;
        for (dst, share) in &r.observed {
            let dst_region = regions.get(dst).map(String::as_str).unwrap_or("");
            egress += share * data.egress_usd_per_gb(&src, dst_region).unwrap_or(0.0);
        }
        let flows = measured
            .flows
            .iter()
            .filter(|f| f.source_cluster_id == from);
        let mut row = CompareRow {
            policy: p,
            observed: r.observed,
            weights: r.weights,
            mean_rtt_ms: r.mean_connect_ms,
            egress_usd_per_gb: egress,
            failed: r.failed,
            bytes_sent_per_second: Default::default(),
            bytes_received_per_second: Default::default(),
            usd_per_hour: 0.0,
            round_robin_usd_per_hour: 0.0,
        };
        for f in flows {
            row.bytes_sent_per_second
                .insert(f.destination_cluster_id.clone(), f.bytes_sent_per_second);
            row.bytes_received_per_second.insert(
                f.destination_cluster_id.clone(),
                f.bytes_received_per_second,
            );
            row.usd_per_hour += f.usd_per_hour;
            row.round_robin_usd_per_hour += f.round_robin_usd_per_hour;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `compare --check`: every load served, bytes measured under each policy, `optimized`
/// spending less than `round-robin` measured, and the round-robin counterfactual the broker
/// computed under `optimized` within 25 % of what round-robin then really spent.
fn check_compare(rows: &[CompareRow]) -> Result<()> {
    for r in rows {
        if r.failed > 0 {
            bail!("{}: {} connections failed", r.policy, r.failed);
        }
        let received: f64 = r.bytes_received_per_second.values().sum();
        if received <= 0.0 {
            bail!("{}: the broker measured no bytes from the source", r.policy);
        }
    }
    let find = |p: Policy| rows.iter().find(|r| r.policy == p);
    if let (Some(opt), Some(rr)) = (find(Policy::Optimized), find(Policy::RoundRobin)) {
        if opt.usd_per_hour >= rr.usd_per_hour {
            bail!(
                "optimized spends ${:.4}/h, not less than round-robin's ${:.4}/h",
                opt.usd_per_hour,
                rr.usd_per_hour
            );
        }
        let off = (opt.round_robin_usd_per_hour - rr.usd_per_hour).abs() / rr.usd_per_hour;
        if off > 0.25 {
            bail!(
                "the round-robin counterfactual computed under optimized (${:.4}/h) is {:.0} % \
                 off what round-robin spent (${:.4}/h)",
                opt.round_robin_usd_per_hour,
                off * 100.0,
                rr.usd_per_hour
            );
        }
    }
    Ok(())
}
