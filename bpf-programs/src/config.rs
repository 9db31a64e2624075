//! The static file of `ballast-dataplane apply`:
//!
//! ```yaml
//! services:
//!   - name: demo/web
//!     vip: 127.96.0.10
//!     port: 80
//!     protocol: tcp            # tcp | udp
//!     backends:
//!       - {address: "127.0.0.1:8081", cluster: c2, weight: 3}
//!       - {address: "127.0.0.1:8082", cluster: c3, weight: 1, healthy: true}
//!     canary: {service: demo/web-v2, percent: 10}   # optional
//! ```

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    spec::{BackendSpec, Canary, Protocol, SelectMode, ServiceSpec},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    vip: String,
    port: u16,
    protocol: Protocol,
    backends: Vec<FileBackend>,
    #[serde(default)]
    canary: Option<FileCanary>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    address: String,
    cluster: String,
    weight: u32,
    #[serde(default = "yes")]
    healthy: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCanary {
    service: String,
    percent: f64,
}

fn invalid(field: String, reason: impl ToString) -> Error {
    Error::InvalidField {
        field,
        reason: reason.to_string(),
    }
}

/// Parses and validates a services file. Errors name the field (`services[1].backends[0].address`).
///
/// # Errors
/// [`Error::InvalidField`] for syntax, unknown fields and every semantic check.
pub fn parse(text: &str) -> Result<Vec<ServiceSpec>> {
    let file: File = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        invalid(format!("file{at}"), e)
    })?;
    let mut specs = Vec::with_capacity(file.services.len());
    for (i, s) in file.services.into_iter().enumerate() {
        let f = |name: &str| format!("services[{i}].{name}");
        let vip = s
            .vip
            .parse()
            .map_err(|e| invalid(f("vip"), format!("{:?}: {e}", s.vip)))?;
        let mut backends = Vec::with_capacity(s.backends.len());
        for (j, b) in s.backends.into_iter().enumerate() {
            let addr = b.address.parse().map_err(|e| {
                invalid(
                    f(&format!("backends[{j}].address")),
                    format!("{:?}: {e} (want ip:port)", b.address),
                )
            })?;
            backends.push(BackendSpec {
                addr,
                cluster: b.cluster,
                weight: b.weight,
                healthy: b.healthy,
            });
        }
        specs.push(ServiceSpec {
            name: s.name,
            vip,
            port: s.port,
            protocol: s.protocol,
            backends,
            canary: s.canary.map(|c| Canary {
                service: c.service,
                percent: c.percent,
            }),
            select: SelectMode::Slots,
        });
    }
    validate_set(&specs)?;
    Ok(specs)
}

/// Checks a whole set of services: each one, unique names and VIPs, canary targets present.
///
/// # Errors
/// [`Error::InvalidField`] naming `services[i].<field>`.
pub fn validate_set(specs: &[ServiceSpec]) -> Result<()> {
    let mut names = HashMap::new();
    let mut vips = HashSet::new();
    for (i, s) in specs.iter().enumerate() {
        let f = |name: &str| format!("services[{i}].{name}");
        s.validate().map_err(|e| {
            let field = match &e {
                Error::InvalidName(_) => "name".to_string(),
                Error::VipPortZero { .. } => "port".into(),
                Error::CanaryPercent { .. } => "canary.percent".into(),
                Error::CanaryTargetInvalid { .. } => "canary.service".into(),
                Error::WeightSumZero { .. }
                | Error::NoBackends { .. }
                | Error::TooManyBackends { .. } => "backends".into(),
                Error::InvalidCluster(c) => {
                    let j = s.backends.iter().position(|b| &b.cluster == c).unwrap_or(0);
                    format!("backends[{j}].cluster")
                }
                Error::FamilyMismatch { backend, .. } | Error::BackendPortZero { backend, .. } => {
                    let j = s
                        .backends
                        .iter()
                        .position(|b| &b.addr.to_string() == backend)
                        .unwrap_or(0);
                    format!("backends[{j}].address")
                }
                _ => "service".into(),
            };
            invalid(f(&field), e)
        })?;
        if names.insert(s.name.as_str(), i).is_some() {
            return Err(invalid(
                f("name"),
                format!("duplicate service name {:?}", s.name),
            ));
        }
        if !vips.insert((s.vip, s.port, s.protocol)) {
            return Err(invalid(
                f("vip"),
                format!(
                    "{}:{}/{} is used by another service of the file",
                    s.vip,
                    s.port,
                    s.protocol.as_str()
                ),
            ));
        }
    }
    for (i, s) in specs.iter().enumerate() {
        if let Some(c) = &s.canary {
            let field = format!("services[{i}].canary.service");
            let Some(&j) = names.get(c.service.as_str()) else {
                return Err(invalid(field, format!("unknown service {:?}", c.service)));
            };
            if specs[j].canary.is_some() {
                return Err(invalid(
                    field,
                    format!("canary target {:?} has a canary of its own", c.service),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: demo/web
    vip: 127.96.0.10
    port: 80
    protocol: tcp
    backends:
      - {address: "127.0.0.1:8081", cluster: c2, weight: 3}
      - {address: "127.0.0.1:8082", cluster: c3, weight: 1, healthy: true}
    canary: {service: demo/web-v2, percent: 10}
  - name: demo/web-v2
    vip: 127.96.0.11
    port: 80
    protocol: tcp
    backends:
      - {address: "127.0.0.1:8083", cluster: c2, weight: 1}
"#;

    fn err_field(text: &str) -> String {
        match parse(text) {
            Err(Error::InvalidField { field, .. }) => field,
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_documented_format() {
        let s = parse(GOOD).expect("valid");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].backends[0].weight, 3);
        assert!(s[0].backends[0].healthy);
        assert_eq!(s[0].canary.as_ref().map(|c| c.percent), Some(10.0));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            err_field(&GOOD.replace("127.0.0.1:8082", "127.0.0.1")),
            "services[0].backends[1].address"
        );
        assert_eq!(
            err_field(&GOOD.replace("127.96.0.11", "nope")),
            "services[1].vip"
        );
        assert_eq!(
            err_field(&GOOD.replace("percent: 10", "percent: 120")),
            "services[0].canary.percent"
        );
        assert_eq!(
            err_field(&GOOD.replace("service: demo/web-v2", "service: nope")),
            "services[0].canary.service"
        );
        assert_eq!(
            err_field(&GOOD.replace(
                "8083\", cluster: c2, weight: 1",
                "8083\", cluster: c2, weight: 0"
            )),
            "services[1].backends"
        );
        assert!(err_field(&GOOD.replace("protocol: tcp", "protocol: sctp")).starts_with("file"));
        assert!(err_field(&GOOD.replace("port: 80", "prot: 80")).starts_with("file"));
        assert_eq!(
            err_field(&GOOD.replace("127.96.0.11", "127.96.0.10")),
            "services[1].vip"
        );
    }
}
