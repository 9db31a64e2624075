//! `ballast-agent`: the member agent binary. `--help` explains every flag.
//!
//! Only wiring: configuration, logs and the admin server (`ballast-runtime`), discovery,
//! probes, the broker session and the steering loop (`ballast_agent::steering`), then the
//! shutdown.

use std::time::Duration;

use anyhow::Context;
use ballast_agent::config::{AgentConfig, Cli, DiscoveryConfig};
use ballast_agent::discovery;
use ballast_agent::install::Installer;
use ballast_agent::lifecycle::{self, Decision};
use ballast_agent::metrics::Metrics;
use ballast_agent::peers;
use ballast_agent::prereq::{self, HostPaths};
use ballast_agent::probe::Prober;
use ballast_agent::session::{self, SessionConfig, SessionIo};
use ballast_agent::steering::{report, SteerConfig, SteerIo, Steerer, CLOSE_GRACE, PENDING_RETRY};
use ballast_runtime::{AdminServer, Readiness};
use clap::Parser;
use tokio::sync::{mpsc, watch};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    let cfg = cli.resolve().context("invalid configuration")?;
    run(cfg).await
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(cluster = %cfg.local.id, node = %cfg.node_name, "starting");
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let admin = AdminServer::bind(cfg.metrics_addr, metrics.registry(), ready.clone()).await?;
    tracing::info!(addr = %admin.local_addr(), "admin server: /metrics, /live, /ready");

    // missing host prerequisites are fatal, each named; the MCS CRDs are waited for
    prereq::require_host(&HostPaths::host(&cfg.cgroup, &cfg.pin_dir), &metrics)?;
    if matches!(cfg.discovery, DiscoveryConfig::Kubernetes { .. }) {
        let client = kube::Client::try_default()
            .await
            .context("Kubernetes client")?;
        tokio::select! {
            _ = prereq::wait_for_mcs(&client, &metrics, &ready, prereq::RECHECK) => {}
            () = ballast_runtime::shutdown_signal() => return admin.shutdown().await.map_err(Into::into),
        }
    }

    let discovery = discovery::start(&cfg.discovery, &cfg.local, &cfg.node_name)
        .await
        .context("discovery")?;
    let installer = Installer::open(&cfg.pin_dir, &cfg.cgroup).with_context(|| {
        format!(
            "data plane (pin dir {}, cgroup {}){}",
            cfg.pin_dir.display(),
            cfg.cgroup.display(),
            prereq::capability_hint()
        )
    })?;

    // probe targets follow the catalog; discovery failures go to the metrics
    let prober = Prober::new(cfg.probe.clone())?;
    tracing::info!(method = ?prober.method(), "probing peers");
    let peers = prober.subscribe();
    // peers: the broker's set (WatchPeers), the configuration overriding it per cluster
    let (peers_tx, peers_rx) = watch::channel(std::sync::Arc::new(Vec::new()));
    let (targets, targets_task) =
        peers::targets_following(discovery.catalog.clone(), peers_rx, metrics.clone());
    let probe_task = tokio::spawn(prober.run(targets));
    let status_task = metrics.follow_discovery_status(discovery.status.clone());
    let without_vip_task = metrics.follow_catalog(discovery.catalog.clone());

    // service times measured on the local endpoints of services with a probe path
    let (service_times_tx, service_times_rx) = watch::channel(std::sync::Arc::default());
    let service_probe_task = tokio::spawn(ballast_agent::service_probe::run(
        discovery.catalog.clone(),
        ballast_agent::service_probe::ServiceProbeConfig::default(),
        service_times_tx,
    ));
    let (updates_tx, updates_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = mpsc::channel(1024);
    let (reports_tx, reports_rx) = watch::channel(None);
    let (gen_tx, gen_rx) = watch::channel(0u64);
    let session_task = match &cfg.broker {
        Some(b) => {
            let scfg = SessionConfig {
                endpoints: b.endpoints.clone(),
                server_name: None,
                ca: b.ca.clone(),
                cert: b.cert.clone(),
                key: b.key.clone(),
                cluster: report::identity(&cfg.local, &discovery.current()),
                node_name: cfg.node_name.clone(),
                report_interval: cfg.report_interval,
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(15),
            };
            let io = SessionIo {
                reports: reports_rx,
                updates: updates_tx,
                acks: acks_rx,
                installed_generation: gen_rx,
                peers: peers_tx,
                metrics: metrics.clone(),
            };
            Some(tokio::spawn(session::run(scfg, io)))
        }
        None => {
            tracing::warn!("no --broker: steering with an even split over ready endpoints");
            None
        }
    };

    let steer = Steerer::new(
        SteerConfig {
            cluster_id: cfg.local.id.clone(),
            node_name: cfg.node_name.clone(),
            weight_scale: cfg.weight_scale,
            report_interval: cfg.report_interval,
            pending_retry: PENDING_RETRY,
            close_grace: CLOSE_GRACE,
        },
        metrics.clone(),
        installer,
        SteerIo {
            catalog: discovery.catalog.clone(),
            peers,
            updates: updates_rx,
            acks: acks_tx,
            reports: reports_tx,
            installed_generation: gen_tx,
            service_times: service_times_rx,
        },
    );
    let kubernetes = matches!(cfg.discovery, DiscoveryConfig::Kubernetes { .. });
    let owner = lifecycle::start_owner_watch(cfg.detach_on_exit, kubernetes).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let steer_task = tokio::spawn(steer.run(stop_rx));
    ready.set(true);

    ballast_runtime::shutdown_signal().await;
    ready.set(false);
    tracing::info!(detach = %cfg.detach_on_exit, "shutting down");
    let _ = stop_tx.send(true);
    for t in [
        targets_task,
        probe_task,
        status_task,
        without_vip_task,
        service_probe_task,
    ] {
        t.abort();
    }
    if let Some(t) = session_task {
        t.abort();
    }
    let installer = steer_task.await.context("steering task")?;
    match lifecycle::decide(cfg.detach_on_exit, kubernetes, owner.as_ref()).await {
        Decision::Detach(why) => {
            installer.detach().context("detaching the data plane")?;
            tracing::info!(%why, "programs detached, pins removed");
        }
        Decision::Keep(why) => {
            tracing::info!(%why, "steering left in place with the last weights");
        }
    }
    drop(discovery);
    admin.shutdown().await?;
    Ok(())
}
