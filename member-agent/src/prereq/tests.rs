//! The host checks on fake trees (tempdirs, and the real mounts where the test can see them);
//! the MCS check through kube's tower-test mock API service (the one fake allowed: the
//! Kubernetes API), answering with the shapes a real API server sends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::json;

fn fake_host(release: &str, with_btf: bool) -> (tempfile::TempDir, HostPaths) {
    let dir = tempfile::tempdir().unwrap();
    let osrelease = dir.path().join("osrelease");
    std::fs::write(&osrelease, format!("{release}\n")).unwrap();
    let btf = dir.path().join("btf-vmlinux");
    if with_btf {
        std::fs::write(&btf, b"\x9f\xeb").unwrap();
    }
    let cgroup = dir.path().join("cgroup");
    std::fs::create_dir(&cgroup).unwrap();
    let paths = HostPaths {
        osrelease,
        btf,
        cgroup,
        pin_dir: dir.path().join("bpf/ballast"),
    };
    (dir, paths)
}

fn names(m: &[Missing]) -> Vec<&'static str> {
    m.iter().map(|m| m.prerequisite.name()).collect()
}

#[test]
fn missing_capabilities_from_the_effective_set() {
    let status = |eff: u64| {
        format!("Name:\tballast-agent\nCapInh:\t0000000000000000\nCapEff:\t{eff:016x}\n")
    };
    let bit = |b: u32| 1u64 << b;
    // the minimal set (and CAP_NET_RAW): nothing missing
    let minimal = bit(39) | bit(12) | bit(38) | bit(13);
    assert_eq!(missing_capabilities(&status(minimal)), Some(vec![]));
    assert_eq!(
        missing_capabilities(&status(minimal & !bit(38))),
        Some(vec!["CAP_PERFMON"])
    );
    assert_eq!(
        missing_capabilities(&status(0)),
        Some(vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"])
    );
    // CAP_SYS_ADMIN covers all three (old kernels without CAP_BPF)
    assert_eq!(missing_capabilities(&status(bit(21))), Some(vec![]));
    assert_eq!(missing_capabilities("Name: x\n"), None);
}

#[test]
fn kernel_versions_parse_from_release_strings() {
    assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
    assert_eq!(kernel_version("5.4.0-150-generic\n"), Some((5, 4)));
    assert_eq!(kernel_version("5.8.0"), Some((5, 8)));
    assert_eq!(kernel_version("5.10+"), Some((5, 10)));
    assert_eq!(kernel_version("4.19.0-1rc2"), Some((4, 19)));
    assert_eq!(kernel_version("garbage"), None);
    assert!(kernel_version("5.7.19").unwrap() < MIN_KERNEL);
    assert!(kernel_version("5.8.0").unwrap() >= MIN_KERNEL);
}

#[test]
fn a_fake_host_names_every_missing_prerequisite() {
    // a tempdir is neither cgroup v2 nor bpffs; no BTF file; an old kernel
    let (_d, paths) = fake_host("5.4.0-150-generic", false);
    let missing = check_host(&paths);
    assert_eq!(names(&missing), ["kernel", "cgroup_v2", "btf", "bpffs"]);
    let text = MissingAll(missing).to_string();
    assert!(
        text.contains("prerequisite missing: kernel (kernel 5.4.0-150-generic is older than 5.8)"),
        "{text}"
    );
    assert!(text.contains("prerequisite missing: btf ("), "{text}");
    assert!(text.contains("is not on a cgroup v2 mount"), "{text}");
    assert!(text.contains("is not on bpffs"), "{text}");

    // a new kernel with BTF: only the mounts are missing
    let (_d, paths) = fake_host("6.18.44-fc-v669", true);
    assert_eq!(names(&check_host(&paths)), ["cgroup_v2", "bpffs"]);

    // an unreadable release is a missing kernel prerequisite, not a panic
    let (_d, mut paths) = fake_host("6.1.0", true);
    paths.osrelease = paths.osrelease.with_file_name("nowhere");
    assert!(names(&check_host(&paths)).contains(&"kernel"));
}

#[test]
fn the_real_mounts_pass_where_they_exist() {
    let (Some(cg), Some(bpf)) = (
        ballast_bpf::sys::cgroup2_mount(),
        ballast_bpf::sys::bpffs_mount(),
    ) else {
        println!("skipped: no cgroup2 or bpffs mount here");
        return;
    };
    let (_d, mut paths) = fake_host("6.18.0", true);
    paths.cgroup = cg;
    // a pin dir that does not exist yet: its nearest ancestor is the bpffs mount
    paths.pin_dir = bpf.join("not-yet-created/ballast");
    assert_eq!(check_host(&paths), Vec::new());
}

#[test]
fn require_host_sets_the_metric_per_prerequisite() {
    let metrics = Metrics::new();
    let (_d, paths) = fake_host("6.18.0", false);
    let e = require_host(&paths, &metrics).expect_err("btf and mounts missing");
    assert!(e.to_string().contains("btf"), "{e}");
    let text = ballast_runtime::encode_metrics(&metrics.registry());
    assert!(
        text.contains(r#"ballast_agent_prerequisite_missing{prerequisite="btf"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ballast_agent_prerequisite_missing{prerequisite="kernel"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"ballast_agent_prerequisite_missing{prerequisite="bpffs"} 1"#),
        "{text}"
    );
}

/// What a real API server answers for a group version it does not serve.
fn not_found() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(b"404 page not found\n".to_vec()))
        .unwrap()
}

