//! Configuration: command-line flags, each with an environment variable, over an optional
//! YAML file (`--config`), over defaults. Precedence: flag > environment > file > default.
//! [`Cli::resolve`] validates everything into an [`AgentConfig`]; an error names the flag or
//! file field.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Args, Parser, ValueEnum};
use serde::Deserialize;

use crate::catalog::{validate_cluster_id, Cluster};
use crate::probe::{ProbeConfig, ProbeMode};
use crate::weights::DEFAULT_SCALE;

/// Where the catalog comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// A topology YAML file (`--topology`).
    Topology,
    /// The Kubernetes MCS API (in-cluster config or KUBECONFIG).
    Kubernetes,
}

/// ballast member agent: discovers services and peers, measures RTT to every peer
/// cluster, reports to the broker and installs the broker's weights into the BPF data plane.
///
/// Every flag can also be set by the environment variable shown, or in the YAML file given
/// with --config (keys are the flag names with '_' for '-', e.g. `probe_interval: 2s`).
/// A flag beats its environment variable, which beats the file, which beats the default.
/// Durations are written like `500ms`, `2s`, `1m`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "ballast-agent",
    version,
    about,
    long_about,
    max_term_width = 100
)]
pub struct Cli {
    /// YAML configuration file; its values apply where no flag or variable is given.
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
}

