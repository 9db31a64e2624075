//! Capacity of the services this cluster serves: declared per-pod capacity × ready pods.

use std::collections::BTreeMap;

use crate::catalog::{Catalog, ServiceName, ServiceTime};

/// Capacity of one local service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub rps_per_pod: f64,
    /// Ready pods of this cluster (distinct endpoint IPs).
    pub ready_pods: usize,
    /// `rps_per_pod × ready_pods`.
    pub rps: f64,
    /// The cluster's service-time curve when one pod's is declared: the per-pod slope divided
    /// by the ready pods (the load spreads over them); the per-pod curve with no ready pod.
    pub service_time: Option<ServiceTime>,
    /// What the capacity counts (the export's declared load unit).
    pub unit: ballast_types::LoadUnit,
}

/// Capacity of every service for which this cluster declares a per-pod capacity. A service
/// with a declared capacity but no ready local pod has capacity 0 (and is reported so: the
/// broker must stop sending there); a service without a declaration is left out (unknown).
pub fn local_capacities(catalog: &Catalog) -> BTreeMap<ServiceName, Capacity> {
    catalog
        .services
        .values()
        .filter_map(|svc| {
            let rps_per_pod = svc.capacity_rps_per_pod?;
            let ready_pods = svc.ready_pods_in(&catalog.local);
            Some((
                svc.name.clone(),
                Capacity {
                    rps_per_pod,
                    ready_pods,
                    rps: rps_per_pod * ready_pods as f64,
                    service_time: svc.service_time_per_pod.map(|c| ServiceTime {
                        base_ms: c.base_ms,
                        slope_ms_per_rps: c.slope_ms_per_rps / ready_pods.max(1) as f64,
                    }),
                    unit: svc.load_unit,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Endpoint, Service};

    #[test]
    fn per_pod_times_local_ready_pods() {
        let ep = |ip: [u8; 4], cluster: &str, ready| Endpoint {
            address: (ip, 80).into(),
            cluster: cluster.into(),
            ready,
            port_name: None,
        };
        let svc = |name: &str, cap: Option<f64>, endpoints| Service {
            name: ServiceName::parse(name).expect("valid"),
            vips: vec![],
            ports: vec![],
            capacity_rps_per_pod: cap,
            service_time_per_pod: None,
            service_time_probe: None,
            load_unit: ballast_types::LoadUnit::default(),
            endpoints,
        };
        let mut services = [
            svc(
                "a/web",
                Some(150.0),
                vec![
                    ep([127, 0, 0, 2], "east", true),
                    ep([127, 0, 0, 3], "east", true),
                    ep([127, 0, 0, 4], "east", false),
                    ep([127, 0, 0, 5], "west", true),
                ],
            ),
            svc("a/db", Some(10.0), vec![ep([127, 0, 0, 6], "west", true)]),
            svc("a/undeclared", None, vec![ep([127, 0, 0, 7], "east", true)]),
        ];
        services[0].service_time_per_pod = Some(ServiceTime {
            base_ms: 10.0,
            slope_ms_per_rps: 0.4,
        });
        let catalog = Catalog {
            local: "east".into(),
            clusters: BTreeMap::new(),
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            without_vip: Default::default(),
        };
        let caps = local_capacities(&catalog);
        let web = caps[&ServiceName::parse("a/web").expect("valid")];
        assert_eq!(web.ready_pods, 2);
        assert!((web.rps - 300.0).abs() < 1e-9);
        // Two ready pods share the load: the cluster's slope is half a pod's.
        assert_eq!(
            web.service_time,
            Some(ServiceTime {
                base_ms: 10.0,
                slope_ms_per_rps: 0.2
            })
        );
        let db = caps[&ServiceName::parse("a/db").expect("valid")];
        assert_eq!(db.ready_pods, 0);
        assert_eq!(db.rps, 0.0);
        assert_eq!(db.service_time, None);
        assert_eq!(caps.len(), 2);
    }
}
