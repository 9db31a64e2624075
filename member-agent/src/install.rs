//! From catalog + broker weights + probe health to data-plane state (`ballast-bpf`).
//!
//! [`desired_specs`] is pure: every service of the catalog becomes one
//! [`ServiceSpec`] per (VIP, port) — named `ns/svc` when the service has one VIP and one port,
//! `ns/svc@vip:port/proto` otherwise — whose backends carry the integer weights of
//! [`crate::weights::expand`]. A service without broker weights yet is split evenly over its
//! ready endpoints; a service with no healthy ready endpoint keeps its known endpoints, all
//! marked unhealthy, so `connect()` fails fast instead of hanging.
//!
//! [`Installer`] applies a desired set to a [`Dataplane`] (only when it changed; each service
//! is one atomic table swap in the kernel) and adopts pinned state on start.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ballast_bpf::{BackendSpec, Dataplane, SelectMode, ServiceSpec};

use crate::catalog::{Catalog, ClusterId, Protocol, Service, ServiceName};
use crate::weights::{expand, Basis, WeightsError};

/// Why a service cannot be installed (it is left out and reported; the rest go ahead).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("service {service}: unknown to discovery")]
    UnknownService { service: String },
    #[error("service {service}: {source}")]
    Weights {
        service: String,
        source: WeightsError,
    },
    #[error("service {service}: port {port}/{protocol} has no endpoint at all")]
    NoEndpoints {
        service: String,
        port: u16,
        protocol: Protocol,
    },
    #[error("data plane: {0}")]
    Dataplane(#[from] ballast_bpf::Error),
}

/// Broker weights of one service: destination cluster → weight, and their generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceWeights {
    pub generation: u64,
    pub weights: BTreeMap<ClusterId, f64>,
}

impl ServiceWeights {
    /// True when `weights` (an update's) are these, cluster for cluster, within 1e-9.
    #[must_use]
    pub fn same_weights<S: std::hash::BuildHasher>(
        &self,
        weights: &std::collections::HashMap<String, f64, S>,
    ) -> bool {
        self.weights.len() == weights.len()
            && self
                .weights
                .iter()
                .all(|(c, w)| weights.get(c).is_some_and(|v| (v - w).abs() <= 1e-9))
    }
}

/// The data-plane name of one (VIP, port) of a service.
pub fn spec_name(svc: &Service, vip: std::net::IpAddr, port: u16, proto: Protocol) -> String {
    if svc.vips.len() == 1 && svc.ports.len() == 1 {
        svc.name.to_string()
    } else {
        format!(
            "{}@{vip}:{port}/{}",
            svc.name,
            proto.to_string().to_lowercase()
        )
    }
}

/// The service a data-plane name belongs to (inverse of [`spec_name`]).
pub fn service_of_spec(name: &str) -> Option<ServiceName> {
    ServiceName::parse(name.split('@').next()?).ok()
}

fn bpf_protocol(p: Protocol) -> ballast_bpf::Protocol {
    match p {
        Protocol::Tcp => ballast_bpf::Protocol::Tcp,
        Protocol::Udp => ballast_bpf::Protocol::Udp,
    }
}

