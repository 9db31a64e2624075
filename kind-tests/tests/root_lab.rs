//! Root-only: brings a real two-cluster lab up on this kernel (network namespaces,
//! cgroups, TUN forwarder), measures the emulated WAN, and tears it down. Each test uses
//! its own name prefix and state dir, so it never touches a running `ballast` lab.
//! Nothing here leaves the machine: cluster namespaces have no default route.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{f, require_root, sorted_rtts, TestLab};
use serde_json::Value;

const WHY_ROOT: &str = "network namespaces, cgroups, TUN devices";

fn lab(tag: &str) -> TestLab {
    TestLab::new("blt", tag)
}

/// A load run against a fixed backend (no steering needed) from a cluster.
fn load_to(lab: &TestLab, from: &str, target: &str, n: usize) -> Value {
    lab.load(from, n, 4, &["--target", target, "--timeout-ms", "1000"])
}

/// `ping` from c1 to c2's gateway, `count` echoes.
fn ping_c2(count: &str) -> [&str; 7] {
    [
        "ping",
        "--from",
        "c1",
        "10.77.2.2",
        "--count",
        count,
        "--json",
    ]
}

fn routes(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "route", "show", "table", "all"])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn root_lab_two_clusters_wan_delay_exec_backends_down() {
    require_root!(WHY_ROOT);
    let lab = lab("a");
    lab.ok(&["up", "--clusters", "2", "--no-control-plane"]);
    // Idempotent: a second `up` keeps what is there.
    lab.ok(&["up", "--clusters", "2", "--no-control-plane"]);
    let e = lab.run(&["up", "--clusters", "3", "--no-control-plane"]);
    assert!(
        !e.status.success(),
        "changing the cluster count must be refused"
    );

    let ns = lab.netns();
    let want: Vec<String> = ["c1", "c2", "wan"]
        .iter()
        .map(|s| format!("{}-{s}", lab.prefix))
        .collect();
    assert_eq!(ns, want);
    // Nothing has a default route, in any table of any lab namespace.
    for n in &ns {
        let r = routes(n);
        assert!(
            !r.lines().any(|l| l.starts_with("default")),
            "{n} has a default route:\n{r}"
        );
    }
    let r = routes(&format!("{}-c1", lab.prefix));
    assert!(r.contains("10.77.0.0/16 via 10.77.1.1"), "{r}");

    // exec runs inside the cluster's netns, in its (first) node's cgroup.
    let cg = lab.ok(&["exec", "c1", "--", "cat", "/proc/self/cgroup"]);
    assert!(
        cg.trim_end()
            .ends_with(&format!("/{}-lab/c1/n1", lab.prefix)),
        "{cg}"
    );
    let e = lab.run(&["exec", "c1", "--node", "n2", "--", "true"]);
    assert!(!e.status.success(), "a node the lab does not have");
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("c1-n1"),
        "the error names the nodes: {}",
        String::from_utf8_lossy(&e.stderr)
    );
    let addrs = lab.ok(&[
        "exec", "c2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert!(addrs.contains("10.77.2.2/24"), "{addrs}");

    // 25 ms each way: ping and a TCP connect across take ~50 ms.
    lab.ok(&["delay", "c1", "c2", "25"]);
    let p = lab.json(&ping_c2("5"));
    assert_eq!(p["received"], 5, "{p}");
    let rtts = sorted_rtts(&p);
    let median = rtts[rtts.len() / 2];
    assert!((49.0..56.0).contains(&median), "ping rtt {rtts:?} ms");
    let l = load_to(&lab, "c1", "10.77.2.2:8080", 20);
    assert_eq!(
        (l["ok"].as_u64(), l["failed"].as_u64()),
        (Some(20), Some(0)),
        "{l}"
    );
    assert_eq!(l["by_cluster"]["c2"], 20, "{l}");
    let connect = f(&l, "p50_connect_ms");
    assert!((49.0..60.0).contains(&connect), "tcp connect {connect} ms");
    // Request = connect + one more round trip.
    let latency = f(&l, "mean_latency_ms");
    assert!((98.0..160.0).contains(&latency), "request {latency} ms");

    // Without the forwarder the WAN is cut, never bypassed; `up` brings it back.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(lab.state_dir().join("state.json")).expect("state"),
    )
    .expect("state json");
    let fwd = state["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["role"] == "wan-forwarder")
        .and_then(|p| p["pid"].as_i64())
        .expect("forwarder pid");
    // SAFETY: kill on a pid this test's lab started.
    unsafe { libc::kill(fwd as i32, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let p = lab.run(&ping_c2("2"));
    assert!(
        !p.status.success(),
        "ping crossed a WAN without its forwarder"
    );
    lab.ok(&["up", "--clusters", "2", "--no-control-plane"]);
    let p = lab.json(&ping_c2("2"));
    assert!(f(&p, "avg_ms") > 45.0, "{p}");

    // Live change, no restart.
    lab.ok(&["delay", "c1", "c2", "5"]);
    let l = load_to(&lab, "c1", "10.77.2.2:8081", 20);
    let connect = f(&l, "p50_connect_ms");
    assert!((9.0..16.0).contains(&connect), "tcp connect {connect} ms");
    assert!(
        lab.run(&["delay", "c1", "c9", "5"]).status.code() != Some(0),
        "unknown cluster accepted"
    );

    // Backends stop and start; status counts them.
    let st = lab.status();
    assert_eq!(st["clusters"][0]["id"], "c1");
    assert_eq!(st["clusters"][0]["netns"], format!("{}-c1", lab.prefix));
    assert_eq!(st["clusters"][1]["gateway"], "10.77.2.2");
    assert_eq!(st["clusters"][1]["nodes"], serde_json::json!(["c2-n1"]));
    assert_eq!(st["services"][0]["name"], "demo/echo");
    assert_eq!(st["services"][0]["port"], 80);
    assert_eq!(st["services"][0]["backends"]["c2"], 2);
    lab.ok(&["backends", "c2", "demo/echo", "stop"]);
    let st = lab.status();
    assert_eq!(st["services"][0]["backends"]["c2"], 0);
    let l = load_to(&lab, "c1", "10.77.2.2:8080", 3);
    assert_eq!(l["failed"], 3, "{l}");
    lab.ok(&["backends", "c2", "demo/echo", "start"]);
    let l = load_to(&lab, "c1", "10.77.2.2:8080", 3);
    assert_eq!(l["ok"], 3, "{l}");

    // down removes everything, and again is a no-op.
    lab.ok(&["down"]);
    assert!(lab.netns().is_empty(), "{:?}", lab.netns());
    assert!(!lab.cgroup_root().exists());
    assert!(!lab.state_dir().exists());
    lab.ok(&["down"]);
}

#[test]
fn root_down_after_crash_works_from_names() {
    require_root!(WHY_ROOT);
    let lab = lab("b");
    lab.ok(&["up", "--clusters", "2", "--no-control-plane"]);
    let state = std::fs::read_to_string(lab.state_dir().join("state.json")).expect("state");
    let pids: Vec<i64> = {
        let v: Value = serde_json::from_str(&state).expect("state json");
        let mut p: Vec<i64> = v["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter_map(|p| p["pid"].as_i64())
            .collect();
        for s in v["services"].as_array().expect("services") {
            for b in s["backends"].as_array().expect("backends") {
                p.extend(b["process"]["pid"].as_i64());
            }
        }
        p
    };
    assert!(pids.len() >= 3, "forwarder and two backends: {pids:?}");
    // The "crash": the state is lost.
    std::fs::remove_dir_all(lab.state_dir()).expect("rm state");
    lab.ok(&["down"]);
    assert!(lab.netns().is_empty(), "{:?}", lab.netns());
    assert!(!lab.cgroup_root().exists());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true),
            "process {pid} survived down"
        );
    }
}

#[test]
fn root_lab_steered_load_follows_bpf_weights() {
    require_root!(WHY_ROOT);
    let lab = lab("c");
    lab.ok(&["up", "--clusters", "3", "--no-control-plane"]);
    // Steer c1's cgroup with the real data plane: c2 3/4, c3 1/4.
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}-lab/c1", lab.prefix));
    std::fs::create_dir_all(pin.parent().expect("parent")).expect("bpf dir");
    let specs = ballast_bpf::config::parse(
        r#"
services:
  - name: demo/echo
    vip: 127.96.0.10
    port: 80
    protocol: tcp
    backends:
      - {address: "10.77.2.2:8080", cluster: c2, weight: 3}
      - {address: "10.77.2.2:8081", cluster: c2, weight: 3}
      - {address: "10.77.3.2:8080", cluster: c3, weight: 1}
      - {address: "10.77.3.2:8081", cluster: c3, weight: 1}
"#,
    )
    .expect("specs");
    let mut dp = ballast_bpf::Dataplane::open(&pin).expect("open data plane");
    dp.attach(lab.cgroup_root().join("c1")).expect("attach");
    dp.apply(&specs).expect("apply");
    drop(dp);

    let l = lab.load("c1", 300, 32, &[]);
    assert_eq!(l["failed"], 0, "{l}");
    let c2 = f(&l["observed"], "c2");
    assert!((0.65..0.85).contains(&c2), "c2 share {c2}: {l}");
    // Each destination's connect time is its link's RTT (defaults from broker/data:
    // us-east-1 <-> us-west-2 ~68 ms, us-east-1 <-> eu-west-1 ~85 ms).
    let rtt2 = f(&l["connect_ms_by_cluster"], "c2");
    let rtt3 = f(&l["connect_ms_by_cluster"], "c3");
    assert!(rtt3 > rtt2 + 8.0, "c2 {rtt2} ms, c3 {rtt3} ms");
    // A cluster that is not steered reaches nothing at the VIP (and nothing off-host).
    let o = lab.run(&[
        "exec",
        "c2",
        "--",
        "curl",
        "-s",
        "-m",
        "1",
        "http://127.96.0.10/",
    ]);
    assert!(!o.status.success());

    lab.ok(&["down"]);
    assert!(!pin.exists(), "pinned maps left behind");
}

