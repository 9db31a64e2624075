//! The engine: turns the stored measurements into per-(service, source) weights and
//! publishes them as numbered generations.
//!
//! A pure core inside an I/O shell:
//! - [`plan`] (pure): a [`Snapshot`] of the store -> one problem per service ([`Inputs`]);
//! - [`round`] (pure): inputs + what is published -> the next entries ([`RoundOutcome`]),
//!   with publication hysteresis (`--publish-threshold`: a service whose weights moved by no
//!   more than the threshold and whose class did not change keeps its published entries);
//! - [`status`] (pure): a snapshot -> each cluster's status for operators;
//! - this module (the shell): reads snapshots, persists and publishes rounds, keeps the
//!   metrics, runs the solve loop, and offers the operations the gRPC layer calls
//!   ([`Engine::register`], [`Engine::ingest_report`], [`Engine::ack`],
//!   [`Engine::set_policy`], [`Engine::cluster_status`], [`Engine::explain`]).
//!
//! Retention: after every publish the store keeps the newest `keep_generations` generations
//! and prunes older ones ([`Store::prune_generations`]), and at most that many solver runs
//! ([`Store::prune_solver_runs`], also after rounds that publish nothing); the in-memory
//! current generation and the sequence after a restart do not depend on the pruned rows.
//! Import declarations of nodes not heard from for the cluster expiry are pruned at the
//! start of each round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ballast_model::{Explanation, Params, Policy};
use ballast_store::{
    AckRecord, AgentRecord, ClusterRecord, PolicyRecord, ReportRecord, SolverRunRecord, Store,
    StoreError,
};
pub use ballast_types::now_ms;
use ballast_types::WeightsStatus;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

pub mod config;
pub mod fit;
pub mod leadership;
pub mod peers;
pub mod plan;
pub mod published;
pub mod round;
pub mod savings;
pub mod snapshot;
pub mod status;
pub mod units;

pub use config::{
    EngineConfig, DEFAULT_CLUSTER_EXPIRY, DEFAULT_KEEP_GENERATIONS, DEFAULT_MAX_SERVICES,
    DEFAULT_PRICES, DEFAULT_PUBLISH_THRESHOLD,
};
pub use leadership::{default_replica_id, ReplicaConfig};
pub use peers::Peer;
pub use plan::{Inputs, ServicePlan};
pub use published::{Entry, Published, SourceEntries};
pub use round::{RoundMemory, RoundOutcome};
pub use snapshot::Snapshot;
pub use status::{ClusterStatus, NodeStatus};

/// Engine failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Model(#[from] ballast_model::ModelError),
    /// A report that would take the broker over `--max-services`; nothing was stored.
    #[error(
        "services: the report would make {would} distinct services with capacity or RPS: \
         over the limit of {limit} (the broker's --max-services); nothing of it was stored"
    )]
    TooManyServices { would: usize, limit: u64 },
}

/// What an agent says when it registers (already validated by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub cluster_id: String,
    pub region: String,
    pub zone: String,
    pub provider: String,
    pub gateway_address: String,
    pub node_name: String,
    pub agent_version: String,
}

/// What a registering agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub policy: Policy,
    pub params: Params,
    pub generation: u64,
    /// Every registered cluster id, sorted.
    pub known_cluster_ids: Vec<String>,
    /// The peer set after this registration.
    pub peers: Arc<Vec<Peer>>,
}

/// A change of the cluster-wide (`service` empty) or a per-service policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChange {
    /// Set either or both halves; the other keeps its effective value.
    Set {
        policy: Option<Policy>,
        params: Option<Params>,
    },
    /// Remove a per-service override.
    Clear,
}

/// Every cluster's status and the ages it was judged by.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterReport {
    pub clusters: Vec<ClusterStatus>,
    pub stale_after_ms: i64,
    /// 0 = clusters never expire.
    pub cluster_expiry_ms: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn gauge_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The shell's round state: what the pure round remembers, and the next run id.
struct RoundState {
    memory: RoundMemory,
    next_run_id: i64,
}

