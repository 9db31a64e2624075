//! WAN emulator accuracy and throughput (root): brings up a two-cluster lab under its own
//! prefix, and for several one-way delays prints the configured RTT beside the measured
//! ICMP RTT (median of 20) and TCP connect time (p50 of 100), then the connection rate of the
//! load generator across a 0 ms link. `cargo bench -p ballast-lab --bench wan`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{sorted_rtts, TestLab};

fn main() {
    if !common::is_root() {
        println!("wan bench skipped: needs root (network namespaces, TUN devices)");
        return;
    }
    let lab = TestLab::new("blb", "");
    lab.ok(&["up", "--clusters", "2", "--no-control-plane"]);
    println!(
        "{:>12} {:>12} {:>14} {:>16}",
        "one-way ms", "want RTT", "ping p50 ms", "connect p50 ms"
    );
    for ms in [0.0, 1.0, 5.0, 25.0, 100.0] {
        let m = ms.to_string();
        lab.ok(&["delay", "c1", "c2", &m]);
        let p = lab.json(&[
            "ping",
            "--from",
            "c1",
            "10.77.2.2",
            "--count",
            "20",
            "--interval-ms",
            "20",
            "--json",
        ]);
        let rtts = sorted_rtts(&p);
        let l = lab.load("c1", 100, 8, &["--target", "10.77.2.2:8080"]);
        println!(
            "{ms:>12.1} {:>12.1} {:>14.2} {:>16.2}",
            2.0 * ms,
            rtts[rtts.len() / 2],
            l["p50_connect_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    lab.ok(&["delay", "c1", "c2", "0"]);
    let l = lab.load("c1", 3000, 32, &["--target", "10.77.2.2:8080"]);
    let rate = l["ok"].as_f64().unwrap_or(0.0) / l["elapsed_s"].as_f64().unwrap_or(1.0);
    println!(
        "load generator through the emulator at 0 ms: {rate:.0} connections/s (GET / each), {} failed",
        l["failed"]
    );
    lab.ok(&["down"]);
}
