//! The load generator: N connections to a service VIP, one `GET /` each; counts which
//! cluster answered, failed connects and latency. Runs inside a cluster (the caller
//! enters its cgroup and netns before starting the runtime), so the connect is steered.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::echo::EchoReply;
use crate::error::{LabError, Result};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub target: SocketAddr,
    /// `Host` header (the service name).
    pub host: String,
    pub connections: usize,
    pub concurrency: usize,
    pub timeout: Duration,
    /// Draw a live progress line on stdout.
    pub progress: bool,
    /// Open at most this many connections per second (paced: connection i starts no
    /// earlier than i / rate s after the first); None: as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// HTTP/1.1 keep-alive: each of the `concurrency` workers holds one connection and sends
    /// its requests on it (`connections` is then the number of requests, `rate` paces
    /// requests). A request that fails on a reused connection is retried once on a new one,
    /// as HTTP clients do for idempotent requests (RFC 9110 9.2.2): that is a reconnect, not
    /// a failure.
    pub keepalive: bool,
    /// Ask each backend to pad its answer to about this many bytes (`GET /?pad=N`: the JSON
    /// reply followed by spaces), so responses carry a volume worth pricing; 0: none.
    pub response_bytes: usize,
}

impl LoadOptions {
    pub fn validate(&self) -> Result<()> {
        if self.connections == 0 || self.connections > 1_000_000 {
            return Err(LabError::invalid("connections", "want 1..=1000000"));
        }
        if self.response_bytes > crate::echo::MAX_PAD {
            return Err(LabError::invalid(
                "response-bytes",
                format!("want 0..={}", crate::echo::MAX_PAD),
            ));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(LabError::invalid("concurrency", "want 1..=1024"));
        }
        if self.timeout.is_zero() {
            return Err(LabError::invalid("timeout", "must be > 0"));
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0 && r <= 100_000.0) {
                return Err(LabError::invalid("rate", format!("{r}: want (0, 100000]")));
            }
        }
        Ok(())
    }
}

/// What one load run observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub from: Option<String>,
    /// The node of `from` whose cgroup the connections came from.
    #[serde(default)]
    pub node: Option<String>,
    pub service: Option<String>,
    pub target: String,
    pub connections: usize,
    pub ok: u64,
    pub failed: u64,
    /// Answered connections per destination cluster.
    pub by_cluster: BTreeMap<String, u64>,
    pub by_backend: BTreeMap<String, u64>,
    /// Share of answered connections per destination cluster.
    pub observed: BTreeMap<String, f64>,
    /// The weights published for (service, source cluster) when the load started, when known.
    pub weights: Option<BTreeMap<String, f64>>,
    /// The same when it ended (weights move while a load runs: it is demand).
    #[serde(default)]
    pub weights_end: Option<BTreeMap<String, f64>>,
    /// Mean time of `connect()` (about one RTT to the chosen backend).
    pub mean_connect_ms: f64,
    /// Median time of `connect()`.
    pub p50_connect_ms: f64,
    /// Mean time of connect + request + response.
    pub mean_latency_ms: f64,
    /// Mean connect time per destination cluster.
    pub connect_ms_by_cluster: BTreeMap<String, f64>,
    /// Failures by kind (`connect`, `timeout`, `http`, `body`).
    pub errors: BTreeMap<String, u64>,
    /// Whether requests shared keep-alive connections (`connections` then counts requests).
    #[serde(default)]
    pub keepalive: bool,
    /// Connections opened (with keep-alive: the first of each worker included).
    #[serde(default)]
    pub opened: u64,
    /// Keep-alive: requests retried on a new connection after their held one failed.
    #[serde(default)]
    pub reconnects: u64,
    pub elapsed_s: f64,
}

