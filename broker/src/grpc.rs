//! The gRPC layer: `ballast.v1.Broker` (agents) and `ballast.v1.Admin` (operators).
//! Translates protobuf <-> engine/model types and validates every message (a status naming
//! the field; nothing of an invalid message is stored).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use ballast_proto::v1::{
    admin_server::Admin, broker_server::Broker, Ack, AckResponse, ClusterInfo, ExplainDestination,
    ExplainRequest, ExplainResponse, GetWeightsRequest, GetWeightsResponse, ImportedServices,
    ListClustersRequest, ListClustersResponse, LoadBalancing, NodeInfo, OptimizedParams,
    RegisterRequest, RegisterResponse, ReportRequest, ReportSummary, SetPolicyRequest,
    SetPolicyResponse, WatchRequest, WeightsStatus, WeightsUpdate,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::engine::{
    now_ms, params_str, policy_str, Engine, EngineError, Entry, Published, WeightsState,
};
use crate::tls::{caller, require_admin, require_cluster};
use ballast_model::{Params, Policy};
use ballast_store::{
    AckRecord, AgentRecord, CapacityRecord, ClusterRecord, PolicyRecord, ReportRecord, RpsRecord,
    RttRecord,
};

/// Settings the agents are told at registration.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub report_interval_ms: i64,
    pub max_message_bytes: u64,
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// Metadata key of an `INVALID_ARGUMENT` that refuses a sample about a cluster the broker
/// does not know (yet); its value is that cluster's id, so an agent can leave the peer out
/// of its reports without parsing the message.
pub const UNKNOWN_CLUSTER_METADATA: &str = "ballast-unknown-cluster";

fn unknown_cluster(field: &str, id: &str) -> Status {
    let mut status = invalid(field, format!("unknown cluster {id:?}"));
    // ids passed check_cluster_id (ASCII), so this only fails on a bug; the message still names it
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(id) {
        status.metadata_mut().insert(UNKNOWN_CLUSTER_METADATA, v);
    }
    status
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::Model(m) => Status::failed_precondition(m.to_string()),
        EngineError::Store(s) => internal(s),
    }
}

/// Checks a cluster id field.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn check_cluster_id(field: &str, v: &str) -> Result<(), Status> {
    if crate::certs::valid_cluster_id(v) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{v:?} is not a cluster id (1-63 characters of a-z, 0-9, '-')"),
        ))
    }
}

fn check_text(field: &str, v: &str, max: usize) -> Result<(), Status> {
    if v.is_empty() {
        return Err(invalid(field, "required"));
    }
    if v.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(field, "contains whitespace or control characters"));
    }
    Ok(())
}

fn check_service(field: &str, v: &str) -> Result<(), Status> {
    check_text(field, v, 253)
}

fn check_num(field: &str, v: f64) -> Result<(), Status> {
    if !v.is_finite() {
        return Err(invalid(field, format!("{v} is not a finite number")));
    }
    if v < 0.0 {
        return Err(invalid(field, format!("{v} is negative")));
    }
    Ok(())
}

fn check_time(field: &str, v: i64, now: i64) -> Result<(), Status> {
    if v <= 0 {
        return Err(invalid(field, "required (Unix milliseconds > 0)"));
    }
    if v > now + 60_000 {
        return Err(invalid(field, "more than a minute in the future"));
    }
    Ok(())
}

fn lb_of(p: Policy) -> LoadBalancing {
    match p {
        Policy::RoundRobin => LoadBalancing::RoundRobin,
        Policy::WeightedRoundRobin => LoadBalancing::WeightedRoundRobin,
        Policy::Optimized => LoadBalancing::Optimized,
    }
}

fn op_of(p: Params) -> OptimizedParams {
    match p {
        Params::Cost => OptimizedParams::Cost,
        Params::Performance => OptimizedParams::Performance,
        Params::Mixed => OptimizedParams::Mixed,
    }
}

