//! Service time measured on the local cluster's own endpoints, for the broker's fit.
//!
//! A service whose local export names a probe path (ServiceExport annotation
//! `ballast.io/service-time-probe: "/healthz"`, or `service_time_probe` in the topology file)
//! is probed every interval: one `GET PATH HTTP/1.1` (`Connection: close`) to each of the
//! local cluster's ready endpoints, timed from the end of the TCP handshake to the first byte
//! of the answer (time to first byte: the backend's service time plus one in-cluster round
//! trip, the connect excluded). An answer whose status is not 2xx or 3xx, a refused connect
//! or a timeout is no sample. The mean over the endpoints that answered is reported with the
//! service's capacity sample (`CapacitySample.measured_service_ms`); the broker pairs it
//! with the load it sees on the cluster and fits the curve.
//!
//! Decision: a raw request on a `tokio` socket rather than an HTTP client library — what is
//! measured is exactly one request line and the first byte of the status line, and the
//! agent needs no HTTP stack for anything else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::catalog::{Catalog, Protocol, ServiceName};

/// The ServiceExport annotation naming the probe path.
pub const PROBE_ANNOTATION: &str = "ballast.io/service-time-probe";
/// The longest probe path accepted.
pub const MAX_PROBE_PATH: usize = 256;

/// Service -> measured service time (ms), the mean over the local endpoints that answered.
pub type ServiceTimes = BTreeMap<ServiceName, f64>;

/// How the service probes run.
#[derive(Debug, Clone, Copy)]
pub struct ServiceProbeConfig {
    pub interval: Duration,
    /// Per endpoint: connect and answer, each.
    pub timeout: Duration,
}

impl Default for ServiceProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Checks a probe path: starts with `/`, at most [`MAX_PROBE_PATH`] bytes, visible ASCII
/// only (it goes into a request line as it is).
///
/// # Errors
/// What is wrong with it.
pub fn check_probe_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} does not start with '/'"));
    }
    if path.len() > MAX_PROBE_PATH {
        return Err(format!(
            "{} bytes, more than the {MAX_PROBE_PATH} allowed",
            path.len()
        ));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{path:?} holds {c:?} (visible ASCII only)"));
    }
    Ok(())
}

/// Why one probe gave no sample.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("request: {0}")]
    Io(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("answered {0:?}, not 2xx or 3xx")]
    Status(String),
}

