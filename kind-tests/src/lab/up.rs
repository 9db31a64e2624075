//! `up`: the network (through `net`), the WAN forwarder, the demo backends and the control
//! plane (certificates, topology files, broker, one agent per node of every cluster: `--nodes
//! N`, each node with its own cgroup under the cluster's, its own pins and metrics port).
//! Idempotent: what exists and runs is kept, so `up` after a crash completes the lab.

use std::fs;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use ballast_types::Policy;

use super::{
    cmdline, BackendState, ClusterState, Lab, LabState, NodeState, ServiceState, UpOptions,
    BACKEND_PORTS, DEMO_PORT, DEMO_SERVICE, DEMO_VIP,
};
use crate::config::{self, RegionData};
use crate::control::{self, ControlPlane};
use crate::error::{IoContext, LabError, Result};
use crate::net;
use crate::sys::{self, Placement};
use crate::wan::{self, LinkTable};

impl Lab {
    /// Brings the lab up (idempotent: what exists is checked and kept).
    pub fn up(&self, opts: &UpOptions) -> Result<LabState> {
        if !sys::is_root() {
            return Err(LabError::Other(
                "ballast-lab up needs root (network namespaces, cgroups, BPF)".into(),
            ));
        }
        if !(2..=config::MAX_CLUSTERS).contains(&opts.clusters) {
            return Err(LabError::invalid(
                "clusters",
                format!("{}: want 2..={}", opts.clusters, config::MAX_CLUSTERS),
            ));
        }
        if let Some(n) = opts.nodes {
            if !(1..=config::MAX_NODES).contains(&n) {
                return Err(LabError::invalid(
                    "nodes",
                    format!("{n}: want 1..={}", config::MAX_NODES),
                ));
            }
        }
        if let Some(b) = opts.brokers {
            if !(1..=config::MAX_BROKERS).contains(&b) {
                return Err(LabError::invalid(
                    "brokers",
                    format!("{b}: want 1..={}", config::MAX_BROKERS),
                ));
            }
        }
        let _lock = self.lock()?;
        let data = RegionData::embedded()?;
        let previous = match self.load_state() {
            Ok(s) => Some(s),
            Err(LabError::NotUp { .. }) => None,
            Err(e) => return Err(e),
        };
        if let Some(p) = &previous {
            if p.clusters.len() != opts.clusters {
                return Err(LabError::invalid(
                    "clusters",
                    format!(
                        "the lab is up with {} clusters; run `ballast-lab down` before changing it to {}",
                        p.clusters.len(),
                        opts.clusters
                    ),
                ));
            }
        }
        // Nodes per cluster: as given, else as the lab is (a state from before nodes existed
        // has none recorded), else 1. Changing it while up is refused, like --clusters.
        let up_nodes = previous
            .as_ref()
            .and_then(|p| p.clusters.first())
            .map(|c| c.nodes.len())
            .filter(|&n| n > 0);
        if let (Some(have), Some(want)) = (up_nodes, opts.nodes) {
            if have != want {
                return Err(LabError::invalid(
                    "nodes",
                    format!(
                        "the lab is up with {have} nodes per cluster; run `ballast-lab down` before changing it to {want}"
                    ),
                ));
            }
        }
        let nodes = opts.nodes.or(up_nodes).unwrap_or(1);
        // Broker replicas: as given, else as the lab is, else 1. SQLite (one broker) and
        // PostgreSQL (replicas) are different databases: changing between them needs `down`.
        let up_brokers = previous
            .as_ref()
            .and_then(|p| p.control.as_ref())
            .map(|cp| cp.brokers);
        let brokers = opts.brokers.or(up_brokers).unwrap_or(1);
        if let Some(have) = up_brokers {
            if (have > 1) != (brokers > 1) {
                return Err(LabError::invalid(
                    "brokers",
                    format!(
                        "the lab is up with {have} broker(s); run `ballast-lab down` before changing it to {brokers}"
                    ),
                ));
            }
        }
        let regions = match &previous {
            Some(p) if opts.regions.is_empty() => {
                p.clusters.iter().map(|c| c.region.clone()).collect()
            }
            _ => data.regions_for(opts.clusters, &opts.regions)?,
        };
        let cgroup2 = sys::cgroup2_mount()?;
        let cgroup_root = self.naming.cgroup_root(&cgroup2);
        let bpf_dir = self.naming.bpf_dir();
        let wan_ns = self.naming.wan_netns();

        let clusters: Vec<ClusterState> = regions
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let index = i + 1;
                let id = config::cluster_id(index);
                let cgroup = cgroup_root.join(&id);
                let cluster_bpf = bpf_dir.join(&id);
                let nodes = (1..=nodes)
                    .map(|k| NodeState {
                        name: config::node_name(&id, k),
                        index: k,
                        cgroup: cgroup.join(config::node_dir(k)),
                        bpf_dir: cluster_bpf.join(config::node_dir(k)),
                        metrics_addr: config::agent_metrics_addr(k),
                    })
                    .collect();
                ClusterState {
                    netns: self.naming.cluster_netns(&id),
                    cgroup,
                    address: config::cluster_addr(index),
                    wan_address: config::wan_side_addr(index),
                    bpf_dir: cluster_bpf,
                    nodes,
                    provider: data.provider(region).unwrap_or("aws").to_string(),
                    region: region.clone(),
                    index,
                    id,
                }
            })
            .collect();

        net::setup_wan(&wan_ns)?;
        fs::create_dir_all(&cgroup_root).ctx(|| format!("creating {}", cgroup_root.display()))?;
        for c in &clusters {
            self.up_cluster(&wan_ns, c)?;
        }

        // Link delays: keep a table that exists (delays set at run time survive `up`).
        if !LinkTable::path(&self.state_dir).exists() {
            let mut t = LinkTable::default();
            for a in &clusters {
                for b in clusters.iter().filter(|b| b.index > a.index) {
                    let ms = data.one_way_ms(&a.region, &b.region)?;
                    t.set(&a.id, &b.id, (ms * 10.0).round() / 10.0, 0.0)?;
                }
            }
            t.save(&self.state_dir)?;
        }

        let mut state = previous.unwrap_or(LabState {
            prefix: self.naming.prefix.clone(),
            wan_netns: wan_ns.clone(),
            cgroup_root: cgroup_root.clone(),
            bpf_dir: bpf_dir.clone(),
            clusters: clusters.clone(),
            services: Vec::new(),
            processes: Vec::new(),
            control: None,
        });
        state.clusters = clusters;
        // Save early: a failure below still leaves `down` everything it needs.
        self.save_state(&state)?;

        self.up_forwarder(&mut state)?;
        self.save_state(&state)?;
        self.up_services(&mut state)?;
        self.save_state(&state)?;
        if opts.control_plane {
            self.up_control(&mut state, opts.policy, brokers)?;
            self.save_state(&state)?;
        }
        Ok(state)
    }

    fn up_control(&self, state: &mut LabState, policy: Policy, brokers: usize) -> Result<()> {
        let find = |name: &str| {
            control::find_binary(name, &self.exe).ok_or_else(|| {
                LabError::Other(format!(
                    "{name} not found (next to {}, in $BALLAST_LAB_BIN_DIR or $PATH); build it with \
                     `cargo build --release -p ballast-broker -p ballast-agent`, or pass --no-control-plane",
                    self.exe.display()
                ))
            })
        };
        let mut cp = match &state.control {
            Some(cp) => cp.clone(),
            None => ControlPlane::new(
                &self.state_dir,
                find("ballast-broker")?,
                find("ballast-agent")?,
            ),
        };
        cp.policy = Some(policy);
        cp.brokers = brokers;
        control::ensure_certs(&cp, state)?;
        control::write_topologies(&self.state_dir, state)?;
        if brokers > 1 {
            // Replicas share the lab's own PostgreSQL (SQLite has one writer).
            cp.database = self.up_postgres(state)?;
        }
        state.control = Some(cp.clone());
        self.save_state(state)?;
        // Brokers of a role this lab no longer has (fewer replicas than before) are ended.
        let roles: Vec<String> = (1..=brokers).map(control::broker_role).collect();
        let stray: Vec<_> = state
            .processes
            .iter()
            .filter(|p| p.role.starts_with("broker") && !roles.contains(&p.role))
            .cloned()
            .collect();
        for p in &stray {
            sys::end_process(p.pid, p.starttime, Duration::from_secs(2));
        }
        state.processes.retain(|p| !stray.contains(p));
        for k in 1..=brokers {
            self.up_broker(state, &cp, policy, k)?;
        }
        let alive = |state: &LabState, role: &str| {
            state
                .process(role)
                .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
        };
        fs::create_dir_all(&state.bpf_dir)
            .ctx(|| format!("creating {}", state.bpf_dir.display()))?;
        // One agent per node. An agent of a role this lab no longer has (a state written
        // before nodes existed: `agent c1`) is ended; `down` would end it anyway.
        let roles: Vec<String> = state
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| agent_role(&n.name)))
            .collect();
        let stray: Vec<_> = state
            .processes
            .iter()
            .filter(|p| p.role.starts_with("agent ") && !roles.contains(&p.role))
            .cloned()
            .collect();
        for p in &stray {
            sys::end_process(p.pid, p.starttime, Duration::from_secs(2));
        }
        state.processes.retain(|p| !stray.contains(p));
        for c in state.clusters.clone() {
            for node in &c.nodes {
                let role = agent_role(&node.name);
                if alive(state, &role) {
                    continue;
                }
                state.processes.retain(|p| p.role != role);
                fs::create_dir_all(&c.bpf_dir)
                    .ctx(|| format!("creating {}", c.bpf_dir.display()))?;
                let p = sys::spawn_daemon(
                    &role,
                    &cp.agent_bin,
                    &control::agent_args(&cp, &self.state_dir, &c, node),
                    &Placement::netns(&c.netns),
                    &self.log(&format!("agent-{}", node.name)),
                    &[("RUST_LOG", "info")],
                )?;
                state.processes.push(p);
                self.save_state(state)?;
            }
        }
        Ok(())
    }

    fn up_cluster(&self, wan_ns: &str, c: &ClusterState) -> Result<()> {
        net::setup_cluster(wan_ns, c)?;
        fs::create_dir_all(&c.cgroup).ctx(|| format!("creating {}", c.cgroup.display()))?;
        for n in &c.nodes {
            fs::create_dir_all(&n.cgroup).ctx(|| format!("creating {}", n.cgroup.display()))?;
        }
        Ok(())
    }

    fn up_forwarder(&self, state: &mut LabState) -> Result<()> {
        let wan_ns = state.wan_netns.clone();
        let alive = state
            .process("wan-forwarder")
            .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
            && wan::control_blocking(&self.state_dir, "ping").is_ok();
        if !alive {
            state.processes.retain(|p| p.role != "wan-forwarder");
            // A forwarder from a crashed run may still hold the TUN names.
            for pid in sys::pids_in_netns(&sys::netns_path(&wan_ns)) {
                if cmdline(pid).contains("wan-forwarder") {
                    sys::end_process(pid, None, Duration::from_secs(2));
                }
            }
            let mut args = self.global_args();
            args.push("wan-forwarder".into());
            let p = sys::spawn_daemon(
                "wan-forwarder",
                &self.exe,
                &args,
                &Placement::netns(&wan_ns),
                &self.log("wan-forwarder"),
                &[("RUST_LOG", "info")],
            )?;
            state.processes.push(p);
            sys::wait_for("the wan forwarder", Duration::from_secs(5), || {
                wan::control_blocking(&self.state_dir, "ping").is_ok()
            })
            .map_err(|e| {
                LabError::Other(format!("{e}; see {}", self.log("wan-forwarder").display()))
            })?;
        }
        net::route_through_emulator(&wan_ns, &state.clusters)?;
        wan::control_blocking(&self.state_dir, "reload")?;
        Ok(())
    }

    fn up_services(&self, state: &mut LabState) -> Result<()> {
        if state.services.is_empty() {
            // demo/echo: two backends in every cluster but c1 (the client side).
            let backends = state
                .clusters
                .iter()
                .skip(1)
                .flat_map(|c| {
                    BACKEND_PORTS.iter().map(|&port| BackendState {
                        cluster: c.id.clone(),
                        addr: SocketAddr::V4(SocketAddrV4::new(c.address, port)),
                        process: None,
                        ready: true,
                    })
                })
                .collect();
            state.services.push(ServiceState {
                name: DEMO_SERVICE.into(),
                vip: DEMO_VIP,
                port: DEMO_PORT,
                backends,
                per_pod_capacity: Default::default(),
                backend_service_time: Default::default(),
                declared_service_time: Default::default(),
                service_time_probe: Default::default(),
                load_unit: Default::default(),
            });
        }
        let clusters = state.clusters.clone();
        for svc in &mut state.services {
            let slowdowns = (0..svc.backends.len())
                .map(|i| super::backends::backend_slowdown(svc, &svc.backends[i]))
                .collect::<Result<Vec<_>>>()?;
            for (b, slowdown) in svc.backends.iter_mut().zip(slowdowns) {
                if !b.running() {
                    let c = clusters
                        .iter()
                        .find(|c| c.id == b.cluster)
                        .ok_or_else(|| LabError::invalid("backend cluster", b.cluster.clone()))?;
                    self.start_backend(&svc.name, c, b, slowdown)?;
                }
            }
        }
        Ok(())
    }
}

/// The process role of node `node`'s agent in the lab state: `agent c1-n2`.
pub fn agent_role(node: &str) -> String {
    format!("agent {node}")
}