fn status_of(s: WeightsState) -> WeightsStatus {
    match s {
        WeightsState::Optimal => WeightsStatus::Optimal,
        WeightsState::Degraded => WeightsStatus::Degraded,
        WeightsState::Stale => WeightsStatus::Stale,
    }
}

fn update_of(generation: u64, service: &str, source: &str, e: &Entry) -> WeightsUpdate {
    WeightsUpdate {
        generation,
        service: service.to_string(),
        source_cluster_id: source.to_string(),
        weights: e.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        status: status_of(e.status).into(),
        reason: e.reason.clone(),
        policy: lb_of(e.policy).into(),
        params: op_of(e.params).into(),
        computed_at_ms: e.computed_at_ms,
        last_in_batch: false,
    }
}

/// What one `WatchWeights` stream has sent its source cluster, so that each new generation
/// sends only what changed for it.
#[derive(Debug, Default)]
pub struct WatchState {
    /// Service -> the entry last sent (none yet: the next batch is the full state).
    sent: Option<BTreeMap<String, Entry>>,
    generation: u64,
}

impl WatchState {
    /// The next batch for `source` from generation `p` (the last update flagged
    /// `last_in_batch`), or nothing when `p` is not newer than what was sent:
    /// - the first batch: every service's weights for `source` (the full state);
    /// - later: only the services whose weights, status, reason, policy or params changed;
    ///   when none did, one unchanged service re-sent at the new generation, so the agent
    ///   still learns (and acknowledges) that it is current.
    ///
    /// A service whose entry disappears is not sent (the agent keeps what it installed).
    pub fn next_batch(&mut self, p: &Published, source: &str) -> Vec<WeightsUpdate> {
        let current: BTreeMap<String, Entry> = p
            .entries
            .iter()
            .filter(|((_, src), _)| src == source)
            .map(|((svc, _), e)| (svc.clone(), e.clone()))
            .collect();
        let mut out: Vec<WeightsUpdate> = match &self.sent {
            None => current
                .iter()
                .map(|(svc, e)| update_of(p.generation, svc, source, e))
                .collect(),
            Some(_) if p.generation <= self.generation => return Vec::new(),
            Some(sent) => {
                let changed: Vec<WeightsUpdate> = current
                    .iter()
                    .filter(|(svc, e)| sent.get(*svc).is_none_or(|old| !old.same_as(e)))
                    .map(|(svc, e)| update_of(p.generation, svc, source, e))
                    .collect();
                if changed.is_empty() {
                    current
                        .iter()
                        .take(1)
                        .map(|(svc, e)| update_of(p.generation, svc, source, e))
                        .collect()
                } else {
                    changed
                }
            }
        };
        if let Some(last) = out.last_mut() {
            last.last_in_batch = true;
        }
        self.sent = Some(current);
        self.generation = p.generation;
        out
    }
}