enum Outcome {
    Ok {
        reply: EchoReply,
        /// The connect's time when this request opened its connection.
        connect: Option<Duration>,
        total: Duration,
    },
    Failed(&'static str, String),
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A worker's held connection (keep-alive).
struct Held {
    sender: Sender,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Opens a connection to the target (steered at connect time) and does the handshake.
async fn open(opts: &LoadOptions) -> Result<(Held, Duration), (&'static str, String)> {
    let t0 = Instant::now();
    let stream = match tokio::time::timeout(opts.timeout, TcpStream::connect(opts.target)).await {
        Err(_) => return Err(("timeout", "connect timed out".into())),
        Ok(Err(e)) => return Err(("connect", e.to_string())),
        Ok(Ok(s)) => s,
    };
    let connect = t0.elapsed();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ("http", e.to_string()))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((Held { sender, conn }, connect))
}

/// One `GET /` on `sender`.
async fn request(
    opts: &LoadOptions,
    sender: &mut Sender,
) -> Result<EchoReply, (&'static str, String)> {
    let path = if opts.response_bytes > 0 {
        format!("/?pad={}", opts.response_bytes)
    } else {
        "/".to_string()
    };
    let req = Request::get(path)
        .header(hyper::header::HOST, opts.host.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| ("http", e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ("http", e.to_string()))?;
    if !resp.status().is_success() {
        return Err(("http", format!("status {}", resp.status())));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ("body", e.to_string()))?
        .to_bytes();
    serde_json::from_slice::<EchoReply>(&body).map_err(|e| ("body", e.to_string()))
}

/// One request on the worker's held connection (opened when there is none). A failure on a
/// reused connection is retried once on a new one (`reconnected`).
async fn one_keepalive(opts: &LoadOptions, held: &mut Option<Held>) -> (Outcome, bool) {
    let t0 = Instant::now();
    let mut reconnected = false;
    let mut connect = None;
    loop {
        let reused = held.is_some();
        if held.is_none() {
            match open(opts).await {
                Ok((h, c)) => {
                    *held = Some(h);
                    connect = Some(c);
                }
                Err((kind, msg)) => return (Outcome::Failed(kind, msg), reconnected),
            }
        }
        let Some(h) = held.as_mut() else {
            return (Outcome::Failed("http", "no connection".into()), reconnected);
        };
        let r = match tokio::time::timeout(opts.timeout, request(opts, &mut h.sender)).await {
            Err(_) => Err(("timeout", "request timed out".to_string())),
            Ok(r) => r,
        };
        match r {
            Ok(reply) => {
                return (
                    Outcome::Ok {
                        reply,
                        connect,
                        total: t0.elapsed(),
                    },
                    reconnected,
                )
            }
            Err((kind, msg)) => {
                *held = None;
                if reused && !reconnected && kind != "timeout" {
                    reconnected = true;
                    continue;
                }
                return (Outcome::Failed(kind, msg), reconnected);
            }
        }
    }
}

async fn one(opts: &LoadOptions) -> Outcome {
    let t0 = Instant::now();
    let (mut held, connect) = match open(opts).await {
        Ok(x) => x,
        Err((kind, msg)) => return Outcome::Failed(kind, msg),
    };
    match tokio::time::timeout(opts.timeout, request(opts, &mut held.sender)).await {
        Err(_) => Outcome::Failed("timeout", "request timed out".into()),
        Ok(Err((kind, msg))) => Outcome::Failed(kind, msg),
        Ok(Ok(reply)) => Outcome::Ok {
            reply,
            connect: Some(connect),
            total: t0.elapsed(),
        },
    }
}

#[derive(Default)]
struct Acc {
    ok: u64,
    failed: u64,
    by_cluster: BTreeMap<String, u64>,
    by_backend: BTreeMap<String, u64>,
    connect_sum: BTreeMap<String, f64>,
    connect_n: BTreeMap<String, u64>,
    connect_total: f64,
    connects: Vec<f64>,
    latency_total: f64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    opened: u64,
    reconnects: u64,
}

fn progress_line(acc: &Acc, done: usize, total: usize) -> String {
    let answered = acc.ok.max(1) as f64;
    let split: Vec<String> = acc
        .by_cluster
        .iter()
        .map(|(c, n)| format!("{c} {:5.1}%", 100.0 * *n as f64 / answered))
        .collect();
    format!(
        "\r\x1b[K  {done}/{total}  {}  failed {}",
        split.join("  "),
        acc.failed
    )
}

/// Runs the load and returns what it saw.
pub async fn run(opts: LoadOptions) -> Result<LoadReport> {
    opts.validate()?;
    let opts = Arc::new(opts);
    let next = Arc::new(AtomicUsize::new(0));
    let acc = Arc::new(Mutex::new(Acc::default()));
    let started = Instant::now();

    let progress = opts.progress.then(|| {
        let acc = acc.clone();
        let total = opts.connections;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Ok(a) = acc.lock() {
                    let done = (a.ok + a.failed) as usize;
                    print!("{}", progress_line(&a, done, total));
                    let _ = std::io::stdout().flush();
                }
            }
        })
    });

    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.min(opts.connections) {
        let opts = opts.clone();
        let next = next.clone();
        let acc = acc.clone();
        workers.push(tokio::spawn(async move {
            let mut held: Option<Held> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.connections {
                    break;
                }
                if let Some(rate) = opts.rate {
                    let at = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let (outcome, reconnected) = if opts.keepalive {
                    one_keepalive(&opts, &mut held).await
                } else {
                    (one(&opts).await, false)
                };
                let Ok(mut a) = acc.lock() else { return };
                a.reconnects += u64::from(reconnected);
                match outcome {
                    Outcome::Ok {
                        reply,
                        connect,
                        total,
                    } => {
                        a.ok += 1;
                        let c = connect.map_or(0.0, |c| c.as_secs_f64() * 1000.0);
                        if connect.is_some() {
                            a.opened += 1;
                            a.connect_total += c;
                            a.connects.push(c);
                        }
                        a.latency_total += total.as_secs_f64() * 1000.0;
                        if connect.is_some() {
                            *a.connect_sum.entry(reply.cluster.clone()).or_default() += c;
                            *a.connect_n.entry(reply.cluster.clone()).or_default() += 1;
                        }
                        *a.by_cluster.entry(reply.cluster).or_default() += 1;
                        *a.by_backend.entry(reply.backend).or_default() += 1;
                    }
                    Outcome::Failed(kind, msg) => {
                        a.failed += 1;
                        *a.errors.entry(kind.to_string()).or_default() += 1;
                        if a.first_error.is_none() {
                            a.first_error = Some(format!("{kind}: {msg}"));
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = progress {
        p.abort();
        print!("\r\x1b[K");
        let _ = std::io::stdout().flush();
    }
    let a = acc
        .lock()
        .map_err(|_| LabError::Other("load worker panicked".into()))?;
    if let Some(e) = &a.first_error {
        tracing::debug!("first failure: {e}");
    }
    let ok = a.ok.max(1) as f64;
    let mut connects = a.connects.clone();
    connects.sort_by(f64::total_cmp);
    let p50_connect_ms = connects.get(connects.len() / 2).copied().unwrap_or(0.0);
    Ok(LoadReport {
        p50_connect_ms,
        from: None,
        node: None,
        service: None,
        target: opts.target.to_string(),
        connections: opts.connections,
        ok: a.ok,
        failed: a.failed,
        observed: a
            .by_cluster
            .iter()
            .map(|(c, n)| (c.clone(), *n as f64 / ok))
            .collect(),
        connect_ms_by_cluster: a
            .connect_n
            .iter()
            .map(|(c, n)| {
                (
                    c.clone(),
                    a.connect_sum.get(c).copied().unwrap_or(0.0) / (*n).max(1) as f64,
                )
            })
            .collect(),
        by_cluster: a.by_cluster.clone(),
        by_backend: a.by_backend.clone(),
        weights: None,
        weights_end: None,
        mean_connect_ms: a.connect_total / a.opened.max(1) as f64,
        keepalive: opts.keepalive,
        opened: a.opened,
        reconnects: a.reconnects,
        mean_latency_ms: a.latency_total / ok,
        errors: a.errors.clone(),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// The human-readable table.
pub fn render(r: &LoadReport) -> String {
    let mut out = String::new();
    let head = match (&r.service, &r.from) {
        (Some(s), Some(f)) => format!("{s} from {f} ({})", r.target),
        _ => r.target.clone(),
    };
    if r.keepalive {
        out.push_str(&format!(
            "{head}: {} requests on {} keep-alive connections ({} reconnects), {} answered, {} failed, {:.1}s\n",
            r.connections, r.opened, r.reconnects, r.ok, r.failed, r.elapsed_s
        ));
    } else {
        out.push_str(&format!(
            "{head}: {} connections, {} answered, {} failed, {:.1}s\n",
            r.connections, r.ok, r.failed, r.elapsed_s
        ));
    }
    out.push_str(&format!(
        "  {:<8} {:>8} {:>9} {:>13} {:>11}\n",
        "cluster", "conns", "observed", "weight", "connect ms"
    ));
    let mut clusters: Vec<&String> = r.by_cluster.keys().collect();
    if let Some(w) = &r.weights {
        for c in w.keys() {
            if !clusters.contains(&c) {
                clusters.push(c);
            }
        }
    }
    clusters.sort();
    for c in clusters {
        let n = r.by_cluster.get(c).copied().unwrap_or(0);
        let obs = r.observed.get(c).copied().unwrap_or(0.0);
        let start = r.weights.as_ref().and_then(|w| w.get(c));
        // A destination missing from the end weights has weight 0 there.
        let end = r
            .weights_end
            .as_ref()
            .map(|w| w.get(c).copied().unwrap_or(0.0));
        let end = end.as_ref();
        let w = match (start, end) {
            (Some(a), Some(b)) if (a - b).abs() >= 0.0005 => {
                format!("{:.1}->{:.1}%", 100.0 * a, 100.0 * b)
            }
            (Some(a), _) => format!("{:.1}%", 100.0 * a),
            (None, Some(b)) => format!("{:.1}%", 100.0 * b),
            (None, None) => "-".into(),
        };
        let cm = r
            .connect_ms_by_cluster
            .get(c)
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  {c:<8} {n:>8} {:>8.1}% {w:>13} {cm:>11}\n",
            100.0 * obs
        ));
    }
    out.push_str(&format!(
        "  mean connect {:.1} ms (p50 {:.1}), mean request {:.1} ms",
        r.mean_connect_ms, r.p50_connect_ms, r.mean_latency_ms
    ));
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!(", failures: {}", e.join(", ")));
    }
    out.push('\n');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn load_counts_clusters_and_failures_on_loopback() {
        // Two real echo backends on loopback; the "service" is one of them.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move { crate::echo::serve_on(l, "c9").await });
        let r = run(LoadOptions {
            target: addr,
            host: "demo/echo".into(),
            connections: 50,
            concurrency: 8,
            timeout: Duration::from_secs(2),
            progress: false,
            rate: None,
            keepalive: false,
            response_bytes: 0,
        })
        .await
        .unwrap();
        assert_eq!(r.ok, 50);
        assert_eq!(r.failed, 0);
        assert_eq!(r.by_cluster.get("c9"), Some(&50));
        assert_eq!(r.by_backend.get(&addr.to_string()), Some(&50));
        assert!((r.observed["c9"] - 1.0).abs() < 1e-9);
        assert!(r.mean_latency_ms >= r.mean_connect_ms);
        srv.abort();

        // Nothing listens there any more: every connect fails, and is counted.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let r = run(LoadOptions {
            target: dead,
            host: "x".into(),
            connections: 5,
            concurrency: 2,
            timeout: Duration::from_secs(1),
            progress: false,
            rate: None,
            keepalive: false,
            response_bytes: 0,
        })
        .await
        .unwrap();
        assert_eq!((r.ok, r.failed), (0, 5));
        assert_eq!(r.errors.get("connect"), Some(&5));
        let table = render(&r);
        assert!(table.contains("5 failed"), "{table}");
    }

    #[tokio::test]
    async fn keepalive_requests_share_connections_and_a_dropped_one_is_retried_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move { crate::echo::serve_on(l, "c9").await });
        let opts = |connections| LoadOptions {
            target: addr,
            host: "demo/echo".into(),
            connections,
            concurrency: 4,
            timeout: Duration::from_secs(2),
            progress: false,
            rate: None,
            keepalive: true,
            response_bytes: 0,
        };
        let r = run(opts(200)).await.unwrap();
        assert_eq!((r.ok, r.failed), (200, 0));
        assert_eq!(r.opened, 4, "one connection per worker");
        assert_eq!(r.reconnects, 0);
        assert!(render(&r).contains("200 requests on 4 keep-alive connections"));
        srv.abort();
        let _ = srv.await;
        // a server that closes every connection after one answer (as a destroyed socket
        // does to the next request): every reuse fails and is retried once, nothing fails
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr2 = l.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let body = serde_json::to_vec(&EchoReply {
                            cluster: "c8".into(),
                            backend: "x".into(),
                        })
                        .unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header(hyper::header::CONNECTION, "close")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let r = run(LoadOptions {
            target: addr2,
            concurrency: 1,
            ..opts(20)
        })
        .await
        .unwrap();
        srv.abort();
        assert_eq!((r.ok, r.failed), (20, 0), "{:?}", r.errors);
        assert_eq!(r.opened, 20);
        assert!(r.reconnects <= 19, "{}", r.reconnects);
    }

    #[tokio::test]
    async fn a_backend_with_a_service_time_curve_answers_slower_as_its_rate_rises() {
        // A real echo backend on loopback, 5 ms + 0.5 ms per request of the last second.
        async fn mean_ms(rate: f64, connections: usize) -> f64 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let slow =
                std::sync::Arc::new(crate::echo::Slowdown::new(ballast_types::ServiceTime {
                    base_ms: 5.0,
                    slope_ms_per_rps: 0.5,
                }));
            let srv =
                tokio::spawn(
                    async move { crate::echo::serve_slowed_on(l, "c9", Some(slow)).await },
                );
            let r = run(LoadOptions {
                target: addr,
                host: "demo/echo".into(),
                connections,
                concurrency: 64,
                timeout: Duration::from_secs(3),
                progress: false,
                rate: Some(rate),
                keepalive: false,
                response_bytes: 0,
            })
            .await
            .unwrap();
            srv.abort();
            assert_eq!(r.failed, 0);
            r.mean_latency_ms
        }
        // 10/s for 2 s: ~5 + 0.5 x 10 = 10 ms; 100/s for 2 s: ~5 + 0.5 x 100 = 55 ms (the
        // first second ramps up from 5 ms, so the mean is a little lower).
        let quiet = mean_ms(10.0, 20).await;
        let busy = mean_ms(100.0, 200).await;
        assert!((5.0..20.0).contains(&quiet), "quiet {quiet:.1} ms");
        assert!((30.0..70.0).contains(&busy), "busy {busy:.1} ms");
    }

    #[test]
    fn bad_options_are_rejected() {
        let mut o = LoadOptions {
            target: "127.0.0.1:1".parse().unwrap(),
            host: "x".into(),
            connections: 0,
            concurrency: 1,
            timeout: Duration::from_secs(1),
            progress: false,
            rate: None,
            keepalive: false,
            response_bytes: 0,
        };
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("connections"));
        o.connections = 1;
        o.concurrency = 0;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("concurrency"));
        o.concurrency = 1;
        o.rate = Some(0.0);
        assert!(o.validate().unwrap_err().to_string().contains("rate"));
        o.rate = Some(20.0);
        assert!(o.validate().is_ok());
    }

    #[tokio::test]
    async fn a_paced_load_keeps_its_rate() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let srv = tokio::spawn(async move { crate::echo::serve_on(l, "c9").await });
        // 20 connections at 40/s: the last starts 19/40 s = 0.475 s after the first.
        let r = run(LoadOptions {
            target: addr,
            host: "demo/echo".into(),
            connections: 20,
            concurrency: 8,
            timeout: Duration::from_secs(2),
            progress: false,
            rate: Some(40.0),
            keepalive: false,
            response_bytes: 0,
        })
        .await
        .unwrap();
        srv.abort();
        assert_eq!(r.ok, 20);
        assert!(
            (0.45..1.5).contains(&r.elapsed_s),
            "20 connections at 40/s took {} s",
            r.elapsed_s
        );
    }
}
