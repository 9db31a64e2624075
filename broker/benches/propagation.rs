//! Propagation benchmark: 100 agents (one per cluster, each with its own mTLS connection)
//! watch their weights; one cluster reports a capacity change; we time from the start of that
//! Report to the moment every watcher holds the new generation. Repeated rounds, p50/p99.
//!
//! `cargo bench -p ballast-broker --bench propagation` (env: `BALLAST_BENCH_ROUNDS`, default
//! 200; `BALLAST_BENCH_WATCHERS`, default 100; `BALLAST_BENCH_SERVICES`, default 1,100:
//! services besides the changing one, served by c0, whose weights do not change, to show what
//! a generation costs when few of many services move). Everything runs on loopback, SQLite
//! store in a temp dir.
#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use ballast_broker::certs::generate;
use ballast_broker::server::{start, ServeConfig};
use ballast_broker::tls::TlsFiles;
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{CapacitySample, RegisterRequest, ReportRequest, WatchRequest};
use ballast_store::sqlite_url;
use tokio::sync::mpsc;
use tonic::transport::Channel;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn client(port: u16, tls: &TlsFiles) -> BrokerClient<Channel> {
    let ch = tls.localhost_channel(port).await.unwrap();
    BrokerClient::new(ch)
}

fn capacity_report(cluster: &str, rps: f64) -> ReportRequest {
    services_report(cluster, &["ns/web".to_string()], rps)
}

fn services_report(cluster: &str, services: &[String], rps: f64) -> ReportRequest {
    ReportRequest {
        cluster_id: cluster.into(),
        node_name: "n1".into(),
        measured_at_ms: ballast_types::now_ms(),
        capacity: services
            .iter()
            .map(|s| CapacitySample {
                service: s.clone(),
                capacity_rps: rps,
                measured_at_ms: 0,
                service_time: None,
                measured_service_ms: None,
                unit: 0,
            })
            .collect(),
        ..ReportRequest::default()
    }
}

/// Waits until every watcher reported `generation` (or later); returns the last arrival and
/// the updates the batches that brought it held, in all.
async fn wait_all(
    rx: &mut mpsc::UnboundedReceiver<(usize, u64, Instant, usize)>,
    watchers: usize,
    generation: u64,
) -> (Instant, usize) {
    let mut have = vec![false; watchers];
    let mut left = watchers;
    let mut last: Option<Instant> = None;
    let mut updates = 0;
    while left > 0 {
        let (i, g, t, n) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every watcher gets the generation within 60 s")
            .unwrap();
        if g >= generation && !have[i] {
            have[i] = true;
            left -= 1;
            updates += n;
            last = Some(last.map_or(t, |l| l.max(t)));
        }
    }
    (last.unwrap(), updates)
}

