//! The demo backends: starting one (in its cluster's cgroup and netns) and `backends stop|start`,
//! which goes through readiness first so that no connection is sent to a dying backend.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ballast_types::ServiceTime;

use super::{BackendState, ClusterState, Lab, LabState, ServiceState};
use crate::control;
use crate::error::{LabError, Result};
use crate::sys::{self, Placement};

/// How backend `b` of `svc` slows under load: its cluster's per-pod curve, with the slope
/// multiplied by the backends sharing its pod (each sees only its share of the pod's load,
/// so that together they answer as one pod of that curve would).
pub(super) fn backend_slowdown(
    svc: &ServiceState,
    b: &BackendState,
) -> Result<Option<ServiceTime>> {
    Ok(svc.backend_curve(&b.cluster)?.map(|c| ServiceTime {
        base_ms: c.base_ms,
        slope_ms_per_rps: c.slope_ms_per_rps * svc.backends_in_pod(&b.cluster, b.addr.ip()) as f64,
    }))
}

impl Lab {
    pub(super) fn start_backend(
        &self,
        service: &str,
        c: &ClusterState,
        b: &mut BackendState,
        slowdown: Option<ServiceTime>,
    ) -> Result<()> {
        let mut args = self.global_args();
        args.extend([
            "echo-server".into(),
            "--cluster".into(),
            c.id.clone(),
            "--listen".into(),
            b.addr.to_string(),
        ]);
        if let Some(curve) = slowdown {
            args.extend(["--service-time".into(), curve.to_string()]);
        }
        let role = format!("backend {service} {} {}", c.id, b.addr);
        let log = self.log(&format!("backend-{}-{}", c.id, b.addr.port()));
        let p = sys::spawn_daemon(
            &role,
            &self.exe,
            &args,
            &Placement::cluster(&c.cgroup, &c.netns),
            &log,
            &[("RUST_LOG", "info")],
        )?;
        let addr = b.addr;
        let netns = c.netns.clone();
        let pid = p.pid;
        b.process = Some(p);
        sys::wait_for(
            &format!("backend {addr} to listen"),
            Duration::from_secs(5),
            || sys::proc_alive(pid, None) && sys::listening_in(&netns, addr),
        )
        .map_err(|e| LabError::Other(format!("{e}; see {}", log.display())))
    }

