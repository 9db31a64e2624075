//! The topology file: the same information as the Kubernetes source, in one YAML file.
//! `member-agent/examples/topology.yaml` documents every field.
//!
//! A file is accepted whole or not at all. Type errors, unknown fields and per-item checks
//! (addresses, names, ports) are reported by serde_yaml with the path and the exact line;
//! checks across items (duplicates, a VIP used twice, an endpoint of an unknown cluster)
//! name the path and the line of the offending value.
//!
//! The file is polled (content compared, so coarse mtimes do not hide a change); a reload
//! that fails is logged and the last good catalog stays.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

mod locate;

use super::{CatalogWatch, Discovery, DiscoveryError, SourceStatus};
use crate::catalog::{
    validate_cluster_id, Catalog, Cluster, ClusterId, Endpoint, Protocol, Service, ServiceName,
    ServicePort, ServiceTime,
};

/// Why a topology file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A parse or per-item error; serde_yaml's message holds the field path, line and column.
    #[error("topology file {path}: {message}")]
    Parse {
        path: PathBuf,
        message: String,
        line: Option<usize>,
    },
    /// An error across items.
    #[error("topology file {path}: {field}: {message}{}", line.map(|l| format!(" at line {l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
        line: Option<usize>,
    },
}

impl TopologyError {
    /// The 1-based line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Parse { line, .. } | Self::Invalid { line, .. } => *line,
        }
    }
}

// ---- the file format (deny_unknown_fields everywhere) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    local_cluster: Option<Label>,
    clusters: Vec<ClusterEntry>,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterEntry {
    id: Label,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    gateway: Option<Ip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: SvcName,
    vips: Vec<Vip>,
    ports: Vec<PortEntry>,
    #[serde(default)]
    capacity_rps_per_pod: Option<Capacity>,
    /// One pod's service time as a function of its load (see [`ServiceTime`]).
    #[serde(default)]
    service_time: Option<ServiceTimeEntry>,
    /// The HTTP path the agents probe on the local endpoints to measure the service time.
    #[serde(default)]
    service_time_probe: Option<String>,
    /// The unit `capacity_rps_per_pod` counts: `connections` (default), `requests`, `bytes`.
    #[serde(default)]
    load_unit: Option<String>,
    #[serde(default)]
    endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTimeEntry {
    base_ms: NonNegative,
    slope_ms_per_rps: NonNegative,
}

impl ServiceTimeEntry {
    fn curve(self) -> ServiceTime {
        ServiceTime {
            base_ms: self.base_ms.0,
            slope_ms_per_rps: self.slope_ms_per_rps.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    #[serde(default)]
    name: Option<PortLabel>,
    port: PortNumber,
    #[serde(default = "default_protocol")]
    protocol: Proto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    address: Addr,
    cluster: Label,
    #[serde(default = "default_true")]
    ready: bool,
    #[serde(default)]
    port_name: Option<PortLabel>,
}

fn default_true() -> bool {
    true
}

fn default_protocol() -> Proto {
    Proto(Protocol::Tcp)
}

/// Scalars validated while parsing. The check runs inside the deserializer's `visit_str`,
/// so serde_yaml attaches the scalar's own path and line to the error.
macro_rules! checked_string {
    ($name:ident, $inner:ty, $check:expr) => {
        #[derive(Debug, Clone)]
        struct $name($inner);
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        let f: fn(&str) -> Result<$inner, String> = $check;
                        f(s).map($name).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

checked_string!(Label, String, |s| validate_cluster_id(s)
    .map(|()| s.to_owned()));
// a port name follows the same DNS-label rule as a cluster id; the message names it
checked_string!(PortLabel, String, |s| validate_cluster_id(s)
    .map(|()| s.to_owned())
    .map_err(|e| e.replacen("cluster id", "port name", 1)));
checked_string!(SvcName, ServiceName, |s| ServiceName::parse(s)
    .map_err(|e| e.to_string()));
checked_string!(Proto, Protocol, Protocol::parse);
checked_string!(Ip, IpAddr, |s| s
    .parse::<IpAddr>()
    .map_err(|e| format!("{s:?} is not an IP address: {e}")));
checked_string!(Vip, IpAddr, |s| {
    let ip: IpAddr = s
        .parse()
        .map_err(|e| format!("{s:?} is not an IP address: {e}"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{s:?} cannot be a service VIP"));
    }
    Ok(ip)
});
checked_string!(Addr, SocketAddr, |s| {
    let a: SocketAddr = s
        .parse()
        .map_err(|e| format!("{s:?} is not an ip:port address: {e}"))?;
    if a.port() == 0 || a.ip().is_unspecified() {
        return Err(format!("{s:?} needs a real IP and a port other than 0"));
    }
    Ok(a)
});

#[derive(Debug, Clone, Copy)]
struct PortNumber(u16);
impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number 1..=65535")
            }
            fn visit_u64<E: serde::de::Error>(self, p: u64) -> Result<PortNumber, E> {
                match u16::try_from(p) {
                    Ok(p) if p > 0 => Ok(PortNumber(p)),
                    _ => Err(E::custom(format!("port {p} is not in 1..=65535"))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, p: i64) -> Result<PortNumber, E> {
                Err(E::custom(format!("port {p} is not in 1..=65535")))
            }
        }
        d.deserialize_u64(V)
    }
}

/// Deserializes a number (integer or float) that `check` accepts.
fn checked_number<'de, D: serde::Deserializer<'de>>(
    d: D,
    expecting: &'static str,
    check: fn(f64) -> Result<f64, String>,
) -> Result<f64, D::Error> {
    struct V {
        expecting: &'static str,
        check: fn(f64) -> Result<f64, String>,
    }
    impl serde::de::Visitor<'_> for V {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
            (self.check)(v).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
            self.visit_f64(v as f64)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
            self.visit_f64(v as f64)
        }
    }
    d.deserialize_f64(V { expecting, check })
}

#[derive(Debug, Clone, Copy)]
struct Capacity(f64);
impl<'de> Deserialize<'de> for Capacity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_number(d, "a positive number", |c| {
            if c.is_finite() && c > 0.0 {
                Ok(c)
            } else {
                Err(format!("capacity {c} must be a positive number"))
            }
        })
        .map(Capacity)
    }
}

