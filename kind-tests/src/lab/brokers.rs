//! Broker replicas in the lab (`up --brokers N`): the lab's own PostgreSQL, started in the
//! wan namespace on its loopback (nothing outside the lab can reach it, and it cannot clash
//! with a PostgreSQL of the host); each replica's role and term, read from its own /metrics
//! and /ready; and `failover`: the leader is SIGKILLed, the time until another replica leads
//! with a higher term is measured, and the killed replica is started again.
//!
//! Decision: the roles come from each replica's public endpoints (`ballast_broker_leader`,
//! `ballast_broker_term`, the `/ready` body), as an operator's monitoring would read them,
//! not from the database.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_types::Policy;
use serde::{Deserialize, Serialize};

use super::{Lab, LabState};
use crate::control::{self, ControlPlane};
use crate::error::{IoContext, LabError, Result};
use crate::sys::{self, Placement};

/// The lab's PostgreSQL port, on the wan namespace's loopback.
pub const LAB_PG_PORT: u16 = 5433;
/// The role `postgres` runs as (Debian's package makes it).
const PG_USER: &str = "postgres";

/// One broker replica as seen from its endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// `k` of `broker-k` (1-based).
    pub index: usize,
    /// Its gRPC address.
    pub address: String,
    pub pid: Option<i32>,
    /// `leader`, `follower`, `not-ready` (its /ready says why in `detail`) or `down`.
    pub role: String,
    /// The term it leads, or the newest it saw.
    pub term: Option<u64>,
    /// Its /ready body (or why it could not be asked).
    pub detail: String,
}

/// What `failover` did and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    pub killed: BrokerStatus,
    pub new_leader: BrokerStatus,
    /// From the SIGKILL to another replica reporting leadership with a higher term.
    pub takeover_ms: f64,
    /// The killed replica, started again (it rejoins as a follower).
    pub restarted_pid: i32,
}

/// The newest installed PostgreSQL's bin directory (`/usr/lib/postgresql/<ver>/bin`).
fn pg_bin_dir() -> Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(base)
        .ctx(|| {
            format!(
                "reading {} (is PostgreSQL installed? kind-tests/setup.sh installs it)",
                base.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        LabError::Other(format!(
            "no PostgreSQL server under {} (kind-tests/setup.sh installs it)",
            base.display()
        ))
    })
}

/// The uid and gid of `user`.
fn ids_of(user: &str) -> Result<(u32, u32)> {
    let uid = sys::run("id", &["-u", user])?;
    let gid = sys::run("id", &["-g", user])?;
    let parse = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| LabError::Other(format!("`id {user}` printed {s:?}")))
    };
    Ok((parse(&uid)?, parse(&gid)?))
}

/// The database URL of the lab's PostgreSQL (trust authentication on the wan namespace's
/// loopback, superuser `ballast`).
pub fn lab_pg_url() -> String {
    format!("postgres://ballast@127.0.0.1:{LAB_PG_PORT}/postgres")
}

