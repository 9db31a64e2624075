//! The lab itself: `up`, `down`, `status`, `delay`, `backends`, and where a cluster lives
//! (for `exec` and `load`). State is kept in a state dir (`/run/PREFIX-lab/state.json`)
//! so every command works from a new process; `down` also works without it.
//!
//! - `state`: what is kept between commands
//! - `up`, `down`, `backends`, `capacity`, `status`: one command (or group) each
//! - this file: the [`Lab`] handle, its state file and lock, the link delays, and the
//!   control-plane calls the commands share
//!
//! Decision: every command takes the state-dir lock while it changes the state, and saves
//! the state after each step of `up`, so a failure leaves `down` everything it needs.

mod backends;
pub mod brokers;
mod capacity;
mod down;
mod service_time;
mod state;
mod status;
mod up;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use ballast_types::{Params, Policy};

use crate::config::{Naming, RegionData};
use crate::control::{self, BrokerView};
use crate::error::{IoContext, LabError, Result};
use crate::sys::{self, Placement};
use crate::wan::{self, LinkTable};

/// Kept here for the tests and callers that knew it as `lab::in_netns`.
pub use crate::sys::in_netns;
pub use capacity::{capacity_rows, render_capacity, CapacityRow};
pub use down::DownReport;
pub use service_time::ServiceTimeChange;
#[cfg(test)]
pub(crate) use state::tests as state_tests;
pub use state::{
    BackendState, ClusterState, LabState, NodeState, ServiceState, UpOptions, BACKEND_PORTS,
    DEFAULT_PER_POD_CAPACITY, DEMO_PORT, DEMO_SERVICE, DEMO_VIP, STATE_FILE,
};
pub use status::{render_up, Status, StatusCluster, StatusService};
pub use up::agent_role;

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

    /// Where commands of cluster `id` run: the cgroup of its node `node` (the first node
    /// when None), steered by that node's agent, and the cluster's netns.
    pub fn placement(&self, id: &str, node: Option<&str>) -> Result<Placement> {
        let s = self.load_state()?;
        let c = s.cluster(id)?;
        let n = c.node(node)?;
        Ok(Placement::cluster(&n.cgroup, &c.netns))
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
        let cp = state.control_plane()?;
        control::settle(cp, &state, stable_for, timeout, on_change)
    }

    /// `policy NAME [--params P]`: switches the broker's cluster-wide policy live (through
    /// its Admin API) and waits (up to `timeout`) for the agents to install the new weights.
    pub fn set_policy(
        &self,
        policy: Policy,
        params: Option<Params>,
        timeout: Duration,
    ) -> Result<BrokerView> {
        let state = self.load_state()?;
        let cp = state.control_plane()?;
        control::set_policy(cp, &state.wan_netns, policy, params)?;
        control::wait_policy(cp, &state, policy, timeout)
    }

    /// The default one-way delay between two clusters of this lab (from their regions).
    pub fn default_delay(&self, a: &str, b: &str) -> Result<f64> {
        let state = self.load_state()?;
        let (ra, rb) = (&state.cluster(a)?.region, &state.cluster(b)?.region);
        let ms = RegionData::embedded()?.one_way_ms(ra, rb)?;
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

    /// Weights installed for (service, source cluster), destination -> weight; None while
    /// no agent reports them.
    pub fn weights(&self, service: &str, from: &str) -> Option<BTreeMap<String, f64>> {
        let v = self.broker_view().ok()??;
        v.weights.get(service)?.get(from).cloned()
    }
}

/// The command line of a process (NULs as spaces), empty if gone.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}
