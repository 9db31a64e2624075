//! The broker's Admin API, through the generated gRPC client
//! (`ballast_proto::v1::admin_client::AdminClient`, tonic over mTLS with the lab's `admin`
//! certificate): the published weights and the generations the agents acknowledged
//! ([`broker_view`]), and switching the policy ([`set_policy`]).
//!
//! Decisions:
//! - Where the call runs: the broker listens on 10.77.0.1, an address on the *wan*
//!   namespace's loopback; the host namespace, where `ballast-lab` runs, has no route to it
//!   (clusters reach it through their veth, the host is not part of the lab's network, and
//!   must not be: nothing is routed out). So each call runs on a fresh thread that `setns`es
//!   into the wan namespace before any socket exists (`sys::in_netns`), with a
//!   current-thread tokio runtime on that thread: the connection, and tonic's background task,
//!   live and die on it, no worker thread is made, and the broker's URL is an IP literal so
//!   no resolver thread is either. The calling thread's namespace is untouched, which matters
//!   for `load`, whose main thread has entered a cluster.
//! - One connection per call (the lab polls a few times a second at most): nothing to keep
//!   alive across commands, which are separate processes anyway.
//! - The server name checked is the broker's address, for which `up` issues the server
//!   certificate (`certs --server-san`), as the agents do.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ballast_model::load_aware::LoadCurve;
use ballast_proto::v1::{
    admin_client::AdminClient, ExplainRequest, GetWeightsRequest, GetWeightsResponse,
    ListClustersRequest, ListClustersResponse, LoadBalancing, OptimizedParams, SetPolicyRequest,
};
use ballast_types::{Params, Policy, WeightsStatus};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ControlPlane;
use crate::config::BROKER_ADDR;
use crate::error::{IoContext, LabError, Result};
use crate::sys;

/// What the broker publishes and what the agents acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerView {
    pub generation: u64,
    /// service -> source -> destination -> weight
    pub weights: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// cluster -> the lowest generation its agents acknowledged (absent: never acked)
    pub acked: BTreeMap<String, u64>,
    /// service -> source -> the policy its weights were computed with (absent: not stated)
    pub policy: BTreeMap<String, BTreeMap<String, Policy>>,
    /// service -> source -> the status of its weights (absent: not stated)
    #[serde(default)]
    pub status: BTreeMap<String, BTreeMap<String, WeightsStatus>>,
    /// cluster -> its agents' node names, as registered with the broker
    #[serde(default)]
    pub nodes: BTreeMap<String, Vec<String>>,
}

/// What the broker solves each service with (its Admin `Explain`): the figures it takes for
/// the facts of several nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SolveView {
    /// service -> serving cluster -> capacity (RPS) in the broker's last solve: one figure
    /// per cluster, not a sum over its nodes.
    pub capacity: BTreeMap<String, BTreeMap<String, f64>>,
    /// service -> source cluster -> demand (RPS): the source's RPS summed over its nodes
    /// and destinations (the broker's small default while the source sends nothing).
    pub demand: BTreeMap<String, BTreeMap<String, f64>>,
    /// service -> serving cluster -> the service-time curve of the cluster (per-pod curve
    /// over its ready pods) the broker solved with, as seen from any source; a cluster
    /// without one is absent.
    #[serde(default)]
    pub service_time: BTreeMap<String, BTreeMap<String, LoadCurve>>,
}

/// The part of the broker's `detail_json` (the model's explanation) the lab reads.
#[derive(Debug, Deserialize)]
struct ExplainDetail {
    #[serde(default)]
    destinations: Vec<ExplainDetailDestination>,
}

#[derive(Debug, Deserialize)]
struct ExplainDetailDestination {
    destination: String,
    #[serde(default)]
    service_time: Option<LoadCurve>,
}

/// Asks the broker, for every (service, source) it publishes weights for (only `service`'s
/// when given), what it solves with: one connection, `GetWeights` then one `Explain` per
/// pair. A pair the broker no longer plans (`NOT_FOUND` between the two calls) is left out.
pub fn solve_view(cp: &ControlPlane, wan_netns: &str, service: Option<&str>) -> Result<SolveView> {
    let filter = service.unwrap_or_default().to_string();
    call(cp, wan_netns, "GetWeights, Explain", |mut c| async move {
        // every page of the published (service, source) pairs
        let mut rows = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .get_weights(GetWeightsRequest {
                    service: filter.clone(),
                    source_cluster_id: String::new(),
                    page_size: 0,
                    page_token: token,
                })
                .await?
                .into_inner();
            rows.extend(page.weights);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let mut v = SolveView::default();
        for row in rows {
            let req = ExplainRequest {
                service: row.service.clone(),
                source_cluster_id: row.source_cluster_id.clone(),
            };
            let ex = match c.explain(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(s),
            };
            v.capacity.insert(
                ex.service.clone(),
                ex.solved_capacity_rps.into_iter().collect(),
            );
            // An explanation the lab cannot read names no curve (the broker's JSON is the
            // model's own serde output; a new field does not break this).
            if let Ok(detail) = serde_json::from_str::<ExplainDetail>(&ex.detail_json) {
                let curves = v.service_time.entry(ex.service.clone()).or_default();
                for d in detail.destinations {
                    if let Some(c) = d.service_time {
                        curves.insert(d.destination, c);
                    }
                }
            }
            v.demand
                .entry(ex.service)
                .or_default()
                .insert(ex.source_cluster_id, ex.demand_rps);
        }
        Ok(v)
    })
}

