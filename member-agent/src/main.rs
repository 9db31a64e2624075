//! `ballast-agent`: the member agent binary. `--help` explains every flag.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Context;
use ballast_agent::capacity::local_capacities;
use ballast_agent::config::{AgentConfig, Cli, DiscoveryConfig};
use ballast_agent::discovery::kubernetes::KubernetesDiscovery;
use ballast_agent::discovery::topology::TopologyDiscovery;
use ballast_agent::discovery::{CatalogWatch, Discovery};
use ballast_agent::metrics::{Metrics, ServiceLabels};
use ballast_agent::probe::{self, PeerTable, Prober};
use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cfg = cli.resolve().context("invalid configuration")?;
    run(cfg).await
}

async fn start_discovery(cfg: &AgentConfig) -> anyhow::Result<CatalogWatch> {
    Ok(match &cfg.discovery {
        DiscoveryConfig::Topology {
            path,
            poll_interval,
        } => {
            TopologyDiscovery {
                path: path.clone(),
                local: cfg.local.id.clone(),
                poll_interval: *poll_interval,
            }
            .start()
            .await?
        }
        DiscoveryConfig::Kubernetes { clusters } => {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes client (in-cluster config or KUBECONFIG)")?;
            KubernetesDiscovery {
                client,
                local: cfg.local.id.clone(),
                static_clusters: clusters.clone(),
                init_timeout: std::time::Duration::from_secs(60),
                debounce: std::time::Duration::from_millis(200),
            }
            .start()
            .await?
        }
    })
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(cluster = %cfg.local.id, node = %cfg.node_name, "starting");
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (addr, metrics_task) = metrics
        .clone()
        .spawn_server(cfg.metrics_addr, stopped(stop_rx.clone()))
        .await
        .with_context(|| format!("cannot serve metrics on {}", cfg.metrics_addr))?;
    tracing::info!(%addr, "metrics on /metrics");

    let discovery = start_discovery(&cfg).await.context("discovery")?;

    // probe targets follow the catalog
    let prober = Prober::new(cfg.probe.clone())?;
    tracing::info!(method = ?prober.method(), "probing peers");
    let mut peers = prober.subscribe();
    let (targets_tx, targets_rx) = watch::channel(discovery.current().probe_targets());
    let mut catalog_rx = discovery.catalog.clone();
    let targets_task = tokio::spawn(async move {
        while catalog_rx.changed().await.is_ok() {
            let t = catalog_rx.borrow_and_update().probe_targets();
            targets_tx.send_if_modified(|cur| {
                let changed = *cur != t;
                *cur = t;
                changed
            });
        }
    });
    let probe_task = tokio::spawn(prober.run(targets_rx));

    // metrics and the health rule follow the probe table
    let m = metrics.clone();
    let peers_task = tokio::spawn(async move {
        let mut prev = Arc::new(PeerTable::new());
        let mut prev_unhealthy = BTreeSet::new();
        while peers.changed().await.is_ok() {
            let table = peers.borrow_and_update().clone();
            m.observe_peers(&prev, &table);
            let unhealthy = probe::unhealthy(&table);
            if unhealthy != prev_unhealthy {
                // TODO(issue 4 part 2): re-expand installed weights without these clusters
                tracing::warn!(?unhealthy, "unhealthy destination clusters changed");
                prev_unhealthy = unhealthy;
            }
            prev = table;
        }
    });

    // capacity and discovery status, every report interval
    let m = metrics.clone();
    let mut status = discovery.status.clone();
    let catalog = discovery.catalog.clone();
    let report_interval = cfg.report_interval;
    let report_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(report_interval);
        let mut failures_seen = 0;
        loop {
            tick.tick().await;
            let st = status.borrow_and_update().clone();
            if st.refreshes_failed > failures_seen {
                m.discovery_failures
                    .inc_by(st.refreshes_failed - failures_seen);
                failures_seen = st.refreshes_failed;
            }
            let caps = local_capacities(&catalog.borrow());
            for (svc, cap) in &caps {
                m.service_capacity_rps
                    .get_or_create(&ServiceLabels {
                        service: svc.to_string(),
                    })
                    .set(cap.rps);
            }
            tracing::debug!(services = caps.len(), "capacity measured");
        }
    });

    if cfg.broker.is_none() {
        tracing::warn!("no --broker: measuring only, no weights will be installed");
    }
    // TODO(issue 4 part 2): broker session (Register, Report, WatchWeights, AckWeights) and
    // the BPF data plane (install, adopt pinned state, --detach-on-exit).

    shutdown_signal().await;
    tracing::info!(
        detach = cfg.detach_on_exit,
        "shutting down; steering state is left as it is"
    );
    let _ = stop_tx.send(true);
    for t in [targets_task, probe_task, peers_task, report_task] {
        t.abort();
    }
    drop(discovery);
    let _ = metrics_task.await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
