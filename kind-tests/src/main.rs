//! `ballast-lab`: the one-host multi-cluster lab (see the crate docs and `--help`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ballast_lab::lab::{self, Lab, UpOptions};
use ballast_lab::load::{self, LoadOptions};
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
        /// Network, backends and load only: no broker, no agents.
        #[arg(long, env = "BALLAST_LAB_NO_CONTROL_PLANE")]
        no_control_plane: bool,
        /// The broker's policy: round-robin | weighted-round-robin | optimized.
        #[arg(long, env = "BALLAST_LAB_POLICY", default_value = "optimized")]
        policy: String,
        /// How long to wait for every agent to install weights, in seconds.
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Switch the broker's policy live and wait for the agents to install the new weights.
    Policy {
        /// round-robin | weighted-round-robin | optimized
        policy: String,
        #[arg(long, env = "BALLAST_LAB_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Remove everything the lab made (idempotent, safe after a crash).
    Down,
    /// Clusters, services, weights, links.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a cluster's cgroup and network namespace.
    Exec {
        cluster: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Set the one-way delay (both directions) between two clusters, live.
    Delay {
        a: String,
        b: String,
        /// One-way delay in ms (the RTT between A and B becomes 2 x MS).
        ms: f64,
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
    /// Open connections to a service from inside a cluster and show where they landed.
    Load {
        #[arg(long)]
        from: String,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Per-connection timeout in ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
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
        target: std::net::IpAddr,
        #[arg(long, default_value_t = 5)]
        count: u32,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long)]
        json: bool,
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
    },
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
            })?;
            if state.control.is_some() {
                if let Err(e) = lab.wait_installed(0, Duration::from_secs(wait_secs)) {
                    eprintln!("ballast-lab up: warning: {e}");
                }
            }
            let status = lab.status()?;
            print!("{}", lab::render_up(&state, &status));
        }
        Cmd::Policy { policy, wait_secs } => {
            init_tracing("warn");
            let v = lab.set_policy(&policy, Duration::from_secs(wait_secs))?;
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
        Cmd::Exec { cluster, cmd } => {
            let placement = lab.placement(&cluster)?;
            placement.enter_current()?;
            let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
            bail!("running {}: {err}", cmd[0]);
        }
        Cmd::Delay { a, b, ms, loss } => {
            init_tracing("warn");
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
            service,
            connections,
            concurrency,
            timeout_ms,
            json,
            target,
        } => {
            init_tracing("warn");
            let state = lab.load_state()?;
            let svc = state.service(&service)?;
            let target = target.unwrap_or(SocketAddr::from((svc.vip, svc.port)));
            let weights = lab.weights(&service, &from);
            // Enter the cluster before any thread exists: the runtime's threads inherit it.
            lab.placement(&from)?.enter_current()?;
            let opts = LoadOptions {
                target,
                host: service.clone(),
                connections,
                concurrency,
                timeout: Duration::from_millis(timeout_ms),
                progress: !json && std::io::stdout().is_terminal(),
            };
            let mut report = runtime(true)?.block_on(load::run(opts))?;
            report.from = Some(from);
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
            target,
            count,
            interval_ms,
            json,
        } => {
            init_tracing("warn");
            lab.placement(&from)?.enter_current()?;
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
        Cmd::WanForwarder => {
            init_tracing("info");
            runtime(true)?.block_on(ballast_lab::wan::run_forwarder(lab.state_dir.clone()))?;
        }
        Cmd::EchoServer { cluster, listen } => {
            init_tracing("info");
            runtime(false)?.block_on(ballast_lab::echo::serve(&cluster, listen))?;
        }
    }
    Ok(())
}
