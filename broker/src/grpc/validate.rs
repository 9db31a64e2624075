//! Validation of incoming messages: each check returns `INVALID_ARGUMENT` naming the field,
//! and [`validate_report`] turns a whole report into a store record or refuses it (nothing
//! of an invalid message is stored). Also the mapping of engine errors to statuses.

use std::collections::BTreeSet;

use ballast_proto::v1::ReportRequest;
use ballast_store::{CapacityRecord, ReportRecord, RpsRecord, RttRecord};
use ballast_types::{ClusterId, LoadUnit, ServiceName, MAX_SERVICE_NAME_LEN};
use tonic::Status;

use crate::engine::{Engine, EngineError};

pub(crate) fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

/// Metadata key of an `INVALID_ARGUMENT` that refuses a sample about a cluster the broker
/// does not know (yet); its value is that cluster's id, so an agent can leave the peer out
/// of its reports without parsing the message.
pub const UNKNOWN_CLUSTER_METADATA: &str = "ballast-unknown-cluster";

pub(crate) fn unknown_cluster(field: &str, id: &str) -> Status {
    let mut status = invalid(field, format!("unknown cluster {id:?}"));
    // ids passed check_cluster_id (ASCII), so this only fails on a bug; the message still names it
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(id) {
        status.metadata_mut().insert(UNKNOWN_CLUSTER_METADATA, v);
    }
    status
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

pub(crate) fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::Model(m) => Status::failed_precondition(m.to_string()),
        // The CRD is the declared source of truth for a scope it holds.
        EngineError::Store(s @ ballast_store::StoreError::PolicyHeldByCrd { .. }) => {
            Status::failed_precondition(s.to_string())
        }
        // A bound on stored state (nodes or imports per cluster, services): named with its flag.
        EngineError::Store(s @ ballast_store::StoreError::Limit { .. }) => {
            Status::resource_exhausted(s.to_string())
        }
        e @ EngineError::TooManyServices { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::Store(s) => internal(s),
    }
}

/// Checks a cluster id field.
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn check_cluster_id(field: &str, v: &str) -> Result<(), Status> {
    ClusterId::validate(v).map_err(|e| invalid(field, e))
}