/// A finite number >= 0 (a service time or its slope: one that falls with load is not convex).
#[derive(Debug, Clone, Copy)]
struct NonNegative(f64);
impl<'de> Deserialize<'de> for NonNegative {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_number(d, "a finite number >= 0", |v| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!(
                    "{v} is not a finite number >= 0 (a service time that falls with load is \
                     not convex)"
                ))
            }
        })
        .map(NonNegative)
    }
}

// ---- parsing and checks across items ----

/// Parses and validates a topology file's text into a catalog for cluster `local`.
/// `path` is only used in messages.
pub fn parse(path: &Path, text: &str, local: &str) -> Result<Catalog, TopologyError> {
    let file: File = serde_yaml::from_str(text).map_err(|e| TopologyError::Parse {
        path: path.to_owned(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })?;
    // serde_yaml keeps no positions in the values it returns: the line of an error across
    // items is found by walking the text again to the field's path (`locate`)
    let invalid = |field: String, message: String| TopologyError::Invalid {
        path: path.to_owned(),
        line: locate::line_of(text, &field),
        field,
        message,
    };

    if let Some(Label(l)) = &file.local_cluster {
        if l != local {
            return Err(invalid(
                "local_cluster".into(),
                format!("is {l:?} but this agent runs as cluster {local:?}"),
            ));
        }
    }
    let mut clusters = BTreeMap::new();
    for (i, c) in file.clusters.iter().enumerate() {
        let id = c.id.0.clone();
        if clusters.contains_key(&id) {
            return Err(invalid(
                format!("clusters[{i}].id"),
                format!("cluster {id:?} is listed twice"),
            ));
        }
        clusters.insert(
            id.clone(),
            Cluster {
                id,
                region: c.region.clone(),
                zone: c.zone.clone(),
                provider: c.provider.clone(),
                gateway: c.gateway.as_ref().map(|g| g.0),
            },
        );
    }
    if !clusters.contains_key(local) {
        return Err(invalid(
            "clusters".into(),
            format!("this agent's cluster {local:?} is not listed"),
        ));
    }

    let mut services = BTreeMap::new();
    let mut vip_owner: BTreeMap<IpAddr, ServiceName> = BTreeMap::new();
    for (si, s) in file.services.iter().enumerate() {
        let name = s.name.0.clone();
        let at = format!("services[{si}]");
        if services.contains_key(&name) {
            return Err(invalid(
                format!("{at}.name"),
                format!("service {name} is listed twice"),
            ));
        }
        if s.vips.is_empty() {
            return Err(invalid(
                format!("{at}.vips"),
                "a service needs at least one VIP".into(),
            ));
        }
        for (vi, v) in s.vips.iter().enumerate() {
            if let Some(other) = vip_owner.insert(v.0, name.clone()) {
                return Err(invalid(
                    format!("{at}.vips[{vi}]"),
                    format!("VIP {} is already used by service {other}", v.0),
                ));
            }
        }
        if let Some(path) = &s.service_time_probe {
            crate::service_probe::check_probe_path(path)
                .map_err(|e| invalid(format!("{at}.service_time_probe"), e))?;
        }
        let load_unit = match &s.load_unit {
            None => ballast_types::LoadUnit::default(),
            Some(u) => u.parse().map_err(|e: ballast_types::UnknownValue| {
                invalid(format!("{at}.load_unit"), e.to_string())
            })?,
        };
        if s.ports.is_empty() {
            return Err(invalid(
                format!("{at}.ports"),
                "a service needs at least one port".into(),
            ));
        }
        let mut seen_ports = BTreeSet::new();
        let mut port_names = BTreeSet::new();
        for (pi, p) in s.ports.iter().enumerate() {
            if !seen_ports.insert((p.port.0, p.protocol.0)) {
                return Err(invalid(
                    format!("{at}.ports[{pi}].port"),
                    format!("port {}/{} is listed twice", p.port.0, p.protocol.0),
                ));
            }
            match &p.name {
                Some(PortLabel(n)) if !port_names.insert(n.clone()) => {
                    return Err(invalid(
                        format!("{at}.ports[{pi}].name"),
                        format!("port name {n:?} is used twice"),
                    ));
                }
                Some(_) => {}
                None if s.ports.len() > 1 => {
                    return Err(invalid(
                        format!("{at}.ports[{pi}].name"),
                        "every port of a multi-port service needs a name".into(),
                    ));
                }
                None => {}
            }
        }
        let mut endpoints = Vec::new();
        let mut seen_eps = BTreeSet::new();
        for (ei, e) in s.endpoints.iter().enumerate() {
            let eat = format!("{at}.endpoints[{ei}]");
            let addr = e.address.0.to_string();
            if !clusters.contains_key(&e.cluster.0) {
                return Err(invalid(
                    format!("{eat}.cluster"),
                    format!("cluster {:?} is not in clusters", e.cluster.0),
                ));
            }
            let port_name = e.port_name.as_ref().map(|p| p.0.clone());
            match &port_name {
                Some(n) if !port_names.contains(n) => {
                    return Err(invalid(
                        format!("{eat}.port_name"),
                        format!("service {name} has no port named {n:?}"),
                    ));
                }
                None if s.ports.len() > 1 => {
                    return Err(invalid(
                        format!("{eat}.port_name"),
                        "endpoints of a multi-port service must name their port".into(),
                    ));
                }
                _ => {}
            }
            if !seen_eps.insert((e.address.0, port_name.clone())) {
                return Err(invalid(
                    format!("{eat}.address"),
                    format!("endpoint {addr} is listed twice"),
                ));
            }
            endpoints.push(Endpoint {
                address: e.address.0,
                cluster: e.cluster.0.clone(),
                ready: e.ready,
                port_name,
            });
        }
        services.insert(
            name.clone(),
            Service {
                name,
                vips: s.vips.iter().map(|v| v.0).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.as_ref().map(|n| n.0.clone()),
                        port: p.port.0,
                        protocol: p.protocol.0,
                    })
                    .collect(),
                capacity_rps_per_pod: s.capacity_rps_per_pod.map(|c| c.0),
                service_time_per_pod: s.service_time.map(ServiceTimeEntry::curve),
                service_time_probe: s.service_time_probe.clone(),
                load_unit,
                endpoints,
            },
        );
    }
    Ok(Catalog {
        local: local.to_owned(),
        clusters,
        services,
        without_vip: Default::default(),
    })
}

