//! Command-line configuration of `serve` and `certs` (clap derive, every flag with `env =`).

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use ballast_types::{Params, Policy};

use crate::engine::{
    EngineConfig, DEFAULT_KEEP_GENERATIONS, DEFAULT_PRICES, DEFAULT_PUBLISH_THRESHOLD,
};
use crate::server::ServeConfig;
use crate::standby::ReuseportConfig;
use crate::tls::TlsFiles;

fn duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30s, 500ms, 2m)"))
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = duration_or_zero(s)?;
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

fn max_step(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_nan() || v <= 0.0 || v > 1.0 {
        return Err(format!("{v} is outside (0, 1]"));
    }
    Ok(v)
}

fn publish_threshold(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || !(0.0..=0.5).contains(&v) {
        return Err(format!(
            "{v} is outside [0, 0.5] (a weight move; 0 = publish every change)"
        ));
    }
    Ok(v)
}

fn price(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{v} is not a finite non-negative price"));
    }
    Ok(v)
}

/// `--egress-prices`: `builtin`, `none` or a file of operator rows over the built-in ones;
/// the whole file is checked before the broker starts.
fn region_prices(value: &str) -> Result<ballast_model::egress_prices::EgressPrices, String> {
    use ballast_model::egress_prices::EgressPrices;
    let builtin = || EgressPrices::builtin().map_err(|e| format!("--egress-prices builtin: {e}"));
    match value {
        "builtin" => builtin(),
        "none" => Ok(EgressPrices::none()),
        path => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--egress-prices {path}: cannot read: {e}"))?;
            builtin()?
                .with_operator_table(path, &text)
                .map_err(|e| format!("--egress-prices {e}"))
        }
    }
}

fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("{v} is not a finite positive number"));
    }
    Ok(v)
}

fn keep_generations(s: &str) -> Result<NonZeroU64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    NonZeroU64::new(v)
        .ok_or_else(|| "must be at least 1 (the current generation is always kept)".into())
}

/// mTLS flags shared by `serve` and `admin`.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signs the peers' certificates.
    #[arg(long, env = "BALLAST_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This side's certificate (PEM).
    #[arg(long, env = "BALLAST_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, env = "BALLAST_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Plain text, no TLS, no client identity (any caller may act as any cluster and use
    /// the admin service): only for local experiments, so `serve` accepts it only on a
    /// loopback `--listen` address.
    #[arg(long, env = "BALLAST_INSECURE")]
    pub insecure: bool,
}

impl TlsArgs {
    /// The TLS files, or `None` with `--insecure`.
    ///
    /// # Errors
    /// A missing flag or unreadable file, named.
    pub fn load(&self) -> Result<Option<TlsFiles>, String> {
        if self.insecure {
            if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
                return Err("--insecure: do not combine with --ca/--cert/--key".into());
            }
            return Ok(None);
        }
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone().ok_or_else(|| {
                format!("{flag} is required (mutual TLS), or pass --insecure for plain text")
            })
        };
        let (ca, cert, key) = (
            need(&self.ca, "--ca")?,
            need(&self.cert, "--cert")?,
            need(&self.key, "--key")?,
        );
        TlsFiles::read(&ca, &cert, &key).map(Some)
    }
}