/// This cluster and node.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Identity")]
pub struct IdentityArgs {
    /// This cluster's id (a DNS label, e.g. `east`); must match the id in --cert's URI SAN (spiffe://ballast/cluster/ID). Required.
    #[arg(long, env = "BALLAST_CLUSTER_ID", value_name = "ID")]
    pub cluster_id: Option<String>,
    /// This node's name, sent with every report (agents of one cluster are told apart by
    /// it). Default: $NODE_NAME, else the host name.
    #[arg(long, env = "BALLAST_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// This cluster's region, registered with the broker (egress pricing). With the
    /// topology source the file's value is used when this is not given.
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
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Broker")]
pub struct BrokerArgs {
    /// Broker endpoint, `https://host:port`. Without it the agent measures and serves
    /// metrics but installs no weights.
    #[arg(long, env = "BALLAST_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// CA certificate (PEM) that signed the broker's certificate. Required with --broker.
    #[arg(long, env = "BALLAST_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// This cluster's client certificate (PEM). Required with --broker.
    #[arg(long, env = "BALLAST_CERT", value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM). Required with --broker.
    #[arg(long, env = "BALLAST_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// How often measurements are reported to the broker [default: 5s].
    #[arg(long, env = "BALLAST_REPORT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub report_interval: Option<Duration>,
}

/// Where services and peers come from.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Discovery")]
pub struct DiscoveryArgs {
    /// Discovery source [default: topology if --topology is given, else kubernetes].
    #[arg(long, env = "BALLAST_DISCOVERY", value_enum)]
    pub discovery: Option<DiscoveryKind>,
    /// Topology file (YAML; see member-agent/examples/topology.yaml). Required with
    /// --discovery topology.
    #[arg(long, env = "BALLAST_TOPOLOGY", value_name = "PATH")]
    pub topology: Option<PathBuf>,
    /// How often the topology file is checked for changes [default: 2s].
    #[arg(long, env = "BALLAST_TOPOLOGY_POLL_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub topology_poll_interval: Option<Duration>,
}

/// The BPF data plane.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Data plane")]
pub struct DataplaneArgs {
    /// cgroup v2 the connect hooks attach to [default: the cgroup2 mount point found in
    /// /proc/mounts, i.e. the whole node].
    #[arg(long, env = "BALLAST_CGROUP", value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory the maps and links are pinned in; a restarted agent adopts what it
    /// finds there [default: /sys/fs/bpf/ballast].
    #[arg(long, env = "BALLAST_PIN_DIR", value_name = "PATH")]
    pub pin_dir: Option<PathBuf>,
    /// On exit, detach the programs and remove the pins. Without it, steering stays in
    /// place with the last weights until the next agent adopts it.
    #[arg(long, env = "BALLAST_DETACH_ON_EXIT", action = ArgAction::SetTrue)]
    pub detach_on_exit: bool,
    /// Sum of the integer backend weights of one service (the slot table size)
    /// [default: 4096, the data plane's slot count].
    #[arg(long, env = "BALLAST_WEIGHT_SCALE", value_name = "N")]
    pub weight_scale: Option<u32>,
}

/// RTT probes to peer gateways.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Probes")]
pub struct ProbeArgs {
    /// `auto`: ICMP echo when permitted (net.ipv4.ping_group_range or CAP_NET_RAW), else
    /// TCP connect; `icmp`: ICMP only; `tcp`: TCP connect only [default: auto].
    #[arg(long, env = "BALLAST_PROBE_MODE", value_enum)]
    pub probe_mode: Option<ProbeMode>,
    /// Time between probe rounds [default: 1s].
    #[arg(long, env = "BALLAST_PROBE_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub probe_interval: Option<Duration>,
    /// How long a probe waits for its answer; less than --probe-interval [default: 800ms].
    #[arg(long, env = "BALLAST_PROBE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub probe_timeout: Option<Duration>,
    /// Weight of a new RTT sample in the moving average, in (0, 1]; 1 means no smoothing
    /// [default: 0.3].
    #[arg(long, env = "BALLAST_PROBE_EWMA_ALPHA", value_name = "ALPHA")]
    pub probe_ewma_alpha: Option<f64>,
    /// Number of recent probes loss is counted over [default: 20].
    #[arg(long, env = "BALLAST_PROBE_LOSS_WINDOW", value_name = "N")]
    pub probe_loss_window: Option<usize>,
    /// Consecutive failed probes after which a peer is unreachable and its backends are
    /// marked unhealthy at once, without waiting for the broker [default: 3].
    #[arg(long, env = "BALLAST_PROBE_UNHEALTHY_AFTER", value_name = "N")]
    pub probe_unhealthy_after: Option<u32>,
    /// Port of the TCP-connect probe (an accepted or refused connection both count as an
    /// answer) [default: 443].
    #[arg(long, env = "BALLAST_PROBE_TCP_PORT", value_name = "PORT")]
    pub probe_tcp_port: Option<u16>,
}

/// Observability.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Metrics")]
pub struct MetricsArgs {
    /// Address of the Prometheus `/metrics` endpoint [default: 127.0.0.1:9464].
    #[arg(long, env = "BALLAST_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// The configuration file: the flags' names in snake_case, plus `clusters`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub cluster_id: Option<String>,
    pub node_name: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub provider: Option<String>,
    pub gateway: Option<IpAddr>,
    pub broker: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    pub report_interval: Option<Duration>,
    pub discovery: Option<DiscoveryKind>,
    pub topology: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    pub topology_poll_interval: Option<Duration>,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub detach_on_exit: Option<bool>,
    pub weight_scale: Option<u32>,
    pub probe_mode: Option<ProbeMode>,
    #[serde(default, with = "opt_duration")]
    pub probe_interval: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub probe_timeout: Option<Duration>,
    pub probe_ewma_alpha: Option<f64>,
    pub probe_loss_window: Option<usize>,
    pub probe_unhealthy_after: Option<u32>,
    pub probe_tcp_port: Option<u16>,
    pub metrics_addr: Option<SocketAddr>,
    /// Peer clusters' region/zone/provider/gateway for the Kubernetes source (the MCS API
    /// does not carry them).
    #[serde(default)]
    pub clusters: Vec<FileCluster>,
}

/// A cluster in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub id: String,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub provider: Option<String>,
    pub gateway: Option<IpAddr>,
}

