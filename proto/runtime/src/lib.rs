//! What every ballast binary does the same way, in one place: logs, the admin HTTP server
//! and the shutdown signal. Decisions:
//!
//! - **Logs** ([`LogArgs`]): `--log-level` is a `tracing` filter directive (`info`,
//!   `warn,ballast_agent=debug`, …) read from `RUST_LOG` when the flag is absent — the
//!   variable the charts and the lab already set — and `--log-format` is `text` (humans) or
//!   `json` (one object per line, for collectors), from `BALLAST_LOG_FORMAT`. Flatten the
//!   struct into a binary's clap `Parser` and call [`LogArgs::init`] once, first thing.
//! - **Admin server** ([`AdminServer::bind`]): one plain-HTTP listener (axum, HTTP/1) for
//!   `GET /metrics` (the text exposition of a prometheus-client [`Registry`]), `GET /live`
//!   (200 while the process serves at all) and `GET /ready` (200 once the caller said so
//!   through [`Readiness::set`] and its check, if any ([`Readiness::set_check`]), passes;
//!   503 otherwise, with the reason in the body). Metrics and probes share one port so
//!   a chart opens one port per pod.
//! - **Shutdown** ([`shutdown_signal`]): completes on SIGTERM (what Kubernetes sends) or
//!   ctrl-c.
//!
//! A binary's `main`:
//!
//! ```no_run
//! # async fn example(registry: prometheus_client::registry::Registry) -> Result<(), Box<dyn std::error::Error>> {
//! use ballast_runtime::{AdminServer, LogArgs, Readiness};
//! # let log = LogArgs::default();
//! log.init()?;
//! let ready = Readiness::default();
//! let admin = AdminServer::bind(
//!     "127.0.0.1:9464".parse()?,
//!     std::sync::Arc::new(registry),
//!     ready.clone(),
//! )
//! .await?;
//! // … start the work, then:
//! ready.set(true);
//! ballast_runtime::shutdown_signal().await;
//! ready.set(false);
//! admin.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Args, ValueEnum};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Errors of this crate; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `--log-level` is not a valid filter directive.
    #[error("--log-level {value:?}: {message}")]
    LogLevel { value: String, message: String },
    /// A global subscriber was already installed.
    #[error("logging is already initialised: {0}")]
    LogInit(String),
    /// The admin address cannot be bound.
    #[error("admin server: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The admin server stopped with an I/O error.
    #[error("admin server: {0}")]
    Serve(std::io::Error),
    /// The admin server task panicked or was aborted.
    #[error("admin server task: {0}")]
    Task(String),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging flags, to `#[command(flatten)]` into a binary's clap `Parser`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logs")]
pub struct LogArgs {
    /// What to log: a tracing filter directive, e.g. `info` or `warn,ballast_agent=debug`.
    #[arg(long, env = "RUST_LOG", value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// Log line format: `text` for people, `json` for log collectors.
    #[arg(
        long,
        env = "BALLAST_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

impl Default for LogArgs {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

impl LogArgs {
    /// The filter `--log-level` describes.
    ///
    /// # Errors
    /// [`RuntimeError::LogLevel`] when the directive does not parse.
    pub fn filter(&self) -> Result<tracing_subscriber::EnvFilter, RuntimeError> {
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            RuntimeError::LogLevel {
                value: self.log_level.clone(),
                message: e.to_string(),
            }
        })
    }

    /// Installs the global `tracing` subscriber. Call once, before anything logs.
    ///
    /// # Errors
    /// A bad `--log-level`, or a subscriber already installed.
    pub fn init(&self) -> Result<(), RuntimeError> {
        let filter = self.filter()?;
        // Logs go to stderr: stdout stays for what a command prints.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let res = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        res.map_err(|e| RuntimeError::LogInit(e.to_string()))
    }
}