/// Reads and parses the file.
pub fn load(path: &Path, local: &str) -> Result<Catalog, TopologyError> {
    let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text, local)
}

/// The topology-file source.
#[derive(Debug, Clone)]
pub struct TopologyDiscovery {
    pub path: PathBuf,
    pub local: ClusterId,
    /// How often the file is checked for a change.
    pub poll_interval: Duration,
}

impl Discovery for TopologyDiscovery {
    fn name(&self) -> &'static str {
        "topology"
    }

    async fn start(self) -> Result<CatalogWatch, DiscoveryError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| TopologyError::Read {
                path: self.path.clone(),
                source,
            })?;
        let first = parse(&self.path, &text, &self.local)?;
        tracing::info!(
            path = %self.path.display(),
            clusters = first.clusters.len(),
            services = first.services.len(),
            "topology loaded"
        );
        let (tx, rx) = watch::channel(Arc::new(first));
        let (status_tx, status_rx) = watch::channel(SourceStatus {
            refreshes_ok: 1,
            ..SourceStatus::default()
        });
        let task = tokio::spawn(async move {
            let mut last_text = text;
            let mut tick = tokio::time::interval(self.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let text = match tokio::fs::read_to_string(&self.path).await {
                    Ok(t) => t,
                    Err(source) => {
                        let err = TopologyError::Read {
                            path: self.path.clone(),
                            source,
                        };
                        report_failure(&status_tx, &err);
                        continue;
                    }
                };
                if text == last_text {
                    continue;
                }
                match parse(&self.path, &text, &self.local) {
                    Ok(catalog) => {
                        last_text = text;
                        tracing::info!(path = %self.path.display(), "topology reloaded");
                        tx.send_if_modified(|cur| {
                            if **cur == catalog {
                                false
                            } else {
                                *cur = Arc::new(catalog);
                                true
                            }
                        });
                        status_tx.send_modify(|s| {
                            s.refreshes_ok += 1;
                            s.last_error = None;
                        });
                    }
                    Err(err) => {
                        // remember the bad text so it is reported once, not every poll
                        last_text = text;
                        report_failure(&status_tx, &err);
                    }
                }
            }
        });
        Ok(CatalogWatch::new(rx, status_rx, task))
    }
}

