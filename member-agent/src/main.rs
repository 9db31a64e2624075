//! `ballast-agent`: the member agent binary. `--help` explains every flag.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ballast_agent::capacity::local_capacities;
use ballast_agent::catalog::{Catalog, Cluster, ServiceName};
use ballast_agent::config::{AgentConfig, Cli, DiscoveryConfig};
use ballast_agent::discovery::kubernetes::KubernetesDiscovery;
use ballast_agent::discovery::topology::TopologyDiscovery;
use ballast_agent::discovery::{CatalogWatch, Discovery};
use ballast_agent::install::{desired_specs, rps_between, Installer, Refusal, Steering, Verdict};
use ballast_agent::metrics::{FlowLabels, Metrics, ServiceLabels};
use ballast_agent::probe::{self, PeerTable, Prober, Reachability};
use ballast_agent::session::{self, SessionConfig, SessionIo};
use ballast_proto::v1::{
    Ack, CapacitySample, ImportedServices, ReportRequest, RpsSample, RttSample, WeightsUpdate,
};
use clap::Parser;
use tokio::sync::{mpsc, watch};
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// This cluster's identity: flags/config over the catalog's entry.
fn identity(cfg: &AgentConfig, catalog: &Catalog) -> Cluster {
    let from_catalog = catalog.clusters.get(&cfg.local.id);
    let pick = |a: &Option<String>, b: Option<&Option<String>>| {
        a.clone().or_else(|| b.and_then(Clone::clone))
    };
    Cluster {
        id: cfg.local.id.clone(),
        region: pick(&cfg.local.region, from_catalog.map(|c| &c.region)),
        zone: pick(&cfg.local.zone, from_catalog.map(|c| &c.zone)),
        provider: pick(&cfg.local.provider, from_catalog.map(|c| &c.provider)),
        gateway: cfg.local.gateway.or(from_catalog.and_then(|c| c.gateway)),
    }
}

fn build_report(
    cfg: &AgentConfig,
    catalog: &Catalog,
    peers: &PeerTable,
    rps: &BTreeMap<(ServiceName, String), f64>,
) -> ReportRequest {
    let rtt = peers
        .iter()
        .filter_map(|(peer, st)| {
            let (reachable, rtt_ms) = match st.reachability {
                Reachability::Unknown => return None,
                Reachability::Reachable { rtt_ewma, .. } => (true, rtt_ewma.as_secs_f64() * 1e3),
                Reachability::Unreachable => (false, 0.0),
            };
            Some(RttSample {
                peer_cluster_id: peer.clone(),
                rtt_ms,
                loss_ratio: st.loss,
                reachable,
                measured_at_ms: 0,
            })
        })
        .collect();
    ReportRequest {
        cluster_id: cfg.local.id.clone(),
        node_name: cfg.node_name.clone(),
        measured_at_ms: now_ms(),
        rtt,
        rps: rps
            .iter()
            .map(|((svc, dst), rps)| RpsSample {
                service: svc.to_string(),
                destination_cluster_id: dst.clone(),
                rps: *rps,
                measured_at_ms: 0,
            })
            .collect(),
        capacity: local_capacities(catalog)
            .into_iter()
            .map(|(svc, cap)| CapacitySample {
                service: svc.to_string(),
                capacity_rps: cap.rps,
                measured_at_ms: 0,
            })
            .collect(),
        // every service discovery knows is one this cluster imports (steers): the broker
        // computes and sends weights for these only
        imports: Some(ImportedServices {
            services: catalog.services.keys().map(ToString::to_string).collect(),
        }),
    }
}

/// How often updates the data plane failed to take are offered to it again (every refused
/// update is also offered again when discovery changes).
const PENDING_RETRY: Duration = Duration::from_secs(30);

/// Everything the steering loop reads and writes.
struct Steer {
    cfg: AgentConfig,
    metrics: Metrics,
    installer: Installer,
    steering: Steering,
    catalog: watch::Receiver<Arc<Catalog>>,
    peers: watch::Receiver<Arc<PeerTable>>,
    updates: mpsc::Receiver<Vec<WeightsUpdate>>,
    acks: mpsc::Sender<Ack>,
    reports: watch::Sender<Option<ReportRequest>>,
    installed_generation: watch::Sender<u64>,
    /// The newest refused update per service with why it was refused, tried again when
    /// discovery changes, and every PENDING_RETRY when the data plane failed (it may take it
    /// now): the broker sends a service's weights again only when they change, so weights
    /// that came before discovery knew the service would otherwise wait for the next change.
    pending: BTreeMap<String, Pending>,
}

/// A refused update kept for another try.
struct Pending {
    update: WeightsUpdate,
    refusal: Refusal,
}