/// The specs of one service.
pub fn service_specs(
    svc: &Service,
    weights: Option<&ServiceWeights>,
    unhealthy: &BTreeSet<ClusterId>,
    scale: u32,
) -> Result<Vec<ServiceSpec>, InstallError> {
    let empty = BTreeMap::new();
    let cluster_weights = weights.map_or(&empty, |w| &w.weights);
    let mut specs = Vec::new();
    for port in &svc.ports {
        let ready = svc.ready_endpoints_for(port);
        let e = expand(cluster_weights, &ready, unhealthy, scale).map_err(|source| {
            InstallError::Weights {
                service: svc.name.to_string(),
                source,
            }
        })?;
        let backends: Vec<BackendSpec> = if e.basis == Basis::NoBackend {
            // fast-fail: every known endpoint of the port, none healthy
            let mut all: Vec<BackendSpec> = svc
                .endpoints
                .iter()
                .filter(|ep| match (&ep.port_name, &port.name) {
                    (None, _) => true,
                    (Some(a), Some(b)) => a == b,
                    (Some(_), None) => false,
                })
                .map(|ep| BackendSpec {
                    addr: ep.address,
                    cluster: ep.cluster.clone(),
                    weight: 1,
                    healthy: false,
                })
                .collect();
            all.sort_by_key(|b| b.addr);
            all.dedup_by_key(|b| b.addr);
            if all.is_empty() {
                return Err(InstallError::NoEndpoints {
                    service: svc.name.to_string(),
                    port: port.port,
                    protocol: port.protocol,
                });
            }
            all
        } else {
            e.backends
                .into_iter()
                .map(|b| BackendSpec {
                    addr: b.address,
                    cluster: b.cluster,
                    weight: b.weight,
                    healthy: true,
                })
                .collect()
        };
        for vip in &svc.vips {
            let backends: Vec<BackendSpec> = backends
                .iter()
                .filter(|b| b.addr.is_ipv4() == vip.is_ipv4())
                .cloned()
                .collect();
            if backends.is_empty() {
                continue; // no backend of this address family
            }
            specs.push(ServiceSpec {
                name: spec_name(svc, *vip, port.port, port.protocol),
                vip: *vip,
                port: port.port,
                protocol: bpf_protocol(port.protocol),
                backends,
                canary: None,
                select: SelectMode::Slots,
            });
        }
    }
    Ok(specs)
}

/// The backends whose established connections must go after a change of health: those that
/// `prev` steered to (healthy, weight > 0) and that now are in an unhealthy (unreachable)
/// cluster, or whose endpoint the catalog still lists but as not ready. A backend that only
/// lost its weight (an ordinary weight change) or whose service is gone is not among them.
pub fn failed_backends(
    prev: &[ServiceSpec],
    catalog: &Catalog,
    unhealthy: &BTreeSet<ClusterId>,
) -> BTreeSet<std::net::SocketAddr> {
    let mut known = BTreeSet::new();
    let mut ready = BTreeSet::new();
    for svc in catalog.services.values() {
        for ep in &svc.endpoints {
            known.insert(ep.address);
            if ep.ready {
                ready.insert(ep.address);
            }
        }
    }
    prev.iter()
        .flat_map(|s| s.backends.iter())
        .filter(|b| b.healthy && b.weight > 0)
        .filter(|b| {
            unhealthy.contains(&b.cluster) || (known.contains(&b.addr) && !ready.contains(&b.addr))
        })
        .map(|b| b.addr)
        .collect()
}

/// Every service of the catalog; services that cannot be installed are returned apart.
pub fn desired_specs(
    catalog: &Catalog,
    weights: &BTreeMap<ServiceName, ServiceWeights>,
    unhealthy: &BTreeSet<ClusterId>,
    scale: u32,
) -> (Vec<ServiceSpec>, Vec<InstallError>) {
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for svc in catalog.services.values() {
        match service_specs(svc, weights.get(&svc.name), unhealthy, scale) {
            Ok(s) => specs.extend(s),
            Err(e) => errors.push(e),
        }
    }
    (specs, errors)
}

/// Owns the data plane: attaches (adopting pinned state), applies desired sets.
pub struct Installer {
    dp: Dataplane,
    cgroup: PathBuf,
    last: Option<Vec<ServiceSpec>>,
}

impl Installer {
    /// Opens the pinned data plane under `pin_dir` (adopting what a previous agent left)
    /// and attaches it to `cgroup` unless it already is (never a second copy).
    pub fn open(pin_dir: &Path, cgroup: &Path) -> Result<Self, InstallError> {
        let mut dp = Dataplane::open(pin_dir)?;
        let adopted = dp.services()?.len();
        if dp.is_attached(cgroup)? {
            tracing::info!(cgroup = %cgroup.display(), adopted, "adopted attached data plane");
        } else {
            dp.attach(cgroup)?;
        }
        Ok(Self {
            dp,
            cgroup: cgroup.to_owned(),
            last: None,
        })
    }