/// The condition `/ready` checks on every request once the flag is set: `Ok` or the reason
/// the process is not ready (one line, for the body and the probe's event).
pub type ReadyCheck =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// Whether the process is ready for traffic; `/ready` answers from it. Cheap to clone
/// (shared state); starts not ready. Two parts: a flag the binary sets once it has started
/// ([`Readiness::set`]) and clears when it stops, and optionally a check
/// ([`Readiness::set_check`]) run on each `/ready` while the flag is set — for conditions
/// that come and go (a store that stops answering), with the reason in the response body.
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default)]
struct ReadinessInner {
    flag: AtomicBool,
    check: RwLock<Option<Arc<ReadyCheck>>>,
    /// Why the flag is clear, when the binary said ([`Readiness::set_not_ready`]).
    reason: RwLock<Option<String>>,
    /// What a ready process says after `ready: ` ([`Readiness::set_detail`]).
    detail: RwLock<Option<Arc<ReadyDetail>>>,
}

/// One line a ready process adds to `/ready`'s body (e.g. its role).
pub type ReadyDetail = dyn Fn() -> String + Send + Sync;

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("flag", &self.is_ready())
            .field("check", &self.current_check().is_some())
            .finish()
    }
}

impl Readiness {
    /// Sets the flag.
    pub fn set(&self, ready: bool) {
        self.set_reason(None);
        self.0.flag.store(ready, Ordering::Release);
    }

    /// Reads the flag (the check is not run).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    /// Not ready, because of `reason` (shown in the body of `/ready`'s 503).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.0.flag.store(false, Ordering::Release);
        self.set_reason(Some(reason.into()));
    }

    fn set_reason(&self, reason: Option<String>) {
        match self.0.reason.write() {
            Ok(mut g) => *g = reason,
            Err(p) => *p.into_inner() = reason,
        }
    }

    /// Why the process is not ready, if it said (`None` when the flag is set).
    #[must_use]
    pub fn reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        match self.0.reason.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs the check `/ready` runs while the flag is set (replacing any earlier one).
    /// It should bound its own time (a probe times out after a second or so by default).
    pub fn set_check<F, Fut>(&self, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Arc<ReadyCheck> = Arc::new(move || Box::pin(check()));
        match self.0.check.write() {
            Ok(mut c) => *c = Some(check),
            Err(p) => *p.into_inner() = Some(check),
        }
    }

    /// Installs the line `/ready` answers a 200 with: `ready: <line>` (plain `ready` without).
    pub fn set_detail<F>(&self, detail: F)
    where
        F: Fn() -> String + Send + Sync + 'static,
    {
        let detail: Arc<ReadyDetail> = Arc::new(detail);
        match self.0.detail.write() {
            Ok(mut d) => *d = Some(detail),
            Err(p) => *p.into_inner() = Some(detail),
        }
    }

    /// The body of a 200 from `/ready`.
    #[must_use]
    pub fn ready_body(&self) -> String {
        let detail = match self.0.detail.read() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match detail {
            Some(f) => format!("ready: {}\n", f()),
            None => "ready\n".to_string(),
        }
    }

    fn current_check(&self) -> Option<Arc<ReadyCheck>> {
        match self.0.check.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// What `/ready` answers: `Ok` when the flag is set and the check (if any) passes, else
    /// the reason.
    ///
    /// # Errors
    /// The reason the process is not ready.
    pub async fn verdict(&self) -> Result<(), String> {
        if !self.is_ready() {
            return Err(self
                .reason()
                .unwrap_or_else(|| "not started, or stopping".into()));
        }
        match self.current_check() {
            Some(check) => check().await,
            None => Ok(()),
        }
    }
}

/// The content type of the OpenMetrics text exposition.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The text exposition of `registry` (empty if encoding fails, which prometheus-client only
/// does on a formatter error).
#[must_use]
pub fn encode_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// The admin routes: `/metrics`, `/live`, `/ready`.
pub fn admin_router(registry: Arc<Registry>, readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                        encode_metrics(&registry),
                    )
                }
            }),
        )
        .route("/live", get(|| async { (StatusCode::OK, "live\n") }))
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    match readiness.verdict().await {
                        Ok(()) => (StatusCode::OK, readiness.ready_body()),
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {reason}\n"),
                        ),
                    }
                }
            }),
        )
}