/// `ballast-broker serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Logs: `--log-level`, `--log-format`.
    #[command(flatten)]
    pub log: ballast_runtime::LogArgs,
    /// gRPC listen address.
    #[arg(long, env = "BALLAST_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address: Prometheus `/metrics`, `/live` and `/ready`.
    #[arg(long, env = "BALLAST_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Store: `sqlite://PATH?mode=rwc` (created on first start) or `postgres://...`.
    #[arg(
        long,
        env = "BALLAST_DATABASE_URL",
        default_value = "sqlite://ballast-broker.db?mode=rwc"
    )]
    pub database: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Re-solve period (also re-solved, debounced, when inputs change).
    #[arg(long, env = "BALLAST_SOLVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub solve_interval: Duration,
    /// Wait after an input change before re-solving.
    #[arg(long, env = "BALLAST_DEBOUNCE", default_value = "20ms", value_parser = duration)]
    pub debounce: Duration,
    /// Measurements older than this are not used (the service keeps its previous weights,
    /// flagged stale).
    #[arg(long, env = "BALLAST_STALE_AFTER", default_value = "60s", value_parser = duration)]
    pub stale_after: Duration,
    /// Report interval told to agents.
    #[arg(long, env = "BALLAST_REPORT_INTERVAL", default_value = "10s", value_parser = duration)]
    pub report_interval: Duration,
    /// Herd damping: the largest change of one weight per round, in (0, 1]; 1 = undamped.
    #[arg(long, env = "BALLAST_MAX_STEP", default_value = "0.2", value_parser = max_step)]
    pub max_step: f64,
    /// Publication hysteresis, in [0, 0.5]: a service's weights are re-published only when
    /// some weight moves by more than this from the published one, or its status, policy,
    /// params, sources or destinations change; 0 = every change is published.
    #[arg(long, env = "BALLAST_PUBLISH_THRESHOLD", default_value_t = DEFAULT_PUBLISH_THRESHOLD, value_parser = publish_threshold)]
    pub publish_threshold: f64,
    /// Largest accepted gRPC message, bytes.
    #[arg(long, env = "BALLAST_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// A connection that has not completed the TLS handshake by then is closed.
    #[arg(long, env = "BALLAST_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 ping interval on every connection.
    #[arg(long, env = "BALLAST_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub keepalive_interval: Duration,
    /// A connection whose HTTP/2 ping is not answered within this is closed.
    #[arg(long, env = "BALLAST_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub keepalive_timeout: Duration,
    /// Open gRPC connections in all; a new one beyond is closed at once
    /// (`ballast_broker_connections_refused_total`).
    #[arg(long, env = "BALLAST_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Open gRPC connections from one IP address (a member cluster's agents behind one NAT
    /// address share it).
    #[arg(long, env = "BALLAST_MAX_CONNECTIONS_PER_PEER", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_peer: u32,
    /// Concurrent calls (HTTP/2 streams) on one connection; an agent uses 4.
    #[arg(long, env = "BALLAST_MAX_STREAMS_PER_CONNECTION", default_value_t = 64, value_parser = clap::value_parser!(u32).range(4..))]
    pub max_streams_per_connection: u32,
    /// Nodes (agents) per cluster: a Register or report of a new node beyond it is refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, env = "BALLAST_MAX_NODES_PER_CLUSTER", default_value_t = ballast_store::DEFAULT_MAX_NODES_PER_CLUSTER, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_nodes_per_cluster: u64,
    /// Distinct services one cluster's nodes declare they import (the union over its
    /// nodes): a report that would go beyond it is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "BALLAST_MAX_IMPORTS_PER_CLUSTER", default_value_t = ballast_store::DEFAULT_MAX_IMPORTS_PER_CLUSTER, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_imports_per_cluster: u64,
    /// Distinct services with a capacity or RPS sample, broker-wide: a report that would add
    /// services beyond it is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "BALLAST_MAX_SERVICES", default_value_t = crate::engine::DEFAULT_MAX_SERVICES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_services: u64,
    /// Demand (RPS) assumed for a source that has reported no RPS for a service yet.
    #[arg(long, env = "BALLAST_DEFAULT_DEMAND_RPS", default_value = "10", value_parser = positive)]
    pub default_demand_rps: f64,
    /// Retention: how many published weights generations the store keeps (the newest
    /// ones, >= 1); older generations, and their solver runs, are deleted after each publish.
    #[arg(long, env = "BALLAST_KEEP_GENERATIONS", value_name = "N", value_parser = keep_generations, default_value_t = DEFAULT_KEEP_GENERATIONS)]
    pub keep_generations: NonZeroU64,
    /// A cluster not heard from (registration or report) for this long is left out of the
    /// solve, as source and destination, until it registers again; `0s` = never.
    /// At least `--stale-after`.
    #[arg(long, env = "BALLAST_CLUSTER_EXPIRY", default_value = "10m", value_parser = duration_or_zero)]
    pub cluster_expiry: Duration,
    /// Cluster-wide policy until one is set with `admin policy set`.
    #[arg(long, env = "BALLAST_POLICY", value_enum, default_value_t = Policy::Optimized)]
    pub policy: Policy,
    /// Cluster-wide params until set with `admin policy set`.
    #[arg(long, env = "BALLAST_PARAMS", value_enum, default_value_t = Params::Mixed)]
    pub params: Params,
    /// Egress price, same zone (USD/GB).
    #[arg(long, env = "BALLAST_PRICE_SAME_ZONE", value_parser = price, default_value_t = DEFAULT_PRICES.same_zone)]
    pub price_same_zone: f64,
    /// Egress price, cross zone (USD/GB).
    #[arg(long, env = "BALLAST_PRICE_CROSS_ZONE", value_parser = price, default_value_t = DEFAULT_PRICES.cross_zone)]
    pub price_cross_zone: f64,
    /// Egress price, cross region (USD/GB).
    #[arg(long, env = "BALLAST_PRICE_CROSS_REGION", value_parser = price, default_value_t = DEFAULT_PRICES.cross_region)]
    pub price_cross_region: f64,
    /// Egress price, internet / another provider (USD/GB).
    #[arg(long, env = "BALLAST_PRICE_INTERNET", value_parser = price, default_value_t = DEFAULT_PRICES.internet)]
    pub price_internet: f64,
    /// Egress prices per (provider, source region, destination): `builtin` (the table
    /// compiled from the providers' public price lists, `broker/data/region_egress_prices.csv`),
    /// `none` (the four tiers above for every pair), or a CSV file of the same shape
    /// (`provider,from,to,usd_per_gb[,source]`) whose rows win over the built-in ones
    /// (negotiated rates). The tiers still price what the table does not cover (zones of one
    /// region, unknown regions or providers).
    #[arg(
        long,
        env = "BALLAST_EGRESS_PRICES",
        value_name = "builtin|none|FILE",
        default_value = "builtin"
    )]
    pub egress_prices: String,
    /// Hot standby on one host: bind the gRPC port with SO_REUSEPORT and steer it with an
    /// sk_reuseport BPF program (root or CAP_BPF + CAP_NET_ADMIN, kernel >= 5.14): new
    /// connections go to the process holding the SQLite lock, to a second `serve` on the same
    /// port and database only once the first is gone. Needs a fixed `--listen` port.
    #[arg(long, env = "BALLAST_REUSEPORT")]
    pub reuseport: bool,
    /// bpffs directory for the pinned program and socket array of `--reuseport` (created;
    /// shared by the processes of one port) [default: /sys/fs/bpf/ballast-broker-<port>].
    #[arg(
        long,
        env = "BALLAST_REUSEPORT_PIN_DIR",
        value_name = "DIR",
        requires = "reuseport"
    )]
    pub reuseport_pin_dir: Option<PathBuf>,
    /// `--reuseport` without the BPF program: plain SO_REUSEPORT, the kernel spreads new
    /// connections over both processes by hash, the waiting standby included (for comparison).
    #[arg(long, env = "BALLAST_REUSEPORT_NO_PROGRAM", requires = "reuseport")]
    pub reuseport_no_program: bool,
    /// Leader lease: a replica leads (solves and publishes) while it holds it; the leader
    /// renews it every third of it, the others try to take it as often, so a dead leader is
    /// replaced within about 4/3 of it. At least 1s (each lease call is bounded by a third of
    /// it) and at least 4 x `--debounce` (a round triggered by a report publishes within one
    /// renewal period).
    #[arg(long, env = "BALLAST_LEASE_TIME", default_value = "5s", value_parser = duration)]
    pub lease_time: Duration,
    /// This replica's name in the lease (and PostgreSQL's application_name); default
    /// `<hostname>-<pid>`.
    #[arg(long, env = "BALLAST_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How many broker replicas the operator runs on this store (more than 1 needs a
    /// PostgreSQL `--database`: one elected leader solves, every replica serves).
    #[arg(long, env = "BALLAST_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,
}

