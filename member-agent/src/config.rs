//! Configuration: command-line flags, each with an environment variable (a flag beats its
//! variable, which beats the default), plus an optional YAML file (`--config`) for what a
//! flag cannot say: overrides of peer clusters' details (the broker streams the registered
//! clusters; an entry in the file wins for its cluster).
//!
//! Decisions: clap parses every value into its type (durations with humantime, modes with
//! `ValueEnum`, ranges with value parsers), so a bad value is refused naming its flag before
//! anything starts; [`Cli::resolve`] then checks what involves several flags or the machine
//! (TLS files with `--broker`, `--probe-timeout` < `--probe-interval`, the cgroup) and
//! returns an [`AgentConfig`] or a [`ConfigError`] naming the flag or file field — never a
//! half-applied configuration. The file is refused whole on any unknown field (a setting that
//! belongs on a flag included), with serde_yaml's path and line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_runtime::LogArgs;
use ballast_types::ClusterId as ClusterName;
use clap::{Args, Parser, ValueEnum};
use serde::Deserialize;

use crate::catalog::Cluster;
use crate::probe::{ProbeConfig, ProbeMode};
use crate::weights::DEFAULT_SCALE;

/// What the agent does with the data plane when it exits (`--detach-on-exit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetachMode {
    /// Detach when the owning DaemonSet is gone or being deleted (Kubernetes only).
    #[default]
    Auto,
    /// Always detach and unpin.
    Always,
    /// Never detach: the next agent adopts the pinned state.
    Never,
}

impl std::fmt::Display for DetachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        })
    }
}

fn detach_mode(s: &str) -> Result<DetachMode, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DetachMode::Auto),
        "always" | "true" => Ok(DetachMode::Always),
        "never" | "false" => Ok(DetachMode::Never),
        other => Err(format!(
            "{other:?} is not a mode: auto, always or never (true/false for always/never)"
        )),
    }
}

/// Where the catalog comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// A topology YAML file (`--topology`).
    Topology,
    /// The Kubernetes MCS API (in-cluster config or KUBECONFIG).
    Kubernetes,
}

/// ballast member agent: discovers services and peers, measures RTT to every peer
/// cluster, reports to the broker and installs the broker's weights into the BPF data plane.
///
/// Every flag can also be set by the environment variable shown; a flag beats its variable.
/// Durations are written like `500ms`, `2s`, `1m`. The YAML file given with --config holds
/// only overrides of peer clusters' details (`clusters:`), which no flag can say; the peers
/// themselves come from the broker.
#[derive(Debug, Parser)]
#[command(
    name = "ballast-agent",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Cli {
    /// YAML file overriding peer clusters' region/zone/provider/gateway (`clusters:`, a list
    /// of `{id, region, zone, provider, gateway}`), for the Kubernetes source; the peers
    /// themselves come from the broker (an entry here wins for its cluster).
    #[arg(long, env = "BALLAST_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub discovery: DiscoveryArgs,
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// A duration longer than zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("not a duration such as 500ms or 2s: {e}")),
    }
}