/// The admin HTTP server, running in a background task.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`AdminServer::local_addr`]) and serves
    /// [`admin_router`] until [`AdminServer::shutdown`].
    ///
    /// # Errors
    /// [`RuntimeError::Bind`] when `addr` cannot be bound.
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        readiness: Readiness,
    ) -> Result<Self, RuntimeError> {
        let bind_err = |source| RuntimeError::Bind { addr, source };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_err)?;
        let bound = listener.local_addr().map_err(bind_err)?;
        let (stop, mut stopped) = watch::channel(false);
        let app = admin_router(registry, readiness);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Ok(Self {
            addr: bound,
            stop,
            task,
        })
    }

    /// The address actually bound.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish, and waits for the task.
    ///
    /// # Errors
    /// The server's I/O error, or a task that panicked.
    pub async fn shutdown(self) -> Result<(), RuntimeError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r.map_err(RuntimeError::Serve),
            Err(e) => Err(RuntimeError::Task(e.to_string())),
        }
    }
}

/// Completes on SIGTERM or ctrl-c (SIGINT), whichever comes first. If a handler cannot be
/// installed, the other one still counts; if neither can, it never completes.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn admin_serves_metrics_liveness_and_the_readiness_flag() {
        let mut registry = Registry::with_prefix("t");
        let c: Counter = Counter::default();
        registry.register("things", "Things counted", c.clone());
        c.inc_by(3);
        let ready = Readiness::default();
        let admin = AdminServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(registry),
            ready.clone(),
        )
        .await
        .expect("bind");
        let addr = admin.local_addr();
        assert_ne!(addr.port(), 0);

        let m = get(addr, "/metrics").await;
        assert!(
            m.starts_with("HTTP/1.0 200") || m.starts_with("HTTP/1.1 200"),
            "{m}"
        );
        assert!(m.contains("t_things_total 3"), "{m}");
        assert!(m.contains("openmetrics-text"), "{m}");
        assert!(get(addr, "/live").await.contains(" 200 "));

        assert!(
            get(addr, "/ready").await.contains(" 503 "),
            "not ready at first"
        );
        ready.set(true);
        assert!(get(addr, "/ready").await.contains(" 200 "));
        ready.set(false);
        assert!(get(addr, "/ready").await.contains(" 503 "));
        assert!(get(addr, "/nothing").await.contains(" 404 "));

        // A check runs on every /ready while the flag is set; its reason is the body.
        let healthy = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        ready.set_check(move || {
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("store unreachable: test".to_string())
                }
            }
        });
        ready.set(true);
        let r = get(addr, "/ready").await;
        assert!(
            r.contains(" 503 ") && r.ends_with("not ready: store unreachable: test\n"),
            "{r}"
        );
        healthy.store(true, Ordering::SeqCst);
        assert!(get(addr, "/ready").await.contains(" 200 "));
        ready.set(false);
        let r = get(addr, "/ready").await;
        assert!(r.contains(" 503 ") && r.contains("not started"), "{r}");

        admin.shutdown().await.expect("clean stop");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "stopped"
        );
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = taken.local_addr().expect("addr");
        let e = AdminServer::bind(addr, Arc::new(Registry::default()), Readiness::default())
            .await
            .expect_err("in use");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn log_flags_parse_and_bad_filters_name_the_flag() {
        let c = Cli::try_parse_from(["x", "--log-level", "debug", "--log-format", "json"])
            .expect("parses");
        assert_eq!(c.log.log_format, LogFormat::Json);
        assert!(c.log.filter().is_ok());
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
        let bad = LogArgs {
            log_level: "ballast=loud".into(),
            log_format: LogFormat::Text,
        };
        let e = bad.filter().expect_err("bad directive").to_string();
        assert!(e.starts_with("--log-level"), "{e}");
    }
}