impl Steer {
    /// Recomputes the desired data-plane state and applies it if it changed.
    fn install(&mut self) -> Result<(), String> {
        let catalog = self.catalog.borrow().clone();
        let unhealthy = probe::unhealthy(&self.peers.borrow());
        let (specs, errors) = desired_specs(
            &catalog,
            &self.steering.weights,
            &unhealthy,
            self.cfg.weight_scale,
        );
        for e in &errors {
            tracing::warn!(error = %e, "service not installed");
        }
        match self.installer.apply(specs) {
            Ok(true) => {
                tracing::info!(?unhealthy, "data plane updated");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Judges and installs one batch from the broker. `retried` holds, for updates offered
    /// again, why each was refused before: the same refusal again is not logged, counted or
    /// acknowledged a second time.
    async fn on_batch(&mut self, batch: Vec<WeightsUpdate>, retried: &BTreeMap<String, Refusal>) {
        let catalog = self.catalog.borrow().clone();
        let unhealthy = probe::unhealthy(&self.peers.borrow());
        let before = self.steering.clone();
        // The update lag is observed for weights that changed what is installed: an unchanged
        // service the broker re-sends to mark a new generation carries its old computation
        // time.
        let mut verdicts: Vec<(Verdict, i64)> = batch
            .iter()
            .map(|u| {
                let unchanged = ServiceName::parse(&u.service)
                    .ok()
                    .and_then(|n| before.weights.get(&n))
                    .is_some_and(|old| old.same_weights(&u.weights));
                (
                    self.steering
                        .accept(&catalog, &unhealthy, self.cfg.weight_scale, u),
                    if unchanged { 0 } else { u.computed_at_ms },
                )
            })
            .collect();
        if let Err(e) = self.install() {
            // nothing of the batch stays: the previous weights are back in force
            self.steering = before;
            let _ = self.install();
            for (v, _) in &mut verdicts {
                if v.result.is_ok() {
                    v.result = Err(Refusal::DataPlane(e.clone()));
                }
            }
        }
        for (u, (v, _)) in batch.iter().zip(&verdicts) {
            match &v.result {
                Ok(()) => {
                    self.pending.remove(&u.service);
                }
                Err(refusal)
                    if self
                        .pending
                        .get(&u.service)
                        .is_none_or(|p| p.update.generation <= u.generation) =>
                {
                    let mut update = u.clone();
                    update.last_in_batch = false;
                    self.pending.insert(
                        u.service.clone(),
                        Pending {
                            update,
                            refusal: refusal.clone(),
                        },
                    );
                }
                Err(_) => {}
            }
        }
        let now = now_ms();
        for (v, computed_at) in verdicts {
            let (applied, error) = match &v.result {
                Ok(()) => {
                    self.metrics
                        .installed_generation
                        .get_or_create(&ServiceLabels {
                            service: v.service.clone(),
                        })
                        .set(i64::try_from(v.generation).unwrap_or(i64::MAX));
                    if computed_at > 0 {
                        self.metrics
                            .update_lag_seconds
                            .observe((now - computed_at).max(0) as f64 / 1e3);
                    }
                    self.installed_generation
                        .send_if_modified(|g| std::mem::replace(g, (*g).max(v.generation)) != *g);
                    (true, String::new())
                }
                Err(e) if retried.get(&v.service) == Some(e) => {
                    // refused as before: the broker and the metrics already know
                    tracing::debug!(service = %v.service, generation = v.generation, error = %e, "weights still refused");
                    continue;
                }
                Err(e) => {
                    self.metrics
                        .updates_refused
                        .get_or_create(&ServiceLabels {
                            service: v.service.clone(),
                        })
                        .inc();
                    tracing::warn!(service = %v.service, generation = v.generation, error = %e, "weights refused");
                    (false, e.to_string())
                }
            };
            let _ = self.acks.try_send(Ack {
                cluster_id: self.cfg.local.id.clone(),
                node_name: self.cfg.node_name.clone(),
                generation: v.generation,
                service: v.service,
                applied,
                error,
            });
        }
    }

    /// Offers pending (refused) updates again, as one batch: all of them after a discovery
    /// change, only those the data plane failed on when `timer_only`.
    async fn retry_pending(&mut self, timer_only: bool) {
        let (retry, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, p)| !timer_only || p.refusal.retry_on_timer());
        self.pending = keep;
        if retry.is_empty() {
            return;
        }
        tracing::info!(
            services = retry.len(),
            timer_only,
            "trying refused weights again"
        );
        let (batch, before): (Vec<_>, BTreeMap<_, _>) = retry
            .into_iter()
            .map(|(service, p)| (p.update, (service, p.refusal)))
            .unzip();
        self.on_batch(batch, &before).await;
    }

    /// Runs until `stop` flips; returns the installer (for --detach-on-exit).
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Installer {
        if let Err(e) = self.install() {
            tracing::error!(error = %e, "first install failed");
        }
        let mut tick = tokio::time::interval(self.cfg.report_interval);
        let mut last_counters: Option<(std::time::Instant, Vec<ballast_bpf::BackendCounter>)> =
            None;
        let mut rps = BTreeMap::new();
        let mut prev_peers = Arc::new(PeerTable::new());
        let mut prev_unhealthy = BTreeSet::new();
        let mut last_retry = std::time::Instant::now();
        loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => return self.installer,
                r = self.catalog.changed() => {
                    if r.is_err() { return self.installer; }
                    if let Err(e) = self.install() {
                        tracing::error!(error = %e, "install after discovery change failed");
                    }
                    self.retry_pending(false).await;
                    last_retry = std::time::Instant::now();
                }
                r = self.peers.changed() => {
                    if r.is_err() { return self.installer; }
                    let table = self.peers.borrow_and_update().clone();
                    self.metrics.observe_peers(&prev_peers, &table);
                    prev_peers = table.clone();
                    let unhealthy = probe::unhealthy(&table);
                    if unhealthy != prev_unhealthy {
                        // the health rule: re-expand now, without waiting for the broker
                        prev_unhealthy = unhealthy;
                        if let Err(e) = self.install() {
                            tracing::error!(error = %e, "install after health change failed");
                        }
                    }
                }
                Some(batch) = self.updates.recv() => self.on_batch(batch, &BTreeMap::new()).await,
                _ = tick.tick() => {
                    if last_retry.elapsed() >= PENDING_RETRY {
                        self.retry_pending(true).await;
                        last_retry = std::time::Instant::now();
                    }
                    let catalog = self.catalog.borrow().clone();
                    match self.installer.dataplane().counters() {
                        Ok(now) => {
                            let t = std::time::Instant::now();
                            if let Some((t0, before)) = &last_counters {
                                rps = rps_between(before, &now, t.duration_since(*t0).as_secs_f64(), &catalog);
                                for ((svc, dst), v) in &rps {
                                    self.metrics.service_rps.get_or_create(&FlowLabels {
                                        service: svc.to_string(),
                                        destination: dst.clone(),
                                    }).set(*v);
                                }
                            }
                            last_counters = Some((t, now));
                        }
                        Err(e) => tracing::warn!(error = %e, "reading counters failed"),
                    }
                    for (svc, cap) in local_capacities(&catalog) {
                        self.metrics.service_capacity_rps
                            .get_or_create(&ServiceLabels { service: svc.to_string() })
                            .set(cap.rps);
                    }
                    let report = build_report(&self.cfg, &catalog, &self.peers.borrow(), &rps);
                    self.reports.send_replace(Some(report));
                }
            }
        }
    }
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
    let installer = Installer::open(&cfg.pin_dir, &cfg.cgroup).with_context(|| {
        format!(
            "data plane (pin dir {}, cgroup {})",
            cfg.pin_dir.display(),
            cfg.cgroup.display()
        )
    })?;