fn ewma_alpha(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(a) if a > 0.0 && a <= 1.0 => Ok(a),
        Ok(_) => Err("must be in (0, 1]".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn loss_window(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        Ok(_) => Err("must be in 1..=10000".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn absolute_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err("must be an absolute path".into())
    }
}

/// This cluster and node.
#[derive(Debug, Args)]
#[command(next_help_heading = "Identity")]
pub struct IdentityArgs {
    /// This cluster's id (a DNS label, e.g. `east`); must match the id in --cert's URI SAN
    /// (spiffe://ballast/cluster/ID).
    #[arg(long, env = "BALLAST_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: ClusterName,
    /// This node's name, sent with every report (agents of one cluster are told apart by
    /// it). Default: $NODE_NAME, else the host name.
    #[arg(long, env = "BALLAST_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// This cluster's region, registered with the broker (egress pricing). Without it, the
    /// --config file's or the topology file's entry for this cluster is used.
    #[arg(long, env = "BALLAST_REGION")]
    pub region: Option<String>,
    /// This cluster's zone, registered with the broker (egress pricing).
    #[arg(long, env = "BALLAST_ZONE")]
    pub zone: Option<String>,
    /// This cluster's provider (e.g. aws, gcp), registered with the broker.
    #[arg(long, env = "BALLAST_PROVIDER")]
    pub provider: Option<String>,
    /// This cluster's gateway address, which peers probe; registered with the broker.
    #[arg(long, env = "BALLAST_GATEWAY", value_name = "IP")]
    pub gateway: Option<IpAddr>,
}

/// The broker connection (gRPC over mutual TLS).
#[derive(Debug, Args)]
#[command(next_help_heading = "Broker")]
pub struct BrokerArgs {
    /// Broker endpoint(s), `https://host:port`: repeat the flag or separate with commas to
    /// list several replicas; a host name is resolved again on every reconnect and each of
    /// its addresses is a replica (a headless Service), the certificate still verified
    /// against the name. The agent stays on one replica while it is healthy and moves to the
    /// next when it becomes unreachable or unavailable. Without it the agent measures and
    /// serves metrics but installs no weights.
    #[arg(
        long,
        env = "BALLAST_BROKER",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub broker: Vec<String>,
    /// CA certificate (PEM) that signed the broker's certificate. Required with --broker.
    #[arg(long, env = "BALLAST_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// This cluster's client certificate (PEM). Required with --broker.
    #[arg(long, env = "BALLAST_CERT", value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM). Required with --broker.
    #[arg(long, env = "BALLAST_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// How often measurements are reported to the broker.
    #[arg(long, env = "BALLAST_REPORT_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = positive_duration)]
    pub report_interval: Duration,
}

/// Where services and peers come from.
#[derive(Debug, Args)]
#[command(next_help_heading = "Discovery")]
pub struct DiscoveryArgs {
    /// Discovery source [default: topology if --topology is given, else kubernetes].
    #[arg(long, env = "BALLAST_DISCOVERY", value_enum)]
    pub discovery: Option<DiscoveryKind>,
    /// Topology file (YAML; see member-agent/examples/topology.yaml). Required with
    /// --discovery topology.
    #[arg(long, env = "BALLAST_TOPOLOGY", value_name = "PATH")]
    pub topology: Option<PathBuf>,
    /// How often the topology file is checked for changes.
    #[arg(long, env = "BALLAST_TOPOLOGY_POLL_INTERVAL", value_name = "DURATION", default_value = "2s", value_parser = positive_duration)]
    pub topology_poll_interval: Duration,
}

/// The BPF data plane.
#[derive(Debug, Args)]
#[command(next_help_heading = "Data plane")]
pub struct DataplaneArgs {
    /// cgroup v2 the connect hooks attach to [default: the cgroup2 mount point found in
    /// /proc/mounts, i.e. the whole node].
    #[arg(long, env = "BALLAST_CGROUP", value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory the maps and links are pinned in; a restarted agent adopts what it
    /// finds there.
    #[arg(long, env = "BALLAST_PIN_DIR", value_name = "PATH", default_value = "/sys/fs/bpf/ballast", value_parser = absolute_path)]
    pub pin_dir: PathBuf,
    /// On exit (SIGTERM): `always` detaches the programs and removes the pins; `never`
    /// leaves steering in place with the last weights until the next agent adopts it;
    /// `auto` detaches only when this pod's DaemonSet is gone or being deleted (an
    /// uninstall; read through the Kubernetes API with POD_NAME and POD_NAMESPACE), and is
    /// `never` without Kubernetes discovery. The bare flag means `always`; `true`/`false`
    /// are `always`/`never`.
    #[arg(
        long,
        env = "BALLAST_DETACH_ON_EXIT",
        value_name = "MODE",
        default_value = "auto",
        num_args = 0..=1,
        default_missing_value = "always",
        value_parser = detach_mode
    )]
    pub detach_on_exit: DetachMode,
    /// Sum of the integer backend weights of one service (the slot table size; the
    /// default is the data plane's slot count).
    #[arg(long, env = "BALLAST_WEIGHT_SCALE", value_name = "N", default_value_t = DEFAULT_SCALE, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub weight_scale: u32,
}

