//! What can be checked about the charts without a cluster (and without `helm`): the YAML that
//! is not a template parses, every `.Values.x.y` a template reads is defined in values.yaml,
//! and the chart's CRDs are exactly what `crdgen` derives from `ballast_broker::crd`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

const CHARTS: [&str; 2] = ["ballast-broker", "ballast-agent"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("broker/ has a parent")
        .to_path_buf()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn is_template(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "templates")
}

/// Every document of a (multi-document) YAML file.
fn parse_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn helm_every_non_template_yaml_parses() {
    let mut files = Vec::new();
    files_under(&repo().join("helm"), &mut files);
    // The MCS CRDs the kind harness installs are plain YAML too.
    files_under(&repo().join("kind-tests/kind"), &mut files);
    let yaml: Vec<&PathBuf> = files
        .iter()
        .filter(|p| !is_template(p))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    assert!(yaml.len() >= 8, "expected the charts' YAML, found {yaml:?}");
    for path in yaml {
        let docs = parse_all(path);
        assert!(!docs.is_empty(), "{}: no YAML document", path.display());
    }
}

#[test]
fn helm_charts_have_valid_chart_yaml() {
    for chart in CHARTS {
        let dir = repo().join("helm").join(chart);
        let meta = &parse_all(&dir.join("Chart.yaml"))[0];
        assert_eq!(meta["apiVersion"].as_str(), Some("v2"), "{chart}");
        assert_eq!(
            meta["name"].as_str(),
            Some(chart),
            "{chart}: name must match its folder"
        );
        let version = meta["version"].as_str().expect("version");
        assert_eq!(
            version.split('.').count(),
            3,
            "{chart}: version {version} is not SemVer"
        );
        assert!(meta["appVersion"].as_str().is_some(), "{chart}: appVersion");
        assert!(dir.join("values.yaml").is_file(), "{chart}: values.yaml");
        assert!(dir.join("templates").is_dir(), "{chart}: templates/");
    }
}

