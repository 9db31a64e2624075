//! What the root lab tests (`root_lab`, `root_agent_e2e`) and the `wan` bench share: a lab
//! under its own name prefix and temporary state dir, torn down on drop, and the
//! `ballast-lab` calls they make. Each user takes a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_ballast-lab");

pub fn is_root() -> bool {
    ballast_bpf::sys::root_for_tests()
}

/// Returns from the test with the printed reason when not root.
#[allow(unused_macros)] // the bench checks root itself
macro_rules! require_root {
    ($why:expr) => {
        if !common::is_root() {
            eprintln!("skipped: needs root ({})", $why);
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_root;

/// A lab under a test prefix; `down` on drop, even when the test fails.
pub struct TestLab {
    pub prefix: String,
    state: tempfile::TempDir,
    started: Instant,
}

impl TestLab {
    /// Prefix `{base}{tag}{pid % 100000}`: each test binary has its own `base`.
    pub fn new(base: &str, tag: &str) -> TestLab {
        TestLab {
            prefix: format!("{base}{tag}{}", std::process::id() % 100_000),
            state: tempfile::tempdir().expect("tempdir"),
            started: Instant::now(),
        }
    }
    pub fn state_dir(&self) -> PathBuf {
        self.state.path().join("lab")
    }
    pub fn run(&self, args: &[&str]) -> Output {
        let state_dir = self.state_dir();
        let mut all: Vec<&str> = vec![
            "--prefix",
            &self.prefix,
            "--state-dir",
            state_dir.to_str().expect("utf8 path"),
        ];
        all.extend_from_slice(args);
        Command::new(BIN)
            .args(&all)
            .output()
            .expect("run ballast-lab")
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "ballast-lab {args:?} failed: {}\n{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
    pub fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }
    /// `load --json` from cluster `from` to `demo/echo`, `extra` flags added.
    pub fn load(
        &self,
        from: &str,
        connections: usize,
        concurrency: usize,
        extra: &[&str],
    ) -> Value {
        let (n, c) = (connections.to_string(), concurrency.to_string());
        let mut args = vec![
            "load",
            "--from",
            from,
            "--service",
            "demo/echo",
            "--connections",
            &n,
            "--concurrency",
            &c,
        ];
        args.extend_from_slice(extra);
        args.push("--json");
        self.json(&args)
    }
    /// The last lines of the broker's and agents' logs, for failure messages (empty
    /// without a control plane).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let dir = self.state_dir().join("logs");
        let mut names = vec!["broker".to_string()];
        // Every node's agent: agent-c1-n1.log, agent-c1-n2.log, ...
        let mut agents: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".log").map(String::from))
                    .filter(|n| n.starts_with("agent-"))
                    .collect()
            })
            .unwrap_or_default();
        agents.sort();
        names.extend(agents);
        for name in names {
            let path = dir.join(format!("{name}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(8)..];
                s.push_str(&format!("\n--- {name}.log (tail) ---\n{}", tail.join("\n")));
            }
        }
        s
    }
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
    /// The lab's network namespaces, sorted.
    pub fn netns(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(String::from)
            .collect();
        v.sort();
        v
    }
    /// The lab's cgroup (under the cgroup2 mount found in /proc/mounts).
    pub fn cgroup_root(&self) -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        let m = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .expect("cgroup2 mount");
        m.join(format!("{}-lab", self.prefix))
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// `v[key]` as a number; panics naming the key.
pub fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A `ping --json` report's RTTs, sorted.
pub fn sorted_rtts(ping: &Value) -> Vec<f64> {
    let mut rtts: Vec<f64> = ping["rtts_ms"]
        .as_array()
        .expect("rtts")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    rtts.sort_by(f64::total_cmp);
    rtts
}

/// The broker and agent binaries, next to `ballast-lab` (where `up` looks for them). In
/// `cargo test --workspace` they are built in the same target dir; under `cargo test -p
/// ballast-lab` they may be missing or stale, so build them (a no-op when up to date),
/// once per test binary. Asserts that both binaries are there; returns the build's error
/// when building failed (the binaries in place are then used).
pub fn control_plane_binaries() -> Option<String> {
    static BUILT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_control_plane_binaries).clone()
}

fn build_control_plane_binaries() -> Option<String> {
    let dir = Path::new(BIN).parent().expect("bin dir");
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--locked",
            "-p",
            "ballast-broker",
            "-p",
            "ballast-agent",
            "--bin",
            "ballast-broker",
            "--bin",
            "ballast-agent",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output();
    let built = match &out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Some(e.to_string()),
    };
    for b in ["ballast-broker", "ballast-agent"] {
        assert!(
            dir.join(b).is_file(),
            "{b} is not in {} (where ballast-lab finds it) and building it failed: {}; \
             run `cargo build -p ballast-broker -p ballast-agent` first",
            dir.display(),
            built.as_deref().unwrap_or("-")
        );
    }
    built
}
