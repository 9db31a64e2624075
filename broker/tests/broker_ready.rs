//! The broker's `/ready`: 200 while the store answers and the solve loop solves, 503 with the
//! reason when the store stops answering (its pool closed, on SQLite and PostgreSQL; the
//! PostgreSQL schema dropped under it). Loopback only, plain-text gRPC (TLS is not the
//! subject here).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ballast_broker::server::{start, Running, ServeConfig};
use ballast_store::on_both_backends;
use ballast_store::testing::PgSchema;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn broker(url: &str) -> (Running, SocketAddr) {
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), url.to_string(), None);
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.solve_interval = Duration::from_secs(3600);
    let running = start(cfg).await.expect("broker starts");
    let addr = running.metrics_addr.unwrap();
    (running, addr)
}

/// `/ready` within 10 s of polling satisfies `pred`; returns the last answer.
async fn ready_until(addr: SocketAddr, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut r = String::new();
    for _ in 0..100 {
        r = get(addr, "/ready").await;
        if pred(&r) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/ready never became {what}; last answer: {r}")
}

async fn ready_follows_the_store(url: &str) {
    let (running, addr) = broker(url).await;
    // Ready as soon as start returns: the store answers, the first round has completed.
    let r = get(addr, "/ready").await;
    assert!(
        r.starts_with("HTTP/1.0 200") && r.ends_with("ready: leader term 1\n"),
        "{r}"
    );
    assert!(get(addr, "/live").await.starts_with("HTTP/1.0 200"));

    // The store stops answering (its pool is closed under the running broker).
    running.engine().store().close().await;
    let r = ready_until(addr, "503", |r| r.starts_with("HTTP/1.0 503")).await;
    assert!(r.contains("not ready: store unreachable: database:"), "{r}");
    // Liveness is not readiness: the process still serves.
    assert!(get(addr, "/live").await.starts_with("HTTP/1.0 200"));
    running.stop().await;
}

on_both_backends!(ready_follows_the_store: ready_sqlite_pool_closed_503, ready_postgres_pool_closed_503);

#[tokio::test]
async fn ready_postgres_schema_dropped_503_with_reason() {
    let Some(pg) = PgSchema::create("ready_postgres_schema_dropped_503_with_reason").await else {
        return;
    };
    let (running, addr) = broker(&pg.url).await;
    let r = get(addr, "/ready").await;
    assert!(r.starts_with("HTTP/1.0 200"), "{r}");
    // An operator drops the broker's schema: the tables are gone.
    pg.drop_schema().await;
    let r = ready_until(addr, "503", |r| r.starts_with("HTTP/1.0 503")).await;
    assert!(r.contains("not ready: store unreachable:"), "{r}");
    assert!(r.contains("policies"), "names the missing table: {r}");
    running.stop().await;
}
