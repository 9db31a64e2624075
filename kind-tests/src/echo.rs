//! The demo service's backend: `GET /` answers `{"cluster": "c2", "backend": "IP:PORT"}`
//! (`GET /?pad=N`: the same followed by spaces up to N bytes, a response with volume).
//!
//! With a service-time curve ([`ServiceTime`], `--service-time base_ms=..,slope_ms_per_rps=..`)
//! it is really slower under load: each request waits `base_ms + slope_ms_per_rps x rate`
//! before the answer, `rate` being the requests this backend received in the last second
//! (its own arrivals, counted as they come) — the load-dependent response time that the
//! broker's load-aware `optimized` models.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_types::ServiceTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::error::{IoContext, Result};

/// The body a backend answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    pub cluster: String,
    pub backend: String,
}

/// The largest answer padding a request may ask for (`GET /?pad=N`).
pub const MAX_PAD: usize = 16 * 1024 * 1024;

/// `pad=N` of the query, at most [`MAX_PAD`].
fn pad_of(query: Option<&str>) -> usize {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("pad="))
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.min(MAX_PAD))
}

fn respond(req: &Request<Incoming>, body: &Bytes) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => match pad_of(req.uri().query()) {
            0 => (StatusCode::OK, body.clone()),
            // JSON allows trailing whitespace: the reply parses the same, only larger
            n => {
                let mut v = body.to_vec();
                v.resize(body.len().max(n), b' ');
                (StatusCode::OK, Bytes::from(v))
            }
        },
        (&Method::GET, _) => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The longest a request waits, however high the rate (a client's timeout is longer).
const MAX_DELAY: Duration = Duration::from_secs(2);
/// The window over which the arrival rate is counted.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// A backend's slowdown: its curve and its recent arrivals.
#[derive(Debug)]
pub struct Slowdown {
    curve: ServiceTime,
    arrivals: Mutex<VecDeque<Instant>>,
}

impl Slowdown {
    pub fn new(curve: ServiceTime) -> Self {
        Self {
            curve,
            arrivals: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts an arrival at `now` and returns how long this request waits:
    /// `base + slope x arrivals in the last second` (this one included), at most [`MAX_DELAY`].
    pub fn arrive(&self, now: Instant) -> Duration {
        let rate = {
            let mut q = self
                .arrivals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            q.push_back(now);
            while q
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > RATE_WINDOW)
            {
                q.pop_front();
            }
            q.len() as f64 / RATE_WINDOW.as_secs_f64()
        };
        let ms = self.curve.base_ms + self.curve.slope_ms_per_rps * rate;
        Duration::from_secs_f64(ms / 1000.0).min(MAX_DELAY)
    }
}

/// Serves on an already bound listener until the task is dropped.
pub async fn serve_on(listener: TcpListener, cluster: &str) -> Result<()> {
    serve_slowed_on(listener, cluster, None).await
}

/// [`serve_on`], each `GET /` waiting as `slowdown` says first.
pub async fn serve_slowed_on(
    listener: TcpListener,
    cluster: &str,
    slowdown: Option<Arc<Slowdown>>,
) -> Result<()> {
    let local = listener.local_addr().ctx(|| "local address".into())?;
    let reply = EchoReply {
        cluster: cluster.to_string(),
        backend: local.to_string(),
    };
    let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let body = body.clone();
        let slowdown = slowdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = respond(&req, &body);
                let wait = match &slowdown {
                    Some(s) if r.status() == StatusCode::OK => s.arrive(Instant::now()),
                    _ => Duration::ZERO,
                };
                async move {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

/// Binds `listen` and serves, slowed by `service_time` when given.
pub async fn serve(
    cluster: &str,
    listen: SocketAddr,
    service_time: Option<ServiceTime>,
) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .ctx(|| format!("binding {listen}"))?;
    let curve = service_time.map_or_else(|| "none".to_string(), |c| c.to_string());
    tracing::info!(%listen, cluster, service_time = %curve, "echo backend up");
    serve_slowed_on(
        listener,
        cluster,
        service_time.map(|c| Arc::new(Slowdown::new(c))),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_arrivals_of_the_last_second_and_is_capped() {
        let s = Slowdown::new(ServiceTime {
            base_ms: 2.0,
            slope_ms_per_rps: 1.0,
        });
        let t0 = Instant::now();
        // 1st arrival: 2 + 1 x 1 ms; 10th within the second: 2 + 10 ms.
        assert_eq!(s.arrive(t0), Duration::from_millis(3));
        for i in 1..9 {
            s.arrive(t0 + Duration::from_millis(i * 10));
        }
        assert_eq!(
            s.arrive(t0 + Duration::from_millis(90)),
            Duration::from_millis(12)
        );
        // 1.5 s later the window holds only the new arrival.
        assert_eq!(
            s.arrive(t0 + Duration::from_millis(1600)),
            Duration::from_millis(3)
        );
        let steep = Slowdown::new(ServiceTime {
            base_ms: 0.0,
            slope_ms_per_rps: 5000.0,
        });
        assert_eq!(steep.arrive(t0), MAX_DELAY);
    }
}
