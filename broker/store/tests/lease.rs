//! The leader lease and publish fencing, on SQLite and PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ballast_store::testing::{run, weight};
use ballast_store::{on_both_backends, LeaderTerm, Store, StoreError};

async fn lease_scenario(url: &str) {
    let store = Store::connect(url).await.unwrap();
    let short = Duration::from_millis(300);
    // a fresh store: nobody holds the lease, the first acquire takes term 1
    let a = store
        .acquire_lease("a", short, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        a,
        LeaderTerm {
            holder: "a".into(),
            term: 1
        }
    );
    let st = store.lease().await.unwrap();
    assert!(st.live() && st.holder == "a" && st.term == 1, "{st:?}");
    // live: another replica cannot take it, and neither can "a" itself (it renews)
    assert!(store
        .acquire_lease("b", short, false)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .acquire_lease("a", short, false)
        .await
        .unwrap()
        .is_none());
    assert!(store.renew_lease(&a, short).await.unwrap());
    // a wrong term or holder does not renew
    let wrong = LeaderTerm {
        holder: "a".into(),
        term: 7,
    };
    assert!(!store.renew_lease(&wrong, short).await.unwrap());
    let g1 = store
        .publish(
            &a,
            10,
            &[weight("ns/web", "c1", "c2", 1.0)],
            &[],
            &run(1, 0),
        )
        .await
        .unwrap();
    assert_eq!(g1, 1);
    // expiry: after the lease, "a" can no longer renew or publish, "b" takes term 2
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!store.lease().await.unwrap().live());
    assert!(!store.renew_lease(&a, short).await.unwrap());
    match store
        .publish(
            &a,
            11,
            &[weight("ns/web", "c1", "c2", 0.5)],
            &[],
            &run(2, 0),
        )
        .await
    {
        Err(StoreError::Fenced {
            term: 1,
            current_term: 1,
        }) => {}
        other => panic!("expired lease publishes: {other:?}"),
    }
    let b = store
        .acquire_lease("b", Duration::from_secs(60), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.term, 2);
    // fencing: the old leader's term is refused while b leads, and nothing is stored
    match store
        .publish(
            &a,
            12,
            &[weight("ns/web", "c1", "c2", 0.25)],
            &[],
            &run(3, 0),
        )
        .await
    {
        Err(StoreError::Fenced {
            term: 1,
            current_term: 2,
        }) => {}
        other => panic!("fenced leader publishes: {other:?}"),
    }
    assert!(!store.renew_lease(&a, short).await.unwrap());
    assert_eq!(store.last_generation().await.unwrap(), 1);
    // b continues the sequence, its term recorded per generation
    let g2 = store
        .publish(
            &b,
            13,
            &[weight("ns/web", "c1", "c2", 0.75)],
            &[],
            &run(4, 0),
        )
        .await
        .unwrap();
    assert_eq!(g2, 2);
    assert_eq!(store.generation_term(1).await.unwrap(), Some(1));
    assert_eq!(store.generation_term(2).await.unwrap(), Some(2));
    assert_eq!(store.weights_of(2).await.unwrap()[0].weight, 0.75);
    // the run carries the generation the store assigned
    let runs = store.solver_runs(10).await.unwrap();
    assert!(
        runs.iter().any(|r| r.id == 4 && r.generation == 2),
        "{runs:?}"
    );
    // force (SQLite's single process at start) takes a live lease, bumping the term
    let c = store
        .acquire_lease("c", short, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.term, 3);
    assert!(!store.renew_lease(&b, short).await.unwrap());
    // release: the lease ends at once, anyone takes it
    store.release_lease(&c).await.unwrap();
    assert!(!store.lease().await.unwrap().live());
    let d = store
        .acquire_lease("d", short, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.term, 4);
    store.close().await;
}

on_both_backends!(lease_scenario: lease_sqlite, lease_postgres);