/// The smallest `--lease-time`.
pub const MIN_LEASE_TIME: Duration = Duration::from_secs(1);

/// Checks `--lease-time` against its rule (see the flag's help).
///
/// # Errors
/// The rule it breaks, naming the flags.
pub fn check_lease_time(lease: Duration, debounce: Duration) -> Result<(), String> {
    if lease < MIN_LEASE_TIME {
        return Err(format!(
            "--lease-time {} is shorter than {}: the leader renews every third of it and each \
             lease call must fit in that third",
            humantime::format_duration(lease),
            humantime::format_duration(MIN_LEASE_TIME)
        ));
    }
    if lease < debounce * 4 {
        return Err(format!(
            "--lease-time {} is shorter than 4 x --debounce {}: a triggered round must publish \
             within one renewal period (a third of the lease)",
            humantime::format_duration(lease),
            humantime::format_duration(debounce)
        ));
    }
    Ok(())
}

impl ServeArgs {
    /// The server configuration.
    ///
    /// # Errors
    /// Missing or unreadable TLS material, named.
    pub fn to_config(&self) -> Result<ServeConfig, String> {
        let tls = self.tls.load()?;
        if tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--insecure: plain text with no client identity is served on loopback only; \
                 --listen {} is not a loopback address (use mutual TLS: --ca/--cert/--key)",
                self.listen
            ));
        }
        if !self.cluster_expiry.is_zero() && self.cluster_expiry < self.stale_after {
            return Err(format!(
                "--cluster-expiry {} is shorter than --stale-after {}: use 0s (never) or at least the stale age",
                humantime::format_duration(self.cluster_expiry),
                humantime::format_duration(self.stale_after)
            ));
        }
        check_lease_time(self.lease_time, self.debounce)?;
        if self.replicas > 1 && self.database.starts_with("sqlite:") {
            return Err(format!(
                "--replicas {}: more than one replica needs a PostgreSQL --database \
                 (postgres://...); SQLite (--database {}) serves one process",
                self.replicas, self.database
            ));
        }
        let replica_id = match &self.replica_id {
            Some(id) if id.trim().is_empty() || id.len() > 200 => {
                return Err(format!(
                    "--replica-id {id:?}: must be 1 to 200 bytes, not blank"
                ));
            }
            Some(id) => id.clone(),
            None => crate::engine::default_replica_id(),
        };
        let reuseport = self.reuseport_config()?;
        let region_prices = std::sync::Arc::new(region_prices(&self.egress_prices)?);
        let mut c = ServeConfig::new(self.listen, self.database.clone(), tls);
        c.reuseport = reuseport;
        c.replica = crate::engine::ReplicaConfig {
            replica_id,
            lease: self.lease_time,
            force: false,
            slow_round: std::env::var("BALLAST_TEST_SLOW_ROUND_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        };
        c.replicas = self.replicas;
        c.metrics_addr = Some(self.metrics_addr);
        c.solve_interval = self.solve_interval;
        c.debounce = self.debounce;
        c.report_interval = self.report_interval;
        c.max_message_bytes = self.max_message_bytes;
        c.connections = crate::server::ConnectionSettings {
            tls_handshake_timeout: self.tls_handshake_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            limits: crate::listener::ConnectionLimits {
                max_connections: self.max_connections as usize,
                max_per_peer: self.max_connections_per_peer as usize,
            },
            max_streams_per_connection: self.max_streams_per_connection,
        };
        c.engine = EngineConfig {
            stale_after: self.stale_after,
            max_step: if self.max_step >= 1.0 {
                None
            } else {
                Some(self.max_step)
            },
            publish_threshold: self.publish_threshold,
            default_demand_rps: self.default_demand_rps,
            policy: self.policy,
            params: self.params,
            prices: ballast_model::PriceTable {
                same_zone: self.price_same_zone,
                cross_zone: self.price_cross_zone,
                cross_region: self.price_cross_region,
                internet: self.price_internet,
            },
            region_prices,
            keep_generations: self.keep_generations,
            cluster_expiry: (!self.cluster_expiry.is_zero()).then_some(self.cluster_expiry),
            store_limits: ballast_store::StoreLimits {
                max_nodes_per_cluster: self.max_nodes_per_cluster,
                max_imports_per_cluster: self.max_imports_per_cluster,
            },
            max_services: self.max_services,
        };
        Ok(c)
    }
}