/// `.Values.a.b.c` paths in a template's text (`$.Values` too).
fn value_paths(text: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(".Values.") {
        rest = &rest[i + ".Values.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        let path: Vec<String> = rest[..end]
            .split('.')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if !path.is_empty() {
            out.insert(path);
        }
        rest = &rest[end..];
    }
    out
}

#[test]
fn helm_value_path_scanner_finds_nested_paths() {
    let t = r#"{{ .Values.a.b | quote }} {{- if $.Values.c }}{{ include "x" .Values.d_e.f1 }}"#;
    let got: Vec<String> = value_paths(t).into_iter().map(|p| p.join(".")).collect();
    assert_eq!(got, ["a.b", "c", "d_e.f1"]);
}

#[test]
fn helm_every_value_a_template_reads_is_defined() {
    for chart in CHARTS {
        let dir = repo().join("helm").join(chart);
        let values = &parse_all(&dir.join("values.yaml"))[0];
        let mut templates = Vec::new();
        files_under(&dir.join("templates"), &mut templates);
        let mut checked = 0;
        for t in &templates {
            let text = std::fs::read_to_string(t).expect("template");
            for path in value_paths(&text) {
                let mut node = values;
                for (depth, key) in path.iter().enumerate() {
                    node = node.get(key.as_str()).unwrap_or_else(|| {
                        panic!(
                            "{}: .Values.{} is not defined in {chart}/values.yaml (missing {:?})",
                            t.display(),
                            path.join("."),
                            path[..=depth].join(".")
                        )
                    });
                }
                checked += 1;
            }
        }
        assert!(
            checked > 20,
            "{chart}: only {checked} value references found"
        );
    }
}

#[test]
fn helm_chart_crds_equal_crdgen_output() {
    let dir = repo().join("helm/ballast-broker/crds");
    let generated = ballast_k8s_api::policy::crd_files().expect("crdgen output");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("helm/ballast-broker/crds")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    let hint =
        "regenerate: cargo run -p ballast-broker --bin crdgen -- --out helm/ballast-broker/crds";
    assert_eq!(
        on_disk, expected,
        "chart CRD files differ from crdgen's; {hint}"
    );
    for (name, yaml) in generated {
        let chart_text = std::fs::read_to_string(dir.join(&name)).expect("crd file");
        let chart: Value = serde_yaml::from_str(&chart_text).expect("chart crd yaml");
        let ours: Value = serde_yaml::from_str(&yaml).expect("generated yaml");
        assert_eq!(chart, ours, "{name} differs from crdgen's output; {hint}");
    }
}

#[test]
fn helm_broker_policy_values_are_valid_crd_values() {
    let values = &parse_all(&repo().join("helm/ballast-broker/values.yaml"))[0];
    let spec = ballast_k8s_api::policy::LoadBalancingPolicySpec {
        service_discovery_load_balancing: values["serviceDiscoveryLoadBalancing"]
            .as_str()
            .map(str::to_string),
        optimized_load_balancing_params: values["optimizedLoadBalancingParams"]
            .as_str()
            .map(str::to_string),
        egress_prices: Vec::new(),
    };
    let choice = ballast_k8s_api::policy::PolicyChoice::try_from(&spec).expect("valid defaults");
    assert!(choice.policy.is_some() && choice.params.is_some());
    // The render-time checks in _helpers.tpl list exactly the CRD's values.
    let helpers =
        std::fs::read_to_string(repo().join("helm/ballast-broker/templates/_helpers.tpl"))
            .expect("helpers");
    for v in [
        "round-robin",
        "local-first-round-robin",
        "weighted-round-robin",
        "optimized",
        "cost",
        "performance",
        "mixed",
    ] {
        assert!(
            helpers.contains(&format!("\"{v}\"")),
            "_helpers.tpl misses {v}"
        );
    }
}

/// The flags the charts pass must stay in one helper per chart (easy to adjust).
#[test]
fn helm_command_lines_live_in_one_helper() {
    for (chart, helper, flags) in [
        (
            "ballast-broker",
            "ballast-broker.args",
            &[
                "serve",
                "--listen",
                "--database",
                "--ca",
                "--cert",
                "--key",
                "--metrics-addr",
                "--policy",
                "--params",
            ][..],
        ),
        (
            "ballast-agent",
            "ballast-agent.args",
            &[
                "--cluster-id",
                "--broker",
                "--ca",
                "--cert",
                "--key",
                "--discovery",
                "--cgroup",
                "--pin-dir",
                "--metrics-addr",
                "--node-name",
            ][..],
        ),
    ] {
        let dir = repo().join("helm").join(chart).join("templates");
        let body = helper_body(chart, helper);
        for flag in flags {
            assert!(
                body.contains(&format!("- {flag}\n")),
                "{chart}: {helper} lacks {flag}"
            );
        }
        let mut templates = Vec::new();
        files_under(&dir, &mut templates);
        for t in templates.iter().filter(|t| !t.ends_with("_helpers.tpl")) {
            let text = std::fs::read_to_string(t).expect("template");
            assert!(
                !text.contains("- --"),
                "{}: flags belong in {helper}",
                t.display()
            );
        }
    }
}

/// The text of one `define` in a chart's `_helpers.tpl`.
fn helper_body(chart: &str, helper: &str) -> String {
    let path = repo()
        .join("helm")
        .join(chart)
        .join("templates/_helpers.tpl");
    let text = std::fs::read_to_string(&path).expect("helpers");
    let start = text
        .find(&format!("define \"{helper}\""))
        .unwrap_or_else(|| panic!("{chart}: no {helper}"));
    let body = &text[start..];
    // Up to the next definition or comment block (or the end of the file).
    let end = [body.find("\n{{- define "), body.find("\n{{/*")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body.len());
    body[..end].to_string()
}

/// Every flag the broker chart passes is a flag of the real `ballast-broker serve`.
#[test]
fn helm_broker_flags_exist_in_the_serve_cli() {
    use clap::Args as _;
    let serve = ballast_broker::cli::args::ServeArgs::augment_args(clap::Command::new("serve"));
    let known: BTreeSet<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    let body = helper_body("ballast-broker", "ballast-broker.args");
    let used: Vec<&str> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split_whitespace().next().unwrap_or(f))
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    for flag in used {
        let flag = format!("--{flag}");
        assert!(
            known.contains(&flag),
            "helm/ballast-broker passes {flag}, which `ballast-broker serve` does not know ({known:?})"
        );
    }
}

/// Leaf paths of a YAML mapping (`a.b.c`); a non-empty list or an empty map is a leaf.
fn leaf_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.as_str().expect("string keys").to_string());
                leaf_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

/// The other direction: every value in values.yaml is read by some template (itself, or a
/// parent passed whole, e.g. `toYaml .Values.resources`), so no documented knob is dead.
#[test]
fn helm_every_value_is_used_by_a_template() {
    for chart in CHARTS {
        let dir = repo().join("helm").join(chart);
        let values = &parse_all(&dir.join("values.yaml"))[0];
        let mut templates = Vec::new();
        files_under(&dir.join("templates"), &mut templates);
        let used: BTreeSet<Vec<String>> = templates
            .iter()
            .flat_map(|t| value_paths(&std::fs::read_to_string(t).expect("template")))
            .collect();
        let mut leaves = Vec::new();
        leaf_paths(values, &mut Vec::new(), &mut leaves);
        for leaf in leaves {
            let read = used
                .iter()
                .any(|u| leaf.starts_with(u) || u.starts_with(&leaf));
            assert!(
                read,
                "{chart}/values.yaml: {} is read by no template",
                leaf.join(".")
            );
        }
    }
}