    /// Makes the kernel hold exactly `specs`; a no-op when nothing changed since the last
    /// call. Returns whether anything was written.
    pub fn apply(&mut self, specs: Vec<ServiceSpec>) -> Result<bool, InstallError> {
        if self.last.as_ref() == Some(&specs) {
            return Ok(false);
        }
        self.dp.apply(&specs)?;
        self.last = Some(specs);
        Ok(true)
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// Destroys the established sockets this node's pods opened, through the steering
    /// programs, to one of `backends` (see `ballast_bpf::sockdiag`); returns how many.
    pub fn destroy_sockets_to(
        &self,
        backends: &BTreeSet<std::net::SocketAddr>,
    ) -> Result<usize, InstallError> {
        let report = self.dp.destroy_sockets_to_in(backends, &self.cgroup)?;
        for f in &report.failed {
            tracing::warn!(socket = %f, "a steered socket could not be destroyed");
        }
        Ok(report.destroyed)
    }

    /// Detaches the programs and unpins (for `--detach-on-exit`).
    pub fn detach(mut self) -> Result<(), InstallError> {
        self.dp.detach(&self.cgroup)?;
        Ok(())
    }
}

/// One broker update as the agent judged it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub service: String,
    pub generation: u64,
    /// `Err` names why it was refused.
    pub result: Result<(), Refusal>,
}

/// Why an update was refused. The kind decides when the agent offers it again: what only
/// discovery can change waits for discovery; a data plane that failed is also retried on a
/// timer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The service is not imported here (yet).
    #[error("{0}")]
    NotImported(String),
    /// The update does not fit what this cluster knows (bad weights, wrong source, an older
    /// generation, weights on clusters with no backend).
    #[error("{0}")]
    Invalid(String),
    /// The update was good but the data plane failed to take it.
    #[error("data plane: {0}")]
    DataPlane(String),
}

impl Refusal {
    /// Whether the same update may succeed later without discovery changing.
    pub fn retry_on_timer(&self) -> bool {
        matches!(self, Self::DataPlane(_))
    }
}

/// The broker weights in force, per service. Updates are checked here before they reach
/// the data plane; a refused update leaves the previous weights of its service in force.
#[derive(Debug, Default, Clone)]
pub struct Steering {
    pub weights: BTreeMap<ServiceName, ServiceWeights>,
}

impl Steering {
    /// Cluster weights read back from what a previous agent installed (healthy backends'
    /// weights summed per cluster), so a restarted agent keeps steering as before until the
    /// broker speaks. Adopted weights carry generation 0: any broker update replaces them.
    pub fn adopt(installed: &[ballast_bpf::InstalledService]) -> Self {
        let mut weights = BTreeMap::new();
        for s in installed {
            let Some(name) = service_of_spec(&s.spec.name) else {
                continue;
            };
            if weights.contains_key(&name) {
                continue;
            }
            let mut per_cluster: BTreeMap<ClusterId, f64> = BTreeMap::new();
            for b in s.spec.backends.iter().filter(|b| b.healthy && b.weight > 0) {
                *per_cluster.entry(b.cluster.clone()).or_insert(0.0) += f64::from(b.weight);
            }
            let total: f64 = per_cluster.values().sum();
            if total <= 0.0 {
                continue;
            }
            for w in per_cluster.values_mut() {
                *w /= total;
            }
            weights.insert(
                name,
                ServiceWeights {
                    generation: 0,
                    weights: per_cluster,
                },
            );
        }
        Self { weights }
    }

