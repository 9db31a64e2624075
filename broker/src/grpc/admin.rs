//! `ballast.v1.Admin`, the operators' service: converts messages to engine operations and
//! engine answers to messages. Only the admin identity reaches it
//! ([`super::identity::Authenticate`] with `admin_only`).

use std::sync::Arc;

use ballast_proto::convert;
use ballast_proto::v1::{
    admin_server::Admin, ClusterInfo, ExplainDestination, ExplainRequest, ExplainResponse,
    GetWeightsRequest, GetWeightsResponse, ImportedServices, ListClustersRequest,
    ListClustersResponse, LoadBalancing, NodeInfo, OptimizedParams, SetPolicyRequest,
    SetPolicyResponse, WeightsStatus,
};
use tonic::{Request, Response, Status};

use super::validate::{check_cluster_id, check_service, engine_status, invalid};
use super::watch::update_of;
use crate::engine::{ClusterStatus, Engine, PolicyChange};

/// `ballast.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
}

impl AdminService {
    /// A service over `engine` (wrap it in [`super::identity::Authenticate`], `admin_only`).
    #[must_use]
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn cluster_info(c: ClusterStatus) -> ClusterInfo {
    ClusterInfo {
        cluster_id: c.cluster.cluster_id,
        region: c.cluster.region,
        zone: c.cluster.zone,
        provider: c.cluster.provider,
        gateway_address: c.cluster.gateway_address,
        registered_at_ms: c.cluster.registered_at_ms,
        last_report_ms: c.last_report_ms,
        last_report_age_ms: c.last_report_age_ms,
        stale: c.stale,
        expired: c.expired,
        nodes: c
            .nodes
            .into_iter()
            .map(|n| NodeInfo {
                node_name: n.node_name,
                agent_version: n.agent_version,
                last_report_ms: n.last_report_ms,
                acked_generation: n.acked_generation,
            })
            .collect(),
        imports: c.imports.map(|services| ImportedServices {
            services: services.into_iter().collect(),
        }),
        services_without_vip: c.services_without_vip.into_iter().collect(),
    }
}

/// The requested change of a `SetPolicy` message.
fn policy_change(m: &SetPolicyRequest) -> Result<PolicyChange, Status> {
    let policy =
        convert::policy("policy", m.policy).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let params =
        convert::params("params", m.params).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if m.clear {
        if m.service.is_empty() {
            return Err(invalid("service", "required with clear"));
        }
        if policy.is_some() || params.is_some() {
            return Err(invalid("clear", "clear takes no policy or params"));
        }
        return Ok(PolicyChange::Clear);
    }
    if policy.is_none() && params.is_none() {
        return Err(invalid("policy", "set policy, params or both"));
    }
    Ok(PolicyChange::Set { policy, params })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_clusters(
        &self,
        _req: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        let report = self.engine.cluster_status().await.map_err(engine_status)?;
        Ok(Response::new(ListClustersResponse {
            clusters: report.clusters.into_iter().map(cluster_info).collect(),
            stale_after_ms: report.stale_after_ms,
            cluster_expiry_ms: report.cluster_expiry_ms,
        }))
    }

    async fn get_weights(
        &self,
        req: Request<GetWeightsRequest>,
    ) -> Result<Response<GetWeightsResponse>, Status> {
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
        let m = req.into_inner();
        if !m.service.is_empty() {
            check_service("service", &m.service)?;
        }
        let change = policy_change(&m)?;
        let (p, q) = self
            .engine
            .set_policy(&m.service, change)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(SetPolicyResponse {
            policy: LoadBalancing::from(p).into(),
            params: OptimizedParams::from(q).into(),
        }))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
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
        let solved_capacity = self.engine.solved_capacity(&m.service);
        Ok(Response::new(ExplainResponse {
            service: m.service,
            source_cluster_id: m.source_cluster_id,
            policy: LoadBalancing::from(plan.problem.policy).into(),
            params: OptimizedParams::from(plan.problem.params).into(),
            demand_rps: demand,
            destinations,
            detail_json: serde_json::to_string(&ex).unwrap_or_default(),
            status: entry
                .map_or(WeightsStatus::Unspecified, |e| {
                    WeightsStatus::from(e.status)
                })
                .into(),
            reason: entry.map(|e| e.reason.clone()).unwrap_or_default(),
            generation: p.generation,
            solved_capacity_rps: solved_capacity.into_iter().collect(),
        }))
    }
}
