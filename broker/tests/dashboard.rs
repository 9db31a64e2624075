//! The Grafana dashboard the broker chart ships (`helm/ballast-broker/dashboards/ballast.json`,
//! ConfigMap `templates/dashboard.yaml`): every PromQL expression in it (panel targets and
//! the variables' `label_values(...)` queries) parses with a PromQL parser, and every metric
//! it names is one the binaries export: scraped from `/metrics` of a broker running in
//! process (with a published generation, so its labelled families have samples), and read
//! from the agent's `Metrics::encode()` after one sample of each family. prometheus-client
//! writes a labelled family, its `# HELP`/`# TYPE` lines included, only once it has a sample
//! (checked in `ballast_broker::metrics`' tests), so every family is exercised first. Names
//! are taken from the sample lines and from the `# TYPE` lines with the exposition's
//! suffixes (`_total`, `_bucket`, `_sum`, `_count`).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_agent::metrics::{FlowLabels, Metrics as AgentMetrics, PeerLabels, ServiceLabels};
use promql_parser::parser::{self, Expr};
use serde_json::Value;
use support::{broker_with_c1_c2, capacity_report, open_watch, send_reports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DASHBOARD: &str = "helm/ballast-broker/dashboards/ballast.json";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("broker/ has a parent")
        .to_path_buf()
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join(DASHBOARD)).expect("dashboard JSON");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// The Grafana variables the dashboard may use, with a value that makes valid PromQL.
fn grafana_variables() -> BTreeMap<&'static str, &'static str> {
    [
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__range", "1h"),
        ("cluster_label", "cluster"),
        ("service", ".*"),
        ("source", ".*"),
    ]
    .into()
}

/// `$name` and `${name}` replaced; an unknown variable left in is an error.
fn interpolate(expr: &str) -> Result<String, String> {
    let mut vars: Vec<_> = grafana_variables().into_iter().collect();
    // longest first, so no name is replaced inside a longer one
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = expr.to_owned();
    for (k, v) in vars {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    // what is left may only be a regex group reference ($1 in label_replace)
    let mut rest = out.split('$').skip(1);
    if rest.any(|after| !after.starts_with(|c: char| c.is_ascii_digit())) {
        return Err(format!("unknown Grafana variable in {expr:?}"));
    }
    Ok(out)
}

/// Every PromQL expression of the dashboard: panel targets' `expr` (rows' nested panels too)
/// and, for query variables, the selector inside `label_values(SELECTOR, label)`.
fn expressions(d: &Value) -> Vec<String> {
    fn panels(v: &Value, out: &mut Vec<String>) {
        for p in v.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(e.to_owned());
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"].as_str() != Some("query") {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .expect("query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q:?}: only label_values(...) expected"));
        let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
        out.push(selector.trim().to_owned());
    }
    out
}

