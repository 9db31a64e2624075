//! `ballast.v1.Broker`, the agents' service: converts messages to engine operations. The
//! caller was authenticated by [`super::identity::Authenticate`]; each handler checks that it
//! acts as the message's cluster, validates, and calls the engine.

use std::pin::Pin;
use std::sync::Arc;

use ballast_proto::v1::{
    broker_server::Broker, Ack, AckResponse, LoadBalancing, OptimizedParams, Peer, PeersUpdate,
    RegisterRequest, RegisterResponse, ReportRequest, ReportSummary, WatchPeersRequest,
    WatchRequest, WeightsUpdate,
};
use ballast_store::AckRecord;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::identity::{acting_as, may_act_as, Caller};
use super::validate::{check_service, check_text, engine_status, invalid, validate_report};
use super::watch::WatchState;
use crate::engine::{self, now_ms, Engine, Registration};

/// Settings the agents are told at registration.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub report_interval_ms: i64,
    pub max_message_bytes: u64,
}

/// `ballast.v1.Broker`.
#[derive(Debug, Clone)]
pub struct BrokerService {
    engine: Arc<Engine>,
    settings: AgentSettings,
    shutdown: watch::Receiver<bool>,
}

impl BrokerService {
    /// A service over `engine` (wrap it in [`super::identity::Authenticate`]).
    #[must_use]
    pub fn new(
        engine: Arc<Engine>,
        settings: AgentSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            engine,
            settings,
            shutdown,
        }
    }

    fn reject(&self, s: Status) -> Status {
        self.engine.metrics().rejected.inc();
        s
    }

    /// The status of an engine error; a refusal by a bound on stored state is counted in
    /// `ballast_broker_limit_refusals_total{flag}`.
    fn engine_refusal(&self, e: crate::engine::EngineError) -> Status {
        use crate::engine::EngineError;
        let flag = match &e {
            EngineError::Store(ballast_store::StoreError::Limit { flag, .. }) => Some(*flag),
            EngineError::TooManyServices { .. } => Some("--max-services"),
            _ => None,
        };
        if let Some(flag) = flag {
            self.engine.metrics().count_limit_refusal(flag);
        }
        engine_status(e)
    }

    fn require_registered(&self, cluster_id: &str) -> Result<(), Status> {
        if self.engine.is_known(cluster_id) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "cluster_id: cluster {cluster_id:?} is not registered (call Register first)"
            )))
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WeightsUpdate, Status>> + Send>>;
type PeersStream = Pin<Box<dyn Stream<Item = Result<PeersUpdate, Status>> + Send>>;

fn peers_message(peers: &[engine::Peer]) -> Vec<Peer> {
    peers
        .iter()
        .map(|p| Peer {
            cluster_id: p.cluster_id.clone(),
            region: p.region.clone(),
            zone: p.zone.clone(),
            provider: p.provider.clone(),
            gateway_address: p.gateway_address.clone(),
        })
        .collect()
}

struct WatcherGuard(Arc<Engine>);
impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.metrics().watchers.dec();
    }
}

/// Why a replica ends its weight streams.
fn engine_reason(engine: &crate::engine::Engine) -> String {
    format!(
        "this broker replica: {}",
        engine
            .availability()
            .err()
            .unwrap_or_else(|| "cut off from the database".into())
    )
}

/// A gateway is "" (none: peers do not probe the cluster) or an IP address peers can probe.
fn check_gateway(v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 64 {
        return Err(invalid("gateway_address", "longer than 64 bytes"));
    }
    let ip: std::net::IpAddr = v.parse().map_err(|_| {
        invalid(
            "gateway_address",
            format!("{v:?} is not an IP address (v4 or v6; \"\" for none)"),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            "gateway_address",
            format!("{ip} is not a unicast address peers can probe"),
        ));
    }
    Ok(())
}

