//! The kind harness scripts (kind-tests/kind), checked without Docker or kind: they stop at
//! once, with status 2, naming every missing tool; and they, with the project's own scripts,
//! are shellcheck-clean.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPTS: [&str; 4] = ["up.sh", "test.sh", "down.sh", "run.sh"];

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kind-tests/kind")
}

/// A PATH holding only what the scripts need before their tool check (bash, dirname), so
/// docker, kind, kubectl and helm are all missing, whatever this machine has.
fn bare_path(dir: &Path) -> String {
    for tool in ["bash", "dirname"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found in /usr/bin or /bin"));
        std::os::unix::fs::symlink(found, dir.join(tool)).expect("symlink");
    }
    dir.display().to_string()
}

#[test]
fn helm_kind_scripts_exit_2_naming_missing_tools() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = bare_path(tmp.path());
    for script in SCRIPTS {
        let out = Command::new(tmp.path().join("bash"))
            .arg(harness().join(script))
            .env_clear()
            .env("PATH", &path)
            .env("WORK_DIR", tmp.path().join("work"))
            .output()
            .expect("run script");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{script}: {stderr}");
        let expected: &[&str] = match script {
            "down.sh" => &["docker", "kind"],
            "test.sh" => &["docker", "kind", "kubectl"],
            _ => &["docker", "kind", "kubectl", "helm"],
        };
        let missing_line = stderr
            .lines()
            .find(|l| l.contains("missing:"))
            .unwrap_or_else(|| panic!("{script}: no 'missing:' line in {stderr}"));
        for tool in expected {
            assert!(
                missing_line.contains(&format!(" {tool};")),
                "{script}: {tool} not named in {missing_line:?}"
            );
        }
        assert!(stderr.contains("one-host lab"), "{script}: {stderr}");
        assert!(
            !tmp.path().join("work").exists(),
            "{script} acted before its tool check"
        );
    }
}

#[test]
fn helm_kind_scripts_are_strict_and_shellcheck_clean() {
    for script in SCRIPTS {
        let text = std::fs::read_to_string(harness().join(script)).expect("script");
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{script}: shebang"
        );
        assert!(
            text.contains("\nset -euo pipefail\n"),
            "{script}: set -euo pipefail"
        );
        assert!(
            text.contains("\nrequire_tools "),
            "{script}: checks its tools"
        );
    }
    // the harness, and the project's own scripts (set-up, tests, lab, CI entry)
    let kind_tests = harness().join("..");
    let own = ["setup.sh", "postgres.sh", "run-tests.sh", "run-lab.sh"]
        .iter()
        .map(|s| kind_tests.join(s))
        .chain([kind_tests.join("../.ci/run")]);
    let Ok(out) = Command::new("shellcheck")
        .arg("-x")
        .args(SCRIPTS.iter().chain(&["lib.sh"]))
        .args(own)
        .current_dir(harness())
        .output()
    else {
        // setup.sh installs it; CI must not pass without having checked
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but shellcheck is not installed (kind-tests/setup.sh installs it)"
        );
        println!("skipped shellcheck: not installed (apt-get install shellcheck)");
        return;
    };
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
