//! Issue 14, bounded state and admin answers that fit, against a real broker over mTLS:
//! nodes, distinct imports per cluster and services broker-wide over their limits are
//! RESOURCE_EXHAUSTED naming the flag (nothing stored); ListClusters and GetWeights page, and
//! every page encodes under 1 MB even with a cluster of 300,000 declared imports.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod support;

use ballast_broker::certs::generate;
use ballast_proto::v1::{
    GetWeightsRequest, ImportedServices, ListClustersRequest, ListClustersResponse, ReportRequest,
};
use ballast_store::{sqlite_url, ReportRecord, Store, StoreLimits};
use prost::Message;
use support::{
    admin, cap, cluster_agent, register_req, report, send_reports, sqlite_test_config, start_broker,
};
use tonic::Code;

fn declaring(cluster: &str, node: &str, services: &[&str]) -> ReportRequest {
    let mut m = report(cluster, node);
    m.imports = Some(ImportedServices {
        services: services.iter().map(|s| (*s).to_string()).collect(),
    });
    m
}

fn assert_exhausted(r: Result<impl std::fmt::Debug, tonic::Status>, flag: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains(flag), "{}", e.message());
}

#[tokio::test]
async fn state_limits_are_resource_exhausted_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["c1".into(), "c2".into()], &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.engine.store_limits = StoreLimits {
        max_nodes_per_cluster: 2,
        max_imports_per_cluster: 3,
    };
    cfg.engine.max_services = 2;
    let b = start_broker(cfg).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    let mut op = admin(b.addr, &bundle).await;

    // nodes per cluster
    a1.register(register_req("c1", "n1")).await.unwrap();
    a1.register(register_req("c1", "n2")).await.unwrap();
    assert_exhausted(
        a1.register(register_req("c1", "n3")).await,
        "--max-nodes-per-cluster",
    );
    a1.register(register_req("c1", "n1")).await.unwrap();
    // a report is no way around it
    assert_exhausted(
        send_reports(&mut a1, vec![declaring("c1", "n3", &["ns/a"])]).await,
        "--max-nodes-per-cluster",
    );

    // distinct imports per cluster: the union over its nodes, not only this message
    send_reports(&mut a1, vec![declaring("c1", "n1", &["ns/a", "ns/b"])])
        .await
        .unwrap();
    send_reports(&mut a1, vec![declaring("c1", "n2", &["ns/b", "ns/c"])])
        .await
        .unwrap();
    assert_exhausted(
        send_reports(&mut a1, vec![declaring("c1", "n2", &["ns/c", "ns/d"])]).await,
        "--max-imports-per-cluster",
    );
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let c1 = &list.clusters[0];
    assert_eq!(c1.cluster_id, "c1");
    assert_eq!(c1.nodes_count, 2);
    assert_eq!(
        c1.imports_count,
        Some(3),
        "the refused declaration is not stored"
    );
    assert!(c1.imports.is_none(), "counts only unless asked");

    // distinct services broker-wide (capacity or RPS)
    a2.register(register_req("c2", "n1")).await.unwrap();
    let mut m = report("c2", "n1");
    m.capacity = vec![cap("ns/s1", 10.0), cap("ns/s2", 10.0)];
    send_reports(&mut a2, vec![m.clone()]).await.unwrap();
    let mut over = report("c2", "n1");
    over.capacity = vec![cap("ns/s1", 10.0), cap("ns/s3", 10.0)];
    assert_exhausted(send_reports(&mut a2, vec![over]).await, "--max-services");
    // services already counted still report
    send_reports(&mut a2, vec![m]).await.unwrap();
    b.engine().run_round().await.unwrap();
    let snap = b.engine().store().capacity().await.unwrap();
    assert!(snap.iter().all(|c| c.service != "ns/s3"), "{snap:?}");
    // every refusal is counted by its flag
    let text = b.engine().metrics().render();
    for (flag, n) in [
        ("--max-nodes-per-cluster", 2),
        ("--max-imports-per-cluster", 1),
        ("--max-services", 1),
    ] {
        let line = format!("ballast_broker_limit_refusals_total{{flag=\"{flag}\"}} {n}");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    b.stop().await;
}

/// All pages of ListClusters, each checked to encode under 1 MB.
async fn list_all(
    op: &mut ballast_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    page_size: u32,
    include_imports: bool,
) -> (
    Vec<ListClustersResponse>,
    Vec<ballast_proto::v1::ClusterInfo>,
) {
    let mut pages = Vec::new();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = op
            .list_clusters(ListClustersRequest {
                page_size,
                page_token: token,
                include_imports,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            page.encoded_len() < 1_000_000,
            "page of {} bytes",
            page.encoded_len()
        );
        all.extend(page.clusters.clone());
        token = page.next_page_token.clone();
        pages.push(page);
        if token.is_empty() {
            return (pages, all);
        }
        assert!(pages.len() < 1000, "pages never end");
    }
}