    /// Checks one update (service known, for this cluster, weights finite in [0, 1] with a
    /// positive sum, expandable) and, if good, takes it. Returns the verdict.
    pub fn accept(
        &mut self,
        catalog: &Catalog,
        unhealthy: &BTreeSet<ClusterId>,
        scale: u32,
        update: &ballast_proto::v1::WeightsUpdate,
    ) -> Verdict {
        let (service, source_cluster, generation, weights) = (
            update.service.as_str(),
            update.source_cluster_id.as_str(),
            update.generation,
            &update.weights,
        );
        let verdict = |result| Verdict {
            service: service.to_owned(),
            generation,
            result,
        };
        let Ok(name) = ServiceName::parse(service) else {
            return verdict(Err(Refusal::Invalid(format!(
                "service {service:?} is not namespace/name"
            ))));
        };
        let Some(svc) = catalog.services.get(&name) else {
            return verdict(Err(Refusal::NotImported(format!(
                "service {service} is unknown to discovery"
            ))));
        };
        if source_cluster != catalog.local {
            return verdict(Err(Refusal::Invalid(format!(
                "weights are for source cluster {source_cluster:?}, this is {:?}",
                catalog.local
            ))));
        }
        for (c, w) in weights {
            if !(w.is_finite() && (0.0..=1.0).contains(w)) {
                return verdict(Err(Refusal::Invalid(format!(
                    "weight of cluster {c:?} is {w}: not in [0, 1]"
                ))));
            }
        }
        if weights.values().sum::<f64>() <= 0.0 {
            return verdict(Err(Refusal::Invalid("weights sum to 0".into())));
        }
        let new = ServiceWeights {
            generation,
            weights: weights.iter().map(|(c, w)| (c.clone(), *w)).collect(),
        };
        if let Err(e) = service_specs(svc, Some(&new), unhealthy, scale) {
            return verdict(Err(Refusal::Invalid(e.to_string())));
        }
        if let Some(old) = self.weights.get(&name) {
            if old.generation > generation {
                return verdict(Err(Refusal::Invalid(format!(
                    "generation {generation} is older than the installed {}",
                    old.generation
                ))));
            }
        }
        self.weights.insert(name, new);
        verdict(Ok(()))
    }
}