/// RTT probes to peer gateways. The defaults are [`ProbeConfig::default`]'s (a test holds
/// them equal).
#[derive(Debug, Args)]
#[command(next_help_heading = "Probes")]
pub struct ProbeArgs {
    /// `auto`: ICMP echo when permitted (net.ipv4.ping_group_range or CAP_NET_RAW), else
    /// TCP connect; `icmp`: ICMP only; `tcp`: TCP connect only.
    #[arg(long, env = "BALLAST_PROBE_MODE", value_enum, default_value = "auto")]
    pub probe_mode: ProbeMode,
    /// Time between probe rounds.
    #[arg(long, env = "BALLAST_PROBE_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = positive_duration)]
    pub probe_interval: Duration,
    /// How long a probe waits for its answer; less than --probe-interval.
    #[arg(long, env = "BALLAST_PROBE_TIMEOUT", value_name = "DURATION", default_value = "800ms", value_parser = positive_duration)]
    pub probe_timeout: Duration,
    /// Weight of a new RTT sample in the moving average, in (0, 1]; 1 means no smoothing.
    #[arg(long, env = "BALLAST_PROBE_EWMA_ALPHA", value_name = "ALPHA", default_value = "0.3", value_parser = ewma_alpha)]
    pub probe_ewma_alpha: f64,
    /// Number of recent probes loss is counted over (1 to 10000).
    #[arg(long, env = "BALLAST_PROBE_LOSS_WINDOW", value_name = "N", default_value = "20", value_parser = loss_window)]
    pub probe_loss_window: usize,
    /// Consecutive failed probes after which a peer is unreachable and its backends are
    /// marked unhealthy at once, without waiting for the broker.
    #[arg(long, env = "BALLAST_PROBE_UNHEALTHY_AFTER", value_name = "N", default_value = "3", value_parser = clap::value_parser!(u32).range(1..))]
    pub probe_unhealthy_after: u32,
    /// Port of the TCP-connect probe (an accepted or refused connection both count as an
    /// answer).
    #[arg(long, env = "BALLAST_PROBE_TCP_PORT", value_name = "PORT", default_value = "443", value_parser = clap::value_parser!(u16).range(1..))]
    pub probe_tcp_port: u16,
}

/// Observability.
#[derive(Debug, Args)]
#[command(next_help_heading = "Metrics")]
pub struct MetricsArgs {
    /// Address of the admin HTTP server: Prometheus `/metrics`, `/live` and `/ready`.
    #[arg(
        long,
        env = "BALLAST_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_addr: SocketAddr,
}

/// The configuration file: only what flags cannot say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Peer clusters' region/zone/provider/gateway for the Kubernetes source (the MCS API
    /// does not carry them); this cluster's entry fills what the identity flags leave out.
    #[serde(default)]
    pub clusters: Vec<FileCluster>,
}

/// A cluster in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub id: ClusterName,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub provider: Option<String>,
    pub gateway: Option<IpAddr>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        message: message.into(),
    }
}

/// The broker connection, all of it or nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// The broker's addresses, in order, each checked.
    pub endpoints: Vec<tonic::transport::Uri>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The resolved discovery source.
#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryConfig {
    Topology {
        path: PathBuf,
        poll_interval: Duration,
    },
    Kubernetes {
        /// Known clusters' details (this one included).
        clusters: Vec<Cluster>,
    },
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// This cluster, with whatever identity details flags and file gave.
    pub local: Cluster,
    pub node_name: String,
    pub broker: Option<BrokerConfig>,
    pub report_interval: Duration,
    pub discovery: DiscoveryConfig,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub detach_on_exit: DetachMode,
    pub weight_scale: u32,
    pub probe: ProbeConfig,
    pub metrics_addr: SocketAddr,
}