mod opt_duration {
    use serde::de::{Error, Visitor};
    use serde::Deserializer;
    use std::time::Duration;

    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as 500ms, 2s or 1m")
        }
        fn visit_str<E: Error>(self, s: &str) -> Result<Self::Value, E> {
            humantime::parse_duration(s)
                .map(Some)
                .map_err(|e| E::custom(format!("{s:?} is not a duration (e.g. 2s): {e}")))
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(V)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_option(V)
    }
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
    pub endpoint: String,
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
    pub detach_on_exit: bool,
    pub weight_scale: u32,
    pub probe: ProbeConfig,
    pub metrics_addr: SocketAddr,
}

/// The first cgroup2 mount point in /proc/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
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

fn positive(name: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(field(name, "must be longer than 0"))
    } else {
        Ok(d)
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

    /// Merges flags over `file` over defaults and validates.
    pub fn resolve_with(self, file: FileConfig) -> Result<AgentConfig, ConfigError> {
        let Cli {
            config: _,
            identity: id,
            broker: b,
            discovery: d,
            dataplane: dp,
            probe: p,
            metrics: m,
        } = self;

        let cluster_id = id
            .cluster_id
            .or(file.cluster_id)
            .ok_or_else(|| field("--cluster-id", "is required"))?;
        validate_cluster_id(&cluster_id).map_err(|e| field("--cluster-id", e))?;
        let node_name = id
            .node_name
            .or(file.node_name)
            .or_else(host_name)
            .ok_or_else(|| field("--node-name", "is required (no $NODE_NAME nor host name)"))?;
        if node_name.is_empty() || node_name.len() > 253 {
            return Err(field("--node-name", "must be 1 to 253 characters"));
        }

        let mut clusters = Vec::new();
        for (i, c) in file.clusters.iter().enumerate() {
            validate_cluster_id(&c.id)
                .map_err(|e| field("clusters", format!("clusters[{i}].id: {e}")))?;
            if clusters.iter().any(|x: &Cluster| x.id == c.id) {
                return Err(field(
                    "clusters",
                    format!("clusters[{i}].id: {:?} is listed twice", c.id),
                ));
            }
            clusters.push(Cluster {
                id: c.id.clone(),
                region: c.region.clone(),
                zone: c.zone.clone(),
                provider: c.provider.clone(),
                gateway: c.gateway,
            });
        }
        let from_list = clusters.iter().find(|c| c.id == cluster_id).cloned();
        let local = Cluster {
            id: cluster_id.clone(),
            region: id
                .region
                .or(file.region)
                .or_else(|| from_list.as_ref().and_then(|c| c.region.clone())),
            zone: id
                .zone
                .or(file.zone)
                .or_else(|| from_list.as_ref().and_then(|c| c.zone.clone())),
            provider: id
                .provider
                .or(file.provider)
                .or_else(|| from_list.as_ref().and_then(|c| c.provider.clone())),
            gateway: id
                .gateway
                .or(file.gateway)
                .or_else(|| from_list.as_ref().and_then(|c| c.gateway)),
        };
        clusters.retain(|c| c.id != cluster_id);
        clusters.push(local.clone());

        let broker = match b.broker.or(file.broker) {
            None => None,
            Some(endpoint) => {
                let uri: axum::http::Uri = endpoint
                    .parse()
                    .map_err(|e| field("--broker", format!("{endpoint:?} is not a URL: {e}")))?;
                if uri.scheme_str() != Some("https") || uri.host().is_none() {
                    return Err(field(
                        "--broker",
                        format!("{endpoint:?} must be https://host:port (mutual TLS)"),
                    ));
                }
                let ca =
                    b.ca.or(file.ca)
                        .ok_or_else(|| field("--ca", "is required with --broker"))?;
                let cert = b
                    .cert
                    .or(file.cert)
                    .ok_or_else(|| field("--cert", "is required with --broker"))?;
                let key = b
                    .key
                    .or(file.key)
                    .ok_or_else(|| field("--key", "is required with --broker"))?;
                for (name, path) in [("--ca", &ca), ("--cert", &cert), ("--key", &key)] {
                    if !path.is_file() {
                        return Err(field(
                            name,
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                }
                Some(BrokerConfig {
                    endpoint,
                    ca,
                    cert,
                    key,
                })
            }
        };
        let report_interval = positive(
            "--report-interval",
            b.report_interval
                .or(file.report_interval)
                .unwrap_or(Duration::from_secs(5)),
        )?;

        let topology = d.topology.or(file.topology);
        let kind = d
            .discovery
            .or(file.discovery)
            .unwrap_or(if topology.is_some() {
                DiscoveryKind::Topology
            } else {
                DiscoveryKind::Kubernetes
            });
        let discovery = match kind {
            DiscoveryKind::Topology => {
                let path = topology
                    .ok_or_else(|| field("--topology", "is required with --discovery topology"))?;
                DiscoveryConfig::Topology {
                    path,
                    poll_interval: positive(
                        "--topology-poll-interval",
                        d.topology_poll_interval
                            .or(file.topology_poll_interval)
                            .unwrap_or(Duration::from_secs(2)),
                    )?,
                }
            }
            DiscoveryKind::Kubernetes => DiscoveryConfig::Kubernetes { clusters },
        };

        let cgroup = dp
            .cgroup
            .or(file.cgroup)
            .or_else(cgroup2_mount)
            .ok_or_else(|| field("--cgroup", "not given and no cgroup2 mount in /proc/mounts"))?;
        if !cgroup.is_dir() {
            return Err(field(
                "--cgroup",
                format!("{} is not a directory", cgroup.display()),
            ));
        }
        let pin_dir = dp
            .pin_dir
            .or(file.pin_dir)
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/ballast"));
        if !pin_dir.is_absolute() {
            return Err(field("--pin-dir", "must be an absolute path"));
        }
        let weight_scale = dp
            .weight_scale
            .or(file.weight_scale)
            .unwrap_or(DEFAULT_SCALE);
        if !(1..=65_536).contains(&weight_scale) {
            return Err(field("--weight-scale", "must be in 1..=65536"));
        }

        let defaults = ProbeConfig::default();
        let probe = ProbeConfig {
            mode: p.probe_mode.or(file.probe_mode).unwrap_or(defaults.mode),
            interval: positive(
                "--probe-interval",
                p.probe_interval
                    .or(file.probe_interval)
                    .unwrap_or(defaults.interval),
            )?,
            timeout: positive(
                "--probe-timeout",
                p.probe_timeout
                    .or(file.probe_timeout)
                    .unwrap_or(defaults.timeout),
            )?,
            ewma_alpha: p
                .probe_ewma_alpha
                .or(file.probe_ewma_alpha)
                .unwrap_or(defaults.ewma_alpha),
            loss_window: p
                .probe_loss_window
                .or(file.probe_loss_window)
                .unwrap_or(defaults.loss_window),
            unhealthy_after: p
                .probe_unhealthy_after
                .or(file.probe_unhealthy_after)
                .unwrap_or(defaults.unhealthy_after),
            tcp_port: p
                .probe_tcp_port
                .or(file.probe_tcp_port)
                .unwrap_or(defaults.tcp_port),
        };
        if probe.timeout >= probe.interval {
            return Err(field(
                "--probe-timeout",
                format!(
                    "{:?} must be shorter than --probe-interval {:?}",
                    probe.timeout, probe.interval
                ),
            ));
        }
        if !(probe.ewma_alpha > 0.0 && probe.ewma_alpha <= 1.0) {
            return Err(field("--probe-ewma-alpha", "must be in (0, 1]"));
        }
        if probe.loss_window == 0 || probe.loss_window > 10_000 {
            return Err(field("--probe-loss-window", "must be in 1..=10000"));
        }
        if probe.unhealthy_after == 0 {
            return Err(field("--probe-unhealthy-after", "must be at least 1"));
        }
        if probe.tcp_port == 0 {
            return Err(field("--probe-tcp-port", "must not be 0"));
        }

        Ok(AgentConfig {
            local,
            node_name,
            broker,
            report_interval,
            discovery,
            cgroup,
            pin_dir,
            detach_on_exit: dp.detach_on_exit || file.detach_on_exit.unwrap_or(false),
            weight_scale,
            probe,
            metrics_addr: m
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9464))),
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
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let cg = tmp_cgroup();
        let cg_path = cg.path().to_str().expect("utf8");
        let file: FileConfig = serde_yaml::from_str(
            r#"
cluster_id: east
node_name: n1
probe_interval: 3s
probe_timeout: 1s
topology: /etc/ballast/topology.yaml
clusters:
  - { id: east, region: us-east-1, gateway: 127.0.0.1 }
  - { id: west, region: eu-west-1 }
"#,
        )
        .expect("file");
        let cli = parse(&[
            "--probe-interval",
            "250ms",
            "--probe-timeout",
            "100ms",
            "--cgroup",
            cg_path,
        ])
        .expect("flags");
        let c = cli.resolve_with(file).expect("valid");
        assert_eq!(c.local.id, "east");
        assert_eq!(c.local.region.as_deref(), Some("us-east-1"));
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.probe.interval, Duration::from_millis(250));
        assert_eq!(c.probe.timeout, Duration::from_millis(100));
        assert_eq!(c.probe.ewma_alpha, 0.3);
        assert_eq!(c.weight_scale, 4096);
        assert_eq!(
            c.discovery,
            DiscoveryConfig::Topology {
                path: "/etc/ballast/topology.yaml".into(),
                poll_interval: Duration::from_secs(2)
            }
        );
        assert!(c.broker.is_none());
        assert!(!c.detach_on_exit);
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
        let err = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args)
                .expect("parses")
                .resolve_with(FileConfig::default())
                .expect_err("invalid")
                .to_string()
        };
        assert!(err(&["--probe-timeout", "2s"]).starts_with("--probe-timeout"));
        assert!(err(&["--probe-ewma-alpha", "1.5"]).starts_with("--probe-ewma-alpha"));
        assert!(err(&["--broker", "http://b:1"]).starts_with("--broker"));
        assert!(err(&["--broker", "https://b:1"]).starts_with("--ca"));
        assert!(err(&["--discovery", "topology"]).starts_with("--topology"));
        assert!(err(&["--pin-dir", "rel"]).starts_with("--pin-dir"));
        assert!(err(&["--probe-loss-window", "0"]).starts_with("--probe-loss-window"));
        let e = parse(&["--cluster-id", "East", "--cgroup", cg_path])
            .expect("parses")
            .resolve_with(FileConfig::default())
            .expect_err("bad id")
            .to_string();
        assert!(e.starts_with("--cluster-id"), "{e}");
        // clap itself refuses what does not parse
        assert!(parse(&["--probe-interval", "soon"]).is_err());
        assert!(parse(&["--metrics-addr", "nowhere"]).is_err());
    }

    #[test]
    fn config_file_unknown_field_is_refused_with_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "cluster_id: east\nprobe_intervl: 2s\n").expect("write");
        let e = read_file(&path).expect_err("typo").to_string();
        assert!(e.contains("probe_intervl") && e.contains("line 2"), "{e}");
        std::fs::write(&path, "probe_interval: sometime\n").expect("write");
        let e = read_file(&path).expect_err("bad duration").to_string();
        assert!(e.contains("probe_interval") && e.contains("line 1"), "{e}");
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
                id: "west".into(),
                region: None,
                zone: None,
                provider: None,
                gateway: Some("127.0.0.2".parse().expect("ip")),
            }],
            ..FileConfig::default()
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
            c.broker.as_ref().map(|b| b.endpoint.as_str()),
            Some("https://127.0.0.1:7443")
        );
        assert!(c.detach_on_exit);
        let DiscoveryConfig::Kubernetes { clusters } = &c.discovery else {
            panic!("kubernetes expected without --topology")
        };
        assert_eq!(clusters.len(), 2);
        assert!(clusters
            .iter()
            .any(|c| c.id == "east" && c.gateway.is_some()));
    }
}