/// Turns two counter snapshots into RPS per (service, destination cluster).
pub fn rps_between(
    before: &[ballast_bpf::BackendCounter],
    after: &[ballast_bpf::BackendCounter],
    seconds: f64,
    catalog: &Catalog,
) -> BTreeMap<(ServiceName, ClusterId), f64> {
    let names: BTreeMap<u32, &str> = catalog
        .clusters
        .keys()
        .map(|c| (ballast_bpf::cluster_id(c), c.as_str()))
        .collect();
    let prev: BTreeMap<(&str, std::net::SocketAddr), u64> = before
        .iter()
        .map(|c| ((c.service.as_str(), c.backend), c.connects))
        .collect();
    let mut out = BTreeMap::new();
    if seconds <= 0.0 {
        return out;
    }
    for c in after {
        let (Some(svc), Some(cluster)) = (service_of_spec(&c.service), names.get(&c.cluster_id))
        else {
            continue;
        };
        // a counter that went backwards was reset (service re-created): count from 0
        let base = prev
            .get(&(c.service.as_str(), c.backend))
            .copied()
            .unwrap_or(0);
        let delta = if c.connects >= base {
            c.connects - base
        } else {
            c.connects
        };
        *out.entry((svc, (*cluster).to_owned())).or_insert(0.0) += delta as f64 / seconds;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Endpoint, ServicePort};

    fn ep(addr: &str, cluster: &str, ready: bool) -> Endpoint {
        Endpoint {
            address: addr.parse().expect("addr"),
            cluster: cluster.into(),
            ready,
            port_name: None,
        }
    }

    fn svc(vips: &[&str], endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: ServiceName::parse("shop/web").expect("name"),
            vips: vips.iter().map(|v| v.parse().expect("ip")).collect(),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
            }],
            capacity_rps_per_pod: None,
            service_time_per_pod: None,
            service_time_probe: None,
            endpoints,
        }
    }

    fn catalog(s: Service) -> Catalog {
        Catalog {
            local: "east".into(),
            clusters: ["east", "west"]
                .iter()
                .map(|c| {
                    (
                        (*c).to_owned(),
                        crate::catalog::Cluster {
                            id: (*c).to_owned(),
                            region: None,
                            zone: None,
                            provider: None,
                            gateway: None,
                        },
                    )
                })
                .collect(),
            services: [(s.name.clone(), s)].into(),
            without_vip: Default::default(),
        }
    }

    #[test]
    fn same_weights_compares_cluster_for_cluster() {
        let sw = ServiceWeights {
            generation: 3,
            weights: [("a".to_string(), 0.25), ("b".to_string(), 0.75)]
                .into_iter()
                .collect(),
        };
        let upd = |w: &[(&str, f64)]| -> std::collections::HashMap<String, f64> {
            w.iter().map(|(c, v)| ((*c).to_string(), *v)).collect()
        };
        assert!(sw.same_weights(&upd(&[("b", 0.75), ("a", 0.25 + 1e-12)])));
        assert!(!sw.same_weights(&upd(&[("a", 0.25), ("b", 0.7)])));
        assert!(!sw.same_weights(&upd(&[("a", 0.25), ("c", 0.75)])));
        assert!(!sw.same_weights(&upd(&[("a", 0.25)])));
    }

    #[test]
    fn broker_weights_become_specs_and_every_spec_validates() {
        let s = svc(
            &["127.96.0.10"],
            vec![
                ep("127.0.1.1:8080", "east", true),
                ep("127.0.2.1:8080", "west", true),
                ep("127.0.2.2:8080", "west", true),
            ],
        );
        let w = ServiceWeights {
            generation: 3,
            weights: [("east".to_owned(), 0.25), ("west".to_owned(), 0.75)].into(),
        };
        let specs = service_specs(&s, Some(&w), &BTreeSet::new(), 4096).expect("valid");
        assert_eq!(specs.len(), 1);
        let sp = &specs[0];
        assert_eq!(sp.name, "shop/web");
        sp.validate().expect("data plane accepts it");
        let ws: Vec<(String, u32)> = sp
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        assert_eq!(
            ws,
            [
                ("127.0.1.1:8080".to_owned(), 1024),
                ("127.0.2.1:8080".to_owned(), 1536),
                ("127.0.2.2:8080".to_owned(), 1536)
            ]
        );
        // the west gateway stops answering: all of it moves to east at once
        let unhealthy: BTreeSet<ClusterId> = ["west".to_owned()].into();
        let specs = service_specs(&s, Some(&w), &unhealthy, 4096).expect("valid");
        assert_eq!(specs[0].backends.len(), 1);
        assert_eq!(specs[0].backends[0].weight, 4096);
    }

    #[test]
    fn multi_vip_names_and_fast_fail_and_no_endpoint() {
        let s = svc(
            &["127.96.0.10", "127.96.0.11"],
            vec![ep("127.0.1.1:8080", "east", false)],
        );
        let specs = service_specs(&s, None, &BTreeSet::new(), 4096).expect("valid");
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].name, "shop/web@127.96.0.11:80/tcp");
        assert_eq!(
            service_of_spec(&specs[1].name),
            Some(ServiceName::parse("shop/web").expect("name"))
        );
        // no ready endpoint: listed but unhealthy, so connect() fails fast
        assert!(specs.iter().all(|s| s.backends.iter().all(|b| !b.healthy)));
        specs[0].validate().expect("valid spec");
        let none = svc(&["127.96.0.10"], vec![]);
        assert!(matches!(
            service_specs(&none, None, &BTreeSet::new(), 4096),
            Err(InstallError::NoEndpoints { .. })
        ));
        let bad = ServiceWeights {
            generation: 1,
            weights: [("east".to_owned(), f64::NAN)].into(),
        };
        let (specs, errors) = desired_specs(
            &catalog(svc(
                &["127.96.0.10"],
                vec![ep("127.0.1.1:8080", "east", true)],
            )),
            &[(ServiceName::parse("shop/web").expect("name"), bad)].into(),
            &BTreeSet::new(),
            4096,
        );
        assert!(specs.is_empty());
        assert!(errors[0].to_string().contains("shop/web"), "{}", errors[0]);
    }

    #[test]
    fn rps_from_counter_deltas_per_destination_cluster() {
        let c = catalog(svc(&["127.96.0.10"], vec![]));
        let counter = |backend: &str, cluster: &str, connects| ballast_bpf::BackendCounter {
            service: "shop/web".into(),
            backend: backend.parse().expect("addr"),
            cluster_id: ballast_bpf::cluster_id(cluster),
            connects,
            bytes_sent: 0,
            bytes_received: 0,
        };
        let before = [
            counter("127.0.1.1:80", "east", 100),
            counter("127.0.2.1:80", "west", 10),
        ];
        let after = [
            counter("127.0.1.1:80", "east", 150),
            counter("127.0.2.1:80", "west", 30),
            counter("127.0.2.2:80", "west", 20),
        ];
        let r = rps_between(&before, &after, 10.0, &c);
        let k = |cl: &str| (ServiceName::parse("shop/web").expect("name"), cl.to_owned());
        assert!((r[&k("east")] - 5.0).abs() < 1e-9);
        assert!((r[&k("west")] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn steering_refuses_bad_updates_and_keeps_the_previous() {
        let c = catalog(svc(
            &["127.96.0.10"],
            vec![
                ep("127.0.1.1:8080", "east", true),
                ep("127.0.2.1:8080", "west", true),
            ],
        ));
        let upd = |service: &str, source: &str, generation, w: &[(&str, f64)]| {
            ballast_proto::v1::WeightsUpdate {
                generation,
                service: service.into(),
                source_cluster_id: source.into(),
                weights: w.iter().map(|(c, w)| ((*c).to_owned(), *w)).collect(),
                last_in_batch: true,
                ..Default::default()
            }
        };
        let none = BTreeSet::new();
        let mut st = Steering::default();
        let v = st.accept(
            &c,
            &none,
            4096,
            &upd("shop/web", "east", 5, &[("east", 0.2), ("west", 0.8)]),
        );
        assert_eq!(v.result, Ok(()));
        let key = ServiceName::parse("shop/web").expect("name");
        let v = st.accept(
            &c,
            &none,
            4096,
            &upd("shop/nope", "east", 6, &[("east", 1.0)]),
        );
        let err = v.result.expect_err("refused");
        assert!(matches!(err, Refusal::NotImported(_)), "{err:?}");
        assert!(!err.retry_on_timer(), "only discovery can change it");
        for (bad, why) in [
            (
                upd("shop/web", "west", 6, &[("east", 1.0)]),
                "source cluster",
            ),
            (
                upd("shop/web", "east", 6, &[("east", 1.5)]),
                "not in [0, 1]",
            ),
            (
                upd("shop/web", "east", 6, &[("east", f64::NAN)]),
                "not in [0, 1]",
            ),
            (upd("shop/web", "east", 6, &[("east", 0.0)]), "sum to 0"),
            (upd("shop/web", "east", 4, &[("east", 1.0)]), "older"),
        ] {
            let v = st.accept(&c, &none, 4096, &bad);
            let err = v.result.expect_err("refused");
            assert!(matches!(err, Refusal::Invalid(_)), "{err:?}");
            assert!(!err.retry_on_timer(), "{err:?}");
            assert!(err.to_string().contains(why), "{err} should say {why}");
            assert_eq!(st.weights[&key].generation, 5, "previous weights stay");
        }
    }

    fn is_root() -> bool {
        ballast_bpf::sys::root_for_tests()
    }

    #[test]
    fn root_installer_applies_adopts_and_detaches() {
        if !is_root() {
            eprintln!("skipped: needs root (BPF, cgroups)");
            return;
        }
        let (Some(cg_root), Some(bpffs)) = (
            ballast_bpf::sys::cgroup2_mount(),
            ballast_bpf::sys::bpffs_mount(),
        ) else {
            panic!("root test needs cgroup2 and bpffs mounted (kind-tests/setup.sh mounts bpffs)");
        };
        let unique = format!("ballast-agent-test-{}", std::process::id());
        let cgroup = cg_root.join(&unique);
        let pin_dir = bpffs.join(&unique);
        std::fs::create_dir_all(&cgroup).expect("cgroup");
        let s = svc(
            &["127.96.0.10"],
            vec![
                ep("127.0.1.1:8080", "east", true),
                ep("127.0.2.1:8080", "west", true),
            ],
        );
        let w = ServiceWeights {
            generation: 1,
            weights: [("east".to_owned(), 1.0), ("west".to_owned(), 3.0)].into(),
        };
        let (specs, errors) = desired_specs(
            &catalog(s),
            &[(ServiceName::parse("shop/web").expect("name"), w)].into(),
            &BTreeSet::new(),
            4096,
        );
        assert!(errors.is_empty());
        let result = std::panic::catch_unwind(|| {
            let mut inst = Installer::open(&pin_dir, &cgroup).expect("open + attach");
            assert!(inst.apply(specs.clone()).expect("apply"));
            assert!(
                !inst.apply(specs.clone()).expect("no-op"),
                "unchanged set is not rewritten"
            );
            let installed = inst.dataplane().service("shop/web").expect("installed");
            let ws: Vec<u32> = installed.spec.backends.iter().map(|b| b.weight).collect();
            assert_eq!(ws, [1024, 3072]);
            drop(inst);
            // a restarted agent adopts the pinned state: attached, service still there, and
            // the cluster weights read back are the broker's 1:3
            let inst = Installer::open(&pin_dir, &cgroup).expect("adopt");
            assert!(inst.dataplane().is_attached(&cgroup).expect("cgroup"));
            let installed = inst.dataplane().services().expect("read");
            assert_eq!(installed.len(), 1);
            let adopted = Steering::adopt(&installed);
            let w = &adopted.weights[&ServiceName::parse("shop/web").expect("name")].weights;
            assert!((w["west"] - 0.75).abs() < 1e-9, "{w:?}");
            inst.detach().expect("detach");
            assert!(!pin_dir.join("links").exists());
        });
        let _ = std::fs::remove_dir_all(&pin_dir);
        let _ = std::fs::remove_dir(&cgroup);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }

    #[test]
    fn failed_backends_are_those_of_unreachable_clusters_or_unready_endpoints() {
        let spec = |backends: Vec<(&str, &str, u32)>| ServiceSpec {
            name: "shop/web".into(),
            vip: "127.96.0.10".parse().expect("vip"),
            port: 80,
            protocol: ballast_bpf::Protocol::Tcp,
            backends: backends
                .into_iter()
                .map(|(a, c, w)| BackendSpec {
                    addr: a.parse().expect("addr"),
                    cluster: c.into(),
                    weight: w,
                    healthy: true,
                })
                .collect(),
            canary: None,
            select: SelectMode::Slots,
        };
        let prev = vec![spec(vec![
            ("127.0.1.1:80", "east", 10),
            ("127.0.2.1:80", "west", 10),
            ("127.0.3.1:80", "south", 0),
            ("127.0.4.1:80", "north", 10),
        ])];
        let catalog = Catalog {
            local: "east".into(),
            clusters: BTreeMap::new(),
            services: BTreeMap::new(),
            without_vip: Default::default(),
        };
        // west unreachable; south too, but nothing was steered there (weight 0)
        let unhealthy: BTreeSet<ClusterId> = ["west".into(), "south".into()].into();
        let failed = failed_backends(&prev, &catalog, &unhealthy);
        assert_eq!(
            failed,
            BTreeSet::from(["127.0.2.1:80".parse().expect("addr")])
        );
        // nothing unhealthy and endpoints unknown (service gone): nothing
        assert!(failed_backends(&prev, &catalog, &BTreeSet::new()).is_empty());
    }
}