/// The engine (shared by the gRPC services and the solve loop).
pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    published: watch::Sender<Arc<Published>>,
    trigger: Notify,
    /// A follower's pending round request to the leader ([`Engine::trigger`]).
    kick: Notify,
    /// Set by [`Engine::trigger`], cleared when a round starts: a permit left in `trigger`
    /// by a trigger that an earlier round already covered does not cause another round.
    dirty: AtomicBool,
    round: tokio::sync::Mutex<RoundState>,
    known: RwLock<BTreeSet<String>>,
    /// The registered, unexpired clusters agents probe ([`peers::peers`]).
    peers: watch::Sender<Arc<Vec<Peer>>>,
    /// Serializes peer refreshes: each reads the store and publishes under this lock, so a
    /// refresh from an older read can never replace a newer one.
    peers_refresh: tokio::sync::Mutex<()>,
    loop_health: std::sync::Mutex<LoopHealth>,
    /// Service -> serving cluster -> capacity (RPS), as planned by the last round
    /// ([`Engine::solved_capacity`]); kept apart from the round lock so reading it never
    /// waits for a round.
    solved_capacity: RwLock<Arc<SolvedCapacity>>,
    /// The distinct services with a capacity or RPS sample: read at load, reconciled with
    /// the store every round, added to by each accepted report (`--max-services`).
    services: RwLock<ServiceCount>,
    /// How this replica takes part in leadership ([`leadership`]).
    replica: ReplicaConfig,
    /// Its role, and how recently the database answered.
    role: std::sync::Mutex<leadership::RoleState>,
    /// Whether it may serve weights as fresh ([`Engine::availability`]).
    available: watch::Sender<bool>,
    /// When it was loaded.
    started: tokio::time::Instant,
    /// Acks not yet written, by (cluster, node, service): a newer ack replaces an older one
    /// ([`Engine::ack`], written by [`Engine::flush_acks`]).
    pending_acks: std::sync::Mutex<HashMap<AckKey, AckRecord>>,
    /// Serializes flushes: a flush returns only once every ack taken before it began (by
    /// itself or by a flush it waited for) is written or back in `pending_acks`.
    ack_flush: tokio::sync::Mutex<()>,
    /// The unit each serving cluster states each service's capacity in ([`units`]).
    load_units: RwLock<units::LoadUnits>,
    /// Prices per direction as of the last full snapshot this replica read (for the egress
    /// metrics; `None` until one was read).
    egress_book: RwLock<Option<Arc<savings::EgressBook>>>,
    /// When each (cluster, node)'s previous report reached this replica (egress metrics).
    last_report_at: std::sync::Mutex<HashMap<(String, String), Instant>>,
}

/// The longest window one report's byte rates are integrated over for the egress metrics.
const MAX_EGRESS_WINDOW: Duration = Duration::from_secs(60);

/// The key of an ack: (cluster, node, service).
type AckKey = (String, String, String);

/// How often the ack flusher ([`Engine::flush_acks_every`]) writes the pending acks.
pub const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The services counted against `--max-services`.
#[derive(Debug, Default)]
struct ServiceCount {
    /// Every counted service.
    known: BTreeSet<String>,
    /// Those reserved since the current round began reading the store: a reconcile from
    /// that read keeps them (the read may not show them yet).
    since_read: BTreeSet<String>,
    /// Those reserved in the round before: their reports may still have been storing when
    /// this round's read began, so this round keeps them too.
    before_read: BTreeSet<String>,
}

/// What the solve loop ([`Engine::run`]) last did, for `/ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopHealth {
    /// The loop is running (set when it starts, cleared when it ends).
    pub running: bool,
    /// When its last round completed (`None`: none yet).
    pub last_round_ok_ms: Option<i64>,
    /// The error of its last round, when that round failed.
    pub last_error: Option<String>,
}

/// Service -> serving cluster -> the capacity (RPS) a round solved with.
pub type SolvedCapacity = BTreeMap<String, BTreeMap<String, f64>>;

