//! The steering loop: the agent's state machine between discovery, probes, the broker
//! session and the data plane. Decisions:
//!
//! - **One owner.** [`Steerer`] alone writes the data plane (through the [`DataPlane`]
//!   trait, so the state machine is tested with a fake, no root, no kernel); everything else
//!   talks to it through channels ([`SteerIo`]).
//! - **A batch is all or nothing in the kernel.** The updates of one broker batch are judged
//!   one by one ([`Steering::accept`]); the good ones are installed together. If the data
//!   plane fails, the previous weights are put back and every good update of the batch is
//!   refused as [`Refusal::DataPlane`].
//! - **Refusals are kept and retried.** The broker sends a service's weights again only when
//!   they change, so the newest refused update per service is kept: all of them are offered
//!   again when discovery changes, and those the data plane failed on also every
//!   [`SteerConfig::pending_retry`]. A retry refused the same way is not logged, counted or
//!   acknowledged again (the broker and the metrics already know).
//! - **Every verdict is acknowledged** with its generation (`applied`, or the refusal), and
//!   the highest applied generation is published for `WatchRequest.last_generation`.
//! - **Health is local.** A change of the unreachable peers re-expands the installed weights
//!   at once, without waiting for the broker.
//! - Every report interval the loop reads the counters, turns them into RPS and publishes a
//!   fresh [`ReportRequest`] ([`report::build_report`]) for the session to send.

pub mod report;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_bpf::{BackendCounter, InstalledService, ServiceSpec};
use ballast_proto::v1::{Ack, ReportRequest, WeightsUpdate};
use tokio::sync::{mpsc, watch};

use crate::capacity::local_capacities;
use crate::catalog::{Catalog, ClusterId, ServiceName};
use crate::install::{
    desired_specs, failed_backends, rps_between, Installer, Refusal, Steering, Verdict,
};
use crate::metrics::{FlowLabels, Metrics, ServiceLabels};
use crate::probe::{self, PeerTable};
use crate::service_probe::ServiceTimes;

/// What the steering loop needs from the data plane; [`Installer`] is the real one.
pub trait DataPlane: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Makes the data plane hold exactly `specs`; `Ok(false)` when nothing changed since the
    /// last successful call.
    fn apply(&mut self, specs: Vec<ServiceSpec>) -> Result<bool, Self::Error>;

    /// Connect counters per (service, backend): the RPS source.
    fn counters(&self) -> Result<Vec<BackendCounter>, Self::Error>;

    /// What is installed now (a previous agent's state, adopted on start).
    fn installed(&self) -> Result<Vec<InstalledService>, Self::Error>;

    /// Destroys the steered, established sockets to `backends` (their clients reconnect and
    /// are steered afresh); returns how many.
    fn destroy_sockets_to(
        &mut self,
        backends: &BTreeSet<std::net::SocketAddr>,
    ) -> Result<usize, Self::Error>;
}

impl DataPlane for Installer {
    type Error = crate::install::InstallError;

    fn apply(&mut self, specs: Vec<ServiceSpec>) -> Result<bool, Self::Error> {
        Installer::apply(self, specs)
    }

    fn counters(&self) -> Result<Vec<BackendCounter>, Self::Error> {
        Ok(self.dataplane().counters()?)
    }

    fn installed(&self) -> Result<Vec<InstalledService>, Self::Error> {
        Ok(self.dataplane().services()?)
    }

    fn destroy_sockets_to(
        &mut self,
        backends: &BTreeSet<std::net::SocketAddr>,
    ) -> Result<usize, Self::Error> {
        Installer::destroy_sockets_to(self, backends)
    }
}

/// How often updates the data plane failed to take are offered to it again by default.
pub const PENDING_RETRY: Duration = Duration::from_secs(30);

/// The loop's settings.
#[derive(Debug, Clone)]
pub struct SteerConfig {
    /// This cluster (acks and reports name it).
    pub cluster_id: ClusterId,
    pub node_name: String,
    /// Sum of the integer backend weights of one service.
    pub weight_scale: u32,
    /// How often counters are read and a report is published.
    pub report_interval: Duration,
    /// How often updates the data plane failed on are offered again ([`PENDING_RETRY`]).
    pub pending_retry: Duration,
    /// How long after a backend failed its established connections are closed
    /// ([`CLOSE_GRACE`]): requests in flight finish, long-lived connections are then closed.
    pub close_grace: Duration,
}

/// The default [`SteerConfig::close_grace`]: a short request in flight on a connection to a
/// backend that just turned unready (a pod terminating) completes within it; a long-lived
/// connection (keep-alive, gRPC, a database pool) is closed after it and reconnects.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The loop's channels.
pub struct SteerIo {
    /// Discovery's catalog.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// The probes' peer table.
    pub peers: watch::Receiver<Arc<PeerTable>>,
    /// Batches of updates from the broker session.
    pub updates: mpsc::Receiver<Vec<WeightsUpdate>>,
    /// Acknowledgements for the session to send.
    pub acks: mpsc::Sender<Ack>,
    /// The latest report, for the session to send.
    pub reports: watch::Sender<Option<ReportRequest>>,
    /// The highest generation installed.
    pub installed_generation: watch::Sender<u64>,
    /// The service times the service probes measured last ([`crate::service_probe`]).
    pub service_times: watch::Receiver<Arc<ServiceTimes>>,
}