/// Reads the broker's weights and the clusters' acknowledged generations (one connection,
/// two calls).
pub fn broker_view(cp: &ControlPlane, wan_netns: &str) -> Result<BrokerView> {
    let (weights, clusters) = call(
        cp,
        wan_netns,
        "GetWeights, ListClusters",
        |mut c| async move {
            // Both answers come in pages (of ~1 MB at most): follow them.
            let mut w = GetWeightsResponse::default();
            let mut token = String::new();
            loop {
                let page = c
                    .get_weights(GetWeightsRequest {
                        page_token: token,
                        ..GetWeightsRequest::default()
                    })
                    .await?
                    .into_inner();
                if !w.weights.is_empty() && page.generation != w.generation {
                    // Published in between: start over on the new generation.
                    w = GetWeightsResponse::default();
                    token = String::new();
                    continue;
                }
                w.generation = page.generation;
                w.weights.extend(page.weights);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let mut l = ListClustersResponse::default();
            let mut token = String::new();
            loop {
                let page = c
                    .list_clusters(ListClustersRequest {
                        page_token: token,
                        ..ListClustersRequest::default()
                    })
                    .await?
                    .into_inner();
                l.clusters.extend(page.clusters);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            Ok((w, l))
        },
    )?;
    Ok(view(weights, clusters))
}

/// Sets the cluster-wide policy (and, when given, the optimized params).
pub fn set_policy(
    cp: &ControlPlane,
    wan_netns: &str,
    policy: Policy,
    params: Option<Params>,
) -> Result<()> {
    let req = SetPolicyRequest {
        service: String::new(),
        policy: LoadBalancing::from(policy).into(),
        params: params
            .map_or(OptimizedParams::Unspecified, OptimizedParams::from)
            .into(),
        clear: false,
    };
    call(cp, wan_netns, "SetPolicy", |mut c| async move {
        c.set_policy(req).await.map(|_| ())
    })
}

/// The broker's explanation of (service, source): per destination its cost, flow, weight
/// and notes (the service-time curve, where it came from, the marginal cost).
pub fn explain_rows(
    cp: &ControlPlane,
    wan_netns: &str,
    service: &str,
    source: &str,
) -> Result<Vec<ballast_proto::v1::ExplainDestination>> {
    let req = ExplainRequest {
        service: service.to_string(),
        source_cluster_id: source.to_string(),
    };
    call(cp, wan_netns, "Explain", |mut c| async move {
        let ex = c.explain(req).await?.into_inner();
        Ok(ex.destinations)
    })
}

/// The broker's egress savings (its Admin `Savings`) for `service`: measured bytes and USD
/// per (source, destination) and the round-robin counterfactual.
pub fn savings(
    cp: &ControlPlane,
    wan_netns: &str,
    service: &str,
) -> Result<ballast_proto::v1::SavingsResponse> {
    let req = ballast_proto::v1::SavingsRequest {
        service: service.to_string(),
    };
    call(cp, wan_netns, "Savings", |mut c| async move {
        Ok(c.savings(req).await?.into_inner())
    })
}

/// The lab's view of the two answers.
fn view(w: GetWeightsResponse, c: ListClustersResponse) -> BrokerView {
    let mut v = BrokerView {
        generation: w.generation,
        ..Default::default()
    };
    for row in w.weights {
        // A number this lab does not know (a newer broker) is "not stated", as `admin`
        // prints it: a wait for a policy then goes on waiting, status still shows weights.
        match ballast_proto::convert::policy("WeightsUpdate.policy", row.policy) {
            Ok(Some(p)) => {
                v.policy
                    .entry(row.service.clone())
                    .or_default()
                    .insert(row.source_cluster_id.clone(), p);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(service = %row.service, "broker weights: {e}"),
        }
        match ballast_proto::convert::status("WeightsUpdate.status", row.status) {
            Ok(Some(st)) => {
                v.status
                    .entry(row.service.clone())
                    .or_default()
                    .insert(row.source_cluster_id.clone(), st);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(service = %row.service, "broker weights: {e}"),
        }
        v.weights
            .entry(row.service)
            .or_default()
            .insert(row.source_cluster_id, row.weights.into_iter().collect());
    }
    for c in c.clusters {
        v.nodes.insert(
            c.cluster_id.clone(),
            c.nodes.iter().map(|n| n.node_name.clone()).collect(),
        );
        if let Some(min) = c.nodes.iter().map(|n| n.acked_generation).min() {
            if min > 0 {
                v.acked.insert(c.cluster_id, min);
            }
        }
    }
    v
}

/// The admin certificate, as tonic's client TLS settings.
fn tls(cp: &ControlPlane) -> Result<ClientTlsConfig> {
    let read = |file: &str| {
        let path = cp.certs_dir.join(file);
        std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read("admin.pem")?,
            read("admin-key.pem")?,
        ))
        .domain_name(BROKER_ADDR.to_string()))
}

/// Runs `f` with a client connected to the broker, from inside the wan namespace (see the
/// module's decisions).
fn call<T, F, Fut>(cp: &ControlPlane, wan_netns: &str, what: &'static str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(AdminClient<Channel>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let failed = move |reason: String| LabError::Admin { call: what, reason };
    let tls = tls(cp)?;
    // Every replica serves Admin: the first one that answers a connect is asked.
    let mut endpoints = Vec::new();
    for url in cp.broker_urls() {
        let endpoint = Endpoint::from_shared(url.clone())
            .and_then(|e| e.tls_config(tls.clone()))
            .map_err(|e| failed(format!("{url}: {}", chain(&e))))?;
        endpoints.push((
            url,
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(20)),
        ));
    }
    sys::in_netns(wan_netns, move || -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "building the admin client's runtime".into())?;
        rt.block_on(async move {
            let mut errors = Vec::new();
            let mut channel = None;
            for (url, endpoint) in endpoints {
                match endpoint.connect().await {
                    Ok(c) => {
                        channel = Some(c);
                        break;
                    }
                    Err(e) => errors.push(format!("connecting to {url}: {}", chain(&e))),
                }
            }
            let channel = channel.ok_or_else(|| failed(errors.join("; ")))?;
            f(AdminClient::new(channel))
                .await
                .map_err(|s| failed(format!("{:?}: {}", s.code(), s.message())))
        })
    })?
}