/// The capacities `inputs` plan with, per service.
fn capacities(inputs: &Inputs) -> SolvedCapacity {
    inputs
        .services
        .iter()
        .map(|(svc, plan)| {
            let caps = plan
                .problem
                .services
                .iter()
                .flat_map(|s| s.capacity_rps.iter())
                .map(|(c, v)| (c.clone(), *v))
                .collect();
            (svc.clone(), caps)
        })
        .collect()
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

/// The generation `generation` as stored rows: one entry per (service, source). A stored
/// status, policy or params that does not parse reads as `degraded` / the configured value.
fn published_of(
    rows: Vec<ballast_store::WeightRecord>,
    generation: u64,
    cfg: &EngineConfig,
) -> Published {
    let mut entries: BTreeMap<(String, String), Entry> = BTreeMap::new();
    let mut created = 0;
    for w in rows {
        created = created.max(w.computed_at_ms);
        let e = entries
            .entry((w.service.clone(), w.src.clone()))
            .or_insert_with(|| Entry {
                weights: BTreeMap::new(),
                status: w.status.parse().unwrap_or(WeightsStatus::Degraded),
                reason: w.reason.clone(),
                policy: w.policy.parse().unwrap_or(cfg.policy),
                params: w.params.parse().unwrap_or(cfg.params),
                computed_at_ms: w.computed_at_ms,
            });
        e.weights.insert(w.dst, w.weight);
    }
    Published::new(generation, created, entries)
}

/// The published weights and their statuses into the metrics.
fn mirror_published(metrics: &Metrics, published: &Published) {
    metrics.observe_published(
        published.entries.iter().map(|((service, source), e)| {
            ((service.as_str(), source.as_str()), e.status, &e.weights)
        }),
    );
}

impl Engine {
    /// Loads the last published generation and the known clusters from the store, and
    /// leads at once ([`ReplicaConfig::embedded`]: the lease taken by force).
    ///
    /// # Errors
    /// A store error.
    pub async fn load(
        store: Store,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        Self::load_replica(store, cfg, metrics, ReplicaConfig::embedded()).await
    }

    /// [`Engine::load`] as one replica of several: with `force` it takes the lease at once
    /// (SQLite), otherwise it starts as a follower and [`Engine::lead`] elects it.
    ///
    /// # Errors
    /// A store error.
    pub async fn load_replica(
        store: Store,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
        replica: ReplicaConfig,
    ) -> Result<Self, EngineError> {
        let store = store.with_limits(cfg.store_limits);
        let services = store.services().await?;
        let last = store.last_generation().await?;
        let generation = u64::try_from(last).unwrap_or(0);
        let published = published_of(store.weights_of(last).await?, generation, &cfg);
        mirror_published(&metrics, &published);
        info!(
            generation,
            entries = published.entries.len(),
            "loaded last published generation"
        );
        metrics
            .generation
            .set(gauge(usize::try_from(generation).unwrap_or(usize::MAX)));
        let known: BTreeSet<String> = store
            .clusters()
            .await?
            .into_iter()
            .map(|c| c.cluster_id)
            .collect();
        metrics.clusters.set(gauge(known.len()));
        let next_run_id = store.last_run_id().await? + 1;
        let (published, _) = watch::channel(Arc::new(published));
        let snap = Snapshot {
            clusters: store.clusters().await?,
            agents: store.agents().await?,
            ..Snapshot::default()
        };
        let expired = plan::expired_clusters(&snap, &cfg, now_ms());
        let mut load_units = units::LoadUnits::default();
        load_units.reconcile(
            &store.capacity().await?,
            now_ms().saturating_sub(millis(cfg.stale_after)),
        );
        let (peers, _) = watch::channel(Arc::new(peers::peers(&snap.clusters, &expired)));
        let listening = store.generation_channel().is_some();
        let started = tokio::time::Instant::now();
        let force = replica.force;
        let engine = Self {
            store,
            cfg,
            metrics,
            published,
            trigger: Notify::new(),
            kick: Notify::new(),
            dirty: AtomicBool::new(false),
            round: tokio::sync::Mutex::new(RoundState {
                memory: RoundMemory::default(),
                next_run_id,
            }),
            known: RwLock::new(known),
            peers,
            peers_refresh: tokio::sync::Mutex::new(()),
            loop_health: std::sync::Mutex::new(LoopHealth::default()),
            solved_capacity: RwLock::new(Arc::default()),
            load_units: RwLock::new(load_units),
            egress_book: RwLock::new(None),
            last_report_at: std::sync::Mutex::new(HashMap::new()),
            services: RwLock::new(ServiceCount {
                known: services,
                since_read: BTreeSet::new(),
                before_read: BTreeSet::new(),
            }),
            replica,
            role: std::sync::Mutex::new(leadership::RoleState {
                last_db_ok: Some(started),
                listener_down_since: listening.then_some(started),
                ..leadership::RoleState::default()
            }),
            available: watch::channel(true).0,
            started,
            pending_acks: std::sync::Mutex::new(HashMap::new()),
            ack_flush: tokio::sync::Mutex::new(()),
        };
        if force {
            engine.acquire_forced().await?;
        } else {
            // A follower names the leader's term from the start.
            engine.seen_term(engine.store.lease().await?.term);
        }
        Ok(engine)
    }

    /// This replica's leadership settings.
    #[must_use]
    pub fn replica(&self) -> &ReplicaConfig {
        &self.replica
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The metrics.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The latest published generation.
    #[must_use]
    pub fn current(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    /// A receiver that sees every new generation.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// The current peer set (registered, unexpired clusters, sorted by id).
    #[must_use]
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        self.peers.borrow().clone()
    }

    /// A receiver that sees every change of the peer set.
    #[must_use]
    pub fn subscribe_peers(&self) -> watch::Receiver<Arc<Vec<Peer>>> {
        self.peers.subscribe()
    }

    /// Reads the registered clusters and replaces the peer set when it differs (watchers
    /// wake only on a change).
    async fn refresh_peers(&self) -> Result<(), EngineError> {
        let _serial = self.peers_refresh.lock().await;
        let snap = Snapshot {
            clusters: self.store.clusters().await?,
            agents: self.store.agents().await?,
            ..Snapshot::default()
        };
        let expired = plan::expired_clusters(&snap, &self.cfg, now_ms());
        // Clusters registered through another replica become known here too.
        for c in &snap.clusters {
            self.add_known(&c.cluster_id);
        }
        let next = peers::peers(&snap.clusters, &expired);
        self.peers.send_if_modified(|cur| {
            if **cur == next {
                false
            } else {
                *cur = Arc::new(next);
                true
            }
        });
        Ok(())
    }

    /// What the solve loop last did.
    #[must_use]
    pub fn loop_health(&self) -> LoopHealth {
        self.loop_health
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn record_loop(&self, f: impl FnOnce(&mut LoopHealth)) {
        match self.loop_health.lock() {
            Ok(mut h) => f(&mut h),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Asks for a (debounced) round: this replica's solve loop, and, on a follower, the
    /// leader's (a round request on the store's channel, at most one per
    /// [`leadership::KICK_GAP`]), so an input a follower received is solved at once, not at
    /// the leader's next solve interval.
    pub fn trigger(&self) {
        self.trigger_local();
        if self.leading().is_none() && self.store.generation_channel().is_some() {
            self.kick.notify_one();
        }
    }

    /// Asks this replica's solve loop for a (debounced) round.
    pub(crate) fn trigger_local(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.trigger.notify_one();
    }

    /// Another serving cluster that states `service`'s capacity, fresh as of `now_ms`, in a
    /// unit other than `unit` ([`units::LoadUnits::conflict`]).
    #[must_use]
    pub fn load_unit_conflict(
        &self,
        service: &str,
        cluster: &str,
        unit: ballast_types::LoadUnit,
        now_ms: i64,
    ) -> Option<(String, ballast_types::LoadUnit)> {
        let cut = now_ms.saturating_sub(millis(self.cfg.stale_after));
        self.load_units
            .read()
            .ok()?
            .conflict(service, cluster, unit, cut)
    }

    /// Whether a cluster is registered.
    #[must_use]
    pub fn is_known(&self, cluster_id: &str) -> bool {
        self.known
            .read()
            .map(|k| k.contains(cluster_id))
            .unwrap_or(false)
    }

    /// Every registered cluster id, sorted.
    #[must_use]
    pub fn known(&self) -> Vec<String> {
        self.known
            .read()
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn add_known(&self, cluster_id: &str) -> bool {
        let Ok(mut k) = self.known.write() else {
            return false;
        };
        let new = k.insert(cluster_id.to_string());
        self.metrics.clusters.set(gauge(k.len()));
        new
    }

    /// Registers (or re-registers) a cluster and one of its agents, and asks for a round.
    ///
    /// # Errors
    /// A store error (then nothing is registered).
    pub async fn register(&self, r: Registration) -> Result<Registered, EngineError> {
        let now = now_ms();
        self.store
            .register(
                &ClusterRecord {
                    cluster_id: r.cluster_id.clone(),
                    region: r.region,
                    zone: r.zone,
                    provider: r.provider,
                    gateway_address: r.gateway_address,
                    registered_at_ms: now,
                    updated_at_ms: now,
                },
                &AgentRecord {
                    cluster_id: r.cluster_id.clone(),
                    node_name: r.node_name.clone(),
                    agent_version: r.agent_version,
                    registered_at_ms: now,
                    last_report_ms: 0,
                    acked_generation: 0,
                },
            )
            .await?;
        if self.add_known(&r.cluster_id) {
            info!(cluster = %r.cluster_id, node = %r.node_name, "cluster registered");
        }
        self.refresh_peers().await?;
        self.trigger();
        let (policy, params) = self.policy_of("").await?;
        Ok(Registered {
            policy,
            params,
            generation: self.current().generation,
            known_cluster_ids: self.known(),
            peers: self.peers(),
        })
    }

    /// Stores one validated report (atomically) and asks for a round.
    ///
    /// # Errors
    /// A store error (then nothing of the report is stored).
    pub async fn ingest_report(&self, report: &ReportRecord) -> Result<(), EngineError> {
        self.reserve_services(report)?;
        self.store.store_report(report).await?;
        if !report.capacity.is_empty() {
            if let Ok(mut u) = self.load_units.write() {
                u.note(&report.capacity);
            }
        }
        self.account_egress(report);
        self.metrics.reports.inc();
        debug!(cluster = %report.cluster_id, node = %report.node_name, "report stored");
        self.trigger();
        Ok(())
    }

    /// Adds a report's bytes and their cost to the egress metrics: its byte rates over the
    /// time since the node's previous report at this replica (at most [`MAX_EGRESS_WINDOW`];
    /// a node's first report here only starts the clock).
    fn account_egress(&self, report: &ReportRecord) {
        let now = Instant::now();
        let window = {
            let Ok(mut last) = self.last_report_at.lock() else {
                return;
            };
            last.insert((report.cluster_id.clone(), report.node_name.clone()), now)
                .map(|t| now.duration_since(t).min(MAX_EGRESS_WINDOW))
        };
        let Some(window) = window else { return };
        let secs = window.as_secs_f64();
        let book = self.egress_book.read().ok().and_then(|b| b.clone());
        for r in &report.rps {
            let bytes = (r.bytes_sent_per_s + r.bytes_received_per_s) * secs;
            if bytes <= 0.0 {
                continue;
            }
            let labels = crate::metrics::EgressLabels {
                service: r.service.clone(),
                src: r.src.clone(),
                dst: r.dst.clone(),
            };
            self.metrics
                .egress_bytes
                .get_or_create(&labels)
                .inc_by(bytes);
            if let Some(book) = &book {
                let usd =
                    book.usd_per_hour(&r.src, &r.dst, r.bytes_sent_per_s, r.bytes_received_per_s)
                        * secs
                        / 3600.0;
                self.metrics.egress_usd.get_or_create(&labels).inc_by(usd);
            }
        }
    }

    /// Keeps the prices of `snap` for the egress metrics.
    fn keep_egress_book(&self, snap: &Snapshot) {
        let book = Arc::new(savings::EgressBook::from_snapshot(snap, &self.cfg));
        if let Ok(mut b) = self.egress_book.write() {
            *b = Some(book);
        }
    }

    /// Egress spent at the measured bytes against round-robin's, as of now
    /// ([`savings::savings`]), for every service or only `only`.
    ///
    /// # Errors
    /// A store error.
    pub async fn savings(&self, only: Option<&str>) -> Result<savings::Savings, EngineError> {
        let now = now_ms();
        let snap = Snapshot::read(&self.store, self.imports_cut(now)).await?;
        self.keep_egress_book(&snap);
        let book = savings::EgressBook::from_snapshot(&snap, &self.cfg);
        Ok(savings::savings(&snap, &self.cfg, &book, now, only))
    }

    /// Refuses a report whose new services would take the broker over `--max-services`,
    /// and otherwise counts them (before the store: concurrent reports cannot both pass;
    /// a report that then fails to store leaves its names until the next round reconciles).
    fn reserve_services(&self, report: &ReportRecord) -> Result<(), EngineError> {
        let mut count = match self.services.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let ServiceCount {
            known, since_read, ..
        } = &mut *count;
        let new: BTreeSet<&str> = report
            .capacity
            .iter()
            .map(|c| c.service.as_str())
            .chain(report.rps.iter().map(|r| r.service.as_str()))
            .filter(|s| !known.contains(*s))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let would = known.len() + new.len();
        if u64::try_from(would).unwrap_or(u64::MAX) > self.cfg.max_services {
            warn!(
                cluster = %report.cluster_id,
                node = %report.node_name,
                would,
                limit = self.cfg.max_services,
                "report refused: over --max-services"
            );
            return Err(EngineError::TooManyServices {
                would,
                limit: self.cfg.max_services,
            });
        }
        for s in new {
            known.insert(s.to_owned());
            since_read.insert(s.to_owned());
        }
        Ok(())
    }

    /// Takes an agent's acknowledgement: kept in memory (replacing a pending one of its
    /// (cluster, node, service)) until the next [`Engine::flush_acks`], which the flusher
    /// ([`Engine::flush_acks_every`]) runs every [`ACK_FLUSH_INTERVAL`] and every reader
    /// of acks runs first.
    ///
    /// # Errors
    /// None today (kept fallible for the callers).
    #[allow(clippy::unused_async)]
    pub async fn ack(&self, ack: &AckRecord) -> Result<(), EngineError> {
        let key = (
            ack.cluster_id.clone(),
            ack.node_name.clone(),
            ack.service.clone(),
        );
        self.pending_acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, ack.clone());
        Ok(())
    }

    /// Writes every pending ack in one transaction ([`Store::ack_many`]) and returns how
    /// many. On return, every ack taken before the call is in the store (or the error is
    /// returned). On failure the acks are kept for the next flush, except where a newer
    /// ack of the same key arrived meanwhile (the newer one wins).
    ///
    /// # Errors
    /// A store error.
    pub async fn flush_acks(&self) -> Result<usize, EngineError> {
        let _serial = self.ack_flush.lock().await;
        let batch: Vec<AckRecord> = std::mem::take(
            &mut *self
                .pending_acks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_values()
        .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.store.ack_many(&batch).await {
            Ok(()) => {
                self.metrics.acks_flushed.inc_by(batch.len() as u64);
                debug!(acks = batch.len(), "acks written");
                Ok(batch.len())
            }
            Err(e) => {
                let mut pending = self
                    .pending_acks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for a in batch {
                    let key = (a.cluster_id.clone(), a.node_name.clone(), a.service.clone());
                    pending.entry(key).or_insert(a);
                }
                Err(e.into())
            }
        }
    }

    /// How many acks wait for the next flush.
    #[must_use]
    pub fn pending_acks(&self) -> usize {
        self.pending_acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The ack flusher: [`Engine::flush_acks`] every `interval` until `shutdown` turns
    /// true, then a last flush. A failed flush is logged and retried on the next tick.
    pub async fn flush_acks_every(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(e) = self.flush_acks().await {
                warn!(error = %e, pending = self.pending_acks(), "writing acks failed; retried");
            }
        }
        if let Err(e) = self.flush_acks().await {
            warn!(error = %e, pending = self.pending_acks(), "writing acks at shutdown failed");
        }
    }

    /// The effective (policy, params) of a service (`""` = cluster-wide).
    ///
    /// # Errors
    /// A store error.
    pub async fn policy_of(&self, service: &str) -> Result<(Policy, Params), EngineError> {
        let rows = self.store.policies().await?;
        Ok(plan::resolve_policy(&rows, service, &self.cfg))
    }

    /// Changes the cluster-wide (`service` empty) or a service's policy, asks for a round
    /// and returns the effective (policy, params) afterwards.
    ///
    /// # Errors
    /// A store error (then nothing is changed).
    pub async fn set_policy(
        &self,
        service: &str,
        change: PolicyChange,
    ) -> Result<(Policy, Params), EngineError> {
        match change {
            PolicyChange::Clear => {
                self.store.delete_policy(service).await?;
            }
            PolicyChange::Set { policy, params } => {
                let (cur_policy, cur_params) = self.policy_of(service).await?;
                let row = PolicyRecord {
                    scope: service.to_owned(),
                    policy: policy.unwrap_or(cur_policy).to_string(),
                    params: params.unwrap_or(cur_params).to_string(),
                };
                self.store.set_policy(&row, now_ms()).await?;
            }
        }
        let (p, q) = self.policy_of(service).await?;
        info!(service = %service, policy = %p, params = %q, "policy set");
        self.trigger();
        Ok((p, q))
    }

    /// Every registered cluster's status, as of now. With `import_names` false the imports
    /// are counted in the database, not read ([`ClusterStatus::imports_count`]; the sets are
    /// empty).
    ///
    /// # Errors
    /// A store error (also from writing the pending acks).
    pub async fn cluster_status(&self, import_names: bool) -> Result<ClusterReport, EngineError> {
        // The acked generations are read from the store: the pending acks first.
        self.flush_acks().await?;
        let now = now_ms();
        let snap =
            Snapshot::read_for_status(&self.store, self.imports_cut(now), import_names).await?;
        Ok(ClusterReport {
            clusters: status::cluster_status(&snap, &self.cfg, now),
            stale_after_ms: millis(self.cfg.stale_after),
            cluster_expiry_ms: self.cfg.cluster_expiry.map_or(0, millis),
        })
    }

    /// Builds every service's problem from the store, as of `now_ms` ([`plan::plan`]).
    ///
    /// # Errors
    /// A store error.
    pub async fn inputs(&self, now_ms: i64) -> Result<Inputs, EngineError> {
        let snap = Snapshot::read(&self.store, self.imports_cut(now_ms)).await?;
        self.keep_egress_book(&snap);
        Ok(plan::plan(&snap, &self.cfg, now_ms))
    }

    /// The services each declaring cluster imports as of `now_ms` ([`plan::imports`]).
    ///
    /// # Errors
    /// A store error.
    pub async fn imports(
        &self,
        now_ms: i64,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, EngineError> {
        Ok(plan::imports(
            &self.store.cluster_imports(self.imports_cut(now_ms)).await?,
            &self.cfg,
            now_ms,
        ))
    }

    /// The freshness cut of import declarations as of `now_ms` (now minus stale-after).
    fn imports_cut(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(millis(self.cfg.stale_after))
    }

    /// The registered clusters not heard from within the cluster expiry as of `now_ms`.
    ///
    /// # Errors
    /// A store error.
    pub async fn expired_clusters(&self, now_ms: i64) -> Result<BTreeSet<String>, EngineError> {
        let snap = Snapshot {
            clusters: self.store.clusters().await?,
            agents: self.store.agents().await?,
            ..Snapshot::default()
        };
        Ok(plan::expired_clusters(&snap, &self.cfg, now_ms))
    }

    /// Forgets the imports of nodes not heard from for the cluster expiry (gone from a
    /// DaemonSet, say); an agent that comes back declares again on its new report stream.
    async fn prune_imports(&self, now: i64) {
        let Some(expiry) = self.cfg.cluster_expiry else {
            return;
        };
        match self
            .store
            .prune_import_declarations(now.saturating_sub(millis(expiry)))
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(nodes = n, "forgot the imports of nodes not heard from"),
            Err(e) => warn!(error = %e, "pruning import declarations failed; retried next round"),
        }
    }

    /// Records this round's service-time points ([`fit::new_points`]) in the store and in
    /// `snap`, and forgets the points older than the fit window. A store error is logged: the
    /// round goes on with the points it has (the next round records them).
    async fn record_service_time_points(&self, snap: &mut Snapshot, now: i64) {
        let known: BTreeSet<&str> = snap
            .clusters
            .iter()
            .map(|c| c.cluster_id.as_str())
            .collect();
        let points = fit::new_points(snap, &known, self.imports_cut(now));
        if !points.is_empty() {
            match self.store.record_service_time_points(&points).await {
                Ok(()) => snap.service_time_points.extend(points),
                Err(e) => warn!(error = %e, "recording service-time points failed"),
            }
        }
        let before = self.imports_cut(now).saturating_sub(fit::window_ms());
        if let Err(e) = self.store.prune_service_time_points(before).await {
            warn!(error = %e, "pruning service-time points failed; retried next round");
        }
    }

    /// One solver round: plans from the store, runs the pure round, and publishes a new
    /// generation when anything changed. Returns the generation in force afterwards.
    ///
    /// # Errors
    /// A store error (then nothing is published).
    pub async fn run_round(&self) -> Result<u64, EngineError> {
        let mut rs = self.round.lock().await;
        // Only the leader solves and publishes; a follower's weights come from the store.
        let Some(leader) = self.leading() else {
            return Ok(self.current().generation);
        };
        let started = Instant::now();
        let now = now_ms();
        self.prune_imports(now).await;
        self.services_read_begins();
        let mut snap = Snapshot::read(&self.store, self.imports_cut(now)).await?;
        self.record_service_time_points(&mut snap, now).await;
        let inputs = plan::plan(&snap, &self.cfg, now);
        self.keep_egress_book(&snap);
        self.reconcile_services(&snap);
        if let Ok(mut u) = self.load_units.write() {
            u.reconcile(
                &snap.capacity,
                now.saturating_sub(millis(self.cfg.stale_after)),
            );
        }
        if let Err(e) = self.refresh_peers().await {
            warn!(error = %e, "refreshing the peer set failed; retried next round");
        }
        let current = self.current();
        if let Ok(mut solved) = self.solved_capacity.write() {
            *solved = Arc::new(capacities(&inputs));
        }
        self.metrics.clusters.set(gauge(inputs.clusters));
        self.metrics
            .expired_clusters
            .set(gauge(inputs.expired.len()));
        self.metrics.stale_inputs.set(gauge(inputs.stale_inputs));
        let RoundOutcome::Computed(out) =
            round::round(&inputs, &current, &rs.memory, &self.cfg, now)
        else {
            return Ok(current.generation);
        };
        if !inputs.expired.is_empty() {
            info!(expired = ?inputs.expired, "clusters not heard from within the expiry are left out");
        }
        self.metrics.stale_services.set(gauge(out.stale_services));
        self.metrics.held_services.inc_by(out.held_services as u64);
        let duration = started.elapsed();
        self.metrics.solve_duration.observe(duration.as_secs_f64());
        let run = SolverRunRecord {
            id: rs.next_run_id,
            started_at_ms: now,
            inputs_digest: out.digest.clone(),
            status: out.status.as_str().to_owned(),
            objective: out.objective,
            duration_ms: duration.as_secs_f64() * 1000.0,
            services: gauge(out.services),
            generation: gauge_i64(current.generation),
            detail: out.detail.clone(),
        };
        let generation = if out.changed {
            if let Some(d) = self.replica.slow_round {
                info!(?d, "test hook: slow round, publishing after a wait");
                tokio::time::sleep(d).await;
            }
            // Only what changed is written; the store carries every other pair over. The
            // store numbers the generation, under this leader's term (fenced).
            let generation = match self
                .store
                .publish(&leader, now, &out.rows, &out.removed, &run)
                .await
            {
                Ok(g) => g,
                Err(e @ StoreError::Fenced { .. }) => {
                    self.fenced(&e);
                    return Ok(self.current().generation);
                }
                Err(e) => return Err(e.into()),
            };
            let published = Arc::new(Published::new(
                u64::try_from(generation).unwrap_or(0),
                now,
                out.entries,
            ));
            self.publish_local(published);
            info!(
                generation,
                term = leader.term,
                status = out.status.as_str(),
                ms = run.duration_ms,
                "published a new generation"
            );
            self.prune_generations().await;
            u64::try_from(generation).unwrap_or(0)
        } else {
            if self.leading().is_none() {
                return Ok(current.generation);
            }
            self.store.record_run(&run).await?;
            // Runs that published nothing all carry the current generation: bound them too.
            if let Err(e) = self
                .store
                .prune_solver_runs(self.cfg.keep_generations)
                .await
            {
                warn!(error = %e, "pruning old solver runs failed; retried after the next round");
            }
            current.generation
        };
        rs.next_run_id += 1;
        rs.memory = out.memory;
        Ok(generation)
    }

    /// Replaces the counted services by those the store holds (withdrawn ones stop
    /// counting towards `--max-services`).
    fn reconcile_services(&self, snap: &Snapshot) {
        let mut held: BTreeSet<String> = snap
            .capacity
            .iter()
            .map(|c| c.service.clone())
            .chain(snap.rps.iter().map(|r| r.service.clone()))
            .collect();
        let mut count = match self.services.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        held.extend(count.since_read.iter().cloned());
        held.extend(count.before_read.iter().cloned());
        count.known = held;
    }

    /// Marks the start of a round's read (see [`ServiceCount::since_read`]).
    fn services_read_begins(&self) {
        let mut count = match self.services.write() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        count.before_read = std::mem::take(&mut count.since_read);
    }

    /// Retention after a publish. A failure leaves the old rows for the next publish's
    /// prune (which computes what to delete from the table, not from this round); the
    /// generation is already published.
    async fn prune_generations(&self) {
        match self
            .store
            .prune_generations(self.cfg.keep_generations)
            .await
        {
            Ok(p) if p.generations > 0 => debug!(
                up_to = p.up_to_generation,
                generations = p.generations,
                weights = p.weights,
                solver_runs = p.solver_runs,
                "pruned old generations"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "pruning old generations failed; retried after the next publish");
            }
        }
    }

    /// The capacity per serving cluster of `service` as the last round planned it (empty
    /// before any round planned the service).
    #[must_use]
    pub fn solved_capacity(&self, service: &str) -> BTreeMap<String, f64> {
        self.solved_capacity
            .read()
            .ok()
            .and_then(|m| m.get(service).cloned())
            .unwrap_or_default()
    }

    /// Explains a service's weights for one source, with the inputs as of now.
    ///
    /// # Errors
    /// `NotFound` for an unknown service or source; a model or store error.
    pub async fn explain(
        &self,
        service: &str,
        source: &str,
    ) -> Result<(Explanation, ServicePlan), EngineError> {
        if !self.is_known(source) {
            return Err(EngineError::NotFound(format!(
                "source_cluster_id: unknown cluster {source:?}"
            )));
        }
        let mut inputs = self.inputs(now_ms()).await?;
        let plan = inputs.services.remove(service).ok_or_else(|| {
            EngineError::NotFound(format!(
                "service: no plan for {service:?} (unknown, or imported by no cluster)"
            ))
        })?;
        if !plan.has_source(source) {
            return Err(EngineError::NotFound(format!(
                "source_cluster_id: {source:?} does not import {service:?} (its agents' \
                 declared imports leave it out)"
            )));
        }
        let ex = ballast_model::explain(&plan.problem, service, source)?;
        Ok((ex, plan))
    }

    /// One round of the solve loop: [`Engine::run_round`], with its outcome recorded in
    /// [`Engine::loop_health`]. `serve` runs the first one before it reports ready.
    pub async fn run_loop_round(&self) {
        match self.run_round().await {
            Ok(_) => self.record_loop(|h| {
                h.last_round_ok_ms = Some(now_ms());
                h.last_error = None;
            }),
            Err(e) => {
                warn!(error = %e, "solver round failed");
                self.record_loop(|h| h.last_error = Some(e.to_string()));
            }
        }
    }

    /// The solve loop: a round `interval` after the start and every `interval` after that
    /// (the caller runs the first one: [`Engine::run_loop_round`]), and `debounce` after a
    /// trigger, until `shutdown` turns true. The loop counts as running
    /// ([`LoopHealth::running`]) from this call until it ends.
    pub fn run(
        self: Arc<Self>,
        interval: Duration,
        debounce: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.record_loop(|h| h.running = true);
        async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.trigger.notified() => {
                        if !self.dirty.load(Ordering::SeqCst) {
                            continue;
                        }
                        tokio::select! {
                            () = tokio::time::sleep(debounce) => {}
                            _ = shutdown.changed() => break,
                        }
                    }
                    _ = shutdown.changed() => break,
                }
                if *shutdown.borrow() {
                    break;
                }
                self.dirty.store(false, Ordering::SeqCst);
                self.run_loop_round().await;
            }
            self.record_loop(|h| h.running = false);
        }
    }
}

#[cfg(test)]
mod tests;
