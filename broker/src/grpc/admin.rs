//! `ballast.v1.Admin`, the operators' service: converts messages to engine operations and
//! engine answers to messages. Only the admin identity reaches it
//! ([`super::identity::Authenticate`] with `admin_only`).

use std::sync::Arc;

use ballast_proto::convert;
use ballast_proto::v1::{
    admin_server::Admin, ClusterInfo, ExplainDestination, ExplainRequest, ExplainResponse,
    GetWeightsRequest, GetWeightsResponse, ImportedServices, ListClustersRequest,
    ListClustersResponse, LoadBalancing, LoadUnit, NodeInfo, OptimizedParams, SavingsFlow,
    SavingsRequest, SavingsResponse, SavingsTotal, SetPolicyRequest, SetPolicyResponse,
    WeightsStatus,
};
use tonic::{Request, Response, Status};

use super::validate::{check_cluster_id, check_service, engine_status, invalid};
use super::watch::update_of;
use crate::engine::fit::CurveOrigin;
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

/// Default and largest `ListClustersRequest.page_size`.
pub const CLUSTERS_PAGE_DEFAULT: usize = 100;
/// The largest `ListClustersRequest.page_size` honoured.
pub const CLUSTERS_PAGE_MAX: usize = 1000;
/// Default `GetWeightsRequest.page_size`.
pub const WEIGHTS_PAGE_DEFAULT: usize = 1000;
/// The largest `GetWeightsRequest.page_size` honoured.
pub const WEIGHTS_PAGE_MAX: usize = 10_000;
/// A page ends before its encoding would exceed this (under 1 MB, far under the 4 MB
/// clients accept by default).
pub const PAGE_BYTES: usize = 900 * 1024;

