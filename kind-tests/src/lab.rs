//! The lab itself: `up`, `down`, `status`, `delay`, `backends`, and where a cluster lives
//! (for `exec` and `load`). State is kept in a state dir (`/run/PREFIX-lab/state.json`)
//! so every command works from a new process; `down` also works without it.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, Naming, RegionData, CLUSTER_IF, LAB_SUBNET, TUN_IN, TUN_OUT};
use crate::control::{self, BrokerView, ControlPlane};
use crate::error::{IoContext, LabError, Result};
use crate::sys::{self, Placement, Spawned};
use crate::wan::{self, LinkTable};

pub const STATE_FILE: &str = "state.json";
pub const DEMO_SERVICE: &str = "demo/echo";
pub const DEMO_VIP: Ipv4Addr = Ipv4Addr::new(127, 96, 0, 10);
pub const DEMO_PORT: u16 = 80;
/// Ports of the backends of the demo service (one backend per port, per serving cluster).
pub const BACKEND_PORTS: [u16; 2] = [8080, 8081];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub id: String,
    pub index: usize,
    pub region: String,
    pub provider: String,
    pub netns: String,
    pub cgroup: PathBuf,
    /// The cluster's address (its `eth0`), what others reach it by: its gateway.
    pub address: Ipv4Addr,
    /// The wan side of its link (its next hop).
    pub wan_address: Ipv4Addr,
    /// Where its agent pins BPF maps.
    pub bpf_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    pub cluster: String,
    pub addr: SocketAddr,
    pub process: Option<Spawned>,
    /// Whether the topology files list it as ready (false while it is being stopped).
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

impl BackendState {
    pub fn running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<BackendState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub wan_netns: String,
    pub cgroup_root: PathBuf,
    pub bpf_dir: PathBuf,
    pub clusters: Vec<ClusterState>,
    pub services: Vec<ServiceState>,
    /// Long-lived processes other than backends (the wan forwarder, broker, agents).
    pub processes: Vec<Spawned>,
    /// The broker and agents, when `up` started them.
    #[serde(default)]
    pub control: Option<ControlPlane>,
}

impl LabState {
    pub fn cluster(&self, id: &str) -> Result<&ClusterState> {
        self.clusters.iter().find(|c| c.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.clusters.iter().map(|c| c.id.as_str()).collect();
            LabError::invalid(
                "cluster",
                format!("{id:?} is not in this lab ({})", ids.join(", ")),
            )
        })
    }
    pub fn service(&self, name: &str) -> Result<&ServiceState> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
                LabError::invalid(
                    "service",
                    format!("{name:?} is not in this lab ({})", names.join(", ")),
                )
            })
    }
    fn process(&self, role: &str) -> Option<&Spawned> {
        self.processes.iter().find(|p| p.role == role)
    }
}

#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    pub clusters: usize,
    pub regions: Vec<String>,
    /// Start the broker and one agent per cluster (needs `ballast-broker` and
    /// `ballast-agent`); without it the lab is network, backends and load only.
    pub control_plane: bool,
    /// The broker's policy at start.
    pub policy: String,
}

/// What `status --json` prints (the shape, plus links).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub clusters: Vec<StatusCluster>,
    pub services: Vec<StatusService>,
    /// service -> source cluster -> destination cluster -> weight.
    pub weights: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// cluster -> generation its agent installed.
    pub installed_generation: BTreeMap<String, u64>,
    /// The generation the broker published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub links: Vec<wan::Link>,
    /// Why weights are missing, when the broker could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusCluster {
    pub id: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub gateway: Ipv4Addr,
    pub region: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// Running backends per cluster.
    pub backends: BTreeMap<String, usize>,
}

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    pub processes: usize,
    pub netns: Vec<String>,
    pub cgroups: bool,
    pub bpf_dir: bool,
    pub state_dir: bool,
}

