//! What the agent tells the broker: the report (RTT, RPS, capacity, imports, imports without
//! a VIP) and this
//! cluster's identity for `Register`. Pure functions over the catalog and the probe table.

use crate::service_probe::ServiceTimes;
use std::collections::BTreeMap;

use ballast_proto::v1::{
    CapacitySample, ImportedServices, LoadUnit as ProtoLoadUnit, ReportRequest, RpsSample,
    RttSample, ServiceTimeCurve,
};
use ballast_types::LoadUnit;

use crate::install::FlowRate;

use crate::capacity::local_capacities;
use crate::catalog::{Catalog, Cluster, ClusterId, ServiceName};
use crate::probe::{PeerTable, Reachability};

/// This cluster's identity: what flags gave (`given`) over the catalog's entry for it.
pub fn identity(given: &Cluster, catalog: &Catalog) -> Cluster {
    let from_catalog = catalog.clusters.get(&given.id);
    let pick = |a: &Option<String>, b: Option<&Option<String>>| {
        a.clone().or_else(|| b.and_then(Clone::clone))
    };
    Cluster {
        id: given.id.clone(),
        region: pick(&given.region, from_catalog.map(|c| &c.region)),
        zone: pick(&given.zone, from_catalog.map(|c| &c.zone)),
        provider: pick(&given.provider, from_catalog.map(|c| &c.provider)),
        gateway: given.gateway.or(from_catalog.and_then(|c| c.gateway)),
    }
}

/// One report: RTT per peer (peers not measured yet are left out), RPS per (service,
/// destination), the local capacities and the imported services — the full set of this
/// node's facts (`full_set`), so that what it no longer states is withdrawn at the broker.
pub fn build_report(
    cluster_id: &str,
    node_name: &str,
    catalog: &Catalog,
    peers: &PeerTable,
    rps: &BTreeMap<(ServiceName, ClusterId), FlowRate>,
    measured: &ServiceTimes,
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
        cluster_id: cluster_id.to_owned(),
        node_name: node_name.to_owned(),
        measured_at_ms: ballast_types::now_ms(),
        rtt,
        rps: rps
            .iter()
            .map(|((svc, dst), rate)| RpsSample {
                service: svc.to_string(),
                destination_cluster_id: dst.clone(),
                rps: rate.connections,
                measured_at_ms: 0,
                bytes_sent_per_second: rate.bytes_sent,
                bytes_received_per_second: rate.bytes_received,
            })
            .collect(),
        capacity: local_capacities(catalog)
            .into_iter()
            .map(|(svc, cap)| CapacitySample {
                service: svc.to_string(),
                capacity_rps: cap.rps,
                measured_at_ms: 0,
                service_time: cap.service_time.map(|c| ServiceTimeCurve {
                    base_ms: c.base_ms,
                    slope_ms_per_rps: c.slope_ms_per_rps,
                }),
                measured_service_ms: measured.get(&svc).copied(),
                unit: match cap.unit {
                    LoadUnit::Connections => ProtoLoadUnit::Connections,
                    LoadUnit::Requests => ProtoLoadUnit::Requests,
                    LoadUnit::Bytes => ProtoLoadUnit::Bytes,
                }
                .into(),
            })
            .collect(),
        // every service discovery knows is one this cluster imports (steers): the broker
        // computes and sends weights for these only
        imports: Some(ImportedServices {
            services: catalog.services.keys().map(ToString::to_string).collect(),
        }),
        // every report states all of this node's facts: what it leaves out is withdrawn
        // (a peer no longer probed, a service no longer exported)
        full_set: true,
        // imports discovery knows but cannot steer (no VIP), for the operator
        services_without_vip: catalog
            .without_vip
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}