fn host_name() -> Option<String> {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
}

/// Reads and parses a configuration file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The file's clusters, each once, as catalog clusters.
fn file_clusters(file: FileConfig) -> Result<Vec<Cluster>, ConfigError> {
    let mut clusters: Vec<Cluster> = Vec::new();
    for (i, c) in file.clusters.into_iter().enumerate() {
        if clusters.iter().any(|x| x.id == c.id.as_str()) {
            return Err(field(
                "clusters",
                format!("clusters[{i}].id: {:?} is listed twice", c.id.as_str()),
            ));
        }
        clusters.push(Cluster {
            id: c.id.into(),
            region: c.region,
            zone: c.zone,
            provider: c.provider,
            gateway: c.gateway,
        });
    }
    Ok(clusters)
}

impl BrokerArgs {
    /// The broker connection: none without --broker, else all of it, checked.
    fn resolve(self) -> Result<Option<BrokerConfig>, ConfigError> {
        if self.broker.iter().all(|b| b.trim().is_empty()) {
            return Ok(None);
        }
        let endpoints = crate::brokers::parse_list(&self.broker)
            .map_err(|e| field("--broker", e.to_string()))?;
        let ca = self
            .ca
            .ok_or_else(|| field("--ca", "is required with --broker"))?;
        let cert = self
            .cert
            .ok_or_else(|| field("--cert", "is required with --broker"))?;
        let key = self
            .key
            .ok_or_else(|| field("--key", "is required with --broker"))?;
        for (name, path) in [("--ca", &ca), ("--cert", &cert), ("--key", &key)] {
            if !path.is_file() {
                return Err(field(
                    name,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        Ok(Some(BrokerConfig {
            endpoints,
            ca,
            cert,
            key,
        }))
    }
}

impl ProbeArgs {
    fn resolve(self) -> Result<ProbeConfig, ConfigError> {
        if self.probe_timeout >= self.probe_interval {
            return Err(field(
                "--probe-timeout",
                format!(
                    "{:?} must be shorter than --probe-interval {:?}",
                    self.probe_timeout, self.probe_interval
                ),
            ));
        }
        Ok(ProbeConfig {
            mode: self.probe_mode,
            interval: self.probe_interval,
            timeout: self.probe_timeout,
            ewma_alpha: self.probe_ewma_alpha,
            loss_window: self.probe_loss_window,
            unhealthy_after: self.probe_unhealthy_after,
            tcp_port: self.probe_tcp_port,
        })
    }
}

impl Cli {
    /// Reads `--config` (if any) and resolves.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        self.resolve_with(file)
    }

    /// Checks the flags together with `file` and builds the configuration.
    pub fn resolve_with(self, file: FileConfig) -> Result<AgentConfig, ConfigError> {
        let Cli {
            config: _,
            identity: id,
            broker,
            discovery: d,
            dataplane: dp,
            probe,
            metrics,
            log: _,
        } = self;

        let cluster_id: String = id.cluster_id.into();
        let node_name = id
            .node_name
            .or_else(host_name)
            .ok_or_else(|| field("--node-name", "is required (no $NODE_NAME nor host name)"))?;
        if node_name.is_empty() || node_name.len() > 253 {
            return Err(field("--node-name", "must be 1 to 253 characters"));
        }

        let mut clusters = file_clusters(file)?;
        let listed = clusters.iter().find(|c| c.id == cluster_id).cloned();
        let from_list = |f: fn(&Cluster) -> Option<String>| listed.as_ref().and_then(f);
        let local = Cluster {
            id: cluster_id.clone(),
            region: id.region.or_else(|| from_list(|c| c.region.clone())),
            zone: id.zone.or_else(|| from_list(|c| c.zone.clone())),
            provider: id.provider.or_else(|| from_list(|c| c.provider.clone())),
            gateway: id
                .gateway
                .or_else(|| listed.as_ref().and_then(|c| c.gateway)),
        };
        clusters.retain(|c| c.id != cluster_id);
        clusters.push(local.clone());

        let report_interval = broker.report_interval;
        let broker = broker.resolve()?;

        let kind = d.discovery.unwrap_or(if d.topology.is_some() {
            DiscoveryKind::Topology
        } else {
            DiscoveryKind::Kubernetes
        });
        let discovery = match kind {
            DiscoveryKind::Topology => DiscoveryConfig::Topology {
                path: d
                    .topology
                    .ok_or_else(|| field("--topology", "is required with --discovery topology"))?,
                poll_interval: d.topology_poll_interval,
            },
            DiscoveryKind::Kubernetes => DiscoveryConfig::Kubernetes { clusters },
        };

        let cgroup = dp
            .cgroup
            .or_else(ballast_bpf::sys::cgroup2_mount)
            .ok_or_else(|| field("--cgroup", "not given and no cgroup2 mount in /proc/mounts"))?;
        if !cgroup.is_dir() {
            return Err(field(
                "--cgroup",
                format!("{} is not a directory", cgroup.display()),
            ));
        }

        Ok(AgentConfig {
            local,
            node_name,
            broker,
            report_interval,
            discovery,
            cgroup,
            pin_dir: dp.pin_dir,
            detach_on_exit: dp.detach_on_exit,
            weight_scale: dp.weight_scale,
            probe: probe.resolve()?,
            metrics_addr: metrics.metrics_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ballast-agent").chain(args.iter().copied()))
    }

    fn tmp_cgroup() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    /// The required flags only (a temporary directory as the cgroup), resolved with `file`.
    fn minimal(file: FileConfig) -> Result<AgentConfig, ConfigError> {
        let cg = tmp_cgroup();
        parse(&[
            "--cluster-id",
            "east",
            "--node-name",
            "n",
            "--cgroup",
            cg.path().to_str().expect("utf8"),
        ])
        .expect("parses")
        .resolve_with(file)
    }

    #[test]
    fn help_explains_every_flag_with_its_env() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no env");
            assert!(
                arg.get_long_help().or(arg.get_help()).is_some(),
                "--{id} has no help"
            );
            let long = arg.get_long().unwrap_or(id);
            assert!(
                help.contains(&format!("--{long}")),
                "--{long} missing from --help"
            );
        }
        assert!(help.contains("BALLAST_CLUSTER_ID"));
        assert!(help.contains("--detach-on-exit"));
        assert!(help.contains("--log-format"));
    }

    #[test]
    fn flag_defaults_are_the_probe_defaults() {
        let c = minimal(FileConfig::default()).expect("valid");
        assert_eq!(c.probe, ProbeConfig::default());
        assert_eq!(c.weight_scale, DEFAULT_SCALE);
        assert_eq!(c.report_interval, Duration::from_secs(5));
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/ballast"));
        assert_eq!(c.metrics_addr, SocketAddr::from(([127, 0, 0, 1], 9464)));
        assert!(c.broker.is_none());
        assert_eq!(c.detach_on_exit, DetachMode::Auto);
    }

    #[test]
    fn flags_are_typed_and_the_file_fills_this_clusters_details() {
        let cg = tmp_cgroup();
        let cg_path = cg.path().to_str().expect("utf8");
        let file: FileConfig = serde_yaml::from_str(
            r#"
clusters:
  - { id: east, region: us-east-1, zone: us-east-1a, gateway: 127.0.0.1 }
  - { id: west, region: eu-west-1 }
"#,
        )
        .expect("file");
        let cli = parse(&[
            "--cluster-id",
            "east",
            "--node-name",
            "n1",
            "--zone",
            "us-east-1b",
            "--probe-interval",
            "250ms",
            "--probe-timeout",
            "100ms",
            "--probe-mode",
            "tcp",
            "--topology",
            "/etc/ballast/topology.yaml",
            "--cgroup",
            cg_path,
        ])
        .expect("flags");
        let c = cli.resolve_with(file).expect("valid");
        assert_eq!(c.local.id, "east");
        assert_eq!(
            c.local.region.as_deref(),
            Some("us-east-1"),
            "from the file"
        );
        assert_eq!(c.local.zone.as_deref(), Some("us-east-1b"), "the flag wins");
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.probe.interval, Duration::from_millis(250));
        assert_eq!(c.probe.timeout, Duration::from_millis(100));
        assert_eq!(c.probe.mode, ProbeMode::Tcp);
        assert_eq!(
            c.discovery,
            DiscoveryConfig::Topology {
                path: "/etc/ballast/topology.yaml".into(),
                poll_interval: Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn errors_name_the_flag() {
        let cg = tmp_cgroup();
        let cg_path = cg.path().to_str().expect("utf8");
        let base = [
            "--cluster-id",
            "east",
            "--node-name",
            "n",
            "--cgroup",
            cg_path,
        ];
        let args = |extra: &[&str]| -> Vec<String> {
            base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
        };
        // refused by resolve (several flags, or the machine)
        let err = |extra: &[&str]| {
            let a = args(extra);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            parse(&a)
                .expect("parses")
                .resolve_with(FileConfig::default())
                .expect_err("invalid")
                .to_string()
        };
        assert!(err(&["--probe-timeout", "2s"]).starts_with("--probe-timeout"));
        assert!(err(&["--broker", "http://b:1"]).starts_with("--broker"));
        // every address of a list is checked, the bad one named
        let e = err(&["--broker", "https://a:1,https://b c:1"]);
        assert!(e.starts_with("--broker") && e.contains("b c"), "{e}");
        let e = err(&["--broker", "https://a:1", "--broker", "ftp://b:1"]);
        assert!(e.starts_with("--broker") && e.contains("ftp://b:1"), "{e}");
        let e = err(&["--broker", "https://a:1", "--broker", "https://a:1"]);
        assert!(e.starts_with("--broker") && e.contains("twice"), "{e}");
        assert!(err(&["--broker", "https://b:1"]).starts_with("--ca"));
        assert!(err(&["--discovery", "topology"]).starts_with("--topology"));
        // refused by clap while parsing, naming the flag
        let refused = |extra: &[&str], flag: &str| {
            let a = args(extra);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let e = parse(&a).expect_err("refused").to_string();
            assert!(e.contains(flag), "{e}");
        };
        refused(&["--probe-ewma-alpha", "1.5"], "--probe-ewma-alpha");
        refused(&["--pin-dir", "rel"], "--pin-dir");
        refused(&["--probe-loss-window", "0"], "--probe-loss-window");
        refused(&["--probe-interval", "soon"], "--probe-interval");
        refused(&["--probe-interval", "0s"], "--probe-interval");
        refused(&["--weight-scale", "0"], "--weight-scale");
        refused(&["--metrics-addr", "nowhere"], "--metrics-addr");
        refused(&["--probe-mode", "udp"], "--probe-mode");
        refused(&["--log-format", "xml"], "--log-format");
        let e = parse(&["--cluster-id", "East", "--cgroup", cg_path])
            .expect_err("bad id")
            .to_string();
        assert!(e.contains("--cluster-id") && e.contains("a-z"), "{e}");
        let e = parse(&["--cgroup", cg_path])
            .expect_err("no id")
            .to_string();
        assert!(e.contains("--cluster-id"), "{e}");
    }

    #[test]
    fn config_file_holds_only_clusters_and_errors_name_field_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "clusters:\n  - id: west\n    gateway: 127.0.0.2\n").expect("write");
        let f = read_file(&path).expect("valid");
        assert_eq!(f.clusters.len(), 1);
        // a setting that belongs on a flag is refused, not silently ignored
        std::fs::write(&path, "clusters: []\nprobe_interval: 2s\n").expect("write");
        let e = read_file(&path).expect_err("a flag's setting").to_string();
        assert!(e.contains("probe_interval") && e.contains("line 2"), "{e}");
        std::fs::write(&path, "clusters:\n  - id: West\n").expect("write");
        let e = read_file(&path).expect_err("bad id").to_string();
        assert!(
            e.contains("clusters[0]") && e.contains("\"West\"") && e.contains("line 2"),
            "{e}"
        );
        std::fs::write(&path, "clusters:\n  - { id: west, gateway: nowhere }\n").expect("write");
        let e = read_file(&path).expect_err("bad ip").to_string();
        assert!(e.contains("gateway"), "{e}");
        let twice: FileConfig =
            serde_yaml::from_str("clusters: [{ id: west }, { id: west }]").expect("parses");
        let e = minimal(twice).expect_err("twice").to_string();
        assert!(e.starts_with("clusters") && e.contains("twice"), "{e}");
    }

    #[test]
    fn broker_needs_all_tls_files_and_kubernetes_gets_clusters() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let p = |f: &str| dir.path().join(f).to_str().expect("utf8").to_owned();
        let cg = dir.path().to_str().expect("utf8");
        let file = FileConfig {
            clusters: vec![FileCluster {
                id: ClusterName::new("west").expect("id"),
                region: None,
                zone: None,
                provider: None,
                gateway: Some("127.0.0.2".parse().expect("ip")),
            }],
        };
        let c = parse(&[
            "--cluster-id",
            "east",
            "--node-name",
            "n",
            "--cgroup",
            cg,
            "--broker",
            "https://127.0.0.1:7443",
            "--broker",
            "https://broker-0:7443,https://broker-1:7443",
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("cert.pem"),
            "--key",
            &p("key.pem"),
            "--detach-on-exit",
            "--gateway",
            "127.0.0.1",
        ])
        .expect("parses")
        .resolve_with(file)
        .expect("valid");
        assert_eq!(
            c.broker.as_ref().map(|b| b
                .endpoints
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()),
            Some(vec![
                "https://127.0.0.1:7443/".to_owned(),
                "https://broker-0:7443/".to_owned(),
                "https://broker-1:7443/".to_owned(),
            ]),
            "repeated and comma-separated, in order"
        );
        assert_eq!(c.detach_on_exit, DetachMode::Always, "the bare flag");
        let DiscoveryConfig::Kubernetes { clusters } = &c.discovery else {
            panic!("kubernetes expected without --topology")
        };
        assert_eq!(clusters.len(), 2);
        assert!(clusters
            .iter()
            .any(|c| c.id == "east" && c.gateway.is_some()));
    }

    #[test]
    fn detach_mode_takes_auto_always_never_and_the_old_bool_spellings() {
        let cg = tmp_cgroup();
        let cg = cg.path().to_str().expect("utf8");
        let mode = |extra: &[&str]| {
            let mut args = vec!["--cluster-id", "east", "--node-name", "n", "--cgroup", cg];
            args.extend_from_slice(extra);
            parse(&args).map(|c| c.dataplane.detach_on_exit)
        };
        assert_eq!(mode(&[]).expect("default"), DetachMode::Auto);
        for (v, want) in [
            ("auto", DetachMode::Auto),
            ("always", DetachMode::Always),
            ("never", DetachMode::Never),
            ("true", DetachMode::Always),
            ("false", DetachMode::Never),
        ] {
            assert_eq!(mode(&["--detach-on-exit", v]).expect(v), want, "{v}");
            let eq = format!("--detach-on-exit={v}");
            assert_eq!(mode(&[eq.as_str()]).expect(v), want, "{v}");
        }
        let e = mode(&["--detach-on-exit", "sometimes"])
            .expect_err("not a mode")
            .to_string();
        assert!(
            e.contains("--detach-on-exit") && e.contains("auto, always or never"),
            "{e}"
        );
    }
}