/// One probe of `addr`: the time from the end of the handshake to the first byte of the
/// answer, when the status is 2xx or 3xx.
///
/// # Errors
/// [`ProbeError`]: no sample.
pub async fn probe_once(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProbeError::Timeout)?
        .map_err(ProbeError::Connect)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ballast-agent\r\nConnection: close\r\n\r\n"
    );
    let answer = async {
        let t0 = Instant::now();
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        let mut got = stream.read(&mut head).await?;
        let ttfb = t0.elapsed();
        // "HTTP/1.1 200": the status code may come in more than one read
        while got < head.len() {
            let n = stream.read(&mut head[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<_, std::io::Error>((ttfb, String::from_utf8_lossy(&head[..got]).into_owned()))
    };
    let (ttfb, head) = tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| ProbeError::Timeout)?
        .map_err(ProbeError::Io)?;
    let status = head.get(9..12).unwrap_or_default();
    if head.starts_with("HTTP/") && (status.starts_with('2') || status.starts_with('3')) {
        Ok(ttfb)
    } else {
        Err(ProbeError::Status(head))
    }
}

/// One round: every probed service's mean time over its local ready endpoints (services
/// none of whose endpoints answered are left out).
pub async fn probe_round(catalog: &Catalog, timeout: Duration) -> ServiceTimes {
    let mut out = ServiceTimes::new();
    for svc in catalog.services.values() {
        let Some(path) = &svc.service_time_probe else {
            continue;
        };
        // the first TCP port: where the endpoints answer HTTP
        let Some(port) = svc.ports.iter().find(|p| p.protocol == Protocol::Tcp) else {
            continue;
        };
        let host = svc.name.to_string();
        let probes: Vec<_> = svc
            .ready_endpoints_for(port)
            .into_iter()
            .filter(|e| e.cluster == catalog.local)
            .map(|e| probe_once(e.address, &host, path, timeout))
            .collect();
        let mut times = Vec::new();
        for r in futures::future::join_all(probes).await {
            match r {
                Ok(t) => times.push(t.as_secs_f64() * 1e3),
                Err(e) => tracing::debug!(service = %svc.name, error = %e, "service probe"),
            }
        }
        if !times.is_empty() {
            out.insert(
                svc.name.clone(),
                times.iter().sum::<f64>() / times.len() as f64,
            );
        }
    }
    out
}

/// Probes every interval until `catalog`'s sender is gone, publishing each round on `tx`.
pub async fn run(
    mut catalog: watch::Receiver<Arc<Catalog>>,
    cfg: ServiceProbeConfig,
    tx: watch::Sender<Arc<ServiceTimes>>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if catalog.has_changed().is_err() {
            return;
        }
        let snapshot = catalog.borrow_and_update().clone();
        let times = probe_round(&snapshot, cfg.timeout).await;
        tx.send_replace(Arc::new(times));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A real TCP server that answers every request with `status` after `delay`.
    async fn server(delay: Duration, status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_time_to_first_byte_is_the_backends_service_time() {
        let slow = server(Duration::from_millis(40), "200 OK").await;
        let t = probe_once(slow, "a/b", "/", Duration::from_secs(2))
            .await
            .expect("a sample");
        assert!(
            t >= Duration::from_millis(40) && t < Duration::from_millis(200),
            "{t:?}"
        );
        let fast = server(Duration::ZERO, "204 No Content").await;
        let t = probe_once(fast, "a/b", "/healthz", Duration::from_secs(2))
            .await
            .expect("a sample");
        assert!(t < Duration::from_millis(40), "{t:?}");
    }

    #[tokio::test]
    async fn errors_timeouts_and_refusals_are_no_sample() {
        let failing = server(Duration::ZERO, "503 Service Unavailable").await;
        let e = probe_once(failing, "a/b", "/", Duration::from_secs(2)).await;
        assert!(
            matches!(e, Err(ProbeError::Status(ref s)) if s.contains("503")),
            "{e:?}"
        );
        let hung = server(Duration::from_secs(5), "200 OK").await;
        let e = probe_once(hung, "a/b", "/", Duration::from_millis(100)).await;
        assert!(matches!(e, Err(ProbeError::Timeout)), "{e:?}");
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        };
        let e = probe_once(gone, "a/b", "/", Duration::from_secs(1)).await;
        assert!(matches!(e, Err(ProbeError::Connect(_))), "{e:?}");
    }

    #[tokio::test]
    async fn a_round_probes_only_the_local_ready_endpoints_of_probed_services() {
        use crate::catalog::{Endpoint, Service, ServicePort};
        let slow = server(Duration::from_millis(30), "200 OK").await;
        let slower = server(Duration::from_millis(90), "200 OK").await;
        // remote and unready endpoints answer at once: counted, they would pull the mean down
        let remote = server(Duration::ZERO, "200 OK").await;
        let unready = server(Duration::ZERO, "200 OK").await;
        let ep = |address, cluster: &str, ready| Endpoint {
            address,
            cluster: cluster.into(),
            ready,
            port_name: None,
        };
        let svc = |name: &str, probe: Option<&str>| Service {
            name: ServiceName::parse(name).expect("valid"),
            vips: vec![],
            ports: vec![ServicePort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
            }],
            capacity_rps_per_pod: None,
            service_time_per_pod: None,
            service_time_probe: probe.map(str::to_owned),
            load_unit: ballast_types::LoadUnit::default(),
            endpoints: vec![
                ep(slow, "east", true),
                ep(slower, "east", true),
                ep(remote, "west", true),
                ep(unready, "east", false),
            ],
        };
        let probed = svc("a/probed", Some("/"));
        let quiet = svc("a/quiet", None);
        let catalog = Catalog {
            local: "east".into(),
            clusters: BTreeMap::new(),
            services: [probed, quiet]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            without_vip: Default::default(),
        };
        let times = probe_round(&catalog, Duration::from_secs(2)).await;
        assert_eq!(times.len(), 1, "{times:?}");
        let ms = times[&ServiceName::parse("a/probed").expect("valid")];
        // the mean of ~30 and ~90 ms
        assert!((60.0..120.0).contains(&ms), "{ms}");
    }

    #[test]
    fn probe_paths_are_checked() {
        assert!(check_probe_path("/healthz?x=1").is_ok());
        for (bad, why) in [
            ("healthz", "does not start with '/'"),
            ("/a b", "visible ASCII only"),
            ("/a\r\nX: y", "visible ASCII only"),
        ] {
            let e = check_probe_path(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(
            check_probe_path(&format!("/{}", "a".repeat(MAX_PROBE_PATH)))
                .expect_err("long")
                .contains("more than")
        );
    }
}
