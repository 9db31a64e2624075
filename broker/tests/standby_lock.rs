//! The SQLite single-writer rule, in process (no root): a second broker on the same SQLite
//! file waits for the database lock before it opens the store, and serves once the first
//! stops (the lock is per open file, so two brokers in one process exclude each other too).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use ballast_broker::server::start;
use support::{broker_for, sqlite_test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_one_sqlite_file_waits_for_the_first_to_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, first) = broker_for(dir.path(), &["c1"]).await;
    let lock = dir.path().join("b.db.lock");
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        std::process::id().to_string(),
        "the holder's pid is in the lock file"
    );
    let generation = first.engine().current().generation;

    let second = tokio::spawn(start(sqlite_test_config(&bundle, dir.path())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second broker must not open the store while the first holds the lock"
    );

    first.stop().await;
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second broker starts once the first stopped")
        .unwrap()
        .expect("and serves");
    assert_eq!(second.engine().current().generation, generation);
    second.stop().await;
}
