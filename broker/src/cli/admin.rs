//! `ballast-broker admin ...`: a thin client of the `Admin` service.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context};
use ballast_proto::convert;
use ballast_proto::v1::{
    admin_client::AdminClient, ExplainRequest, GetWeightsRequest, ListClustersRequest,
    LoadBalancing, OptimizedParams, SavingsRequest, SavingsResponse, SavingsTotal,
    SetPolicyRequest,
};
use clap::{Args, Subcommand};
use tonic::transport::{Channel, Endpoint};

use super::args::TlsArgs;
use ballast_k8s_api::mcs::NO_VIP_REMEDY;
use ballast_types::{Params, Policy};

/// `ballast-broker admin`.
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// The broker's gRPC address (http:// with --insecure, https:// otherwise).
    #[arg(long, env = "BALLAST_BROKER", default_value = "https://127.0.0.1:7443")]
    pub broker: String,
    /// The name the broker's certificate is checked against.
    #[arg(long, env = "BALLAST_BROKER_NAME", default_value = "localhost")]
    pub server_name: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Admin subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum AdminCommand {
    /// Registered clusters and the freshness of their measurements.
    Clusters {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List each cluster's imported services (by default only their count).
        #[arg(long)]
        imports: bool,
    },
    /// The weights currently published.
    Weights {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this source cluster.
        #[arg(long)]
        source: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Egress spent at the measured bytes against the round-robin counterfactual (the same
    /// bytes split equally over the serving clusters), per flow, per service and in total.
    Savings {
        /// Only this service, namespace/name.
        #[arg(long)]
        service: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Why a source's weights for a service are what they are.
    Explain {
        /// The service, namespace/name.
        #[arg(long)]
        service: String,
        /// The source cluster.
        #[arg(long)]
        source: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `admin policy ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum PolicyCommand {
    /// Sets the cluster-wide policy, or a service's override with --service.
    Set {
        /// Override for this service only.
        #[arg(long)]
        service: Option<String>,
        /// The load-balancing policy.
        #[arg(long, value_enum)]
        policy: Option<Policy>,
        /// What `optimized` and `weighted-round-robin` minimise.
        #[arg(long, value_enum)]
        params: Option<Params>,
    },
    /// Removes a service's override.
    Clear {
        /// The service.
        #[arg(long)]
        service: String,
    },
}

fn lb_name(v: i32) -> &'static str {
    convert::policy("policy", v)
        .ok()
        .flatten()
        .map_or("unspecified", Policy::as_str)
}

fn op_name(v: i32) -> &'static str {
    convert::params("params", v)
        .ok()
        .flatten()
        .map_or("unspecified", Params::as_str)
}

fn status_name(v: i32) -> &'static str {
    convert::status("status", v)
        .ok()
        .flatten()
        .map_or("unspecified", ballast_types::WeightsStatus::as_str)
}

async fn connect(a: &AdminArgs) -> anyhow::Result<AdminClient<Channel>> {
    let tls = a.tls.load().map_err(anyhow::Error::msg)?;
    let mut ep = Endpoint::from_shared(a.broker.clone())
        .with_context(|| format!("--broker {:?}", a.broker))?;
    if let Some(t) = &tls {
        ep = ep
            .tls_config(t.client_config(&a.server_name))
            .context("--ca/--cert/--key")?;
    }
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.broker))?;
    Ok(AdminClient::new(ch))
}

/// Runs one admin command and returns what to print.
///
/// # Errors
/// A bad flag, a connection failure or the broker's error status.
#[allow(clippy::too_many_lines)]
/// Every page of `ListClusters`, concatenated.
async fn all_clusters(
    c: &mut AdminClient<Channel>,
    include_imports: bool,
) -> anyhow::Result<ballast_proto::v1::ListClustersResponse> {
    let mut all = ballast_proto::v1::ListClustersResponse::default();
    let mut token = String::new();
    loop {
        let page = c
            .list_clusters(ListClustersRequest {
                page_size: 0,
                page_token: token,
                include_imports,
            })
            .await?
            .into_inner();
        all.stale_after_ms = page.stale_after_ms;
        all.cluster_expiry_ms = page.cluster_expiry_ms;
        all.clusters.extend(page.clusters);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

/// Every page of `GetWeights`, concatenated (the generation of the last page; a page of
/// another generation than the first starts over, so the entries are of one generation).
async fn all_weights(
    c: &mut AdminClient<Channel>,
    service: String,
    source_cluster_id: String,
) -> anyhow::Result<ballast_proto::v1::GetWeightsResponse> {
    for _attempt in 0..5 {
        let mut all = ballast_proto::v1::GetWeightsResponse::default();
        let mut token = String::new();
        let consistent = loop {
            let page = c
                .get_weights(GetWeightsRequest {
                    service: service.clone(),
                    source_cluster_id: source_cluster_id.clone(),
                    page_size: 0,
                    page_token: token,
                })
                .await?
                .into_inner();
            if !all.weights.is_empty() && page.generation != all.generation {
                break false;
            }
            all.generation = page.generation;
            all.weights.extend(page.weights);
            if page.next_page_token.is_empty() {
                break true;
            }
            token = page.next_page_token;
        };
        if consistent {
            return Ok(all);
        }
    }
    bail!("GetWeights: the broker published new generations while paging; try again")
}

pub async fn run(a: &AdminArgs) -> anyhow::Result<String> {
    // Validate flags before connecting.
    if let AdminCommand::Policy {
        command: PolicyCommand::Set { policy, params, .. },
    } = &a.command
    {
        if policy.is_none() && params.is_none() {
            bail!("policy set: give --policy, --params or both");
        }
    }
    let mut c = connect(a).await?;
    let mut out = String::new();
    match &a.command {
        AdminCommand::Clusters { json, imports } => {
            let r = all_clusters(&mut c, *imports).await?;
            if *json {
                let v: Vec<_> = r
                    .clusters
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "cluster_id": c.cluster_id, "region": c.region, "zone": c.zone,
                            "provider": c.provider, "gateway_address": c.gateway_address,
                            "last_report_ms": c.last_report_ms,
                            "last_report_age_ms": c.last_report_age_ms, "stale": c.stale,
                            "expired": c.expired,
                            "imports": c.imports.as_ref().map(|i| &i.services),
                            "imports_count": c.imports_count,
                            "nodes_count": c.nodes_count,
                            "truncated": c.truncated,
                            "services_without_vip": c.services_without_vip,
                            "services_without_vip_remedy": (!c.services_without_vip.is_empty())
                                .then_some(NO_VIP_REMEDY),
                            "nodes": c.nodes.iter().map(|n| serde_json::json!({
                                "node_name": n.node_name, "agent_version": n.agent_version,
                                "last_report_ms": n.last_report_ms,
                                "acked_generation": n.acked_generation})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                out = serde_json::to_string_pretty(&serde_json::json!({"clusters": v}))?;
            } else {
                let _ = writeln!(
                    out,
                    "{:<16} {:<16} {:<18} {:<8} {:>6} {:>12} {:>8} STATE",
                    "CLUSTER", "REGION", "ZONE", "PROVIDER", "NODES", "LAST_REPORT", "IMPORTS"
                );
                for c in &r.clusters {
                    let age = if c.last_report_age_ms < 0 {
                        "never".to_string()
                    } else {
                        format!("{:.1}s ago", c.last_report_age_ms as f64 / 1000.0)
                    };
                    let imports = c
                        .imports_count
                        .map_or_else(|| "all".to_string(), |n| n.to_string());
                    let _ = writeln!(
                        out,
                        "{:<16} {:<16} {:<18} {:<8} {:>6} {:>12} {:>8} {}",
                        c.cluster_id,
                        c.region,
                        c.zone,
                        c.provider,
                        c.nodes_count,
                        age,
                        imports,
                        if c.expired {
                            "expired"
                        } else if c.stale {
                            "stale"
                        } else {
                            "fresh"
                        }
                    );
                }
                for c in r
                    .clusters
                    .iter()
                    .filter(|c| !c.services_without_vip.is_empty())
                {
                    let _ = writeln!(
                        out,
                        "\n{}: {} ServiceImport(s) without a VIP, not steered: {}\n  remedy: {}",
                        c.cluster_id,
                        c.services_without_vip.len(),
                        c.services_without_vip.join(", "),
                        NO_VIP_REMEDY
                    );
                }
            }
        }
        AdminCommand::Weights {
            service,
            source,
            json,
        } => {
            let r = all_weights(
                &mut c,
                service.clone().unwrap_or_default(),
                source.clone().unwrap_or_default(),
            )
            .await?;
            if *json {
                let v: Vec<_> = r
                    .weights
                    .iter()
                    .map(|w| {
                        let weights: BTreeMap<_, _> = w.weights.iter().collect();
                        serde_json::json!({
                            "service": w.service, "source": w.source_cluster_id,
                            "weights": weights, "status": status_name(w.status),
                            "reason": w.reason, "policy": lb_name(w.policy),
                            "params": op_name(w.params), "computed_at_ms": w.computed_at_ms,
                        })
                    })
                    .collect();
                out = serde_json::to_string_pretty(
                    &serde_json::json!({"generation": r.generation, "weights": v}),
                )?;
            } else {
                let _ = writeln!(out, "generation {}", r.generation);
                for w in &r.weights {
                    let weights: BTreeMap<_, _> = w.weights.iter().collect();
                    let ws: Vec<String> =
                        weights.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
                    let _ = writeln!(
                        out,
                        "{} from {}: {} [{} {}/{}]{}",
                        w.service,
                        w.source_cluster_id,
                        ws.join(" "),
                        status_name(w.status),
                        lb_name(w.policy),
                        op_name(w.params),
                        if w.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", w.reason)
                        }
                    );
                }
            }
        }
        AdminCommand::Policy { command } => {
            let req = match command {
                PolicyCommand::Set {
                    service,
                    policy,
                    params,
                } => SetPolicyRequest {
                    service: service.clone().unwrap_or_default(),
                    policy: policy
                        .map_or(LoadBalancing::Unspecified, LoadBalancing::from)
                        .into(),
                    params: params
                        .map_or(OptimizedParams::Unspecified, OptimizedParams::from)
                        .into(),
                    clear: false,
                },
                PolicyCommand::Clear { service } => SetPolicyRequest {
                    service: service.clone(),
                    clear: true,
                    ..SetPolicyRequest::default()
                },
            };
            let scope = if req.service.is_empty() {
                "cluster-wide".to_string()
            } else {
                req.service.clone()
            };
            let r = c.set_policy(req).await?.into_inner();
            let _ = writeln!(
                out,
                "{scope}: policy {} params {}",
                lb_name(r.policy),
                op_name(r.params)
            );
        }
        AdminCommand::Explain {
            service,
            source,
            json,
        } => {
            let r = c
                .explain(ExplainRequest {
                    service: service.clone(),
                    source_cluster_id: source.clone(),
                })
                .await?
                .into_inner();
            if *json {
                out.clone_from(&r.detail_json);
            } else {
                let _ = writeln!(
                    out,
                    "{} from {} (generation {}, {} {}/{}, demand {:.1} {}/s){}",
                    r.service,
                    r.source_cluster_id,
                    r.generation,
                    status_name(r.status),
                    lb_name(r.policy),
                    op_name(r.params),
                    r.demand_rps,
                    unit_name(r.unit),
                    if r.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.reason)
                    }
                );
                let _ = writeln!(
                    out,
                    "{:<16} {:>10} {:>10} {:>8} {:>12} {:>12} {:>12} {:>10}  NOTES",
                    "DESTINATION",
                    "COST",
                    "FLOW",
                    "WEIGHT",
                    "CAPACITY",
                    "SENT_B/S",
                    "RECV_B/S",
                    "USD/H"
                );
                for d in &r.destinations {
                    // the capacity the last round solved with: one figure per cluster
                    let capacity = r
                        .solved_capacity_rps
                        .get(&d.cluster_id)
                        .map_or_else(|| "-".to_string(), |c| format!("{c:.1}"));
                    let _ = writeln!(
                        out,
                        "{:<16} {:>10.4} {:>10.2} {:>8.4} {:>12} {:>12.0} {:>12.0} {:>10.6}  {}",
                        d.cluster_id,
                        d.cost,
                        d.flow_rps,
                        d.weight,
                        capacity,
                        d.bytes_sent_per_second,
                        d.bytes_received_per_second,
                        d.egress_usd_per_hour,
                        d.notes.join(", ")
                    );
                }
            }
        }
        AdminCommand::Savings { service, json } => {
            let r = c
                .savings(SavingsRequest {
                    service: service.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            out = render_savings(&r, *json);
        }
    }
    Ok(out)
}

fn unit_name(u: i32) -> &'static str {
    match ballast_proto::v1::LoadUnit::try_from(u) {
        Ok(ballast_proto::v1::LoadUnit::Requests) => "requests",
        Ok(ballast_proto::v1::LoadUnit::Bytes) => "bytes",
        _ => "connections",
    }
}

/// `admin savings` as a table or JSON.
fn render_savings(r: &SavingsResponse, json: bool) -> String {
    let total_json = |t: &SavingsTotal| {
        serde_json::json!({
            "service": t.service,
            "bytes_per_second": t.bytes_per_second,
            "usd_per_hour": t.usd_per_hour,
            "round_robin_usd_per_hour": t.round_robin_usd_per_hour,
            "saved_usd_per_hour": t.saved_usd_per_hour,
        })
    };
    if json {
        let v = serde_json::json!({
            "as_of_ms": r.as_of_ms,
            "flows": r.flows.iter().map(|f| serde_json::json!({
                "service": f.service,
                "source": f.source_cluster_id,
                "destination": f.destination_cluster_id,
                "bytes_sent_per_second": f.bytes_sent_per_second,
                "bytes_received_per_second": f.bytes_received_per_second,
                "usd_per_gb_sent": f.usd_per_gb_sent,
                "usd_per_gb_received": f.usd_per_gb_received,
                "usd_per_hour": f.usd_per_hour,
                "round_robin_usd_per_hour": f.round_robin_usd_per_hour,
            })).collect::<Vec<_>>(),
            "services": r.services.iter().map(total_json).collect::<Vec<_>>(),
            "total": r.total.as_ref().map(total_json),
        });
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<10} {:<10} {:>12} {:>12} {:>8} {:>8} {:>12} {:>12}",
        "SERVICE", "SOURCE", "DEST", "SENT_B/S", "RECV_B/S", "$/GB>", "$/GB<", "USD/H", "RR_USD/H"
    );
    for f in &r.flows {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<10} {:>12.0} {:>12.0} {:>8.4} {:>8.4} {:>12.6} {:>12.6}",
            f.service,
            f.source_cluster_id,
            f.destination_cluster_id,
            f.bytes_sent_per_second,
            f.bytes_received_per_second,
            f.usd_per_gb_sent,
            f.usd_per_gb_received,
            f.usd_per_hour,
            f.round_robin_usd_per_hour
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>14} {:>14} {:>18} {:>14}",
        "SERVICE", "BYTES/S", "SPENT_USD/H", "ROUND_ROBIN_USD/H", "SAVED_USD/H"
    );
    let row = |out: &mut String, name: &str, t: &SavingsTotal| {
        let _ = writeln!(
            out,
            "{:<24} {:>14.0} {:>14.6} {:>18.6} {:>14.6}",
            name,
            t.bytes_per_second,
            t.usd_per_hour,
            t.round_robin_usd_per_hour,
            t.saved_usd_per_hour
        );
    };
    for t in &r.services {
        row(&mut out, &t.service, t);
    }
    if let Some(t) = &r.total {
        row(&mut out, "(total)", t);
    }
    out
}