fn report_failure(status: &watch::Sender<SourceStatus>, err: &TopologyError) {
    tracing::warn!(error = %err, "topology reload failed; keeping the last good catalog");
    status.send_modify(|s| {
        s.refreshes_failed += 1;
        s.last_error = Some(err.to_string());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
local_cluster: east
clusters:
  - id: east
    region: us-east-1
    zone: us-east-1a
    provider: aws
    gateway: 127.0.0.1
  - id: west
    region: eu-west-1
    gateway: 127.0.0.2
services:
  - name: shop/web
    vips: [127.96.0.10]
    ports:
      - name: http
        port: 80
        protocol: TCP
    capacity_rps_per_pod: 250
    endpoints:
      - { address: "127.0.1.1:8080", cluster: east, port_name: http }
      - { address: "127.0.2.1:8080", cluster: west, ready: false, port_name: http }
  - name: shop/db
    vips: [127.96.0.11]
    ports:
      - port: 5432
    endpoints:
      - address: 127.0.2.2:5432
        cluster: west
    service_time: { base_ms: 12, slope_ms_per_rps: 0.2 }
    service_time_probe: /healthz
"#;

    fn p(text: &str) -> Result<Catalog, TopologyError> {
        parse(Path::new("t.yaml"), text, "east")
    }

    #[test]
    fn good_file_becomes_catalog() {
        let c = p(GOOD).expect("valid");
        assert_eq!(c.local, "east");
        assert_eq!(c.clusters.len(), 2);
        assert_eq!(
            c.clusters["west"].gateway,
            Some("127.0.0.2".parse().expect("ip"))
        );
        assert_eq!(c.clusters["west"].zone, None);
        let web = &c.services[&ServiceName::parse("shop/web").expect("name")];
        assert_eq!(web.vips, vec!["127.96.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(web.capacity_rps_per_pod, Some(250.0));
        assert_eq!(web.service_time_per_pod, None);
        assert_eq!(web.service_time_probe, None);
        let db = &c.services[&ServiceName::parse("shop/db").expect("valid")];
        assert_eq!(
            db.service_time_per_pod,
            Some(ServiceTime {
                base_ms: 12.0,
                slope_ms_per_rps: 0.2
            })
        );
        assert_eq!(web.endpoints.len(), 2);
        assert!(web.endpoints[0].ready);
        assert!(!web.endpoints[1].ready);
        let db = &c.services[&ServiceName::parse("shop/db").expect("name")];
        assert_eq!(db.ports[0].protocol, Protocol::Tcp);
        assert_eq!(db.ports[0].name, None);
        assert_eq!(db.service_time_probe.as_deref(), Some("/healthz"));
        assert_eq!(c.probe_targets().len(), 1);
    }

    #[test]
    fn example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/topology.yaml");
        let c = load(&path, "east").expect("the documented example must load");
        assert!(c.services.len() >= 2);
        assert!(c.clusters.len() >= 3);
    }

    /// Replaces `from` by `to` in GOOD (exactly once) and returns the error.
    fn broken(from: &str, to: &str) -> TopologyError {
        assert_eq!(GOOD.matches(from).count(), 1, "{from:?} must occur once");
        p(&GOOD.replace(from, to)).expect_err("must be refused")
    }

    fn assert_err(err: &TopologyError, field: &str, line: usize) {
        let msg = err.to_string();
        assert!(msg.contains(field), "{msg:?} should name {field:?}");
        assert_eq!(err.line(), Some(line), "{msg}");
    }

    #[test]
    fn a_bad_probe_path_is_refused_naming_the_field() {
        let e = broken(
            "service_time_probe: /healthz",
            "service_time_probe: healthz",
        );
        assert_err(&e, "services[1].service_time_probe", 31);
        assert!(e.to_string().contains("does not start with '/'"), "{e}");
    }

    #[test]
    fn per_item_errors_name_field_and_line() {
        assert_err(
            &broken("gateway: 127.0.0.2", "gateway: 127.0.0.300"),
            "clusters[1].gateway",
            11,
        );
        assert_err(
            &broken("    region: eu-west-1", "    regoin: eu-west-1"),
            "unknown field `regoin`",
            10,
        );
        assert_err(
            &broken("port: 5432", "port: 70000"),
            "services[1].ports[0].port",
            26,
        );
        assert_err(
            &broken("protocol: TCP", "protocol: SCTP"),
            "services[0].ports[0].protocol",
            18,
        );
        assert_err(
            &broken("address: 127.0.2.2:5432", "address: 127.0.2.2"),
            "services[1].endpoints[0].address",
            28,
        );
        assert_err(
            &broken("name: shop/db", "name: shop"),
            "services[1].name",
            23,
        );
        assert_err(
            &broken("capacity_rps_per_pod: 250", "capacity_rps_per_pod: -1"),
            "capacity_rps_per_pod",
            19,
        );
        assert_err(
            &broken("slope_ms_per_rps: 0.2", "slope_ms_per_rps: -0.2"),
            "services[1].service_time.slope_ms_per_rps",
            30,
        );
        assert_err(
            &broken("base_ms: 12,", "base: 12,"),
            "services[1].service_time",
            30,
        );
    }

    #[test]
    fn cross_item_errors_name_field_and_line() {
        assert_err(
            &broken("vips: [127.96.0.11]", "vips: [127.96.0.10]"),
            "services[1].vips[0]",
            24,
        );
        assert_err(
            &broken("name: shop/db", "name: shop/web"),
            "services[1].name",
            23,
        );
        assert_err(&broken("  - id: west", "  - id: east"), "clusters[1].id", 9);
        assert_err(
            &broken("        cluster: west", "        cluster: north"),
            "services[1].endpoints[0].cluster",
            29,
        );
        assert_err(
            &broken(
                "ready: false, port_name: http",
                "ready: false, port_name: https",
            ),
            "services[0].endpoints[1].port_name",
            22,
        );
        assert_err(
            &broken("local_cluster: east", "local_cluster: west"),
            "local_cluster",
            2,
        );
        let e = p("clusters:\n  - id: west\n").expect_err("local missing");
        assert_err(&e, "clusters", 1);
    }

    #[tokio::test]
    async fn reload_applies_good_files_and_keeps_last_good_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("topology.yaml");
        std::fs::write(&path, GOOD).expect("write");
        let d = TopologyDiscovery {
            path: path.clone(),
            local: "east".into(),
            poll_interval: Duration::from_millis(20),
        };
        let mut w = d.start().await.expect("good file");
        let first = w.current();
        assert_eq!(first.services.len(), 2);

        // a bad file: refused whole, status says why, catalog unchanged
        std::fs::write(
            &path,
            GOOD.replace("vips: [127.96.0.11]", "vips: [127.96.0.10]"),
        )
        .expect("write");
        let mut status = w.status.clone();
        let st = tokio::time::timeout(
            Duration::from_secs(5),
            status.wait_for(|s| s.refreshes_failed > 0),
        )
        .await
        .expect("failure reported")
        .expect("sender alive")
        .clone();
        assert!(st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("already used")));
        assert_eq!(w.current(), first);
        assert!(!w.catalog.has_changed().expect("alive"));

        // a good change is applied
        std::fs::write(
            &path,
            GOOD.replace("capacity_rps_per_pod: 250", "capacity_rps_per_pod: 99"),
        )
        .expect("write");
        tokio::time::timeout(Duration::from_secs(5), w.catalog.changed())
            .await
            .expect("reloaded")
            .expect("alive");
        let web = &w.current().services[&ServiceName::parse("shop/web").expect("name")];
        assert_eq!(web.capacity_rps_per_pod, Some(99.0));
        assert_eq!(w.status.borrow().last_error, None);
    }

    #[tokio::test]
    async fn start_fails_on_a_bad_first_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, "clusters: 3\n").expect("write");
        let d = TopologyDiscovery {
            path,
            local: "east".into(),
            poll_interval: Duration::from_secs(1),
        };
        assert!(d.start().await.is_err());
    }
}