/// A refused update kept for another try, with why it was refused.
#[derive(Debug, Clone)]
struct Pending {
    update: WeightsUpdate,
    refusal: Refusal,
}

/// The steering state machine over a data plane `D`.
pub struct Steerer<D> {
    cfg: SteerConfig,
    metrics: Metrics,
    plane: D,
    steering: Steering,
    io: SteerIo,
    /// The newest refused update per service.
    pending: BTreeMap<String, Pending>,
    last_counters: Option<(Instant, Vec<BackendCounter>)>,
    rps: BTreeMap<(ServiceName, ClusterId), crate::install::FlowRate>,
    /// What the data plane holds since the last successful apply (empty before the first).
    installed_specs: Vec<ServiceSpec>,
    /// Failed backends whose connections are closed at the instant (after the grace).
    closing: Vec<(Instant, BTreeSet<std::net::SocketAddr>)>,
}

impl<D: DataPlane> Steerer<D> {
    /// A loop over `plane`, starting from the weights it already holds (a restarted agent
    /// keeps steering as before until the broker speaks).
    pub fn new(cfg: SteerConfig, metrics: Metrics, plane: D, io: SteerIo) -> Self {
        let steering = match plane.installed() {
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
        Self {
            cfg,
            metrics,
            plane,
            steering,
            io,
            pending: BTreeMap::new(),
            last_counters: None,
            rps: BTreeMap::new(),
            installed_specs: Vec::new(),
            closing: Vec::new(),
        }
    }

    /// The broker weights in force.
    pub fn steering(&self) -> &Steering {
        &self.steering
    }

    /// The data plane.
    pub fn plane(&self) -> &D {
        &self.plane
    }

    /// The services with a refused update kept for another try, and why each was refused.
    pub fn pending(&self) -> impl Iterator<Item = (&str, &Refusal)> {
        self.pending.iter().map(|(s, p)| (s.as_str(), &p.refusal))
    }

    /// Recomputes the desired data-plane state and applies it if it changed.
    pub fn install(&mut self) -> Result<(), String> {
        let catalog = self.io.catalog.borrow().clone();
        let unhealthy = probe::unhealthy(&self.io.peers.borrow());
        let (specs, errors) = desired_specs(
            &catalog,
            &self.steering.weights,
            &unhealthy,
            self.cfg.weight_scale,
        );
        for e in &errors {
            tracing::warn!(error = %e, "service not installed");
        }
        match self.plane.apply(specs.clone()) {
            Ok(true) => {
                tracing::info!(?unhealthy, "data plane updated");
                let prev = std::mem::replace(&mut self.installed_specs, specs);
                self.close_failed(&prev, &catalog, &unhealthy);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Destroys the established connections steered to backends that failed since `prev`
    /// ([`failed_backends`]), so that long-lived clients reconnect to healthy ones.
    fn close_failed(
        &mut self,
        prev: &[ServiceSpec],
        catalog: &Catalog,
        unhealthy: &BTreeSet<ClusterId>,
    ) {
        let failed = failed_backends(prev, catalog, unhealthy);
        if failed.is_empty() {
            return;
        }
        tracing::info!(backends = ?failed, grace = ?self.cfg.close_grace, "backends failed: their connections close after the grace");
        self.closing
            .push((Instant::now() + self.cfg.close_grace, failed));
        if self.cfg.close_grace.is_zero() {
            self.close_due(Instant::now());
        }
    }

    /// When the next close is due, if one is.
    pub fn next_close(&self) -> Option<Instant> {
        self.closing.iter().map(|(at, _)| *at).min()
    }

    /// Closes the connections of the failed backends whose grace ended by `now`.
    pub fn close_due(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.closing)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.closing = later;
        let failed: BTreeSet<std::net::SocketAddr> =
            due.into_iter().flat_map(|(_, set)| set).collect();
        if failed.is_empty() {
            return;
        }
        match self.plane.destroy_sockets_to(&failed) {
            Ok(n) => {
                self.metrics.sockets_destroyed.inc_by(n as u64);
                tracing::info!(backends = ?failed, sockets = n, "closed connections to failed backends");
            }
            Err(e) => {
                self.metrics.socket_destroy_failures.inc();
                tracing::warn!(error = %e, backends = ?failed, "closing connections to failed backends failed");
            }
        }
    }

    /// Judges and installs one batch from the broker. `retried` holds, for updates offered
    /// again, why each was refused before: the same refusal again is not logged, counted or
    /// acknowledged a second time.
    pub fn on_batch(&mut self, batch: Vec<WeightsUpdate>, retried: &BTreeMap<String, Refusal>) {
        let catalog = self.io.catalog.borrow().clone();
        let unhealthy = probe::unhealthy(&self.io.peers.borrow());
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
        self.keep_refused(&batch, &verdicts);
        let now = ballast_types::now_ms();
        for (v, computed_at) in verdicts {
            let (applied, error) = match &v.result {
                Ok(()) => {
                    self.record_applied(&v, computed_at, now);
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
            if self
                .io
                .acks
                .try_send(Ack {
                    cluster_id: self.cfg.cluster_id.clone(),
                    node_name: self.cfg.node_name.clone(),
                    generation: v.generation,
                    service: v.service,
                    applied,
                    error,
                })
                .is_err()
            {
                tracing::debug!("ack dropped (no broker session, or its queue is full)");
            }
        }
    }

    /// Keeps the newest refused update per service; an applied one clears its service.
    fn keep_refused(&mut self, batch: &[WeightsUpdate], verdicts: &[(Verdict, i64)]) {
        for (u, (v, _)) in batch.iter().zip(verdicts) {
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
    }

    /// Metrics and the published generation for an applied update.
    fn record_applied(&self, v: &Verdict, computed_at_ms: i64, now_ms: i64) {
        self.metrics
            .installed_generation
            .get_or_create(&ServiceLabels {
                service: v.service.clone(),
            })
            .set(i64::try_from(v.generation).unwrap_or(i64::MAX));
        if computed_at_ms > 0 {
            self.metrics
                .update_lag_seconds
                .observe((now_ms - computed_at_ms).max(0) as f64 / 1e3);
        }
        self.io
            .installed_generation
            .send_if_modified(|g| std::mem::replace(g, (*g).max(v.generation)) != *g);
    }

    /// Offers pending (refused) updates again, as one batch: all of them after a discovery
    /// change, only those the data plane failed on when `timer_only`.
    pub fn retry_pending(&mut self, timer_only: bool) {
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
        self.on_batch(batch, &before);
    }

    /// Discovery changed: reinstall, then offer every pending update again.
    pub fn on_discovery_change(&mut self) {
        if let Err(e) = self.install() {
            tracing::error!(error = %e, "install after discovery change failed");
        }
        self.retry_pending(false);
    }

    /// Reads the counters, updates RPS and capacity metrics, publishes a fresh report.
    pub fn sample_and_report(&mut self) {
        let catalog = self.io.catalog.borrow().clone();
        match self.plane.counters() {
            Ok(now) => {
                let t = Instant::now();
                if let Some((t0, before)) = &self.last_counters {
                    let secs = t.duration_since(*t0).as_secs_f64();
                    self.rps = rps_between(before, &now, secs, &catalog);
                    for ((svc, dst), v) in &self.rps {
                        let labels = FlowLabels {
                            service: svc.to_string(),
                            destination: dst.clone(),
                        };
                        self.metrics
                            .service_rps
                            .get_or_create(&labels)
                            .set(v.connections);
                        self.metrics
                            .service_bytes_sent
                            .get_or_create(&labels)
                            .set(v.bytes_sent);
                        self.metrics
                            .service_bytes_received
                            .get_or_create(&labels)
                            .set(v.bytes_received);
                    }
                }
                self.last_counters = Some((t, now));
            }
            Err(e) => tracing::warn!(error = %e, "reading counters failed"),
        }
        for (svc, cap) in local_capacities(&catalog) {
            self.metrics
                .service_capacity_rps
                .get_or_create(&ServiceLabels {
                    service: svc.to_string(),
                })
                .set(cap.rps);
        }
        let report = report::build_report(
            &self.cfg.cluster_id,
            &self.cfg.node_name,
            &catalog,
            &self.io.peers.borrow(),
            &self.rps,
            &self.io.service_times.borrow(),
        );
        self.io.reports.send_replace(Some(report));
    }

    /// Runs until `stop` flips (or discovery or the probes go away); returns the data plane
    /// (for `--detach-on-exit`).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> D {
        if let Err(e) = self.install() {
            tracing::error!(error = %e, "first install failed");
        }
        let mut tick = tokio::time::interval(self.cfg.report_interval);
        let mut prev_peers = Arc::new(PeerTable::new());
        let mut prev_unhealthy = BTreeSet::new();
        let mut last_retry = Instant::now();
        loop {
            let next_close = self.next_close();
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => return self.plane,
                r = self.io.catalog.changed() => {
                    if r.is_err() { return self.plane; }
                    self.on_discovery_change();
                    last_retry = Instant::now();
                }
                r = self.io.peers.changed() => {
                    if r.is_err() { return self.plane; }
                    let table = self.io.peers.borrow_and_update().clone();
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
                Some(batch) = self.io.updates.recv() => self.on_batch(batch, &BTreeMap::new()),
                () = until(next_close) => self.close_due(Instant::now()),
                _ = tick.tick() => {
                    if last_retry.elapsed() >= self.cfg.pending_retry {
                        self.retry_pending(true);
                        last_retry = Instant::now();
                    }
                    self.sample_and_report();
                }
            }
        }
    }
}

/// Sleeps until `at`; never returns when there is none.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