pub struct Lab {
    pub naming: Naming,
    pub state_dir: PathBuf,
    /// This program, to start the lab's own daemons.
    pub exe: PathBuf,
}

impl Lab {
    pub fn new(prefix: &str, state_dir: Option<PathBuf>) -> Result<Lab> {
        let naming = Naming::new(prefix)?;
        let state_dir = state_dir.unwrap_or_else(|| naming.default_state_dir());
        let exe = std::env::current_exe().ctx(|| "finding this program".into())?;
        Ok(Lab {
            naming,
            state_dir,
            exe,
        })
    }

    fn state_path(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    fn lock(&self) -> Result<sys::FileLock> {
        fs::create_dir_all(&self.state_dir)
            .ctx(|| format!("creating {}", self.state_dir.display()))?;
        sys::FileLock::acquire(&self.state_dir.join("lock"))
    }

    pub fn load_state(&self) -> Result<LabState> {
        let path = self.state_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NotUp {
                    prefix: self.naming.prefix.clone(),
                    dir: self.state_dir.clone(),
                })
            }
            Err(e) => return Err(LabError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text).map_err(|source| LabError::Parse { path, source })
    }

    fn save_state(&self, s: &LabState) -> Result<()> {
        let data = serde_json::to_vec_pretty(s).map_err(|e| LabError::Other(e.to_string()))?;
        sys::write_atomic(&self.state_path(), &data)
    }

    fn global_args(&self) -> Vec<String> {
        vec![
            "--prefix".into(),
            self.naming.prefix.clone(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
        ]
    }

    fn log(&self, name: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{name}.log"))
    }

    /// Where commands of cluster `id` run (its cgroup and netns).
    pub fn placement(&self, id: &str) -> Result<Placement> {
        let s = self.load_state()?;
        let c = s.cluster(id)?;
        Ok(Placement::cluster(&c.cgroup, &c.netns))
    }

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
        let _lock = self.lock()?;
        let data = RegionData::embedded();
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
                ClusterState {
                    netns: self.naming.cluster_netns(&id),
                    cgroup: cgroup_root.join(&id),
                    address: config::cluster_addr(index),
                    wan_address: config::wan_side_addr(index),
                    bpf_dir: bpf_dir.join(&id),
                    provider: data.provider(region).unwrap_or("aws").to_string(),
                    region: region.clone(),
                    index,
                    id,
                }
            })
            .collect();

        // The wan namespace: forwarding, no reverse-path filter, the broker's address.
        sys::ensure_netns(&wan_ns)?;
        sys::ip_in(&wan_ns, &["link", "set", "lo", "up"])?;
        let broker = format!("{}/32", config::BROKER_ADDR);
        sys::ip_in(&wan_ns, &["addr", "replace", &broker, "dev", "lo"])?;
        sys::sysctl_in(&wan_ns, "net.ipv4.ip_forward", "1")?;
        sys::sysctl_in(&wan_ns, "net.ipv4.conf.all.rp_filter", "0")?;
        sys::sysctl_in(&wan_ns, "net.ipv4.conf.default.rp_filter", "0")?;

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
            self.up_control(&mut state, &opts.policy)?;
            self.save_state(&state)?;
        }
        Ok(state)
    }

    fn up_control(&self, state: &mut LabState, policy: &str) -> Result<()> {
        control::validate_policy(policy)?;
        let find = |name: &str| {
            control::find_binary(name, &self.exe).ok_or_else(|| {
                LabError::Other(format!(
                    "{name} not found (next to {}, in $BALLAST_LAB_BIN_DIR or $PATH); build it with \
                     `cargo build --release -p ballast-broker -p ballast-agent`, or pass --no-control-plane",
                    self.exe.display()
                ))
            })
        };
        let cp = match &state.control {
            Some(cp) => cp.clone(),
            None => ControlPlane::new(
                &self.state_dir,
                find("ballast-broker")?,
                find("ballast-agent")?,
            ),
        };
        control::ensure_certs(&cp, state)?;
        control::write_topologies(&self.state_dir, state)?;
        state.control = Some(cp.clone());
        let wan_ns = state.wan_netns.clone();
        let alive = |state: &LabState, role: &str| {
            state
                .process(role)
                .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
        };
        if !alive(state, "broker") {
            state.processes.retain(|p| p.role != "broker");
            let p = sys::spawn_daemon(
                "broker",
                &cp.broker_bin,
                &control::broker_args(&cp, policy),
                &Placement::netns(&wan_ns),
                &self.log("broker"),
                &[("RUST_LOG", "info")],
            )?;
            state.processes.push(p);
            self.save_state(state)?;
            control::wait_listening(&wan_ns, control::broker_socket(), Duration::from_secs(20))
                .map_err(|e| {
                    LabError::Other(format!("{e}; see {}", self.log("broker").display()))
                })?;
        }
        fs::create_dir_all(&state.bpf_dir)
            .ctx(|| format!("creating {}", state.bpf_dir.display()))?;
        for c in state.clusters.clone() {
            let role = format!("agent {}", c.id);
            if alive(state, &role) {
                continue;
            }
            state.processes.retain(|p| p.role != role);
            let p = sys::spawn_daemon(
                &role,
                &cp.agent_bin,
                &control::agent_args(&cp, &self.state_dir, &c),
                &Placement::netns(&c.netns),
                &self.log(&format!("agent-{}", c.id)),
                &[("RUST_LOG", "info")],
            )?;
            state.processes.push(p);
            self.save_state(state)?;
        }
        Ok(())
    }

    /// The broker's view (weights, acknowledged generations), when a control plane runs.
    pub fn broker_view(&self) -> Result<Option<BrokerView>> {
        let state = self.load_state()?;
        match &state.control {
            Some(cp) => control::broker_view(cp, &state.wan_netns).map(Some),
            None => Ok(None),
        }
    }

    /// Waits until every agent installed weights newer than generation `after`.
    pub fn wait_installed(&self, after: u64, timeout: Duration) -> Result<Option<BrokerView>> {
        let state = self.load_state()?;
        match &state.control {
            Some(cp) => control::wait_installed(cp, &state, after, timeout).map(Some),
            None => Ok(None),
        }
    }

    /// Waits for the weights to stop moving (see [`control::settle`]).
    pub fn settle(
        &self,
        stable_for: Duration,
        timeout: Duration,
        on_change: impl FnMut(&BrokerView),
    ) -> Result<BrokerView> {
        let state = self.load_state()?;
        let cp = state.control.as_ref().ok_or_else(|| {
            LabError::Other(
                "no broker in this lab (it was brought up with --no-control-plane)".into(),
            )
        })?;
        control::settle(cp, &state, stable_for, timeout, on_change)
    }

    /// `policy NAME`: switches the broker's cluster-wide policy live and waits (up to
    /// `timeout`) for the agents to install the new weights.
    pub fn set_policy(&self, policy: &str, timeout: Duration) -> Result<BrokerView> {
        control::validate_policy(policy)?;
        let state = self.load_state()?;
        let cp = state.control.as_ref().ok_or_else(|| {
            LabError::Other(
                "no broker in this lab (it was brought up with --no-control-plane)".into(),
            )
        })?;
        control::admin(cp, &state.wan_netns, &["policy", "set", "--policy", policy])?;
        control::wait_policy(cp, &state, policy, timeout)
    }

    fn up_cluster(&self, wan_ns: &str, c: &ClusterState) -> Result<()> {
        let wan_if = config::wan_if(&c.id);
        sys::ensure_netns(&c.netns)?;
        sys::ip_in(&c.netns, &["link", "set", "lo", "up"])?;
        if !sys::link_exists(&c.netns, CLUSTER_IF) {
            // A half-made pair from a crash: its wan end blocks the name.
            if sys::link_exists(wan_ns, &wan_if) {
                sys::ip_in(wan_ns, &["link", "del", &wan_if])?;
            }
            sys::ip(&[
                "link", "add", CLUSTER_IF, "netns", &c.netns, "type", "veth", "peer", "name",
                &wan_if, "netns", wan_ns,
            ])?;
        }
        sys::sysctl_in(wan_ns, &format!("net.ipv4.conf.{wan_if}.rp_filter"), "0")?;
        let caddr = format!("{}/24", c.address);
        let waddr = format!("{}/24", c.wan_address);
        sys::ip_in(&c.netns, &["addr", "replace", &caddr, "dev", CLUSTER_IF])?;
        sys::ip_in(&c.netns, &["link", "set", CLUSTER_IF, "up"])?;
        sys::ip_in(wan_ns, &["addr", "replace", &waddr, "dev", &wan_if])?;
        sys::ip_in(wan_ns, &["link", "set", &wan_if, "up"])?;
        // Only the lab's subnet: no default route, nothing off this machine is reachable.
        let via = c.wan_address.to_string();
        sys::ip_in(
            &c.netns,
            &[
                "route", "replace", LAB_SUBNET, "via", &via, "dev", CLUSTER_IF,
            ],
        )?;
        fs::create_dir_all(&c.cgroup).ctx(|| format!("creating {}", c.cgroup.display()))?;
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
        sys::sysctl_in(&wan_ns, &format!("net.ipv4.conf.{TUN_OUT}.rp_filter"), "0")?;
        sys::sysctl_in(&wan_ns, &format!("net.ipv4.conf.{TUN_IN}.rp_filter"), "0")?;
        sys::ip_in(&wan_ns, &["link", "set", TUN_IN, "up"])?;
        sys::ip_in(&wan_ns, &["link", "set", TUN_OUT, "up"])?;
        // Fail closed: without the forwarder (its TUN gone, and with it the route below)
        // cluster traffic must not bypass the emulator through the main table.
        sys::ip_in(
            &wan_ns,
            &[
                "route",
                "replace",
                "unreachable",
                LAB_SUBNET,
                "table",
                config::WAN_TABLE,
                "metric",
                "4096",
            ],
        )?;
        // Only lab destinations go through the emulator; anything else has no route.
        sys::ip_in(
            &wan_ns,
            &[
                "route",
                "replace",
                LAB_SUBNET,
                "dev",
                TUN_IN,
                "table",
                config::WAN_TABLE,
            ],
        )?;
        let rules = sys::ip_in(&wan_ns, &["rule", "show"])?;
        for c in &state.clusters {
            let wan_if = config::wan_if(&c.id);
            let want = format!("iif {wan_if} lookup {}", config::WAN_TABLE);
            if !rules.lines().any(|l| l.contains(&want)) {
                sys::ip_in(
                    &wan_ns,
                    &[
                        "rule",
                        "add",
                        "iif",
                        &wan_if,
                        "lookup",
                        config::WAN_TABLE,
                        "pref",
                        "100",
                    ],
                )?;
            }
        }
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
            });
        }
        let clusters = state.clusters.clone();
        for svc in &mut state.services {
            for b in &mut svc.backends {
                if !b.running() {
                    let c = clusters
                        .iter()
                        .find(|c| c.id == b.cluster)
                        .ok_or_else(|| LabError::invalid("backend cluster", b.cluster.clone()))?;
                    self.start_backend(&svc.name, c, b)?;
                }
            }
        }
        Ok(())
    }

    fn start_backend(&self, service: &str, c: &ClusterState, b: &mut BackendState) -> Result<()> {
        let mut args = self.global_args();
        args.extend([
            "echo-server".into(),
            "--cluster".into(),
            c.id.clone(),
            "--listen".into(),
            b.addr.to_string(),
        ]);
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
            || {
                sys::proc_alive(pid, None)
                    && in_netns(&netns, move || tcp_probe(addr)).unwrap_or(false)
            },
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
                for b in svc.backends.iter_mut().filter(|b| b.cluster == cluster) {
                    if !b.running() {
                        self.start_backend(service, &c, b)?;
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

    /// Waits until no cluster's data plane (read from its pinned maps) sends new connections
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
        let steers_to_them = |c: &ClusterState| -> bool {
            let Ok(dp) = ballast_bpf::Dataplane::open(&c.bpf_dir) else {
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
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pending: Vec<&str> = state
                .clusters
                .iter()
                .filter(|c| steers_to_them(c))
                .map(|c| c.id.as_str())
                .collect();
            if pending.is_empty() {
                return None;
            }
            if std::time::Instant::now() >= deadline {
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

    /// The default one-way delay between two clusters of this lab (from their regions).
    pub fn default_delay(&self, a: &str, b: &str) -> Result<f64> {
        let state = self.load_state()?;
        let (ra, rb) = (&state.cluster(a)?.region, &state.cluster(b)?.region);
        let ms = RegionData::embedded().one_way_ms(ra, rb)?;
        Ok((ms * 10.0).round() / 10.0)
    }

    /// `delay A B MS`: sets the one-way delay (both directions) live.
    pub fn set_delay(&self, a: &str, b: &str, ms: f64, loss: f64) -> Result<()> {
        let _lock = self.lock()?;
        let state = self.load_state()?;
        state.cluster(a)?;
        state.cluster(b)?;
        let mut t = LinkTable::load(&self.state_dir)?;
        t.set(a, b, ms, loss)?;
        t.save(&self.state_dir)?;
        wan::control_blocking(&self.state_dir, "reload").map(|_| ())
    }

    pub fn status(&self) -> Result<Status> {
        let state = self.load_state()?;
        let links = LinkTable::load(&self.state_dir)
            .map(|t| t.links)
            .unwrap_or_default();
        let (view, broker_error) = match &state.control {
            Some(cp) => match control::broker_view(cp, &state.wan_netns) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        Ok(Status {
            clusters: state
                .clusters
                .iter()
                .map(|c| StatusCluster {
                    id: c.id.clone(),
                    netns: c.netns.clone(),
                    cgroup: c.cgroup.clone(),
                    gateway: c.address,
                    region: c.region.clone(),
                })
                .collect(),
            services: state
                .services
                .iter()
                .map(|s| {
                    let mut backends = BTreeMap::new();
                    for b in &s.backends {
                        let e = backends.entry(b.cluster.clone()).or_insert(0);
                        if b.running() {
                            *e += 1;
                        }
                    }
                    StatusService {
                        name: s.name.clone(),
                        vip: s.vip,
                        port: s.port,
                        backends,
                    }
                })
                .collect(),
            weights: view.as_ref().map(|v| v.weights.clone()).unwrap_or_default(),
            installed_generation: view.as_ref().map(|v| v.acked.clone()).unwrap_or_default(),
            generation: view.as_ref().map(|v| v.generation),
            links,
            broker_error,
        })
    }

    /// Weights installed for (service, source cluster), destination -> weight; None while
    /// no agent reports them.
    pub fn weights(&self, service: &str, from: &str) -> Option<BTreeMap<String, f64>> {
        let v = self.broker_view().ok()??;
        v.weights.get(service)?.get(from).cloned()
    }

    /// Removes everything the lab made: its processes, namespaces (and with them the
    /// veths and TUNs), cgroups, pinned maps and state. Idempotent; works from the state
    /// and, when that is gone, from the names.
    pub fn down(&self) -> Result<DownReport> {
        let mut report = DownReport::default();
        let grace = Duration::from_secs(2);
        let state = self.load_state().ok();
        if let Some(s) = &state {
            let backends = s
                .services
                .iter()
                .flat_map(|svc| svc.backends.iter().filter_map(|b| b.process.as_ref()));
            for p in s.processes.iter().chain(backends) {
                if sys::end_process(p.pid, p.starttime, grace) {
                    report.processes += 1;
                }
            }
        }
        // By name: every namespace of this prefix, every process inside it.
        for ns in sys::list_netns()
            .into_iter()
            .filter(|n| self.naming.owns_netns(n))
        {
            for pid in sys::pids_in_netns(&sys::netns_path(&ns)) {
                if sys::end_process(pid, None, grace) {
                    report.processes += 1;
                }
            }
            sys::ip(&["netns", "del", &ns])?;
            report.netns.push(ns);
        }
        if let Ok(cgroup2) = sys::cgroup2_mount() {
            let root = self.naming.cgroup_root(&cgroup2);
            if root.exists() {
                for pid in sys::pids_in_cgroup(&root) {
                    if sys::end_process(pid, None, grace) {
                        report.processes += 1;
                    }
                }
                sys::remove_cgroup_tree(&root)?;
                report.cgroups = true;
            }
        }
        let bpf = self.naming.bpf_dir();
        if bpf.exists() {
            fs::remove_dir_all(&bpf).ctx(|| format!("removing {}", bpf.display()))?;
            report.bpf_dir = true;
        }
        if self.state_dir.exists() {
            fs::remove_dir_all(&self.state_dir)
                .ctx(|| format!("removing {}", self.state_dir.display()))?;
            report.state_dir = true;
        }
        Ok(report)
    }
}

/// The command line of a process (NULs as spaces), empty if gone.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has entered network namespace `netns` (the calling
/// thread's namespace is untouched).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let placement = Placement::netns(netns);
    std::thread::spawn(move || -> Result<T> {
        placement.enter_current()?;
        Ok(f())
    })
    .join()
    .map_err(|_| LabError::Other("netns thread panicked".into()))?
}

fn tcp_probe(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The table `up` prints.
pub fn render_up(state: &LabState, status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<4} {:<16} {:<12} {:<16} {}\n",
        "id", "region", "gateway", "netns", "cgroup"
    ));
    for c in &state.clusters {
        out.push_str(&format!(
            "{:<4} {:<16} {:<12} {:<16} {}\n",
            c.id,
            c.region,
            c.address.to_string(),
            c.netns,
            c.cgroup.display()
        ));
    }
    out.push('\n');
    for s in &status.services {
        let b: Vec<String> = s.backends.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        out.push_str(&format!(
            "service {} vip {}:{} backends {}\n",
            s.name,
            s.vip,
            s.port,
            b.join(" ")
        ));
        match status.weights.get(&s.name) {
            Some(w) if !w.is_empty() => {
                for (src, dsts) in w {
                    let d: Vec<String> = dsts
                        .iter()
                        .map(|(c, x)| format!("{c} {:.1}%", 100.0 * x))
                        .collect();
                    out.push_str(&format!("  weights from {src}: {}\n", d.join("  ")));
                }
            }
            _ => out.push_str("  weights: none published yet\n"),
        }
    }
    if let Some(g) = status.generation {
        let inst: Vec<String> = state
            .clusters
            .iter()
            .map(|c| match status.installed_generation.get(&c.id) {
                Some(x) => format!("{} {x}", c.id),
                None => format!("{} -", c.id),
            })
            .collect();
        out.push_str(&format!(
            "broker generation {g}; installed: {}\n",
            inst.join("  ")
        ));
    }
    if let Some(e) = &status.broker_error {
        out.push_str(&format!("broker: {e}\n"));
    }
    out.push_str("\nlinks (one-way ms):\n");
    for l in status.links.iter().filter(|l| l.from < l.to) {
        out.push_str(&format!("  {} <-> {}  {:.1} ms", l.from, l.to, l.delay_ms));
        if l.loss > 0.0 {
            out.push_str(&format!("  loss {:.1}%", 100.0 * l.loss));
        }
        out.push('\n');
    }
    out
}
