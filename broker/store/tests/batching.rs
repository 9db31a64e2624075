//! Batched writes on both backends: [`Store::ack_many`] (multi-row upserts of acks) and
//! [`Store::store_report`]'s multi-row sample upserts with a key stated twice.
#![allow(clippy::unwrap_used, clippy::float_cmp)]

use ballast_store::testing::{agent, c1_n1, cluster, report_of};
use ballast_store::{on_both_backends, AckRecord, Store};

fn ack(node: &str, service: &str, generation: i64, applied: bool, at: i64) -> AckRecord {
    AckRecord {
        cluster_id: "c1".into(),
        node_name: node.into(),
        service: service.into(),
        generation,
        applied,
        error: if applied {
            String::new()
        } else {
            "boom".into()
        },
        acked_at_ms: at,
    }
}

/// Several keys in one batch, a key repeated within a batch (the last wins) and across
/// batches (the newest batch wins), an empty batch, and more rows than one statement holds.
async fn ack_many_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    store
        .register(&cluster("c1", "us-east-1"), &agent("c1", "n1"))
        .await
        .unwrap();
    store.ack_many(&[]).await.unwrap();
    assert!(store.acks().await.unwrap().is_empty());

    store
        .ack_many(&[
            ack("n1", "a", 1, true, 10),
            ack("n1", "b", 1, true, 10),
            ack("n2", "a", 1, false, 10),
            // The same key again in one batch: the last occurrence wins, no error.
            ack("n1", "b", 2, true, 11),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.acks().await.unwrap(),
        vec![
            ack("n1", "a", 1, true, 10),
            ack("n1", "b", 2, true, 11),
            ack("n2", "a", 1, false, 10),
        ]
    );
    assert_eq!(c1_n1(&store).await.acked_generation, 2);

    // A later batch replaces the keys it states and leaves the others.
    store
        .ack_many(&[ack("n1", "a", 3, true, 20), ack("n2", "a", 3, true, 20)])
        .await
        .unwrap();
    assert_eq!(
        store.acks().await.unwrap(),
        vec![
            ack("n1", "a", 3, true, 20),
            ack("n1", "b", 2, true, 11),
            ack("n2", "a", 3, true, 20),
        ]
    );
    assert_eq!(c1_n1(&store).await.acked_generation, 3);
    // Store::ack is a batch of one.
    store.ack(&ack("n1", "b", 4, false, 30)).await.unwrap();
    assert_eq!(store.acks().await.unwrap()[1], ack("n1", "b", 4, false, 30));

    // Several statements in one batch (over 1,000 rows).
    let many: Vec<AckRecord> = (0..2500)
        .map(|i| ack(&format!("m{i}"), "s", 5, true, 40))
        .collect();
    store.ack_many(&many).await.unwrap();
    assert_eq!(store.acks().await.unwrap().len(), 3 + 2500);
    store.close().await;
}

on_both_backends!(ack_many_scenario: ack_many_sqlite, ack_many_postgres);

/// A report stating one sample key twice (RTT, RPS and capacity) stores the last one
/// without error; a large report spans several statements.
async fn duplicate_samples_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    store
        .register(&cluster("c1", "us-east-1"), &agent("c1", "n1"))
        .await
        .unwrap();
    let r = report_of(
        "c1",
        "n1",
        100,
        &[("c2", 5.0), ("c3", 7.0), ("c2", 9.0)],
        &[("s", "c2", 10.0), ("s", "c2", 20.0), ("t", "c2", 1.0)],
        &[("s", 100.0), ("t", 5.0), ("s", 300.0)],
    );
    store.store_report(&r).await.unwrap();
    let rtt: Vec<(String, f64)> = store
        .rtt()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.dst, s.rtt_ms))
        .collect();
    assert_eq!(rtt, vec![("c2".into(), 9.0), ("c3".into(), 7.0)]);
    let rps: Vec<(String, f64)> = store
        .rps()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.service, s.rps))
        .collect();
    assert_eq!(rps, vec![("s".into(), 20.0), ("t".into(), 1.0)]);
    let cap: Vec<(String, f64)> = store
        .capacity()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.service, s.capacity_rps))
        .collect();
    assert_eq!(cap, vec![("s".into(), 300.0), ("t".into(), 5.0)]);

    // A second report replaces the stored samples (the upsert's UPDATE branch).
    let r2 = report_of(
        "c1",
        "n1",
        200,
        &[("c2", 1.0), ("c2", 2.0)],
        &[("s", "c2", 30.0)],
        &[("s", 50.0), ("s", 60.0)],
    );
    store.store_report(&r2).await.unwrap();
    let rtt = store.rtt().await.unwrap();
    assert_eq!(rtt.len(), 2);
    assert_eq!((rtt[0].rtt_ms, rtt[0].measured_at_ms), (2.0, 200));
    assert_eq!(store.rps().await.unwrap()[0].rps, 30.0);
    assert_eq!(store.capacity().await.unwrap()[0].capacity_rps, 60.0);

    // 2,500 RTT samples: three statements.
    let peers: Vec<String> = (0..2500).map(|i| format!("p{i}")).collect();
    let rtt: Vec<(&str, f64)> = peers.iter().map(|p| (p.as_str(), 1.0)).collect();
    store
        .store_report(&report_of("c1", "n1", 300, &rtt, &[], &[]))
        .await
        .unwrap();
    assert_eq!(store.rtt().await.unwrap().len(), 2 + 2500);
    store.close().await;
}

on_both_backends!(duplicate_samples_scenario: duplicate_samples_sqlite, duplicate_samples_postgres);