pub(crate) fn check_text(field: &str, v: &str, max: usize) -> Result<(), Status> {
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

/// A service name: `namespace/name`, both DNS labels (`ballast_types::ServiceName`, the
/// rule the agent's discovery applies to every ServiceImport it reports).
pub(crate) fn check_service(field: &str, v: &str) -> Result<(), Status> {
    check_text(field, v, MAX_SERVICE_NAME_LEN)?;
    ServiceName::parse(v)
        .map(|_| ())
        .map_err(|e| invalid(field, e))
}

pub(crate) fn check_num(field: &str, v: f64) -> Result<(), Status> {
    if !v.is_finite() {
        return Err(invalid(field, format!("{v} is not a finite number")));
    }
    if v < 0.0 {
        return Err(invalid(field, format!("{v} is negative")));
    }
    Ok(())
}

/// The largest RTT accepted, milliseconds (10 minutes: no real path is slower).
pub const MAX_RTT_MS: f64 = 600_000.0;
/// The largest RPS (demand) accepted per sample.
pub const MAX_RPS: f64 = 1e9;
/// The largest capacity accepted per sample, requests per second.
pub const MAX_CAPACITY_RPS: f64 = 1e9;
/// The largest service time (ms) and service-time slope (ms per RPS) accepted.
pub const MAX_SERVICE_TIME_MS: f64 = 600_000.0;

/// [`check_num`] and at most `max` (`what` names the bound): physical bounds keep every sum
/// the broker forms over nodes and clusters finite.
pub(crate) fn check_bounded(field: &str, v: f64, max: f64, what: &str) -> Result<(), Status> {
    check_num(field, v)?;
    if v > max {
        return Err(invalid(field, format!("{v} is above {max} ({what})")));
    }
    Ok(())
}

pub(crate) fn check_time(field: &str, v: i64, now: i64) -> Result<(), Status> {
    if v <= 0 {
        return Err(invalid(field, "required (Unix milliseconds > 0)"));
    }
    if v > now + 60_000 {
        return Err(invalid(field, "more than a minute in the future"));
    }
    Ok(())
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
        full_set: m.full_set,
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
            check_bounded(
                &format!("{f}.rtt_ms"),
                s.rtt_ms,
                MAX_RTT_MS,
                "the largest RTT accepted, 10 minutes",
            )?;
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
        check_bounded(
            &format!("{f}.rps"),
            s.rps,
            MAX_RPS,
            "the largest RPS accepted",
        )?;
        check_bounded(
            &format!("{f}.bytes_sent_per_second"),
            s.bytes_sent_per_second,
            MAX_BYTES_PER_SECOND,
            "the largest byte rate accepted, 1 TB/s",
        )?;
        check_bounded(
            &format!("{f}.bytes_received_per_second"),
            s.bytes_received_per_second,
            MAX_BYTES_PER_SECOND,
            "the largest byte rate accepted, 1 TB/s",
        )?;
        rec.rps.push(RpsRecord {
            src: m.cluster_id.clone(),
            service: s.service.clone(),
            dst: s.destination_cluster_id.clone(),
            node_name: m.node_name.clone(),
            rps: s.rps,
            measured_at_ms: at(&format!("{f}.measured_at_ms"), s.measured_at_ms)?,
            bytes_sent_per_s: s.bytes_sent_per_second,
            bytes_received_per_s: s.bytes_received_per_second,
        });
    }
    let mut seen = BTreeSet::new();
    for (i, s) in m.capacity.iter().enumerate() {
        let f = format!("capacity[{i}]");
        check_service(&format!("{f}.service"), &s.service)?;
        if !seen.insert(s.service.clone()) {
            return Err(invalid(&format!("{f}.service"), "duplicate service"));
        }
        check_bounded(
            &format!("{f}.capacity_rps"),
            s.capacity_rps,
            MAX_CAPACITY_RPS,
            "the largest capacity accepted",
        )?;
        let curve = match &s.service_time {
            Some(c) => {
                check_bounded(
                    &format!("{f}.service_time.base_ms"),
                    c.base_ms,
                    MAX_SERVICE_TIME_MS,
                    "the longest service time accepted",
                )?;
                check_bounded(
                    &format!("{f}.service_time.slope_ms_per_rps"),
                    c.slope_ms_per_rps,
                    MAX_SERVICE_TIME_MS,
                    "the steepest service-time slope accepted",
                )?;
                (Some(c.base_ms), Some(c.slope_ms_per_rps))
            }
            None => (None, None),
        };
        if let Some(ms) = s.measured_service_ms {
            check_bounded(
                &format!("{f}.measured_service_ms"),
                ms,
                MAX_SERVICE_TIME_MS,
                "the longest service time accepted",
            )?;
        }
        let unit = load_unit(&format!("{f}.unit"), s.unit)?;
        if let Some((other, other_unit)) =
            engine.load_unit_conflict(&s.service, &m.cluster_id, unit, now)
        {
            return Err(invalid(
                &format!("{f}.unit"),
                format!(
                    "{} is counted in {other_unit} (cluster {other:?} states its capacity so); \
                     a capacity in {unit} cannot be compared with it: state it in {other_unit}, \
                     or change the unit on every serving cluster (the old one holds until its \
                     samples are older than the broker's stale-after age)",
                    s.service
                ),
            ));
        }
        rec.capacity.push(CapacityRecord {
            cluster_id: m.cluster_id.clone(),
            service: s.service.clone(),
            node_name: m.node_name.clone(),
            capacity_rps: s.capacity_rps,
            measured_at_ms: at(&format!("{f}.measured_at_ms"), s.measured_at_ms)?,
            service_base_ms: curve.0,
            service_slope_ms_per_rps: curve.1,
            measured_service_ms: s.measured_service_ms,
            load_unit: unit.as_str().to_owned(),
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
    if m.services_without_vip.len() > MAX_IMPORTS {
        return Err(invalid(
            "services_without_vip",
            format!(
                "{} services, more than the {MAX_IMPORTS} allowed",
                m.services_without_vip.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, service) in m.services_without_vip.iter().enumerate() {
        let f = format!("services_without_vip[{i}]");
        check_service(&f, service)?;
        if !seen.insert(service) {
            return Err(invalid(&f, format!("duplicate service {service:?}")));
        }
    }
    rec.services_without_vip = m.services_without_vip.clone();
    Ok(rec)
}

/// The largest byte rate accepted in a report (1 TB/s: far above any node's link).
pub const MAX_BYTES_PER_SECOND: f64 = 1e12;

/// The proto's `LoadUnit` as the vocabulary's (UNSPECIFIED = connections, the default).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` for a number outside the enum.
pub(crate) fn load_unit(field: &str, v: i32) -> Result<LoadUnit, Status> {
    match ballast_proto::v1::LoadUnit::try_from(v) {
        Ok(ballast_proto::v1::LoadUnit::Unspecified | ballast_proto::v1::LoadUnit::Connections) => {
            Ok(LoadUnit::Connections)
        }
        Ok(ballast_proto::v1::LoadUnit::Requests) => Ok(LoadUnit::Requests),
        Ok(ballast_proto::v1::LoadUnit::Bytes) => Ok(LoadUnit::Bytes),
        Err(_) => Err(invalid(
            field,
            format!("{v} is not a load unit (connections 1, requests 2, bytes 3)"),
        )),
    }
}

/// The most services one node may declare it imports (or imports without a VIP).
pub const MAX_IMPORTS: usize = 100_000;