/// An error and its sources, `: `-separated (tonic's transport errors say little on top).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ballast_proto::v1::{ClusterInfo, NodeInfo, WeightsUpdate};

    #[test]
    fn the_view_keeps_weights_policies_and_the_lowest_acknowledged_generation() {
        let w = GetWeightsResponse {
            generation: 7,
            weights: vec![WeightsUpdate {
                service: "demo/echo".into(),
                source_cluster_id: "c1".into(),
                weights: [("c2".to_string(), 0.6), ("c3".to_string(), 0.4)].into(),
                policy: LoadBalancing::Optimized.into(),
                status: ballast_proto::v1::WeightsStatus::Stale.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let node = |acked| NodeInfo {
            acked_generation: acked,
            node_name: format!("n{acked}"),
            ..Default::default()
        };
        let c = ListClustersResponse {
            clusters: vec![
                ClusterInfo {
                    cluster_id: "c1".into(),
                    nodes: vec![node(7), node(6)],
                    ..Default::default()
                },
                ClusterInfo {
                    cluster_id: "c2".into(),
                    nodes: vec![node(0)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let v = view(w, c);
        assert_eq!(v.generation, 7);
        assert_eq!(v.weights["demo/echo"]["c1"]["c2"], 0.6);
        assert_eq!(v.policy["demo/echo"]["c1"], Policy::Optimized);
        assert_eq!(v.acked.get("c1"), Some(&6));
        assert_eq!(v.status["demo/echo"]["c1"], WeightsStatus::Stale);
        assert_eq!(v.nodes["c1"], ["n7", "n6"]);
        assert_eq!(v.acked.get("c2"), None, "never acknowledged");
    }

    #[test]
    fn an_unknown_policy_number_is_not_stated() {
        let w = GetWeightsResponse {
            generation: 1,
            weights: vec![WeightsUpdate {
                service: "s".into(),
                source_cluster_id: "c1".into(),
                policy: 99,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = view(w, ListClustersResponse::default());
        assert!(v.policy.is_empty());
        assert!(v.weights["s"].contains_key("c1"));
    }
}