/// Every metric name an expression selects (`name{...}` or `{__name__="name"}`).
fn metric_names(e: &Expr, out: &mut BTreeSet<String>) {
    let selector =
        |vs: &promql_parser::parser::VectorSelector, out: &mut BTreeSet<String>| match &vs.name {
            Some(n) => {
                out.insert(n.clone());
            }
            None => {
                for m in &vs.matchers.matchers {
                    if m.name == "__name__" {
                        out.insert(m.value.clone());
                    }
                }
            }
        };
    match e {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(vs) => selector(vs, out),
        Expr::MatrixSelector(ms) => selector(&ms.vs, out),
        Expr::Call(c) => {
            for a in &c.args.args {
                metric_names(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The metric names a text exposition offers to a query: sample lines, and what each
/// `# TYPE` line's family is exposed as.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                panic!("bad TYPE line {line:?}");
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// What is wrong with the dashboard's expressions against `exported`: unparsable
/// expressions, unknown metric names. Also returns every metric it names.
fn check(exprs: &[String], exported: &BTreeSet<String>) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for raw in exprs {
        let expr = match interpolate(raw) {
            Ok(e) => e,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        match parser::parse(&expr) {
            Ok(ast) => {
                let mut names = BTreeSet::new();
                metric_names(&ast, &mut names);
                if names.is_empty() {
                    problems.push(format!("{raw:?} names no metric"));
                }
                for n in names {
                    if !exported.contains(&n) {
                        problems.push(format!("{raw:?}: {n} is not exported"));
                    }
                    used.insert(n);
                }
            }
            Err(e) => problems.push(format!("{raw:?} does not parse: {e}")),
        }
    }
    (problems, used)
}

/// The agent's exposition with one sample in every family.
fn agent_exposition() -> String {
    let m = AgentMetrics::new();
    let peer = PeerLabels { peer: "c2".into() };
    let svc = ServiceLabels {
        service: "ns/web".into(),
    };
    m.peer_rtt_seconds.get_or_create(&peer).set(0.02);
    m.peer_reachable.get_or_create(&peer).set(1);
    m.peer_loss_ratio.get_or_create(&peer).set(0.0);
    m.probe_failures.get_or_create(&peer).inc();
    m.service_rps
        .get_or_create(&FlowLabels {
            service: "ns/web".into(),
            destination: "c2".into(),
        })
        .set(3.0);
    m.service_capacity_rps.get_or_create(&svc).set(100.0);
    m.installed_generation.get_or_create(&svc).set(1);
    m.updates_refused.get_or_create(&svc).inc();
    m.update_lag_seconds.observe(0.01);
    m.discovery_failures.inc();
    m.set_probe_targets("broker", 1);
    m.encode()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap()
}

/// The broker's exposition, scraped from a running broker that has published weights.
async fn broker_exposition() -> String {
    let dir = tempfile::tempdir().unwrap();
    let (_bundle, b, mut a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    let mut watch = open_watch(&mut a1, "c1", 0).await;
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 1000.0)])
        .await
        .unwrap();
    send_reports(&mut a1, vec![capacity_report("c1", "ns/web", 1000.0)])
        .await
        .unwrap();
    let u = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("weights within 10 s")
        .unwrap()
        .expect("stream open");
    assert!(u.generation >= 1, "{u:?}");
    let text = scrape(b.metrics_addr.expect("metrics on")).await;
    drop(watch);
    b.stop().await;
    text
}

#[tokio::test]
async fn dashboard_promql_parses_and_names_only_exported_metrics() {
    let broker = broker_exposition().await;
    // a labelled family shows samples only once set: the published weights did that
    assert!(
        broker.contains("ballast_broker_weight{service=\"ns/web\",source=\"c1\""),
        "{broker}"
    );
    let agent = agent_exposition();
    let mut names = exported(&broker);
    names.extend(exported(&agent));
    // the exposition's own names agree with the TYPE-derived ones (no sample is unknown)
    let from_types: BTreeSet<String> = exported(
        &broker
            .lines()
            .chain(agent.lines())
            .filter(|l| l.starts_with("# TYPE "))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    for n in &names {
        assert!(
            from_types.contains(n) || n.ends_with("_created"),
            "{n}: a sample without a TYPE-derived name"
        );
    }

    let d = dashboard();
    let exprs = expressions(&d);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let (problems, used) = check(&exprs, &names);
    assert!(problems.is_empty(), "{problems:#?}");
    // what the dashboard is for (issue 10, item 8), each from the binaries' metrics
    for must in [
        "ballast_broker_weight",
        "ballast_broker_generation",
        "ballast_agent_installed_generation",
        "ballast_broker_solve_duration_seconds_bucket",
        "ballast_broker_stale_services",
        "ballast_broker_published_entries",
        "ballast_agent_peer_rtt_seconds",
        "ballast_agent_service_rps",
        "ballast_agent_service_capacity_rps",
        "ballast_agent_updates_refused_total",
    ] {
        assert!(
            used.contains(must),
            "the dashboard shows no {must}: {used:?}"
        );
    }
}

#[test]
fn dashboard_checker_rejects_unknown_metrics_and_bad_promql() {
    let names: BTreeSet<String> = ["ballast_broker_generation".to_owned()].into();
    let (p, _) = check(
        &[
            "max(ballast_broker_generation)".into(),
            r#"label_replace(max(ballast_broker_generation), "a", "$1", "b", "(.*)")"#.into(),
        ],
        &names,
    );
    assert!(p.is_empty(), "{p:?}");
    for (bad, want) in [
        ("max(ballast_broker_nope)", "not exported"),
        ("max(ballast_broker_generation", "does not parse"),
        (
            "rate(ballast_broker_generation[$nope])",
            "unknown Grafana variable",
        ),
        ("{__name__=\"ballast_agent_gone\"}", "not exported"),
        ("vector(1)", "names no metric"),
    ] {
        let (p, _) = check(&[bad.into()], &names);
        assert!(p.iter().any(|m| m.contains(want)), "{bad}: {p:?}");
    }
    // counters are queried with _total, histograms by their series
    let names =
        exported("# TYPE x_reports counter\n# TYPE x_lag histogram\n# TYPE x_up gauge\nx_up 1\n");
    let want: BTreeSet<String> = [
        "x_reports_total",
        "x_lag_bucket",
        "x_lag_sum",
        "x_lag_count",
        "x_up",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(names, want);
}

#[test]
fn dashboard_configmap_is_off_by_default_with_the_sidecar_label() {
    let template =
        std::fs::read_to_string(repo().join("helm/ballast-broker/templates/dashboard.yaml"))
            .unwrap();
    assert!(
        template.starts_with("{{- if .Values.dashboard.enabled }}"),
        "{template}"
    );
    assert!(
        template.contains(".Files.Get \"dashboards/ballast.json\""),
        "{template}"
    );
    assert!(
        template
            .contains("{{ .Values.dashboard.label }}: {{ .Values.dashboard.labelValue | quote }}"),
        "{template}"
    );
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("helm/ballast-broker/values.yaml")).unwrap(),
    )
    .unwrap();
    let d = &values["dashboard"];
    assert_eq!(d["enabled"].as_bool(), Some(false));
    assert_eq!(d["label"].as_str(), Some("grafana_dashboard"));
    assert_eq!(d["labelValue"].as_str(), Some("1"));
    // Grafana needs a uid and a title to keep one copy across reloads
    let dash = dashboard();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
}