    // probe targets follow the catalog
    let prober = Prober::new(cfg.probe.clone())?;
    tracing::info!(method = ?prober.method(), "probing peers");
    let peers = prober.subscribe();
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

    // discovery failures into metrics
    let m = metrics.clone();
    let mut status = discovery.status.clone();
    let status_task = tokio::spawn(async move {
        let mut seen = 0;
        while status.changed().await.is_ok() {
            let failed = status.borrow_and_update().refreshes_failed;
            if failed > seen {
                m.discovery_failures.inc_by(failed - seen);
                seen = failed;
            }
        }
    });

    let steering = match installer.dataplane().services() {
        Ok(installed) => {
            let s = Steering::adopt(&installed);
            if !s.weights.is_empty() {
                tracing::info!(services = s.weights.len(), "adopted the installed weights");
            }
            s
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the installed services; starting even");
            Steering::default()
        }
    };

    let (updates_tx, updates_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = mpsc::channel(1024);
    let (reports_tx, reports_rx) = watch::channel(None);
    let (gen_tx, gen_rx) = watch::channel(0u64);
    let session_task = match &cfg.broker {
        Some(b) => {
            let scfg = SessionConfig {
                endpoint: b.endpoint.clone(),
                server_name: None,
                ca: b.ca.clone(),
                cert: b.cert.clone(),
                key: b.key.clone(),
                cluster: identity(&cfg, &discovery.current()),
                node_name: cfg.node_name.clone(),
                report_interval: cfg.report_interval,
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(15),
            };
            Some(tokio::spawn(session::run(
                scfg,
                SessionIo {
                    reports: reports_rx,
                    updates: updates_tx,
                    acks: acks_rx,
                    installed_generation: gen_rx,
                },
            )))
        }
        None => {
            tracing::warn!("no --broker: steering with an even split over ready endpoints");
            None
        }
    };

    let steer = Steer {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        installer,
        steering,
        catalog: discovery.catalog.clone(),
        peers,
        updates: updates_rx,
        acks: acks_tx,
        reports: reports_tx,
        installed_generation: gen_tx,
        pending: BTreeMap::new(),
    };
    let steer_task = tokio::spawn(steer.run(stop_rx.clone()));

    shutdown_signal().await;
    tracing::info!(detach = cfg.detach_on_exit, "shutting down");
    let _ = stop_tx.send(true);
    for t in [targets_task, probe_task, status_task] {
        t.abort();
    }
    if let Some(t) = session_task {
        t.abort();
    }
    let installer = steer_task.await.context("steering task")?;
    if cfg.detach_on_exit {
        installer.detach().context("detaching the data plane")?;
        tracing::info!("programs detached, pins removed");
    } else {
        tracing::info!("steering left in place with the last weights");
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