fn page_size(v: u32, default: usize, max: usize) -> usize {
    match usize::try_from(v) {
        Ok(0) => default,
        Ok(n) => n.min(max),
        Err(_) => max,
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

fn bad_token() -> Status {
    invalid(
        "page_token",
        "not a token this broker issued (use next_page_token of the previous page, or empty for the first)",
    )
}

/// `ListClusters` page token: the last cluster id of the previous page.
fn clusters_token(last: &str) -> String {
    format!("c1.{}", hex(last))
}

fn parse_clusters_token(t: &str) -> Result<Option<String>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    t.strip_prefix("c1.")
        .and_then(unhex)
        .map(Some)
        .ok_or_else(bad_token)
}

/// `GetWeights` page token: the last (service, source) of the previous page.
fn weights_token(service: &str, source: &str) -> String {
    format!("w1.{}.{}", hex(service), hex(source))
}

fn parse_weights_token(t: &str) -> Result<Option<(String, String)>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    t.strip_prefix("w1.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(a, b)| Some((unhex(a)?, unhex(b)?)))
        .map(Some)
        .ok_or_else(bad_token)
}

/// Bytes a repeated message or string field of `len` encoded bytes adds to its parent.
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// Cuts `c`'s lists (imports, then services without a VIP, then nodes) until it encodes in
/// `budget` bytes, marking it `truncated`; the counts stay complete.
fn fit_cluster(c: &mut ClusterInfo, budget: usize) {
    use prost::Message;
    if c.encoded_len() <= budget {
        return;
    }
    c.truncated = true;
    let over = |c: &ClusterInfo| c.encoded_len().saturating_sub(budget);
    let mut excess = over(c);
    if let Some(imports) = &mut c.imports {
        while excess > 0 {
            let Some(s) = imports.services.pop() else {
                break;
            };
            excess = excess.saturating_sub(field_len(s.len()));
        }
    }
    let mut excess = over(c);
    while excess > 0 {
        let Some(s) = c.services_without_vip.pop() else {
            break;
        };
        excess = excess.saturating_sub(field_len(s.len()));
    }
    let mut excess = over(c);
    while excess > 0 {
        let Some(n) = c.nodes.pop() else { break };
        excess = excess.saturating_sub(field_len(n.encoded_len()));
    }
}

fn cluster_info(c: ClusterStatus, include_imports: bool) -> ClusterInfo {
    ClusterInfo {
        imports_count: c.imports_count,
        nodes_count: c.nodes.len() as u64,
        truncated: false,
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
        imports: c
            .imports
            .filter(|_| include_imports)
            .map(|services| ImportedServices {
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
        req: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        use prost::Message;
        let m = req.into_inner();
        let after = parse_clusters_token(&m.page_token)?;
        let size = page_size(m.page_size, CLUSTERS_PAGE_DEFAULT, CLUSTERS_PAGE_MAX);
        let report = self
            .engine
            .cluster_status(m.include_imports)
            .await
            .map_err(engine_status)?;
        let mut out = ListClustersResponse {
            clusters: Vec::new(),
            stale_after_ms: report.stale_after_ms,
            cluster_expiry_ms: report.cluster_expiry_ms,
            next_page_token: String::new(),
        };
        // Sorted by id: the page starts after the token's cluster.
        let rest: Vec<ClusterStatus> = report
            .clusters
            .into_iter()
            .filter(|c| after.as_ref().is_none_or(|a| c.cluster.cluster_id > *a))
            .collect();
        let total = rest.len();
        // Room for the token itself.
        let budget = PAGE_BYTES - 1024;
        for c in rest {
            if out.clusters.len() >= size {
                break;
            }
            let mut info = cluster_info(c, m.include_imports);
            let used = out.encoded_len();
            if out.clusters.is_empty() {
                // One cluster is always sent, cut to fit when it alone is too large.
                fit_cluster(&mut info, budget.saturating_sub(used + 8));
            } else if used + field_len(info.encoded_len()) > budget {
                break;
            }
            out.clusters.push(info);
        }
        if out.clusters.len() < total {
            if let Some(last) = out.clusters.last() {
                out.next_page_token = clusters_token(&last.cluster_id);
            }
        }
        Ok(Response::new(out))
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
        let after = parse_weights_token(&m.page_token)?;
        let size = page_size(m.page_size, WEIGHTS_PAGE_DEFAULT, WEIGHTS_PAGE_MAX);
        let p = self.engine.current();
        let range = match &after {
            Some(k) => p.entries.range::<(String, String), _>((
                std::ops::Bound::Excluded(k),
                std::ops::Bound::Unbounded,
            )),
            None => p.entries.range::<(String, String), _>(..),
        };
        let mut matching = range
            .filter(|((svc, src), _)| {
                (m.service.is_empty() || *svc == m.service)
                    && (m.source_cluster_id.is_empty() || *src == m.source_cluster_id)
            })
            .peekable();
        let mut out = GetWeightsResponse {
            generation: p.generation,
            weights: Vec::new(),
            next_page_token: String::new(),
        };
        let mut used = 16;
        let mut last: Option<(&String, &String)> = None;
        while let Some(((svc, src), e)) = matching.peek() {
            if out.weights.len() >= size {
                break;
            }
            let u = update_of(p.generation, svc, src, e);
            let len = field_len(prost::Message::encoded_len(&u));
            if !out.weights.is_empty() && used + len > PAGE_BYTES - 1024 {
                break;
            }
            used += len;
            last = Some((svc, src));
            out.weights.push(u);
            matching.next();
        }
        if matching.peek().is_some() {
            if let Some((svc, src)) = last {
                out.next_page_token = weights_token(svc, src);
            }
        }
        Ok(Response::new(out))
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
        let spent = self
            .engine
            .savings(Some(&m.service))
            .await
            .map_err(engine_status)?;
        let flow_to = |dst: &str| {
            spent
                .flows
                .iter()
                .find(|f| f.source == m.source_cluster_id && f.destination == dst)
        };
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
                if let Some(c) = d.service_time {
                    let origin = match plan.service_time_origin.get(&d.destination) {
                        Some(CurveOrigin::Fitted(n)) => format!("fitted from {n} measured points"),
                        Some(CurveOrigin::Measured(n)) => {
                            format!("flat at the median of {n} measured points")
                        }
                        Some(CurveOrigin::Declared) | None => "declared".to_string(),
                    };
                    notes.push(format!(
                        "service time {:.1} ms at {:.1} rps ({:.3} + {:.4} ms/rps, {origin}), \
                         marginal cost {:.2}",
                        d.service_ms,
                        d.total_flow_rps,
                        c.base_ms,
                        c.slope_ms_per_rps,
                        d.marginal_cost
                    ));
                }
                let measured = flow_to(&d.destination);
                ExplainDestination {
                    cluster_id: d.destination.clone(),
                    cost: d.cost,
                    flow_rps: d.flow,
                    weight: entry
                        .and_then(|e| e.weights.get(&d.destination))
                        .copied()
                        .unwrap_or(d.weight),
                    notes,
                    bytes_sent_per_second: measured.map_or(0.0, |f| f.bytes_sent_per_second),
                    bytes_received_per_second: measured
                        .map_or(0.0, |f| f.bytes_received_per_second),
                    egress_usd_per_hour: measured.map_or(0.0, |f| f.usd_per_hour),
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
            unit: load_unit(plan.unit).into(),
        }))
    }

    async fn savings(
        &self,
        req: Request<SavingsRequest>,
    ) -> Result<Response<SavingsResponse>, Status> {
        let m = req.into_inner();
        if !m.service.is_empty() {
            check_service("service", &m.service)?;
        }
        let only = (!m.service.is_empty()).then_some(m.service.as_str());
        let s = self.engine.savings(only).await.map_err(engine_status)?;
        let total = |t: &crate::engine::savings::Total| SavingsTotal {
            service: t.service.clone(),
            bytes_per_second: t.bytes_per_second,
            usd_per_hour: t.usd_per_hour,
            round_robin_usd_per_hour: t.round_robin_usd_per_hour,
            saved_usd_per_hour: t.saved_usd_per_hour,
        };
        Ok(Response::new(SavingsResponse {
            flows: s
                .flows
                .iter()
                .map(|f| SavingsFlow {
                    service: f.service.clone(),
                    source_cluster_id: f.source.clone(),
                    destination_cluster_id: f.destination.clone(),
                    bytes_sent_per_second: f.bytes_sent_per_second,
                    bytes_received_per_second: f.bytes_received_per_second,
                    usd_per_gb_sent: f.usd_per_gb_sent,
                    usd_per_gb_received: f.usd_per_gb_received,
                    usd_per_hour: f.usd_per_hour,
                    round_robin_usd_per_hour: f.round_robin_usd_per_hour,
                })
                .collect(),
            services: s.services.iter().map(total).collect(),
            total: Some(total(&s.total)),
            as_of_ms: ballast_types::now_ms(),
        }))
    }
}

/// The vocabulary's unit as the proto's.
fn load_unit(u: ballast_types::LoadUnit) -> LoadUnit {
    match u {
        ballast_types::LoadUnit::Connections => LoadUnit::Connections,
        ballast_types::LoadUnit::Requests => LoadUnit::Requests,
        ballast_types::LoadUnit::Bytes => LoadUnit::Bytes,
    }
}
