//! The real `ballast-agent` binary with Kubernetes discovery against a fake API server (a
//! loopback HTTP listener that serves no MCS group, answering 404 like a real API server):
//! the agent stays up, `/ready` answers 503 naming the missing prerequisite, the metric says
//! 1, and SIGTERM ends it cleanly. No root needed (the host checks only read the mounts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fake_api_without_mcs() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                    break;
                }
            }
            let _ = tx.send(first.trim().to_owned());
            let body = "404 page not found\n";
            let _ = write!(
                c,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, rx)
}

fn get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn agent_without_mcs_crds_against_fake_api_is_not_ready_and_says_why() {
    let (Some(cgroup), Some(bpffs)) = (
        ballast_bpf::sys::cgroup2_mount(),
        ballast_bpf::sys::bpffs_mount(),
    ) else {
        println!("skipped: needs cgroup2 and bpffs mounted");
        return;
    };
    let (api_port, asked) = fake_api_without_mcs();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{api_port}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake\n"
        ),
    )
    .unwrap();
    let admin = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
        .args([
            "--cluster-id",
            "east",
            "--node-name",
            "n1",
            "--discovery",
            "kubernetes",
        ])
        .args([
            "--region",
            "r",
            "--zone",
            "z",
            "--provider",
            "onprem",
            "--cgroup",
        ])
        .arg(&cgroup)
        .arg("--pin-dir")
        .arg(bpffs.join(format!("ballast-never-created-{}", std::process::id())))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let r = get(admin, "/ready");
        if r.contains("prerequisite missing") {
            break r;
        }
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited instead of waiting for the CRDs"
        );
        assert!(Instant::now() < deadline, "no reason in /ready: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ready.contains(" 503 "), "{ready}");
    assert!(
        ready.contains("not ready: prerequisite missing: mcs_crds"),
        "{ready}"
    );
    let metrics = get(admin, "/metrics");
    assert!(
        metrics.contains(r#"ballast_agent_prerequisite_missing{prerequisite="mcs_crds"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ballast_agent_prerequisite_missing{prerequisite="bpffs"} 0"#),
        "{metrics}"
    );
    assert!(get(admin, "/live").contains(" 200 "));
    let paths: Vec<String> = asked.try_iter().collect();
    assert!(
        paths
            .iter()
            .any(|p| p.contains("/apis/multicluster.x-k8s.io/v1alpha1")),
        "{paths:?}"
    );

    let pid = libc::pid_t::try_from(agent.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = agent.wait().unwrap();
    assert!(st.success(), "clean exit on SIGTERM while waiting: {st}");
}
