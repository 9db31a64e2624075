//! Issue 14: the broker's memory does not grow with nodes x imports. 100 nodes of one cluster
//! each declare the same 2,000 imports over real mTLS; the broker (in this process, alone in
//! this test binary) ingests them, solves and lists the clusters; its RSS growth, read from
//! `/proc/self/status` (VmRSS), stays under 50 MB (before the fix: 268 MB, as reported).
#![allow(clippy::unwrap_used)]

mod support;

use ballast_broker::certs::generate;
use ballast_proto::v1::{ImportedServices, ListClustersRequest};
use support::{
    admin, cap, cluster_agent, register_req, report, send_reports, sqlite_test_config, start_broker,
};

fn vm_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_growth_with_100_nodes_x_2000_imports_stays_under_50_mb() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&["c1".into(), "c2".into()], &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    let mut op = admin(b.addr, &bundle).await;
    a2.register(register_req("c2", "n1")).await.unwrap();
    let services: Vec<String> = (0..2000).map(|i| format!("shop/service-{i:05}")).collect();
    // c2 serves some of them, so rounds have problems to solve
    let mut m = report("c2", "n1");
    m.capacity = services.iter().take(50).map(|s| cap(s, 100.0)).collect();
    send_reports(&mut a2, vec![m]).await.unwrap();
    a1.register(register_req("c1", "n000")).await.unwrap();
    b.engine().run_round().await.unwrap();
    op.list_clusters(ListClustersRequest::default())
        .await
        .unwrap();

    let before = vm_rss_kb();
    for n in 0..100 {
        let node = format!("n{n:03}");
        a1.register(register_req("c1", &node)).await.unwrap();
        let mut m = report("c1", &node);
        m.imports = Some(ImportedServices {
            services: services.clone(),
        });
        send_reports(&mut a1, vec![m]).await.unwrap();
    }
    for _ in 0..3 {
        b.engine().run_round().await.unwrap();
        let list = op
            .list_clusters(ListClustersRequest {
                include_imports: true,
                ..ListClustersRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.clusters[0].imports_count, Some(2000));
        assert_eq!(list.clusters[0].nodes_count, 100);
    }
    let after = vm_rss_kb();
    let growth_mb = after.saturating_sub(before) as f64 / 1024.0;
    println!(
        "VmRSS before {before} kB, after {after} kB: growth {growth_mb:.1} MB \
         (100 nodes x 2,000 imports, 3 rounds, 3 ListClusters with imports)"
    );
    assert!(growth_mb < 50.0, "RSS grew {growth_mb:.1} MB");
    b.stop().await;
}
