//! Per-cluster bounds ([`StoreLimits`]) and imports aggregated per cluster, on both backends.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use ballast_store::testing::{agent, cluster, report_of};
use ballast_store::{on_both_backends, ReportRecord, Store, StoreError, StoreLimits};

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

fn declaring(c: &str, node: &str, at: i64, services: &[&str]) -> ReportRecord {
    let mut r = report_of(c, node, at, &[], &[], &[("ns/cap", 5.0)]);
    r.imports = Some(services.iter().map(|s| (*s).to_string()).collect());
    r
}

fn flag_of(r: Result<(), StoreError>) -> &'static str {
    match r {
        Err(StoreError::Limit { flag, .. }) => flag,
        other => panic!("expected a limit error, got {other:?}"),
    }
}

async fn limits_refuse_and_store_nothing(url: &str) {
    let store = Store::connect(url).await.unwrap().with_limits(StoreLimits {
        max_nodes_per_cluster: 2,
        max_imports_per_cluster: 3,
    });
    store
        .register(&cluster("c1", "r"), &agent("c1", "n1"))
        .await
        .unwrap();
    store
        .register(&cluster("c1", "r"), &agent("c1", "n2"))
        .await
        .unwrap();
    // a third node of c1: refused, nothing stored
    let e = store
        .register(&cluster("c1", "r"), &agent("c1", "n3"))
        .await;
    assert_eq!(flag_of(e), "--max-nodes-per-cluster");
    // known nodes re-register, another cluster has its own count
    store
        .register(&cluster("c1", "r"), &agent("c1", "n1"))
        .await
        .unwrap();
    store
        .register(&cluster("c2", "r"), &agent("c2", "n1"))
        .await
        .unwrap();
    // a report of a new node creates one: refused as well
    let e = store
        .store_report(&declaring("c1", "n3", 1000, &["ns/a"]))
        .await;
    assert_eq!(flag_of(e), "--max-nodes-per-cluster");
    let nodes: Vec<String> = store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| format!("{}/{}", a.cluster_id, a.node_name))
        .collect();
    assert_eq!(nodes, vec!["c1/n1", "c1/n2", "c2/n1"]);

    // distinct imports: the union over the cluster's nodes
    store
        .store_report(&declaring("c1", "n1", 1000, &["ns/a", "ns/b"]))
        .await
        .unwrap();
    store
        .store_report(&declaring("c1", "n2", 2000, &["ns/b", "ns/c"]))
        .await
        .unwrap();
    // n2 alone declares 2, but the union would be 4 > 3
    let e = store
        .store_report(&declaring("c1", "n2", 3000, &["ns/c", "ns/d"]))
        .await;
    assert_eq!(flag_of(e), "--max-imports-per-cluster");
    let n2 = store
        .imports()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.cluster_id == "c1" && d.node_name == "n2")
        .unwrap();
    assert_eq!(
        n2.services,
        set(&["ns/b", "ns/c"]),
        "nothing of the refused report"
    );
    assert_eq!(n2.declared_at_ms, 2000);
    // c2 declares nothing: an empty set, kept
    store
        .store_report(&declaring("c2", "n1", 2500, &[]))
        .await
        .unwrap();

    // aggregated per cluster: nodes heard since the cut, or all when none was
    let agg = |cut| {
        let store = store.clone();
        async move {
            store
                .cluster_imports(cut)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.cluster_id, d.services))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        agg(1500).await,
        vec![
            ("c1".into(), set(&["ns/b", "ns/c"])),
            ("c2".into(), set(&[]))
        ]
    );
    assert_eq!(
        agg(0).await,
        vec![
            ("c1".into(), set(&["ns/a", "ns/b", "ns/c"])),
            ("c2".into(), set(&[]))
        ]
    );
    assert_eq!(
        agg(9000).await,
        vec![
            ("c1".into(), set(&["ns/a", "ns/b", "ns/c"])),
            ("c2".into(), set(&[]))
        ],
        "none fresh: all nodes count"
    );
    // counted without reading the names: the same sizes (c2 declared none: absent)
    let counts = |cut| {
        let store = store.clone();
        async move { store.cluster_import_counts(cut).await.unwrap() }
    };
    assert_eq!(counts(1500).await, [("c1".to_string(), 2)].into());
    assert_eq!(counts(0).await, [("c1".to_string(), 3)].into());
    assert_eq!(counts(9000).await, [("c1".to_string(), 3)].into());
    let heads: Vec<String> = store
        .cluster_import_heads()
        .await
        .unwrap()
        .into_iter()
        .map(|d| format!("{}@{}:{}", d.cluster_id, d.heard_at_ms, d.services.len()))
        .collect();
    assert_eq!(heads, vec!["c1@2000:0", "c2@2500:0"]);
    assert_eq!(store.services().await.unwrap(), set(&["ns/cap"]));
    store.close().await;
}

on_both_backends!(limits_refuse_and_store_nothing: limits_sqlite, limits_postgres);