impl ServeArgs {
    /// `--reuseport`'s settings, checked: a fixed port (the standby must bind the same
    /// one), a database a standby can take over (not in-memory), and a pin dir whose parent
    /// exists (bpffs mounted).
    fn reuseport_config(&self) -> Result<Option<ReuseportConfig>, String> {
        if !self.reuseport {
            return Ok(None);
        }
        if self.listen.port() == 0 {
            return Err(format!(
                "--reuseport needs a fixed port: --listen {} picks a free port per process, so a \
                 standby could not bind the same one",
                self.listen
            ));
        }
        if self.database.starts_with("sqlite:")
            && crate::standby::sqlite_file(&self.database).is_none()
        {
            return Err(format!(
                "--reuseport with the in-memory database {:?}: a standby could not take over its \
                 data; use a SQLite file or PostgreSQL",
                self.database
            ));
        }
        let pin_dir = self
            .reuseport_pin_dir
            .clone()
            .unwrap_or_else(|| crate::standby::default_pin_dir(self.listen.port()));
        let program = !self.reuseport_no_program;
        if program {
            let parent = pin_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .ok_or_else(|| {
                    format!(
                        "--reuseport-pin-dir {}: must be a directory inside a mounted bpffs",
                        pin_dir.display()
                    )
                })?;
            if !parent.is_dir() {
                return Err(format!(
                    "--reuseport-pin-dir {}: its parent {} does not exist (is bpffs mounted? \
                     mount -t bpf bpf /sys/fs/bpf)",
                    pin_dir.display(),
                    parent.display()
                ));
            }
        }
        Ok(Some(ReuseportConfig { pin_dir, program }))
    }
}

