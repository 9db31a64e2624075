//! `service-time`: how a cluster's backends of a service slow under load, and the curve the
//! cluster declares for them.
//!
//! Decision: the two are set apart on purpose. `--backends` makes the echo backends really
//! slower (restarted with `--service-time`, through readiness, so no connection meets a
//! dying backend); `--declare` writes the curve into the cluster's topology file, which is
//! what its agents report and the broker's load-aware `optimized` solves with. Slow backends
//! with no declaration are what the linear model sees; the same with the declaration is
//! load-aware: the lab compares the two on the same backends and the same load.

use std::time::{Duration, Instant};

use ballast_model::load_aware::LoadCurve;
use ballast_types::ServiceTime;

use super::Lab;
use crate::control;
use crate::error::{LabError, Result};

/// What `service-time` changed, for the CLI to print.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServiceTimeChange {
    pub service: String,
    pub cluster: String,
    /// The backends' per-pod curve now (None: they do not slow down).
    pub backends: Option<ServiceTime>,
    /// The declared per-pod curve now (None: none declared).
    pub declared: Option<ServiceTime>,
    /// The path the cluster's agents probe now (None: not probed).
    pub probe: Option<String>,
    /// The cluster's curve in the broker's last solve (per-pod over ready pods).
    pub broker: Option<LoadCurve>,
    /// How long the broker took to solve with the new declaration (when it changed).
    pub took_s: Option<f64>,
}

/// The cluster curve the broker should solve with for a per-pod `curve` over `pods`.
fn cluster_curve(curve: ServiceTime, pods: usize) -> Option<LoadCurve> {
    (pods > 0).then(|| LoadCurve {
        base_ms: curve.base_ms,
        slope_ms_per_rps: curve.slope_ms_per_rps / pods as f64,
    })
}

fn same_curve(a: Option<LoadCurve>, b: Option<LoadCurve>) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0);
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            close(a.base_ms, b.base_ms) && close(a.slope_ms_per_rps, b.slope_ms_per_rps)
        }
        _ => false,
    }
}

impl Lab {
    /// `service-time CLUSTER SERVICE [--backends CURVE|none] [--declare CURVE|none]`: the
    /// outer `None` leaves that side unchanged, `Some(None)` removes it. A backend change
    /// restarts the cluster's backends of the service (stop through readiness, start with
    /// the curve); a declaration change rewrites the topology files and waits (up to
    /// `timeout`) until the broker solves with the cluster's new curve.
    pub fn set_service_time(
        &self,
        cluster: &str,
        service: &str,
        backends: Option<Option<ServiceTime>>,
        declare: Option<Option<ServiceTime>>,
        probe: Option<Option<String>>,
        timeout: Duration,
    ) -> Result<ServiceTimeChange> {
        if let Some(Some(path)) = &probe {
            if !path.starts_with('/') || !path.chars().all(|c| c.is_ascii_graphic()) {
                return Err(LabError::invalid(
                    "probe",
                    format!("{path:?}: want a path starting with '/', visible ASCII only"),
                ));
            }
        }
        for curve in [backends, declare].into_iter().flatten().flatten() {
            curve
                .check()
                .map_err(|e| LabError::invalid("service-time", e))?;
        }
        {
            let _lock = self.lock()?;
            let mut state = self.load_state()?;
            state.cluster(cluster)?;
            state.service(service)?;
            for s in state.services.iter_mut().filter(|s| s.name == service) {
                if let Some(b) = backends {
                    match b {
                        Some(c) => s.backend_service_time.insert(cluster.into(), c.to_string()),
                        None => s.backend_service_time.remove(cluster),
                    };
                }
                if let Some(p) = &probe {
                    match p {
                        Some(path) => s.service_time_probe.insert(cluster.into(), path.clone()),
                        None => s.service_time_probe.remove(cluster),
                    };
                }
                if let Some(d) = declare {
                    match d {
                        Some(c) => s
                            .declared_service_time
                            .insert(cluster.into(), c.to_string()),
                        None => s.declared_service_time.remove(cluster),
                    };
                }
            }
            self.save_state(&state)?;
        }
        if backends.is_some() {
            // Restart: the curve is an argument of the backend process.
            self.backends(cluster, service, false, timeout)?;
            self.backends(cluster, service, true, timeout)?;
        }
        let started = Instant::now();
        let state = self.load_state()?;
        let svc = state.service(service)?;
        let mut change = ServiceTimeChange {
            service: service.into(),
            cluster: cluster.into(),
            backends: svc.backend_curve(cluster)?,
            declared: svc.declared_curve(cluster)?,
            probe: svc.service_time_probe.get(cluster).cloned(),
            broker: None,
            took_s: None,
        };
        let Some(cp) = &state.control else {
            return Ok(change);
        };
        control::write_topologies(&self.state_dir, &state)?;
        if declare.is_none() {
            // a probe alone: the broker's curve comes later, from the measurements
            return Ok(change);
        }
        let want = change
            .declared
            .and_then(|c| cluster_curve(c, svc.ready_pods(cluster)));
        let deadline = started + timeout;
        loop {
            let solve = control::solve_view(cp, &state.wan_netns, Some(service))?;
            let got = solve
                .service_time
                .get(service)
                .and_then(|m| m.get(cluster))
                .copied();
            change.broker = got;
            if same_curve(got, want) {
                if declare.is_some() {
                    change.took_s = Some(started.elapsed().as_secs_f64());
                }
                return Ok(change);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout(format!(
                    "the broker to solve {service} with {cluster}'s service time {want:?} \
                     (it has {got:?} after {timeout:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Lab {
    /// The broker's explanation of `service`'s weights from `source` ([`control::explain_rows`]).
    pub fn explain(
        &self,
        service: &str,
        source: &str,
    ) -> Result<Vec<ballast_proto::v1::ExplainDestination>> {
        let state = self.load_state()?;
        state.cluster(source)?;
        state.service(service)?;
        control::explain_rows(state.control_plane()?, &state.wan_netns, service, source)
    }

    /// The broker's measured egress and round-robin counterfactual for `service`
    /// ([`control::savings`]).
    pub fn savings(&self, service: &str) -> Result<ballast_proto::v1::SavingsResponse> {
        let state = self.load_state()?;
        state.service(service)?;
        control::savings(state.control_plane()?, &state.wan_netns, service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_curve_is_the_pod_curve_shared_by_its_ready_pods() {
        let pod = ServiceTime {
            base_ms: 2.0,
            slope_ms_per_rps: 3.0,
        };
        let two = cluster_curve(pod, 2);
        assert!(same_curve(
            two,
            Some(LoadCurve {
                base_ms: 2.0,
                slope_ms_per_rps: 1.5
            })
        ));
        assert!(!same_curve(two, cluster_curve(pod, 1)));
        assert_eq!(cluster_curve(pod, 0), None);
        assert!(!same_curve(two, None));
    }
}
