//! The environment of the root tests that run the real `ballast-agent` binary: a cgroup, a
//! pin dir, a loopback backend answering `east`, and a topology file steering `vip:80` to it;
//! everything is removed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Env {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub topology: PathBuf,
    pub _dir: tempfile::TempDir,
    pub agent: Option<Child>,
    pub stop: Arc<AtomicBool>,
    /// The agent's admin port (`/ready`).
    pub port: u16,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        if let Ok(mut dp) = ballast_bpf::Dataplane::open(&self.pin_dir) {
            let _ = dp.detach(&self.cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(root) = ballast_bpf::sys::cgroup2_mount() {
            if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(root.join("cgroup.procs"), p);
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The environment named `prefix-what-PID`, steering `vip`; `None` (skip) when not root.
pub fn env(prefix: &str, what: &str, vip: &str) -> Option<Env> {
    if !ballast_bpf::sys::root_for_tests() {
        println!("skipped: needs root (BPF, cgroups)");
        return None;
    }
    let (Some(cg_root), Some(bpffs)) = (
        ballast_bpf::sys::cgroup2_mount(),
        ballast_bpf::sys::bpffs_mount(),
    ) else {
        panic!("needs cgroup2 and bpffs mounted (kind-tests/setup.sh mounts bpffs)");
    };
    let unique = format!("ballast-{prefix}-{what}-{}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(b"east\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let topology = dir.path().join("topology.yaml");
    std::fs::write(
        &topology,
        format!(
            "local_cluster: east\nclusters:\n  - id: east\nservices:\n  - name: t/web\n    vips: [{vip}]\n    ports: [{{ port: 80 }}]\n    endpoints:\n      - {{ address: 127.0.0.1:{port}, cluster: east }}\n"
        ),
    )
    .unwrap();
    let e = Env {
        cgroup: cg_root.join(&unique),
        pin_dir: bpffs.join(&unique),
        topology,
        _dir: dir,
        agent: None,
        stop,
        port: TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    };
    std::fs::create_dir_all(&e.cgroup).unwrap();
    Some(e)
}