/// `ballast-broker certs`.
#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Directory to write the PEM files into (created).
    #[arg(long, env = "BALLAST_CERTS_OUT")]
    pub out: PathBuf,
    /// Cluster ids, comma-separated (one client certificate each).
    #[arg(
        long,
        env = "BALLAST_CERTS_CLUSTERS",
        value_delimiter = ',',
        required = true
    )]
    pub clusters: Vec<String>,
    /// Extra DNS names or IPs for the server certificate (besides localhost and 127.0.0.1).
    #[arg(long, env = "BALLAST_CERTS_SERVER_SAN", value_delimiter = ',')]
    pub server_san: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn insecure_is_refused_off_loopback_naming_the_flags() {
        for listen in ["0.0.0.0:7443", "10.1.2.3:7443", "[::]:7443"] {
            let cli = Cli::try_parse_from(["serve", "--insecure", "--listen", listen]).unwrap();
            let e = cli.serve.to_config().unwrap_err();
            assert!(e.contains("--insecure") && e.contains(listen), "{e}");
        }
        for listen in ["127.0.0.1:7443", "127.9.0.1:1", "[::1]:7443"] {
            let cli = Cli::try_parse_from(["serve", "--insecure", "--listen", listen]).unwrap();
            assert!(cli.serve.to_config().unwrap().tls.is_none(), "{listen}");
        }
    }

    #[test]
    fn publish_threshold_defaults_to_two_hundredths_and_is_validated() {
        let parse = |args: &[&str]| {
            let mut v = vec!["serve", "--insecure"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let cfg = |args: &[&str]| parse(args).unwrap().serve.to_config().unwrap();
        assert_eq!(cfg(&[]).engine.publish_threshold, 0.02);
        assert_eq!(
            cfg(&["--publish-threshold", "0"]).engine.publish_threshold,
            0.0
        );
        assert_eq!(
            cfg(&["--publish-threshold", "0.05"])
                .engine
                .publish_threshold,
            0.05
        );
        for bad in ["-0.01", "0.6", "NaN", "inf", "x"] {
            let arg = format!("--publish-threshold={bad}");
            let e = parse(&[&arg]).unwrap_err().to_string();
            assert!(e.contains("--publish-threshold"), "{bad}: {e}");
        }
    }

    #[test]
    fn egress_prices_are_builtin_none_or_an_operator_file_checked_whole() {
        let cfg = |args: &[&str]| {
            let mut v = vec!["serve", "--insecure"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().serve.to_config()
        };
        let price = |c: &ServeConfig| {
            c.engine
                .region_prices
                .price("aws", "sa-east-1", "aws", "us-east-1")
                .map(|m| m.usd_per_gb)
        };
        assert_eq!(price(&cfg(&[]).unwrap()), Some(0.138));
        assert_eq!(price(&cfg(&["--egress-prices", "none"]).unwrap()), None);
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("negotiated.csv");
        std::fs::write(&good, "provider,from,to,usd_per_gb\naws,*,*,0.004\n").unwrap();
        let c = cfg(&["--egress-prices", good.to_str().unwrap()]).unwrap();
        assert_eq!(price(&c), Some(0.004));
        let bad = dir.path().join("bad.csv");
        std::fs::write(
            &bad,
            "provider,from,to,usd_per_gb\naws,*,*,0.004\naws,us-east-1,*,-1\n",
        )
        .unwrap();
        let e = cfg(&["--egress-prices", bad.to_str().unwrap()]).unwrap_err();
        assert!(
            e.starts_with("--egress-prices ") && e.contains("row 3, usd_per_gb"),
            "{e}"
        );
        let e = cfg(&["--egress-prices", "/nonexistent/prices.csv"]).unwrap_err();
        assert!(e.contains("--egress-prices /nonexistent/prices.csv"), "{e}");
    }

    #[test]
    fn cluster_expiry_defaults_disables_with_zero_and_rejects_below_stale_after() {
        let cfg = |args: &[&str]| {
            let mut v = vec!["serve", "--insecure"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().serve.to_config()
        };
        assert_eq!(
            cfg(&[]).unwrap().engine.cluster_expiry,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            cfg(&["--cluster-expiry", "0s"])
                .unwrap()
                .engine
                .cluster_expiry,
            None
        );
        assert_eq!(
            cfg(&["--cluster-expiry", "2m", "--stale-after", "2m"])
                .unwrap()
                .engine
                .cluster_expiry,
            Some(Duration::from_secs(120))
        );
        let e = cfg(&["--cluster-expiry", "30s"]).unwrap_err();
        assert!(
            e.contains("--cluster-expiry 30s") && e.contains("--stale-after 1m"),
            "{e}"
        );
    }

    #[test]
    fn reuseport_needs_a_fixed_port_a_file_database_and_an_existing_pin_dir_parent() {
        let cfg = |args: &[&str]| {
            let mut v = vec!["serve", "--insecure"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().serve.to_config()
        };
        assert_eq!(cfg(&[]).unwrap().reuseport, None, "off by default");
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        let pins_s = pins.to_str().unwrap();
        let c = cfg(&["--reuseport", "--reuseport-pin-dir", pins_s]).unwrap();
        assert_eq!(
            c.reuseport,
            Some(ReuseportConfig {
                pin_dir: pins.clone(),
                program: true
            })
        );
        let c = cfg(&["--reuseport", "--listen", "127.0.0.1:7500"]).unwrap();
        assert_eq!(
            c.reuseport.unwrap().pin_dir,
            PathBuf::from("/sys/fs/bpf/ballast-broker-7500")
        );

        let e = cfg(&[
            "--reuseport",
            "--listen",
            "127.0.0.1:0",
            "--reuseport-pin-dir",
            pins_s,
        ])
        .unwrap_err();
        assert!(
            e.contains("--reuseport needs a fixed port") && e.contains("127.0.0.1:0"),
            "{e}"
        );

        let missing = dir.path().join("no-such-dir").join("pins");
        let e = cfg(&[
            "--reuseport",
            "--reuseport-pin-dir",
            missing.to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(
            e.contains("--reuseport-pin-dir")
                && e.contains("no-such-dir")
                && e.contains("does not exist"),
            "{e}"
        );
        // Without the program there are no pins: the pin dir is not checked.
        let c = cfg(&[
            "--reuseport",
            "--reuseport-no-program",
            "--reuseport-pin-dir",
            missing.to_str().unwrap(),
        ])
        .unwrap();
        assert!(!c.reuseport.unwrap().program);

        let e = cfg(&[
            "--reuseport",
            "--reuseport-pin-dir",
            pins_s,
            "--database",
            "sqlite::memory:",
        ])
        .unwrap_err();
        assert!(e.contains("in-memory"), "{e}");

        for flag in [
            "--reuseport-no-program",
            "--reuseport-pin-dir=/sys/fs/bpf/x",
        ] {
            let e = Cli::try_parse_from(["serve", "--insecure", flag])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--reuseport"), "{flag} without --reuseport: {e}");
        }
    }

    #[test]
    fn keep_generations_defaults_parses_and_rejects_zero_naming_the_flag() {
        let cli = Cli::try_parse_from(["serve", "--insecure"]).unwrap();
        assert_eq!(cli.serve.keep_generations, DEFAULT_KEEP_GENERATIONS);
        let c = cli.serve.to_config().unwrap();
        assert_eq!(c.engine.keep_generations.get(), 1000);

        let cli = Cli::try_parse_from(["serve", "--insecure", "--keep-generations", "7"]).unwrap();
        assert_eq!(
            cli.serve.to_config().unwrap().engine.keep_generations.get(),
            7
        );

        for bad in ["0", "-1", "x", ""] {
            let flag = format!("--keep-generations={bad}");
            let e = Cli::try_parse_from(["serve", "--insecure", flag.as_str()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--keep-generations"), "{bad:?}: {e}");
        }
        let e = Cli::try_parse_from(["serve", "--insecure", "--keep-generations", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn lease_replicas_and_replica_id_are_checked_naming_the_flags() {
        let cfg = |args: &[&str]| {
            let mut v = vec!["serve", "--insecure"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().serve.to_config()
        };
        let c = cfg(&[]).unwrap();
        assert_eq!(c.replica.lease, Duration::from_secs(5));
        assert_eq!(c.replicas, 1);
        assert!(c
            .replica
            .replica_id
            .ends_with(&format!("-{}", std::process::id())));
        let e = cfg(&["--lease-time", "500ms"]).unwrap_err();
        assert!(e.contains("--lease-time 500ms"), "{e}");
        let e = cfg(&["--lease-time", "2s", "--debounce", "1s"]).unwrap_err();
        assert!(
            e.contains("--lease-time 2s") && e.contains("--debounce 1s"),
            "{e}"
        );
        let e = cfg(&["--replicas", "3"]).unwrap_err();
        assert!(
            e.contains("--replicas 3") && e.contains("--database"),
            "{e}"
        );
        let c = cfg(&[
            "--replicas",
            "3",
            "--database",
            "postgres://u@h/db",
            "--replica-id",
            "r1",
        ])
        .unwrap();
        assert_eq!((c.replicas, c.replica.replica_id.as_str()), (3, "r1"));
        assert!(cfg(&["--replica-id", " "])
            .unwrap_err()
            .contains("--replica-id"));
    }
}