impl Lab {
    /// Starts the lab's PostgreSQL in the wan namespace (initdb on first use), unless it
    /// runs; returns its URL.
    pub(super) fn up_postgres(&self, state: &mut LabState) -> Result<String> {
        let url = lab_pg_url();
        if state
            .process("postgres")
            .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
        {
            return Ok(url);
        }
        state.processes.retain(|p| p.role != "postgres");
        let bin = pg_bin_dir()?;
        let (uid, gid) = ids_of(PG_USER)?;
        let data = self.state_dir.join("pg");
        let sock = self.state_dir.join("pg-socket");
        for dir in [&data, &sock] {
            fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .ctx(|| format!("chown {} to {PG_USER}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod {}", dir.display()))?;
        }
        // The server must reach its directories through the state dir.
        fs::set_permissions(&self.state_dir, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("chmod {}", self.state_dir.display()))?;
        let as_pg = |program: &Path| -> Vec<String> {
            vec![
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--init-groups".to_string(),
                "--".to_string(),
                program.display().to_string(),
            ]
        };
        if !data.join("PG_VERSION").exists() {
            let mut args = as_pg(&bin.join("initdb"));
            args.extend(
                [
                    "-D",
                    &data.display().to_string(),
                    "-U",
                    "ballast",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            sys::run("setpriv", &refs).map_err(|e| {
                LabError::Other(format!("initdb of the lab's PostgreSQL failed: {e}"))
            })?;
        }
        let mut args = as_pg(&bin.join("postgres"));
        args.extend(
            [
                "-D",
                &data.display().to_string(),
                "-k",
                &sock.display().to_string(),
                "-h",
                "127.0.0.1",
                "-p",
                &LAB_PG_PORT.to_string(),
                "-c",
                "max_connections=200",
                "-c",
                "fsync=off",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let p = sys::spawn_daemon(
            "postgres",
            Path::new("/usr/bin/setpriv"),
            &args,
            &Placement::netns(&state.wan_netns),
            &self.log("postgres"),
            &[],
        )?;
        state.processes.push(p);
        self.save_state(state)?;
        let addr: SocketAddr = ([127, 0, 0, 1], LAB_PG_PORT).into();
        control::wait_listening(&state.wan_netns, addr, Duration::from_secs(30))
            .map_err(|e| LabError::Other(format!("{e}; see {}", self.log("postgres").display())))?;
        Ok(url)
    }

    /// Starts broker `k` (1-based) unless it runs, and waits for it to listen.
    pub(super) fn up_broker(
        &self,
        state: &mut LabState,
        cp: &ControlPlane,
        policy: Policy,
        k: usize,
    ) -> Result<()> {
        let role = control::broker_role(k);
        if state
            .process(&role)
            .is_some_and(|p| sys::proc_alive(p.pid, p.starttime))
        {
            return Ok(());
        }
        state.processes.retain(|p| p.role != role);
        let log = self.log(&role);
        let p = sys::spawn_daemon(
            &role,
            &cp.broker_bin,
            &control::broker_args(cp, policy, k),
            &Placement::netns(&state.wan_netns),
            &log,
            &[("RUST_LOG", "info")],
        )?;
        state.processes.push(p);
        self.save_state(state)?;
        control::wait_listening(
            &state.wan_netns,
            control::broker_socket_of(k),
            Duration::from_secs(30),
        )
        .map_err(|e| LabError::Other(format!("{e}; see {}", log.display())))
    }

    /// Every broker replica's role and term.
    pub fn brokers(&self) -> Result<Vec<BrokerStatus>> {
        let state = self.load_state()?;
        let cp = state.control_plane()?.clone();
        Ok(broker_statuses(&state, &cp))
    }

    /// Kills the leader, waits (up to `timeout`) for another replica to lead with a higher
    /// term, then starts the killed replica again.
    pub fn failover(&self, timeout: Duration) -> Result<FailoverReport> {
        let _lock = self.lock()?;
        let mut state = self.load_state()?;
        let cp = state.control_plane()?.clone();
        if cp.brokers < 2 {
            return Err(LabError::invalid(
                "brokers",
                "failover needs broker replicas: bring the lab up with --brokers 2 or more",
            ));
        }
        let before = broker_statuses(&state, &cp);
        let leader = leader_of(&before).ok_or_else(|| {
            LabError::Other(format!(
                "no replica reports leadership: {}",
                render(&before)
            ))
        })?;
        let role = control::broker_role(leader.index);
        let proc = state
            .process(&role)
            .cloned()
            .ok_or_else(|| LabError::Other(format!("{role} is not a process of this lab")))?;
        // SIGKILL: no clean shutdown, no lease handed over.
        // SAFETY: kill(2) on a pid this lab started (checked alive by its start time).
        if !sys::proc_alive(proc.pid, proc.starttime)
            || unsafe { libc::kill(proc.pid, libc::SIGKILL) } != 0
        {
            return Err(LabError::Other(format!(
                "{role} (pid {}) is not running",
                proc.pid
            )));
        }
        let killed_at = Instant::now();
        let old_term = leader.term.unwrap_or(0);
        let mut new_leader = None;
        while killed_at.elapsed() < timeout {
            let now = broker_statuses(&state, &cp);
            if let Some(l) = leader_of(&now) {
                if l.index != leader.index && l.term.unwrap_or(0) > old_term {
                    new_leader = Some(l);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let takeover_ms = killed_at.elapsed().as_secs_f64() * 1000.0;
        // Whatever happened, the killed replica comes back (as a follower).
        let policy = cp.policy.unwrap_or(Policy::Optimized);
        self.up_broker(&mut state, &cp, policy, leader.index)?;
        let restarted_pid = state.process(&role).map_or(0, |p| p.pid);
        let new_leader = new_leader.ok_or_else(|| {
            LabError::Other(format!(
                "no other replica led within {:.1} s of killing {role}: {}",
                timeout.as_secs_f64(),
                render(&broker_statuses(&state, &cp))
            ))
        })?;
        Ok(FailoverReport {
            killed: leader,
            new_leader,
            takeover_ms,
            restarted_pid,
        })
    }
}

fn leader_of(s: &[BrokerStatus]) -> Option<BrokerStatus> {
    s.iter()
        .filter(|b| b.role == "leader")
        .max_by_key(|b| b.term)
        .cloned()
}

/// `broker-1 leader term 3 (pid 12), broker-2 follower ...`, one line.
pub fn render(s: &[BrokerStatus]) -> String {
    s.iter()
        .map(|b| {
            format!(
                "{} {}{}{}",
                control::broker_role(b.index),
                b.role,
                b.term.map(|t| format!(" term {t}")).unwrap_or_default(),
                b.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each replica's status, asked from inside the wan namespace.
pub fn broker_statuses(state: &LabState, cp: &ControlPlane) -> Vec<BrokerStatus> {
    let ks: Vec<usize> = (1..=cp.brokers.max(1)).collect();
    let pids: Vec<Option<i32>> = ks
        .iter()
        .map(|&k| {
            state
                .process(&control::broker_role(k))
                .filter(|p| sys::proc_alive(p.pid, p.starttime))
                .map(|p| p.pid)
        })
        .collect();
    let asked = sys::in_netns(&state.wan_netns, move || {
        ks.iter()
            .map(|&k| {
                let m = control::broker_metrics_of(k);
                (k, http_get(m, "/metrics"), http_get(m, "/ready"))
            })
            .collect::<Vec<_>>()
    });
    let asked = match asked {
        Ok(a) => a,
        Err(e) => {
            return pids
                .iter()
                .enumerate()
                .map(|(i, pid)| BrokerStatus {
                    index: i + 1,
                    address: control::broker_socket_of(i + 1).to_string(),
                    pid: *pid,
                    role: "down".into(),
                    term: None,
                    detail: e.to_string(),
                })
                .collect()
        }
    };
    asked
        .into_iter()
        .zip(pids)
        .map(|((k, metrics, ready), pid)| {
            let address = control::broker_socket_of(k).to_string();
            let (role, term, detail) = match (metrics, ready) {
                (Ok((_, m)), Ok((code, body))) => {
                    let leader = gauge(&m, "ballast_broker_leader");
                    let term = gauge(&m, "ballast_broker_term").map(|t| t as u64);
                    let role = if code != 200 {
                        "not-ready"
                    } else if leader == Some(1.0) {
                        "leader"
                    } else {
                        "follower"
                    };
                    (role.to_string(), term, body.trim().to_string())
                }
                (Err(e), _) | (_, Err(e)) => ("down".to_string(), None, e),
            };
            BrokerStatus {
                index: k,
                address,
                pid,
                role,
                term,
                detail,
            }
        })
        .collect()
}

/// A gauge's value in a Prometheus text exposition (the unlabelled sample).
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The status code and body of `GET path` (HTTP/1.0, one connection).
fn http_get(addr: SocketAddr, path: &str) -> std::result::Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: not an HTTP answer"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_read_from_the_exposition_and_labelled_samples_are_not_taken() {
        let text = "# HELP ballast_broker_leader x\n# TYPE ballast_broker_leader gauge\n\
                    ballast_broker_leader 1\nballast_broker_term 7\n\
                    ballast_broker_term_other 9\nballast_broker_leader{x=\"y\"} 0\n";
        assert_eq!(gauge(text, "ballast_broker_leader"), Some(1.0));
        assert_eq!(gauge(text, "ballast_broker_term"), Some(7.0));
        assert_eq!(gauge(text, "ballast_broker_missing"), None);
    }

    #[test]
    fn the_leader_is_the_one_with_the_highest_term() {
        let b = |index, role: &str, term| BrokerStatus {
            index,
            address: String::new(),
            pid: None,
            role: role.into(),
            term: Some(term),
            detail: String::new(),
        };
        let s = vec![b(1, "leader", 3), b(2, "leader", 4), b(3, "follower", 4)];
        assert_eq!(leader_of(&s).unwrap().index, 2);
        assert!(leader_of(&[b(1, "follower", 1)]).is_none());
        assert_eq!(render(&s[..1]), "broker leader term 3");
    }
}
