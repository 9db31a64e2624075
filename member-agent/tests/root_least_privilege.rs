//! The real `ballast-agent` under `capsh` with only the capabilities the chart grants (root:
//! BPF, cgroups). The agent runs as uid 0 with every other capability dropped from its
//! bounding set — what a container running as root with `capabilities: {drop: [ALL], add:
//! [...]}` gets — and must start, steer a real connection (a client in the test's cgroup
//! connecting to VIP 127.96.0.79:80 lands on a loopback backend), exit, start again adopting
//! the pinned links and maps, steer again, and finally detach on SIGTERM with
//! `--detach-on-exit always`. Dropping any one capability of the set makes the agent fail at
//! start with an error naming the operation the kernel refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The capabilities the agent needs on this kernel (measured; see the crate README's table).
const MINIMAL: &[&str] = &["cap_bpf", "cap_net_admin", "cap_perfmon"];
/// Granted by the chart besides: ICMP probes (without it `--probe-mode auto` falls back to
/// TCP connects, so the agent still runs).
const OPTIONAL: &[&str] = &["cap_net_raw"];

const VIP: &str = "127.96.0.79";

fn capsh() -> Option<PathBuf> {
    ["/usr/sbin/capsh", "/sbin/capsh", "/usr/bin/capsh"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Every capability name this kernel knows.
fn all_caps() -> Vec<String> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mask = (1u64 << (last + 1)) - 1;
    let out = Command::new(capsh().unwrap())
        .arg(format!("--decode={mask:#x}"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let names = text.trim().split_once('=').unwrap().1;
    names.split(',').map(str::to_owned).collect()
}

fn cap_mask(names: &[&str]) -> u64 {
    let all = all_caps();
    names
        .iter()
        .map(|n| {
            let bit = all.iter().position(|a| a == n).expect("known capability");
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

use common::{env, Env};

/// [`common::env`] for this file; capsh must exist.
fn lp_env(what: &str) -> Option<Env> {
    let e = env("lp", what, VIP)?;
    assert!(
        capsh().is_some(),
        "capsh not found: install libcap2-bin (kind-tests/setup.sh does)"
    );
    Some(e)
}

/// Starts the agent as uid 0 with only `keep` in its bounding (hence effective) set.
fn start(e: &Env, keep: &[&str], detach: &str) -> Child {
    let drop: Vec<String> = all_caps()
        .into_iter()
        .filter(|c| !keep.contains(&c.as_str()))
        .collect();
    Command::new(capsh().unwrap())
        .arg(format!("--drop={}", drop.join(",")))
        .args(["--", "-c", r#"exec "$0" "$@""#])
        .arg(env!("CARGO_BIN_EXE_ballast-agent"))
        .args(["--cluster-id", "east", "--node-name", "lp"])
        .args(["--discovery", "topology", "--topology"])
        .arg(&e.topology)
        .args(["--topology-poll-interval", "100ms", "--cgroup"])
        .arg(&e.cgroup)
        .arg("--pin-dir")
        .arg(&e.pin_dir)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", e.port))
        .args(["--detach-on-exit", detach])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        // a file, not a pipe: a verifier log can exceed the pipe's buffer and block the agent
        .stderr(std::fs::File::create(log_path(e)).unwrap())
        .spawn()
        .unwrap()
}

fn log_path(e: &Env) -> PathBuf {
    e._dir.path().join("agent.log")
}

fn agent_log(e: &Env) -> String {
    std::fs::read_to_string(log_path(e)).unwrap_or_default()
}

/// The effective capability mask of `pid`.
fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// One connect to the VIP from a process in the test's cgroup; the first line it reads.
fn connect_via_vip(cgroup: &Path) -> Option<String> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/{VIP}/80 && head -1 <&3",
            cgroup.display()
        ))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Waits until a connect through the VIP lands on the backend (the agent steers), or the agent
/// exits.
fn steers(e: &mut Env) -> bool {
    let port = e.port;
    if !wait_ready(port, e.agent.as_mut().unwrap()) {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if connect_via_vip(&e.cgroup).as_deref() == Some("east") {
            return true;
        }
        if let Some(a) = e.agent.as_mut() {
            if a.try_wait().unwrap().is_some() {
                return false;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn sigterm(e: &mut Env) -> (std::process::ExitStatus, String) {
    let mut a = e.agent.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    let pid = libc::pid_t::try_from(a.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = a.wait().unwrap();
    (status, agent_log(e))
}

fn attached_programs(cgroup: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn root_least_privilege_agent_steers_restarts_and_detaches_with_the_minimal_caps() {
    let Some(mut e) = lp_env("ok") else { return };
    let granted: Vec<&str> = MINIMAL.iter().chain(OPTIONAL).copied().collect();
    assert_eq!(
        connect_via_vip(&e.cgroup).as_deref(),
        Some(""),
        "unsteered, the VIP has no listener"
    );

    e.agent = Some(start(&e, &granted, "never"));
    assert!(steers(&mut e), "the agent does not steer with {granted:?}");
    let pid = e.agent.as_ref().unwrap().id();
    assert_eq!(
        cap_eff(pid),
        cap_mask(&granted),
        "the agent runs with exactly {granted:?}"
    );
    let (st, err) = sigterm(&mut e);
    assert!(st.success(), "exit {st}: {err}");
    assert!(
        attached_programs(&e.cgroup).contains("blst_"),
        "still attached after never"
    );

    // restart: adopts the pinned links and maps (no CAP_SYS_ADMIN for the id look-ups)
    e.agent = Some(start(&e, &granted, "always"));
    assert!(steers(&mut e), "the restarted agent does not steer");
    let (st, err) = sigterm(&mut e);
    assert!(st.success(), "exit {st}: {err}");
    let left = attached_programs(&e.cgroup);
    assert!(!left.contains("blst_"), "detached on exit, yet: {left}");
    assert!(!e.pin_dir.exists(), "pins removed");
    assert_eq!(
        connect_via_vip(&e.cgroup).as_deref(),
        Some(""),
        "no longer steered"
    );
}

#[test]
fn root_least_privilege_each_capability_of_the_set_is_needed() {
    let Some(mut e) = lp_env("drop") else { return };
    for missing in MINIMAL {
        let keep: Vec<&str> = MINIMAL
            .iter()
            .chain(OPTIONAL)
            .copied()
            .filter(|c| c != missing)
            .collect();
        let mut a = start(&e, &keep, "always");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = a.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = a.kill();
                let _ = a.wait();
                let err = agent_log(&e);
                panic!("without {missing} the agent kept running: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = agent_log(&e);
        assert!(!status.success(), "without {missing}: {status}");
        let name = missing.to_uppercase();
        assert!(
            err.contains("data plane") && err.contains(&format!("missing capabilities: {name}")),
            "without {missing} the error must name it: {err}"
        );
        println!(
            "without {missing}: {}",
            err.lines().next().unwrap_or_default()
        );
        assert!(
            !attached_programs(&e.cgroup).contains("blst_"),
            "nothing attached without {missing}"
        );
        let _ = std::fs::remove_dir_all(&e.pin_dir);
        e.agent = None;
    }
}

/// Waits until the agent at `port` answers `/ready` with 200 (it has installed its signal
/// handler and applied the catalog); false if it exits first.
fn wait_ready(port: u16, agent: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
            if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        if agent.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