    /// `backends CLUSTER SERVICE stop|start`. With a control plane, a stop first marks
    /// the backends not ready in every topology file and waits (up to `timeout`) for the
    /// agents to install weights without them, then ends them: no connection is sent to a
    /// dying backend. A start starts them, waits until they listen, then marks them ready.
    /// Returns how many backends, and a note when the agents did not confirm in time.
    pub fn backends(
        &self,
        cluster: &str,
        service: &str,
        start: bool,
        timeout: Duration,
    ) -> Result<(usize, Option<String>)> {
        let _lock = self.lock()?;
        let mut state = self.load_state()?;
        let c = state.cluster(cluster)?.clone();
        state.service(service)?;
        let n = state
            .services
            .iter()
            .filter(|s| s.name == service)
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.cluster == cluster)
            .count();
        if n == 0 {
            return Err(LabError::invalid(
                "cluster",
                format!("service {service} has no backends in {cluster}"),
            ));
        }
        let generation = match &state.control {
            Some(cp) => control::broker_view(cp, &state.wan_netns)
                .map(|v| v.generation)
                .ok(),
            None => None,
        };
        let note;
        if start {
            for svc in state.services.iter_mut().filter(|s| s.name == service) {
                let slowdowns = (0..svc.backends.len())
                    .map(|i| backend_slowdown(svc, &svc.backends[i]))
                    .collect::<Result<Vec<_>>>()?;
                for (b, slowdown) in svc.backends.iter_mut().zip(slowdowns) {
                    if b.cluster != cluster {
                        continue;
                    }
                    if !b.running() {
                        self.start_backend(service, &c, b, slowdown)?;
                    }
                    b.ready = true;
                }
            }
            self.save_state(&state)?;
            note = self.publish_readiness(&state, generation, timeout)?;
        } else {
            for svc in state.services.iter_mut().filter(|s| s.name == service) {
                for b in svc.backends.iter_mut().filter(|b| b.cluster == cluster) {
                    b.ready = false;
                }
            }
            self.save_state(&state)?;
            let published = self.publish_readiness(&state, generation, timeout)?;
            // A new generation acknowledged by every agent does not prove each agent has
            // re-read its topology file (the generation may have been made for another
            // reason): wait until no data plane steers to these backends any more.
            let drained = self.wait_drained(&state, service, cluster, timeout);
            note = match (published, drained) {
                (None, None) => None,
                (a, b) => Some(a.into_iter().chain(b).collect::<Vec<_>>().join("; ")),
            };
            for svc in state.services.iter_mut().filter(|s| s.name == service) {
                for b in svc.backends.iter_mut().filter(|b| b.cluster == cluster) {
                    if let Some(p) = b.process.take() {
                        sys::end_process(p.pid, p.starttime, Duration::from_secs(2));
                    }
                }
            }
            self.save_state(&state)?;
        }
        Ok((n, note))
    }

    /// Waits until no node's data plane (read from its pinned maps) sends new connections
    /// of `service` to a backend of `cluster`; `Some(note)` when that did not happen in time.
    fn wait_drained(
        &self,
        state: &LabState,
        service: &str,
        cluster: &str,
        timeout: Duration,
    ) -> Option<String> {
        state.control.as_ref()?;
        let addrs: Vec<SocketAddr> = state
            .services
            .iter()
            .filter(|s| s.name == service)
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.cluster == cluster)
            .map(|b| b.addr)
            .collect();
        // Every node's data plane (each agent pins its own maps).
        let steers_to_them = |c: &ClusterState| -> bool {
            c.nodes.iter().any(|n| {
                let Ok(dp) = ballast_bpf::Dataplane::open(&n.bpf_dir) else {
                    return true;
                };
                match dp.service(service) {
                    Ok(s) => s
                        .spec
                        .backends
                        .iter()
                        .any(|b| addrs.contains(&b.addr) && b.healthy && b.weight > 0),
                    Err(_) => false,
                }
            })
        };
        // ... and every established connection they steered there closed (short requests
        // finish; the agents close long-lived ones after their grace), as a preStop hook
        // waits for a pod's connections to drain
        let wanted: std::collections::BTreeSet<SocketAddr> = addrs.iter().copied().collect();
        let connections_to_them = |c: &ClusterState| -> usize {
            c.nodes
                .iter()
                .map(|n| {
                    ballast_bpf::Dataplane::open(&n.bpf_dir)
                        .and_then(|dp| dp.steered_sockets_to(&wanted))
                        .map_or(0, |m| m.len())
                })
                .sum()
        };
        let deadline = Instant::now() + timeout;
        loop {
            let pending: Vec<&str> = state
                .clusters
                .iter()
                .filter(|c| steers_to_them(c))
                .map(|c| c.id.as_str())
                .collect();
            let open: usize = if pending.is_empty() {
                state.clusters.iter().map(connections_to_them).sum()
            } else {
                0
            };
            if pending.is_empty() && open == 0 {
                return None;
            }
            if pending.is_empty() && Instant::now() >= deadline {
                return Some(format!(
                    "{open} steered connection(s) to {service} in {cluster} still open after \
                     {timeout:?}"
                ));
            }
            if Instant::now() >= deadline {
                return Some(format!(
                    "the data planes of {} still steer {service} to {cluster} after {timeout:?}",
                    pending.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the topology files and waits for the agents to install the result.
    fn publish_readiness(
        &self,
        state: &LabState,
        generation: Option<u64>,
        timeout: Duration,
    ) -> Result<Option<String>> {
        let Some(cp) = &state.control else {
            return Ok(None);
        };
        control::write_topologies(&self.state_dir, state)?;
        match control::wait_installed(cp, state, generation.unwrap_or(0), timeout) {
            Ok(_) => Ok(None),
            Err(e) => Ok(Some(e.to_string())),
        }
    }
}