fn check_registration(m: &RegisterRequest) -> Result<(), Status> {
    check_text("region", &m.region, 128)?;
    check_text("zone", &m.zone, 128)?;
    check_text("provider", &m.provider, 64)?;
    check_text("node_name", &m.node_name, 253)?;
    check_gateway(&m.gateway_address)?;
    if m.agent_version.len() > 128 {
        return Err(invalid("agent_version", "longer than 128 bytes"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        acting_as(&req, &req.get_ref().cluster_id).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        check_registration(&m).map_err(|s| self.reject(s))?;
        let r = self
            .engine
            .register(Registration {
                cluster_id: m.cluster_id.clone(),
                region: m.region,
                zone: m.zone,
                provider: m.provider,
                gateway_address: m.gateway_address,
                node_name: m.node_name,
                agent_version: m.agent_version,
            })
            .await
            .map_err(|e| self.engine_refusal(e))?;
        Ok(Response::new(RegisterResponse {
            cluster_id: m.cluster_id,
            report_interval_ms: self.settings.report_interval_ms,
            stale_after_ms: i64::try_from(self.engine.config().stale_after.as_millis())
                .unwrap_or(i64::MAX),
            policy: LoadBalancing::from(r.policy).into(),
            params: OptimizedParams::from(r.params).into(),
            generation: r.generation,
            max_message_bytes: self.settings.max_message_bytes,
            known_cluster_ids: r.known_cluster_ids,
            peers: peers_message(&r.peers),
        }))
    }

    async fn report(
        &self,
        req: Request<Streaming<ReportRequest>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let who = req.extensions().get::<Caller>().cloned();
        let mut stream = req.into_inner();
        let mut summary = ReportSummary::default();
        while let Some(m) = stream
            .message()
            .await
            .map_err(super::oversize::map_status)?
        {
            // Each message names its cluster: the stream's caller must be allowed every one.
            may_act_as(who.as_ref(), &m.cluster_id).map_err(|s| self.reject(s))?;
            let rec = validate_report(&m, &self.engine, now_ms()).map_err(|s| self.reject(s))?;
            self.engine
                .ingest_report(&rec)
                .await
                .map_err(|e| self.engine_refusal(e))?;
            summary.messages += 1;
            summary.rtt_samples += rec.rtt.len() as u64;
            summary.rps_samples += rec.rps.len() as u64;
            summary.capacity_samples += rec.capacity.len() as u64;
        }
        summary.generation = self.engine.current().generation;
        Ok(Response::new(summary))
    }

    type WatchWeightsStream = WatchStream;

    async fn watch_weights(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchWeightsStream>, Status> {
        acting_as(&req, &req.get_ref().cluster_id).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        check_text("node_name", &m.node_name, 253).map_err(|s| self.reject(s))?;
        self.require_registered(&m.cluster_id)
            .map_err(|s| self.reject(s))?;
        // A replica cut off from the database must not serve its weights as fresh: the
        // agent goes to another replica.
        self.engine
            .availability()
            .map_err(|r| Status::unavailable(format!("this broker replica: {r}")))?;
        debug!(cluster = %m.cluster_id, node = %m.node_name, last = m.last_generation, "watch");
        let (tx, rx) = mpsc::channel::<Result<WeightsUpdate, Status>>(64);
        let mut updates = self.engine.subscribe();
        let mut available = self.engine.subscribe_available();
        let mut shutdown = self.shutdown.clone();
        let engine = self.engine.clone();
        let source = m.cluster_id;
        engine.metrics().watchers.inc();
        tokio::spawn(async move {
            let guard = WatcherGuard(engine);
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
                    r = available.changed() => {
                        if r.is_err() {
                            return;
                        }
                        if !*available.borrow_and_update() {
                            let reason = engine_reason(&guard.0);
                            let _ = tx.send(Err(Status::unavailable(reason))).await;
                            return;
                        }
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

    type WatchPeersStream = PeersStream;

    async fn watch_peers(
        &self,
        req: Request<WatchPeersRequest>,
    ) -> Result<Response<Self::WatchPeersStream>, Status> {
        acting_as(&req, &req.get_ref().cluster_id).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        check_text("node_name", &m.node_name, 253).map_err(|s| self.reject(s))?;
        self.require_registered(&m.cluster_id)
            .map_err(|s| self.reject(s))?;
        debug!(cluster = %m.cluster_id, node = %m.node_name, "watch peers");
        let (tx, rx) = mpsc::channel::<Result<PeersUpdate, Status>>(4);
        let mut peers = self.engine.subscribe_peers();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let update = PeersUpdate {
                    peers: peers_message(&peers.borrow_and_update().clone()),
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = peers.changed() => if r.is_err() { return },
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
        acting_as(&req, &req.get_ref().cluster_id).map_err(|s| self.reject(s))?;
        let m = req.into_inner();
        (|| {
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
            .map_err(engine_status)?;
        Ok(Response::new(AckResponse {}))
    }
}