struct Row {
    debounce_ms: u64,
    services: usize,
    /// Mean updates per watcher per generation.
    updates: f64,
    rounds: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

#[allow(clippy::too_many_lines)]
async fn run(watchers: usize, services: usize, rounds: usize, debounce: Duration) -> Row {
    let ids: Vec<String> = (0..watchers).map(|i| format!("c{i}")).collect();
    let bundle = generate(&ids, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        sqlite_url(&dir.path().join("bench.db")),
        Some(bundle.tls_files(&bundle.server)),
    );
    cfg.solve_interval = Duration::from_secs(3600);
    cfg.debounce = debounce;
    let broker = start(cfg).await.unwrap();
    let port = broker.addr.port();

    let tls: Vec<TlsFiles> = bundle
        .clusters
        .iter()
        .map(|(_, p)| bundle.tls_files(p))
        .collect();
    let mut clients = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut c = client(port, &tls[i]).await;
        c.register(RegisterRequest {
            cluster_id: id.clone(),
            region: "us-east-1".into(),
            zone: format!("us-east-1{}", ["a", "b", "c"][i % 3]),
            provider: "aws".into(),
            gateway_address: "127.0.0.1".into(),
            agent_version: "bench".into(),
            node_name: "n1".into(),
        })
        .await
        .unwrap();
        clients.push(c);
    }
    // c0 and c1 serve ns/web; c0 serves the static services too.
    for id in ["c0", "c1"] {
        let i: usize = id[1..].parse().unwrap();
        clients[i]
            .report(tokio_stream::iter(vec![capacity_report(id, 100_000.0)]))
            .await
            .unwrap();
    }
    let statics: Vec<String> = (1..services).map(|k| format!("ns/static-{k}")).collect();
    for chunk in statics.chunks(500) {
        clients[0]
            .report(tokio_stream::iter(vec![services_report(
                "c0", chunk, 100_000.0,
            )]))
            .await
            .unwrap();
    }
    // Every watcher forwards (its index, generation, arrival time, updates in the batch) of
    // each completed batch.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant, usize)>();
    for (i, id) in ids.iter().enumerate() {
        let mut c = clients[i].clone();
        let tx = tx.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut s = c
                .watch_weights(WatchRequest {
                    cluster_id: id,
                    node_name: "n1".into(),
                    last_generation: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Ok(Some(u)) = s.message().await {
                n += 1;
                if u.last_in_batch {
                    if tx.send((i, u.generation, Instant::now(), n)).is_err() {
                        return;
                    }
                    n = 0;
                }
            }
        });
    }
    // Wait until the broker has weights for every service and every watcher holds them.
    let mut generation = loop {
        let p = broker.engine().current();
        if p.entries.len() >= services * watchers {
            break p.generation;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    wait_all(&mut rx, watchers, generation).await;

    let mut samples = Vec::with_capacity(rounds);
    let mut updates = 0;
    let mut reporter = clients[1].clone();
    for round in 0..rounds {
        // Drain stale notifications, then change c1's capacity.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while rx.try_recv().is_ok() {}
        // c1 stops serving (0) / serves again: every source's weights move.
        let cap = if round % 2 == 0 { 0.0 } else { 100_000.0 };
        let t0 = Instant::now();
        reporter
            .report(tokio_stream::iter(vec![capacity_report("c1", cap)]))
            .await
            .unwrap();
        let (last, n) = wait_all(&mut rx, watchers, generation + 1).await;
        updates += n;
        let ms = last.duration_since(t0).as_secs_f64() * 1000.0;
        if std::env::var_os("BALLAST_BENCH_VERBOSE").is_some() {
            eprintln!(
                "round {round}: {ms:.1} ms, generation {} -> {}",
                generation,
                broker.engine().current().generation
            );
        }
        samples.push(ms);
        generation = broker.engine().current().generation;
    }
    drop(clients);
    broker.stop().await;
    samples.sort_by(f64::total_cmp);
    Row {
        debounce_ms: u64::try_from(debounce.as_millis()).unwrap_or(0),
        services,
        updates: updates as f64 / (rounds * watchers) as f64,
        rounds,
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        max: *samples.last().unwrap(),
    }
}

fn main() {
    let watchers = env_usize("BALLAST_BENCH_WATCHERS", 100);
    let rounds = env_usize("BALLAST_BENCH_ROUNDS", 200);
    let services: Vec<usize> = std::env::var("BALLAST_BENCH_SERVICES").ok().map_or_else(
        || vec![1, 100],
        |v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("propagation: {watchers} watchers (one mTLS connection and cluster each), {rounds} rounds, SQLite store, loopback");
    println!("time from the start of a Report (capacity change) to every watcher holding the new generation");
    println!();
    println!("(one service's weights change per round; the others, served by c0 alone, do not)");
    println!();
    println!("| services | debounce | watchers | rounds | updates per watcher per generation | p50 ms | p99 ms | max ms | target p99 < 100 ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let cases = services.iter().flat_map(|s| {
        [Duration::from_millis(20), Duration::from_millis(50)]
            .into_iter()
            .map(move |d| (*s, d))
    });
    for (services, debounce) in cases {
        let r = rt.block_on(run(watchers, services, rounds, debounce));
        println!(
            "| {} | {} ms{} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.services,
            r.debounce_ms,
            if r.debounce_ms == 20 {
                " (default)"
            } else {
                ""
            },
            watchers,
            r.rounds,
            r.updates,
            r.p50,
            r.p99,
            r.max,
            if r.p99 < 100.0 { "met" } else { "MISSED" }
        );
    }
}