/// Validates a report and turns it into a store record.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the first bad field, `NOT_FOUND` for an unknown cluster.
pub fn validate_report(
    m: &ReportRequest,
    engine: &Engine,
    now: i64,
) -> Result<ReportRecord, Status> {
    check_cluster_id("cluster_id", &m.cluster_id)?;
    if !engine.is_known(&m.cluster_id) {
        return Err(Status::not_found(format!(
            "cluster_id: cluster {:?} is not registered (call Register first)",
            m.cluster_id
        )));
    }
    check_text("node_name", &m.node_name, 253)?;
    check_time("measured_at_ms", m.measured_at_ms, now)?;
    let at = |field: &str, v: i64| -> Result<i64, Status> {
        if v == 0 {
            Ok(m.measured_at_ms)
        } else {
            check_time(field, v, now)?;
            Ok(v)
        }
    };
    let mut rec = ReportRecord {
        cluster_id: m.cluster_id.clone(),
        node_name: m.node_name.clone(),
        received_at_ms: now,
        ..ReportRecord::default()
    };
    let mut seen = BTreeSet::new();
    for (i, s) in m.rtt.iter().enumerate() {
        let f = format!("rtt[{i}]");
        check_cluster_id(&format!("{f}.peer_cluster_id"), &s.peer_cluster_id)?;
        if s.peer_cluster_id == m.cluster_id {
            return Err(invalid(
                &format!("{f}.peer_cluster_id"),
                "a cluster does not measure RTT to itself",
            ));
        }
        if !engine.is_known(&s.peer_cluster_id) {
            return Err(unknown_cluster(
                &format!("{f}.peer_cluster_id"),
                &s.peer_cluster_id,
            ));
        }
        if !seen.insert(s.peer_cluster_id.clone()) {
            return Err(invalid(&format!("{f}.peer_cluster_id"), "duplicate peer"));
        }
        if s.reachable {
            check_num(&format!("{f}.rtt_ms"), s.rtt_ms)?;
        } else if !s.rtt_ms.is_finite() {
            return Err(invalid(&format!("{f}.rtt_ms"), "not a finite number"));
        }
        if !s.loss_ratio.is_finite() || !(0.0..=1.0).contains(&s.loss_ratio) {
            return Err(invalid(
                &format!("{f}.loss_ratio"),
                format!("{} is outside [0, 1]", s.loss_ratio),
            ));
        }
        rec.rtt.push(RttRecord {
            src: m.cluster_id.clone(),
            dst: s.peer_cluster_id.clone(),
            node_name: m.node_name.clone(),
            rtt_ms: if s.reachable { s.rtt_ms } else { 0.0 },
            loss_ratio: s.loss_ratio,
            reachable: s.reachable,
            measured_at_ms: at(&format!("{f}.measured_at_ms"), s.measured_at_ms)?,
        });
    }
    let mut seen = BTreeSet::new();
    for (i, s) in m.rps.iter().enumerate() {
        let f = format!("rps[{i}]");
        check_service(&format!("{f}.service"), &s.service)?;
        check_cluster_id(
            &format!("{f}.destination_cluster_id"),
            &s.destination_cluster_id,
        )?;
        if !engine.is_known(&s.destination_cluster_id) {
            return Err(unknown_cluster(
                &format!("{f}.destination_cluster_id"),
                &s.destination_cluster_id,
            ));
        }
        if !seen.insert((s.service.clone(), s.destination_cluster_id.clone())) {
            return Err(invalid(&f, "duplicate (service, destination_cluster_id)"));
        }
        check_num(&format!("{f}.rps"), s.rps)?;
        rec.rps.push(RpsRecord {
            src: m.cluster_id.clone(),
            service: s.service.clone(),
            dst: s.destination_cluster_id.clone(),
            node_name: m.node_name.clone(),
            rps: s.rps,
            measured_at_ms: at(&format!("{f}.measured_at_ms"), s.measured_at_ms)?,
        });
    }
    let mut seen = BTreeSet::new();
    for (i, s) in m.capacity.iter().enumerate() {
        let f = format!("capacity[{i}]");
        check_service(&format!("{f}.service"), &s.service)?;
        if !seen.insert(s.service.clone()) {
            return Err(invalid(&format!("{f}.service"), "duplicate service"));
        }
        check_num(&format!("{f}.capacity_rps"), s.capacity_rps)?;
        rec.capacity.push(CapacityRecord {
            cluster_id: m.cluster_id.clone(),
            service: s.service.clone(),
            node_name: m.node_name.clone(),
            capacity_rps: s.capacity_rps,
            measured_at_ms: at(&format!("{f}.measured_at_ms"), s.measured_at_ms)?,
        });
    }
    if let Some(imports) = &m.imports {
        if imports.services.len() > MAX_IMPORTS {
            return Err(invalid(
                "imports.services",
                format!(
                    "{} services, more than the {MAX_IMPORTS} allowed",
                    imports.services.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, service) in imports.services.iter().enumerate() {
            let f = format!("imports.services[{i}]");
            check_service(&f, service)?;
            if !seen.insert(service) {
                return Err(invalid(&f, format!("duplicate service {service:?}")));
            }
        }
        rec.imports = Some(imports.services.clone());
    }
    Ok(rec)
}

/// The most services one node may declare it imports.
pub const MAX_IMPORTS: usize = 100_000;

/// `ballast.v1.Broker`.
#[derive(Debug, Clone)]
pub struct BrokerService {
    engine: Arc<Engine>,
    insecure: bool,
    settings: AgentSettings,
    shutdown: watch::Receiver<bool>,
}

impl BrokerService {
    /// A service over `engine`; `insecure` trusts every caller (plain-text mode).
    #[must_use]
    pub fn new(
        engine: Arc<Engine>,
        insecure: bool,
        settings: AgentSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            engine,
            insecure,
            settings,
            shutdown,
        }
    }

    fn reject(&self, s: Status) -> Status {
        self.engine.metrics().rejected.inc();
        s
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WeightsUpdate, Status>> + Send>>;

struct WatcherGuard(Arc<Engine>);
impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.metrics().watchers.dec();
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let who = caller(&req, self.insecure).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        check_cluster_id("cluster_id", &m.cluster_id).map_err(|s| self.reject(s))?;
        require_cluster(&who, &m.cluster_id).map_err(|s| self.reject(s))?;
        (|| {
            check_text("region", &m.region, 128)?;
            check_text("zone", &m.zone, 128)?;
            check_text("provider", &m.provider, 64)?;
            check_text("node_name", &m.node_name, 253)?;
            if m.gateway_address.len() > 253 {
                return Err(invalid("gateway_address", "longer than 253 bytes"));
            }
            if m.agent_version.len() > 128 {
                return Err(invalid("agent_version", "longer than 128 bytes"));
            }
            Ok(())
        })()
        .map_err(|s| self.reject(s))?;
        let now = now_ms();
        self.engine
            .store()
            .register(
                &ClusterRecord {
                    cluster_id: m.cluster_id.clone(),
                    region: m.region,
                    zone: m.zone,
                    provider: m.provider,
                    gateway_address: m.gateway_address,
                    registered_at_ms: now,
                    updated_at_ms: now,
                },
                &AgentRecord {
                    cluster_id: m.cluster_id.clone(),
                    node_name: m.node_name.clone(),
                    agent_version: m.agent_version,
                    registered_at_ms: now,
                    last_report_ms: 0,
                    acked_generation: 0,
                },
            )
            .await
            .map_err(internal)?;
        let new = !self.engine.is_known(&m.cluster_id);
        self.engine.add_known(&m.cluster_id);
        if new {
            info!(cluster = %m.cluster_id, node = %m.node_name, "cluster registered");
        }
        self.engine.trigger();
        let (policy, params) = self.engine.policy_of("").await.map_err(engine_status)?;
        Ok(Response::new(RegisterResponse {
            cluster_id: m.cluster_id,
            report_interval_ms: self.settings.report_interval_ms,
            stale_after_ms: i64::try_from(self.engine.config().stale_after.as_millis())
                .unwrap_or(i64::MAX),
            policy: lb_of(policy).into(),
            params: op_of(params).into(),
            generation: self.engine.current().generation,
            max_message_bytes: self.settings.max_message_bytes,
            known_cluster_ids: self.engine.known(),
        }))
    }

    async fn report(
        &self,
        req: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let who = caller(&req, self.insecure).map_err(|s| self.reject(s))?;
        let mut stream = req.into_inner();
        let mut summary = ReportSummary::default();
        while let Some(m) = stream.message().await? {
            check_cluster_id("cluster_id", &m.cluster_id).map_err(|s| self.reject(s))?;
            require_cluster(&who, &m.cluster_id).map_err(|s| self.reject(s))?;
            let rec = validate_report(&m, &self.engine, now_ms()).map_err(|s| self.reject(s))?;
            self.engine
                .store()
                .store_report(&rec)
                .await
                .map_err(internal)?;
            summary.messages += 1;
            summary.rtt_samples += rec.rtt.len() as u64;
            summary.rps_samples += rec.rps.len() as u64;
            summary.capacity_samples += rec.capacity.len() as u64;
            self.engine.metrics().reports.inc();
            debug!(cluster = %rec.cluster_id, node = %rec.node_name, "report stored");
            self.engine.trigger();
        }
        summary.generation = self.engine.current().generation;
        Ok(Response::new(summary))
    }

    type WatchWeightsStream = WatchStream;

    async fn watch_weights(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchWeightsStream>, Status> {
        let who = caller(&req, self.insecure).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        check_cluster_id("cluster_id", &m.cluster_id).map_err(|s| self.reject(s))?;
        require_cluster(&who, &m.cluster_id).map_err(|s| self.reject(s))?;
        check_text("node_name", &m.node_name, 253).map_err(|s| self.reject(s))?;
        if !self.engine.is_known(&m.cluster_id) {
            return Err(self.reject(Status::not_found(format!(
                "cluster_id: cluster {:?} is not registered (call Register first)",
                m.cluster_id
            ))));
        }
        debug!(cluster = %m.cluster_id, node = %m.node_name, last = m.last_generation, "watch");
        let (tx, rx) = mpsc::channel::<Result<WeightsUpdate, Status>>(64);
        let mut updates = self.engine.subscribe();
        let mut shutdown = self.shutdown.clone();
        let engine = self.engine.clone();
        let source = m.cluster_id;
        engine.metrics().watchers.inc();
        tokio::spawn(async move {
            let _guard = WatcherGuard(engine);
            let mut snapshot = updates.borrow_and_update().clone();
            let mut state = WatchState::default();
            loop {
                for u in state.next_batch(&snapshot, &source) {
                    if tx.send(Ok(u)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = updates.changed() => {
                        if r.is_err() {
                            return;
                        }
                        snapshot = updates.borrow_and_update().clone();
                    }
                    () = tx.closed() => return,
                    _ = shutdown.changed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack_weights(&self, req: Request<Ack>) -> Result<Response<AckResponse>, Status> {
        let who = caller(&req, self.insecure).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        (|| {
            check_cluster_id("cluster_id", &m.cluster_id)?;
            require_cluster(&who, &m.cluster_id)?;
            check_text("node_name", &m.node_name, 253)?;
            check_service("service", &m.service)?;
            if m.generation == 0 {
                return Err(invalid("generation", "required (> 0)"));
            }
            if m.generation > self.engine.current().generation {
                return Err(invalid(
                    "generation",
                    format!("{} was never published", m.generation),
                ));
            }
            if m.error.len() > 4096 {
                return Err(invalid("error", "longer than 4096 bytes"));
            }
            if !self.engine.is_known(&m.cluster_id) {
                return Err(Status::not_found(format!(
                    "cluster_id: cluster {:?} is not registered",
                    m.cluster_id
                )));
            }
            Ok(())
        })()
        .map_err(|s| self.reject(s))?;
        self.engine
            .store()
            .ack(&AckRecord {
                cluster_id: m.cluster_id,
                node_name: m.node_name,
                service: m.service,
                generation: i64::try_from(m.generation).unwrap_or(i64::MAX),
                applied: m.applied,
                error: m.error,
                acked_at_ms: now_ms(),
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(AckResponse {}))
    }
}

/// `ballast.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
    insecure: bool,
}

impl AdminService {
    /// A service over `engine`; `insecure` trusts every caller (plain-text mode).
    #[must_use]
    pub fn new(engine: Arc<Engine>, insecure: bool) -> Self {
        Self { engine, insecure }
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let who = caller(req, self.insecure)?;
        require_admin(&who).inspect_err(|_| {
            self.engine.metrics().rejected.inc();
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_clusters(
        &self,
        req: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        self.admin(&req)?;
        let store = self.engine.store();
        let clusters = store.clusters().await.map_err(internal)?;
        let agents = store.agents().await.map_err(internal)?;
        let mut newest: BTreeMap<String, i64> = BTreeMap::new();
        for r in store.rtt().await.map_err(internal)? {
            let e = newest.entry(r.src).or_default();
            *e = (*e).max(r.measured_at_ms);
        }
        for r in store.rps().await.map_err(internal)? {
            let e = newest.entry(r.src).or_default();
            *e = (*e).max(r.measured_at_ms);
        }
        for r in store.capacity().await.map_err(internal)? {
            let e = newest.entry(r.cluster_id).or_default();
            *e = (*e).max(r.measured_at_ms);
        }
        let now = now_ms();
        let stale_ms =
            i64::try_from(self.engine.config().stale_after.as_millis()).unwrap_or(i64::MAX);
        let expired = self.engine.expired_clusters(now).await.map_err(internal)?;
        let mut imports = self.engine.imports(now).await.map_err(internal)?;
        let out = clusters
            .into_iter()
            .map(|c| {
                let nodes: Vec<NodeInfo> = agents
                    .iter()
                    .filter(|a| a.cluster_id == c.cluster_id)
                    .map(|a| NodeInfo {
                        node_name: a.node_name.clone(),
                        agent_version: a.agent_version.clone(),
                        last_report_ms: a.last_report_ms,
                        acked_generation: u64::try_from(a.acked_generation).unwrap_or(0),
                    })
                    .collect();
                let received = nodes.iter().map(|n| n.last_report_ms).max().unwrap_or(0);
                let last = newest
                    .get(&c.cluster_id)
                    .copied()
                    .unwrap_or(0)
                    .max(if received > 0 { received.min(now) } else { 0 });
                let age = if last > 0 { now - last } else { -1 };
                let expired = expired.contains(&c.cluster_id);
                let imports = imports
                    .remove(&c.cluster_id)
                    .map(|services| ImportedServices {
                        services: services.into_iter().collect(),
                    });
                ClusterInfo {
                    cluster_id: c.cluster_id,
                    region: c.region,
                    zone: c.zone,
                    provider: c.provider,
                    gateway_address: c.gateway_address,
                    registered_at_ms: c.registered_at_ms,
                    last_report_ms: last,
                    last_report_age_ms: age,
                    stale: last == 0 || age > stale_ms,
                    expired,
                    nodes,
                    imports,
                }
            })
            .collect();
        Ok(Response::new(ListClustersResponse {
            clusters: out,
            stale_after_ms: stale_ms,
            cluster_expiry_ms: self
                .engine
                .config()
                .cluster_expiry
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }))
    }

    async fn get_weights(
        &self,
        req: Request<GetWeightsRequest>,
    ) -> Result<Response<GetWeightsResponse>, Status> {
        self.admin(&req)?;
        let m = req.into_inner();
        if !m.service.is_empty() {
            check_service("service", &m.service)?;
        }
        if !m.source_cluster_id.is_empty() {
            check_cluster_id("source_cluster_id", &m.source_cluster_id)?;
        }
        let p = self.engine.current();
        let weights = p
            .entries
            .iter()
            .filter(|((svc, src), _)| {
                (m.service.is_empty() || *svc == m.service)
                    && (m.source_cluster_id.is_empty() || *src == m.source_cluster_id)
            })
            .map(|((svc, src), e)| update_of(p.generation, svc, src, e))
            .collect();
        Ok(Response::new(GetWeightsResponse {
            generation: p.generation,
            weights,
        }))
    }

    async fn set_policy(
        &self,
        req: Request<SetPolicyRequest>,
    ) -> Result<Response<SetPolicyResponse>, Status> {
        self.admin(&req)?;
        let m = req.into_inner();
        if !m.service.is_empty() {
            check_service("service", &m.service)?;
        }
        let policy = match LoadBalancing::try_from(m.policy) {
            Ok(LoadBalancing::Unspecified) => None,
            Ok(LoadBalancing::RoundRobin) => Some(Policy::RoundRobin),
            Ok(LoadBalancing::WeightedRoundRobin) => Some(Policy::WeightedRoundRobin),
            Ok(LoadBalancing::Optimized) => Some(Policy::Optimized),
            Err(_) => return Err(invalid("policy", format!("unknown value {}", m.policy))),
        };
        let params = match OptimizedParams::try_from(m.params) {
            Ok(OptimizedParams::Unspecified) => None,
            Ok(OptimizedParams::Cost) => Some(Params::Cost),
            Ok(OptimizedParams::Performance) => Some(Params::Performance),
            Ok(OptimizedParams::Mixed) => Some(Params::Mixed),
            Err(_) => return Err(invalid("params", format!("unknown value {}", m.params))),
        };
        let store = self.engine.store();
        if m.clear {
            if m.service.is_empty() {
                return Err(invalid("service", "required with clear"));
            }
            if policy.is_some() || params.is_some() {
                return Err(invalid("clear", "clear takes no policy or params"));
            }
            store.delete_policy(&m.service).await.map_err(internal)?;
        } else {
            if policy.is_none() && params.is_none() {
                return Err(invalid("policy", "set policy, params or both"));
            }
            let (cur_policy, cur_params) = self
                .engine
                .policy_of(&m.service)
                .await
                .map_err(engine_status)?;
            store
                .set_policy(
                    &PolicyRecord {
                        scope: m.service.clone(),
                        policy: policy_str(policy.unwrap_or(cur_policy)).to_string(),
                        params: params_str(params.unwrap_or(cur_params)).to_string(),
                    },
                    now_ms(),
                )
                .await
                .map_err(internal)?;
        }
        let (p, q) = self
            .engine
            .policy_of(&m.service)
            .await
            .map_err(engine_status)?;
        info!(service = %m.service, policy = policy_str(p), params = params_str(q), "policy set");
        self.engine.trigger();
        Ok(Response::new(SetPolicyResponse {
            policy: lb_of(p).into(),
            params: op_of(q).into(),
        }))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        self.admin(&req)?;
        let m = req.into_inner();
        check_service("service", &m.service)?;
        check_cluster_id("source_cluster_id", &m.source_cluster_id)?;
        let (ex, plan) = self
            .engine
            .explain(&m.service, &m.source_cluster_id)
            .await
            .map_err(engine_status)?;
        let p = self.engine.current();
        let entry = p
            .entries
            .get(&(m.service.clone(), m.source_cluster_id.clone()));
        let demand = plan
            .problem
            .services
            .first()
            .and_then(|s| s.demand_rps.get(&m.source_cluster_id))
            .copied()
            .unwrap_or(0.0);
        let mut destinations: Vec<ExplainDestination> = ex
            .destinations
            .iter()
            .map(|d| {
                let mut notes = Vec::new();
                if d.capacity_full {
                    notes.push("capacity full".to_string());
                }
                if d.liveness_floor {
                    notes.push("liveness floor".to_string());
                }
                if d.local_preference {
                    notes.push("local preference (cost 0)".to_string());
                }
                ExplainDestination {
                    cluster_id: d.destination.clone(),
                    cost: d.cost,
                    flow_rps: d.flow,
                    weight: entry
                        .and_then(|e| e.weights.get(&d.destination))
                        .copied()
                        .unwrap_or(d.weight),
                    notes,
                }
            })
            .collect();
        destinations.sort_by(|a, b| a.cluster_id.cmp(&b.cluster_id));
        Ok(Response::new(ExplainResponse {
            service: m.service,
            source_cluster_id: m.source_cluster_id,
            policy: lb_of(plan.problem.policy).into(),
            params: op_of(plan.problem.params).into(),
            demand_rps: demand,
            destinations,
            detail_json: serde_json::to_string(&ex).unwrap_or_default(),
            status: entry
                .map_or(WeightsStatus::Unspecified, |e| status_of(e.status))
                .into(),
            reason: entry.map(|e| e.reason.clone()).unwrap_or_default(),
            generation: p.generation,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(weights: &[(&str, f64)]) -> Entry {
        Entry {
            weights: weights
                .iter()
                .map(|(c, w)| ((*c).to_string(), *w))
                .collect(),
            status: WeightsState::Optimal,
            reason: String::new(),
            policy: Policy::Optimized,
            params: Params::Mixed,
            computed_at_ms: 1,
        }
    }

    fn published(generation: u64, entries: &[(&str, &str, Entry)]) -> Published {
        Published {
            generation,
            created_at_ms: 1,
            entries: entries
                .iter()
                .map(|(svc, src, e)| (((*svc).to_string(), (*src).to_string()), e.clone()))
                .collect(),
        }
    }

    /// (service, generation, weight on c2) of each update; checks the batch flag.
    fn sent(batch: &[WeightsUpdate]) -> Vec<(String, u64, f64)> {
        for (i, u) in batch.iter().enumerate() {
            assert_eq!(u.last_in_batch, i + 1 == batch.len(), "{batch:?}");
            assert_eq!(u.source_cluster_id, "c1");
        }
        batch
            .iter()
            .map(|u| (u.service.clone(), u.generation, u.weights["c2"]))
            .collect()
    }

    fn s(svc: &str, generation: u64, w: f64) -> (String, u64, f64) {
        (svc.to_string(), generation, w)
    }

    #[test]
    fn watch_sends_the_full_state_then_only_what_changed_for_the_source() {
        let half = entry(&[("c2", 0.5), ("c3", 0.5)]);
        let most = entry(&[("c2", 0.9), ("c3", 0.1)]);
        let mut st = WatchState::default();
        // subscribe: every service of c1 (not c2's entries)
        let g1 = published(
            1,
            &[
                ("a/x", "c1", half.clone()),
                ("b/y", "c1", half.clone()),
                ("a/x", "c2", half.clone()),
            ],
        );
        assert_eq!(
            sent(&st.next_batch(&g1, "c1")),
            vec![s("a/x", 1, 0.5), s("b/y", 1, 0.5)]
        );
        // the same generation again: nothing
        assert!(st.next_batch(&g1, "c1").is_empty());
        // generation 2 changes b/y for c1 (and only recomputes a/x): b/y alone
        let mut recomputed = half.clone();
        recomputed.computed_at_ms = 99;
        let g2 = published(
            2,
            &[
                ("a/x", "c1", recomputed.clone()),
                ("b/y", "c1", most.clone()),
                ("a/x", "c2", most.clone()),
            ],
        );
        assert_eq!(sent(&st.next_batch(&g2, "c1")), vec![s("b/y", 2, 0.9)]);
        // generation 3 changes only c2's entries: one unchanged service at generation 3
        let g3 = published(
            3,
            &[
                ("a/x", "c1", recomputed.clone()),
                ("b/y", "c1", most.clone()),
                ("a/x", "c2", half.clone()),
            ],
        );
        assert_eq!(sent(&st.next_batch(&g3, "c1")), vec![s("a/x", 3, 0.5)]);
        // a status change alone is a change; a new service is sent
        let mut stale = most.clone();
        stale.status = WeightsState::Stale;
        let g4 = published(
            4,
            &[
                ("a/x", "c1", recomputed),
                ("b/y", "c1", stale),
                ("c/z", "c1", most),
            ],
        );
        assert_eq!(
            sent(&st.next_batch(&g4, "c1")),
            vec![s("b/y", 4, 0.9), s("c/z", 4, 0.9)]
        );
        // a new stream starts from the full state again
        assert_eq!(sent(&WatchState::default().next_batch(&g4, "c1")).len(), 3);
        // a source with no entries gets nothing
        assert!(WatchState::default().next_batch(&g4, "c9").is_empty());
    }
}
