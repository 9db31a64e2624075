//! WAN emulator accuracy and throughput (root): brings up a two-cluster lab under its own
//! prefix, and for several one-way delays prints the configured RTT beside the measured
//! ICMP RTT (median of 20) and TCP connect time (p50 of 100), then the connection rate of the
//! load generator across a 0 ms link. `cargo bench -p ballast-lab --bench wan`.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ballast-lab");

fn lab(prefix: &str, state: &str, args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(["--prefix", prefix, "--state-dir", state])
        .args(args)
        .output()
        .expect("run ballast-lab");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(prefix: &str, state: &str, args: &[&str]) -> Value {
    serde_json::from_str(&lab(prefix, state, args)).expect("json")
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("wan bench skipped: needs root (network namespaces, TUN devices)");
        return;
    }
    let prefix = format!("blb{}", std::process::id() % 100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("lab");
    let state = state.to_str().expect("utf8");
    lab(
        &prefix,
        state,
        &["up", "--clusters", "2", "--no-control-plane"],
    );
    println!(
        "{:>12} {:>12} {:>14} {:>16}",
        "one-way ms", "want RTT", "ping p50 ms", "connect p50 ms"
    );
    for ms in [0.0, 1.0, 5.0, 25.0, 100.0] {
        let m = ms.to_string();
        lab(&prefix, state, &["delay", "c1", "c2", &m]);
        let p = json(
            &prefix,
            state,
            &[
                "ping",
                "--from",
                "c1",
                "10.77.2.2",
                "--count",
                "20",
                "--interval-ms",
                "20",
                "--json",
            ],
        );
        let mut rtts: Vec<f64> = p["rtts_ms"]
            .as_array()
            .expect("rtts")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        rtts.sort_by(f64::total_cmp);
        let l = json(
            &prefix,
            state,
            &[
                "load",
                "--from",
                "c1",
                "--service",
                "demo/echo",
                "--target",
                "10.77.2.2:8080",
                "--connections",
                "100",
                "--concurrency",
                "8",
                "--json",
            ],
        );
        println!(
            "{ms:>12.1} {:>12.1} {:>14.2} {:>16.2}",
            2.0 * ms,
            rtts[rtts.len() / 2],
            l["p50_connect_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    lab(&prefix, state, &["delay", "c1", "c2", "0"]);
    let l = json(
        &prefix,
        state,
        &[
            "load",
            "--from",
            "c1",
            "--service",
            "demo/echo",
            "--target",
            "10.77.2.2:8080",
            "--connections",
            "3000",
            "--concurrency",
            "32",
            "--json",
        ],
    );
    let rate = l["ok"].as_f64().unwrap_or(0.0) / l["elapsed_s"].as_f64().unwrap_or(1.0);
    println!(
        "load generator through the emulator at 0 ms: {rate:.0} connections/s (GET / each), {} failed",
        l["failed"]
    );
    lab(&prefix, state, &["down"]);
}
