//! `ballast-broker solve --input FILE.json` run as the real binary.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn run(name: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ballast-broker"))
        .arg("solve")
        .arg("--input")
        .arg(fixture(name))
        .output()
        .expect("runs ballast-broker")
}

fn ok(name: &str) -> Value {
    let out = run(name);
    assert!(
        out.status.success(),
        "{name}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn fails(name: &str) -> String {
    let out = run(name);
    assert!(!out.status.success(), "{name} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn issue_example_gives_the_documented_output() {
    let v = ok("solve_issue_example.json");
    let services = v["services"].as_array().expect("services array");
    assert_eq!(services.len(), 1);
    let s = &services[0];
    let mut keys: Vec<&str> = s
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "flows",
            "name",
            "objective",
            "reason",
            "solve_ms",
            "status",
            "weights"
        ]
    );
    assert_eq!(s["name"], "ns/svc");
    assert_eq!(s["status"], "optimal");
    assert!(s["reason"].is_null());
    assert_eq!(num(&s["weights"]["c1"]["c2"]), 1.0);
    assert_eq!(num(&s["flows"]["c1"]["c2"]), 100.0);
    assert!((num(&s["objective"]) - 300.0).abs() < 1e-9);
    assert!(num(&s["solve_ms"]) >= 0.0);
}

#[test]
fn wrr_example_via_the_cli() {
    let v = ok("solve_wrr_example.json");
    let w = &v["services"][0]["weights"]["c1"];
    assert!((num(&w["c3"]) - 2.0 / 3.0).abs() < 1e-12, "{w}");
    assert!((num(&w["c2"]) - 1.0 / 3.0).abs() < 1e-12, "{w}");
}

#[test]
fn computed_costs_fill_local_then_cheap_capacity() {
    let v = ok("solve_real_costs.json");
    let cart = &v["services"][0];
    assert_eq!(cart["name"], "shop/cart");
    assert_eq!(cart["status"], "optimal");
    let f = &cart["flows"]["east-a"];
    // east-a serves itself (cost 0) up to its capacity less west's liveness floor, then the
    // GCP cluster next door (8 ms, internet price), then us-west-2.
    assert!((num(&f["east-a"]) - 249.0).abs() < 1e-6, "{f}");
    assert!((num(&f["gcp"]) - 99.0).abs() < 1e-6, "{f}");
    assert!((num(&f["west"]) - 52.0).abs() < 1e-6, "{f}");
    let west = &cart["flows"]["west"];
    assert!((num(&west["west"]) - 298.0).abs() < 1e-6, "{west}");
    // gcp has no demand: its split follows the spare capacity (only west has any).
    assert!((num(&cart["weights"]["gcp"]["west"]) - 1.0).abs() < 1e-9);
    for (src, row) in cart["weights"].as_object().expect("rows") {
        let sum: f64 = row.as_object().expect("row").values().map(num).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{src}: {sum}");
    }
    let search = &v["services"][1];
    assert_eq!(num(&search["weights"]["east-b"]["east-a"]), 0.5);
    assert_eq!(num(&search["weights"]["east-b"]["west"]), 0.5);
}

#[test]
fn infeasible_is_degraded_not_an_error() {
    let v = ok("solve_degraded.json");
    let s = &v["services"][0];
    assert_eq!(s["status"], "degraded");
    let reason = s["reason"].as_str().expect("reason");
    assert!(reason.contains("exceeds total capacity"), "{reason}");
    assert_eq!(num(&s["weights"]["c1"]["c2"]), 0.5);
}

#[test]
fn unknown_cluster_is_named() {
    let err = fails("solve_bad_unknown_cluster.json");
    assert!(
        err.contains("services[0].demand_rps.c9: unknown cluster \"c9\""),
        "{err}"
    );
}

#[test]
fn negative_rtt_is_named() {
    let err = fails("solve_bad_negative_rtt.json");
    assert!(
        err.contains("rtt_ms.c1.c2: must be a finite number >= 0"),
        "{err}"
    );
}

#[test]
fn negative_demand_is_named() {
    let err = fails("solve_bad_negative_demand.json");
    assert!(err.contains("services[0].demand_rps.c1"), "{err}");
}

#[test]
fn missing_field_is_named_with_its_path() {
    let err = fails("solve_bad_missing_field.json");
    assert!(
        err.contains("services[0]") && err.contains("missing field `demand_rps`"),
        "{err}"
    );
}

#[test]
fn unknown_policy_is_named() {
    let err = fails("solve_bad_policy.json");
    assert!(err.contains("policy") && err.contains("fastest"), "{err}");
}

#[test]
fn unreadable_file_is_an_error() {
    let err = fails("does-not-exist.json");
    assert!(err.contains("cannot read"), "{err}");
}