#[tokio::test]
async fn list_clusters_pages_fit_with_300k_imports() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir.path().join("b.db"));
    // The facts go in through the store directly (fast); the broker reads them.
    let store = Store::connect(&url)
        .await
        .unwrap()
        .with_limits(StoreLimits {
            max_nodes_per_cluster: 10,
            max_imports_per_cluster: 1_000_000,
        });
    let ids: Vec<String> = (0..250).map(|i| format!("k{i:03}")).collect();
    for id in &ids {
        store
            .register(
                &ballast_store::testing::cluster(id, "us-east-1"),
                &ballast_store::testing::agent(id, "n1"),
            )
            .await
            .unwrap();
    }
    let services: Vec<String> = (0..300_000).map(|i| format!("ns/svc-{i:06}")).collect();
    store
        .store_report(&ReportRecord {
            cluster_id: "k000".into(),
            node_name: "n1".into(),
            received_at_ms: ballast_types::now_ms(),
            imports: Some(services),
            ..ReportRecord::default()
        })
        .await
        .unwrap();
    store.close().await;

    let bundle = generate(&["k000".into()], &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    let mut op = admin(b.addr, &bundle).await;

    // counts only, default page size (100): 3 pages
    let (pages, all) = list_all(&mut op, 0, false).await;
    assert_eq!(pages.len(), 3);
    let got: Vec<&String> = all.iter().map(|c| &c.cluster_id).collect();
    assert_eq!(
        got,
        ids.iter().collect::<Vec<_>>(),
        "every cluster once, in order"
    );
    assert_eq!(all[0].imports_count, Some(300_000));
    assert!(all[0].imports.is_none());
    assert!(!all[0].truncated);
    assert_eq!(all[1].imports_count, None, "never declared");

    // with the lists: k000's is cut to fit, the count stays
    let (pages, all) = list_all(&mut op, 0, true).await;
    assert!(pages.len() >= 3);
    assert_eq!(all.len(), 250);
    let k0 = &all[0];
    assert!(k0.truncated);
    assert_eq!(k0.imports_count, Some(300_000));
    let listed = k0.imports.as_ref().unwrap().services.len();
    assert!(listed > 10_000 && listed < 300_000, "{listed}");

    // a page size is honoured
    let (pages, all) = list_all(&mut op, 60, false).await;
    assert_eq!(pages.len(), 250_usize.div_ceil(60));
    assert_eq!(all.len(), 250);

    // a token the broker did not issue
    for token in ["garbage", "c1.zz", "w1.00.00"] {
        let e = op
            .list_clusters(ListClustersRequest {
                page_token: token.into(),
                ..ListClustersRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("page_token"), "{}", e.message());
    }
    b.stop().await;
}

#[tokio::test]
async fn get_weights_pages() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["c1".into(), "c2".into()], &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    a1.register(register_req("c1", "n1")).await.unwrap();
    a2.register(register_req("c2", "n1")).await.unwrap();
    let mut m = report("c2", "n1");
    m.capacity = (0..5).map(|i| cap(&format!("ns/s{i}"), 100.0)).collect();
    send_reports(&mut a2, vec![m]).await.unwrap();
    b.engine().run_round().await.unwrap();

    let mut op = admin(b.addr, &bundle).await;
    // an old client (no page fields): the first page at the default size, here all
    let whole = op
        .get_weights(GetWeightsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.weights.len(), 10, "5 services x 2 sources");
    assert!(whole.next_page_token.is_empty());

    let mut paged = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let p = op
            .get_weights(GetWeightsRequest {
                page_size: 3,
                page_token: token,
                ..GetWeightsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(p.weights.len() <= 3);
        assert_eq!(p.generation, whole.generation);
        pages += 1;
        paged.extend(p.weights);
        token = p.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(paged, whole.weights);

    let e = op
        .get_weights(GetWeightsRequest {
            page_token: "nope".into(),
            ..GetWeightsRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("page_token"), "{}", e.message());
    b.stop().await;
}

/// `ballast-broker admin clusters` follows the pages: 150 clusters (more than the default
/// page of 100) all listed.
#[tokio::test]
async fn admin_cli_lists_every_page() {
    use ballast_broker::cli::admin::{run, AdminArgs, AdminCommand};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&sqlite_url(&dir.path().join("b.db")))
        .await
        .unwrap();
    for i in 0..150 {
        let id = format!("k{i:03}");
        store
            .register(
                &ballast_store::testing::cluster(&id, "us-east-1"),
                &ballast_store::testing::agent(&id, "n1"),
            )
            .await
            .unwrap();
    }
    store.close().await;
    let bundle = generate(&["k000".into()], &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    let files = support::tls_of(&bundle, &bundle.admin);
    for (name, pem) in [
        ("ca.pem", &files.ca_pem),
        ("admin.pem", &files.cert_pem),
        ("admin-key.pem", &files.key_pem),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let args = AdminArgs {
        broker: format!("https://127.0.0.1:{}", b.addr.port()),
        server_name: "localhost".into(),
        tls: ballast_broker::cli::args::TlsArgs {
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("admin.pem")),
            key: Some(dir.path().join("admin-key.pem")),
            insecure: false,
        },
        command: AdminCommand::Clusters {
            json: true,
            imports: false,
        },
    };
    let out = run(&args).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cluster_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 150, "{ids:?}");
    assert_eq!(ids[149], "k149");
    b.stop().await;
}
