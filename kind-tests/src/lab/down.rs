//! `down`: removes everything the lab made, from the state and, when that is gone, from the
//! names (every namespace and cgroup of the prefix). Idempotent.

use std::fs;
use std::time::Duration;

use serde::Serialize;

use super::Lab;
use crate::error::{IoContext, Result};
use crate::{net, sys};

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    pub processes: usize,
    pub netns: Vec<String>,
    pub cgroups: bool,
    pub bpf_dir: bool,
    pub state_dir: bool,
}

impl Lab {
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
            net::delete_netns(&ns)?;
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