fn weight(st: &Value, from: &str, to: &str) -> f64 {
    st["weights"]["demo/echo"][from][to].as_f64().unwrap_or(0.0)
}

#[test]
fn root_lab_control_plane_installs_weights_that_follow_the_wan() {
    require_root!(WHY_ROOT);
    // Building them here must succeed (the e2e tests fall back to binaries in place).
    let built = common::control_plane_binaries();
    assert!(
        built.is_none(),
        "building ballast-broker and ballast-agent: {}",
        built.unwrap_or_default()
    );
    let lab = lab("d");
    lab.ok(&["up", "--clusters", "3", "--wait-secs", "60"]);

    // Every agent installed the broker's generation; weights exist for every source.
    let st = lab.status();
    let generation = st["generation"].as_u64().expect("generation");
    assert!(generation >= 1, "{st}");
    for c in ["c1", "c2", "c3"] {
        let g = st["installed_generation"][c].as_u64().unwrap_or(0);
        assert!(g >= generation, "{c} installed {g} < {generation}: {st}");
    }
    // From c1 (us-east-1), c2 (us-west-2, ~68 ms) is nearer than c3 (eu-west-1, ~85 ms)
    // at the same egress price: optimized prefers c2.
    lab.ok(&["settle", "--from", "c1", "--stable-secs", "3"]);
    let st = lab.status();
    assert!(weight(&st, "c1", "c2") > weight(&st, "c1", "c3"), "{st}");

    // c1 <-> c2 becomes far: the agents measure it, the broker moves c1's weight to c3.
    lab.ok(&["delay", "c1", "c2", "150"]);
    lab.ok(&["settle", "--from", "c1", "--stable-secs", "3"]);
    let st = lab.status();
    assert!(weight(&st, "c1", "c3") > 0.7, "{st}");
    let l = lab.load("c1", 200, 32, &[]);
    assert_eq!(l["failed"], 0, "{l}");
    assert!(f(&l["observed"], "c3") > 0.6, "{l}");

    // c3's backends stop: drained through readiness first, so nothing fails.
    lab.ok(&["backends", "c3", "demo/echo", "stop"]);
    let l = lab.load("c1", 50, 16, &[]);
    assert_eq!(l["failed"], 0, "{l}");
    assert_eq!(l["by_cluster"]["c2"], 50, "{l}");

    // round-robin, live: equal weights from c1 (c3 is back).
    lab.ok(&["backends", "c3", "demo/echo", "start"]);
    lab.ok(&["policy", "round-robin"]);
    lab.ok(&["settle", "--from", "c1", "--stable-secs", "2"]);
    let st = lab.status();
    let (w2, w3) = (weight(&st, "c1", "c2"), weight(&st, "c1", "c3"));
    assert!((w2 - 0.5).abs() < 0.01 && (w3 - 0.5).abs() < 0.01, "{st}");

    lab.ok(&["down"]);
    assert!(lab.netns().is_empty());
    assert!(!Path::new(&format!("/sys/fs/bpf/{}-lab", lab.prefix)).exists());
}