/// The APIResourceList a real API server serves for the MCS CRDs (recorded shape).
fn mcs_resources(version: &str) -> Response<Body> {
    let list = json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("multicluster.x-k8s.io/{version}"),
        "resources": [
            {"name": "serviceexports", "singularName": "serviceexport", "namespaced": true,
             "kind": "ServiceExport", "verbs": ["delete","deletecollection","get","list","patch","create","update","watch"],
             "shortNames": ["svcex"], "storageVersionHash": "tvUzS3ZL2fY="},
            {"name": "serviceexports/status", "singularName": "", "namespaced": true,
             "kind": "ServiceExport", "verbs": ["get","patch","update"]},
            {"name": "serviceimports", "singularName": "serviceimport", "namespaced": true,
             "kind": "ServiceImport", "verbs": ["delete","deletecollection","get","list","patch","create","update","watch"],
             "shortNames": ["svcim"], "storageVersionHash": "2hBHp7tCJKY="}
        ]
    });
    Response::builder()
        .body(Body::from(serde_json::to_vec(&list).unwrap()))
        .unwrap()
}

/// A mock API server answering each path with `answer`; returns the client and the paths
/// asked.
fn mock_api(
    answer: impl Fn(&str) -> Response<Body> + Send + 'static,
) -> (Client, tokio::task::JoinHandle<Vec<String>>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut asked = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            send.send_response(answer(&path));
            asked.push(path);
        }
        asked
    });
    (Client::new(svc, "default"), server)
}

#[tokio::test]
async fn mcs_check_against_mock_api_v1alpha1_served() {
    let (client, server) = mock_api(|path| match path {
        "/apis/multicluster.x-k8s.io/v1alpha1" => mcs_resources("v1alpha1"),
        _ => not_found(),
    });
    assert_eq!(mcs_served(&client).await.unwrap(), Some("v1alpha1"));
    drop(client);
    assert_eq!(
        server.await.unwrap(),
        [
            "/apis/multicluster.x-k8s.io/v1beta1",
            "/apis/multicluster.x-k8s.io/v1alpha1"
        ]
    );
}

#[tokio::test]
async fn mcs_check_against_mock_api_v1beta1_served_first() {
    let (client, server) = mock_api(|path| match path {
        "/apis/multicluster.x-k8s.io/v1beta1" => mcs_resources("v1beta1"),
        _ => not_found(),
    });
    assert_eq!(mcs_served(&client).await.unwrap(), Some("v1beta1"));
    drop(client);
    assert_eq!(server.await.unwrap().len(), 1, "v1beta1 found first");
}

#[tokio::test]
async fn mcs_check_against_mock_api_not_served() {
    let (client, _server) = mock_api(|_| not_found());
    assert_eq!(mcs_served(&client).await.unwrap(), None);

    // a group version served without serviceimports (e.g. only ServiceExport) is not enough
    let (client, _server) = mock_api(|path| {
        if path.ends_with("v1alpha1") {
            let list = json!({"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "multicluster.x-k8s.io/v1alpha1",
                "resources": [{"name": "serviceexports", "singularName": "serviceexport",
                    "namespaced": true, "kind": "ServiceExport", "verbs": ["get"]}]});
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).unwrap()))
                .unwrap()
        } else {
            not_found()
        }
    });
    assert_eq!(mcs_served(&client).await.unwrap(), None);

    // any other error is an error (not "missing")
    let (client, _server) = mock_api(|_| {
        Response::builder()
            .status(StatusCode::FORBIDDEN)
            .body(Body::from(serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "forbidden: User \"system:serviceaccount:ballast:agent\" cannot get path \"/apis/multicluster.x-k8s.io/v1beta1\""})).unwrap()))
            .unwrap()
    });
    assert!(mcs_served(&client).await.is_err());
}

#[tokio::test]
async fn mcs_wait_against_mock_api_is_not_ready_with_the_reason_until_the_crds_appear() {
    let installed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = installed.clone();
    let (client, _server) = mock_api(move |path| {
        if flag.load(std::sync::atomic::Ordering::SeqCst)
            && path == "/apis/multicluster.x-k8s.io/v1alpha1"
        {
            mcs_resources("v1alpha1")
        } else {
            not_found()
        }
    });
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let (m, r) = (metrics.clone(), ready.clone());
    let wait =
        tokio::spawn(async move { wait_for_mcs(&client, &m, &r, Duration::from_millis(20)).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ready.reason().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no reason given");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reason = ready.reason().unwrap();
    assert!(
        reason.starts_with("prerequisite missing: mcs_crds"),
        "{reason}"
    );
    assert!(!ready.is_ready());
    let text = ballast_runtime::encode_metrics(&metrics.registry());
    assert!(
        text.contains(r#"ballast_agent_prerequisite_missing{prerequisite="mcs_crds"} 1"#),
        "{text}"
    );

    installed.store(true, std::sync::atomic::Ordering::SeqCst);
    let v = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("found once installed")
        .unwrap();
    assert_eq!(v, "v1alpha1");
    let text = ballast_runtime::encode_metrics(&metrics.registry());
    assert!(
        text.contains(r#"ballast_agent_prerequisite_missing{prerequisite="mcs_crds"} 0"#),
        "{text}"
    );
}
