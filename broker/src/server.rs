//! `ballast-broker serve`: wires the store, the engine (solve loop), the gRPC services over
//! mutual TLS and the metrics endpoint. [`start`] runs everything in the background and
//! returns a handle; tests and benchmarks use it in-process.
//!
//! Probes, on the metrics port: `/live` answers 200 while the process serves; `/ready`
//! answers 200 when, checked on each request ([`broker_ready`]): the store answers a cheap
//! query on its schema within [`STORE_PROBE_TIMEOUT`], and the solve loop is running and
//! completed a round within the last [`READY_ROUNDS`] solve intervals (at least
//! [`MIN_ROUND_AGE`]). Otherwise 503 with every reason in the body, e.g.
//! `not ready: store unreachable: database: …; solver: last completed round 95 s ago …`.
//! A replica is also not ready while it is cut off from the database for longer than its
//! lease ([`Engine::availability`]); a ready replica's body names its role: `ready: leader
//! term N` or `ready: follower (leader term N)` (both 200: followers serve watches too).
//!
//! On SQLite, [`start`] first takes the database lock ([`crate::standby`]): a second process
//! on the same file waits there as a hot standby (`/ready` 503, `ballast_broker_standby` 1)
//! before anything touches the store; with `--reuseport` its listener is bound and in the
//! program's standby slot before it waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::v1::{admin_server::AdminServer, broker_server::BrokerServer};
use ballast_runtime::{AdminServer as HttpAdmin, Readiness};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::engine::{
    default_replica_id, now_ms, Engine, EngineConfig, EngineError, LoopHealth, ReplicaConfig,
};
use crate::grpc::{AdminService, AgentSettings, Authenticate, BrokerService};
use crate::listener::{ConnectionLimits, ListenerMetrics};
use crate::metrics::Metrics;
use crate::standby::{DbLock, LockAttempt, ReuseportConfig, SharedListener, StandbyError};
use crate::tls::TlsFiles;
use ballast_store::{Store, StoreError};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// gRPC listen address (port 0 = any free port).
    pub listen: SocketAddr,
    /// `/metrics` listen address; `None` = no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// `sqlite://PATH?mode=rwc` or `postgres://...`.
    pub database_url: String,
    /// mTLS material; `None` = plain text (`--insecure`).
    pub tls: Option<TlsFiles>,
    /// Re-solve period.
    pub solve_interval: Duration,
    /// Wait after an input change before re-solving (coalesces bursts of reports).
    pub debounce: Duration,
    /// Told to agents at registration.
    pub report_interval: Duration,
    /// Largest accepted gRPC message.
    pub max_message_bytes: usize,
    /// Connection hygiene of the gRPC listener.
    pub connections: ConnectionSettings,
    /// Model and staleness settings.
    pub engine: EngineConfig,
    /// `--reuseport`: share the gRPC port with a hot standby (see [`crate::standby`]).
    pub reuseport: Option<ReuseportConfig>,
    /// This replica's id and lease time (`force` is set from the database: SQLite takes the
    /// lease by force, PostgreSQL elects).
    pub replica: ReplicaConfig,
    /// How many replicas the operator runs (`--replicas`): more than 1 needs PostgreSQL.
    pub replicas: u32,
}

impl ServeConfig {
    /// Defaults for everything but the listen address, database and TLS.
    #[must_use]
    pub fn new(listen: SocketAddr, database_url: String, tls: Option<TlsFiles>) -> Self {
        Self {
            listen,
            metrics_addr: None,
            database_url,
            tls,
            solve_interval: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
            report_interval: Duration::from_secs(10),
            max_message_bytes: 4 * 1024 * 1024,
            connections: ConnectionSettings::default(),
            engine: EngineConfig::default(),
            reuseport: None,
            replica: ReplicaConfig {
                replica_id: default_replica_id(),
                lease: DEFAULT_LEASE_TIME,
                force: false,
                slow_round: None,
            },
            replicas: 1,
        }
    }
}

/// Default of `--lease-time`.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(5);

/// Bounds on what one client can hold of the gRPC listener (flags of `serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// A connection that has not completed the TLS handshake by then is closed.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 pings on idle connections, every this long...
    pub keepalive_interval: Duration,
    /// ...and a connection whose ping is not answered within this is closed.
    pub keepalive_timeout: Duration,
    /// Open connections in all, and from one IP address.
    pub limits: ConnectionLimits,
    /// Concurrent HTTP/2 streams (calls) on one connection.
    pub max_streams_per_connection: u32,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            limits: ConnectionLimits {
                max_connections: 10_000,
                max_per_peer: 512,
            },
            max_streams_per_connection: 64,
        }
    }
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(String),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Admin(ballast_runtime::RuntimeError),
    #[error(transparent)]
    Standby(#[from] StandbyError),
    /// The store could not be opened at start (never a silent fallback).
    #[error("--database {url}: cannot open the store: {source}")]
    Database { url: String, source: StoreError },
    /// `--replicas` above 1 on a store that cannot share one.
    #[error("--replicas {replicas} needs a PostgreSQL --database (SQLite serves one process); got --database {url}")]
    ReplicasNeedPostgres { replicas: u32, url: String },
}

/// A running broker.
#[derive(Debug)]
pub struct Running {
    /// The gRPC address actually bound.
    pub addr: SocketAddr,
    /// The metrics address actually bound.
    pub metrics_addr: Option<SocketAddr>,
    engine: Arc<Engine>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    admin: Option<HttpAdmin>,
    readiness: Readiness,
    /// SQLite: the single-writer lock, held until the process ends.
    _db_lock: Option<DbLock>,
}

impl Running {
    /// The engine (current generation, manual rounds).
    #[must_use]
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops the servers and the solve loop, and closes the store.
    pub async fn stop(self) {
        self.readiness.set(false);
        let _ = self.shutdown.send(true);
        if let Some(admin) = self.admin {
            if let Err(e) = admin.shutdown().await {
                warn!(error = %e, "admin server stopped");
            }
        }
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                warn!("a server task did not stop within 5 s; aborted");
                abort.abort();
            }
        }
        // Acks taken after the flusher's last flush (the servers stop concurrently).
        if let Err(e) = self.engine.flush_acks().await {
            warn!(error = %e, pending = self.engine.pending_acks(), "writing acks at stop failed");
        }
        self.engine.store().close().await;
    }

    /// Waits until a task ends (the servers run until [`Running::stop`] or a fatal error).
    pub async fn wait(&mut self) {
        if let Some(t) = self.tasks.first_mut() {
            let _ = t.await;
        }
    }
}

/// Opens the store, loads the last generation, binds the listeners and starts serving.
///
/// # Errors
/// [`ServeError`] when the store, a listener or the TLS material is unusable.
pub async fn start(cfg: ServeConfig) -> Result<Running, ServeError> {
    let sqlite = cfg.database_url.starts_with("sqlite:");
    if sqlite && cfg.replicas > 1 {
        return Err(ServeError::ReplicasNeedPostgres {
            replicas: cfg.replicas,
            url: redact(&cfg.database_url),
        });
    }
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::default();
    // Hot standby: the shared listener first (a standby's socket takes slot 1, so the kernel
    // has somewhere to queue connections the moment the primary's is gone), then the
    // database lock; nothing opens the store before it is held.
    let mut shared = match &cfg.reuseport {
        Some(r) => Some(SharedListener::bind(cfg.listen, r)?),
        None => None,
    };
    let (db_lock, mut http_admin) =
        lock_database(&cfg, &metrics, &readiness, shared.as_mut()).await?;
    let url = if sqlite {
        cfg.database_url.clone()
    } else {
        with_application_name(&cfg.database_url, &cfg.replica.replica_id)
    };
    let store = Store::connect(&url)
        .await
        .map_err(|source| ServeError::Database {
            url: redact(&cfg.database_url),
            source,
        })?;
    let p = cfg.engine.prices;
    let now = crate::engine::now_ms();
    for (tier, v) in [
        ("same_zone", p.same_zone),
        ("cross_zone", p.cross_zone),
        ("cross_region", p.cross_region),
        ("internet", p.internet),
    ] {
        store.set_price(tier, v, now).await?;
    }
    let replica = ReplicaConfig {
        force: sqlite,
        ..cfg.replica.clone()
    };
    let engine =
        Arc::new(Engine::load_replica(store, cfg.engine.clone(), metrics.clone(), replica).await?);
    let (shutdown, shutdown_rx) = watch::channel(false);

    let listener = match shared {
        Some(mut s) => {
            s.promote()?;
            s.into_listener()
        }
        None => tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?,
    };
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let insecure = cfg.tls.is_none();
    let settings = AgentSettings {
        report_interval_ms: i64::try_from(cfg.report_interval.as_millis()).unwrap_or(i64::MAX),
        max_message_bytes: cfg.max_message_bytes as u64,
    };
    // Identity is established once per call, by the interceptors.
    let broker = InterceptedService::new(
        BrokerServer::new(BrokerService::new(
            engine.clone(),
            settings,
            shutdown_rx.clone(),
        ))
        .max_decoding_message_size(cfg.max_message_bytes),
        Authenticate {
            insecure,
            admin_only: false,
            metrics: metrics.clone(),
        },
    );
    let admin = InterceptedService::new(
        AdminServer::new(AdminService::new(engine.clone()))
            .max_decoding_message_size(cfg.max_message_bytes),
        Authenticate {
            insecure,
            admin_only: true,
            metrics: metrics.clone(),
        },
    );
    let conn = cfg.connections;
    let mut builder = Server::builder()
        .layer(crate::grpc::oversize::layer())
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(conn.keepalive_interval))
        .http2_keepalive_timeout(Some(conn.keepalive_timeout))
        .max_concurrent_streams(Some(conn.max_streams_per_connection));
    if let Some(tls) = &cfg.tls {
        builder = builder
            .tls_config(tls.server_config().timeout(conn.tls_handshake_timeout))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let router = builder.add_service(broker).add_service(admin);
    let mut tasks = Vec::new();
    let mut sd = shutdown_rx.clone();
    let metrics_l = metrics.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = crate::listener::incoming(
            listener,
            conn.limits,
            ListenerMetrics {
                refused: metrics_l.connections_refused.clone(),
                fd_exhausted: metrics_l.accept_fd_exhausted.clone(),
            },
        );
        let signal = async move {
            let _ = sd.wait_for(|v| *v).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
            warn!(error = %e, "grpc server stopped");
        }
    }));

    // /metrics, /live and /ready (already up when this process waited as a standby); ready
    // from here on (store open, generation loaded, gRPC listener bound) until stop.
    let admin = match http_admin.take() {
        Some(a) => Some(a),
        None => bind_admin(&cfg, &metrics, &readiness).await?,
    };
    let metrics_addr = admin.as_ref().map(HttpAdmin::local_addr);
    let (e, interval) = (engine.clone(), cfg.solve_interval);
    readiness.set_check(move || {
        let e = e.clone();
        async move { broker_ready(&e, interval).await }
    });
    let e = engine.clone();
    readiness.set_detail(move || e.role_line());
    // Leadership (renew or take the lease) and, on PostgreSQL, the generation listener.
    tasks.push(tokio::spawn(engine.clone().follow(shutdown_rx.clone())));
    // The first round before ready: fresh weights, and /ready's "a round completed" holds
    // (a leader's round: the lease first, if it is free).
    // The lease loop runs from here, so a slow first round does not outlive the lease.
    engine.lease_attempt().await;
    tasks.push(tokio::spawn(engine.clone().lead(shutdown_rx.clone())));
    engine.run_loop_round().await;
    let e = engine.clone();
    let (interval, debounce) = (cfg.solve_interval, cfg.debounce);
    tasks.push(tokio::spawn(e.run(interval, debounce, shutdown_rx.clone())));
    // Acks are coalesced in memory and written in batches (a last flush at shutdown).
    tasks.push(tokio::spawn(
        engine
            .clone()
            .flush_acks_every(crate::engine::ACK_FLUSH_INTERVAL, shutdown_rx),
    ));
    readiness.set(true);
    info!(%addr, ?metrics_addr, tls = !insecure, db = %redact(&cfg.database_url), "broker serving");
    Ok(Running {
        addr,
        metrics_addr,
        engine,
        shutdown,
        tasks,
        admin,
        readiness,
        _db_lock: db_lock,
    })
}

async fn bind_admin(
    cfg: &ServeConfig,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Result<Option<HttpAdmin>, ServeError> {
    match cfg.metrics_addr {
        Some(maddr) => Ok(Some(
            HttpAdmin::bind(maddr, metrics.registry(), readiness.clone())
                .await
                .map_err(ServeError::Admin)?,
        )),
        None => Ok(None),
    }
}

/// On SQLite, takes the database lock, waiting as a hot standby while another process holds
/// it: `--reuseport`'s socket in slot 1, `ballast_broker_standby` 1, `/metrics` and `/live`
/// up (returned, bound early) and `/ready` 503 with the reason. PostgreSQL and in-memory
/// SQLite: no lock.
async fn lock_database(
    cfg: &ServeConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shared: Option<&mut SharedListener>,
) -> Result<(Option<DbLock>, Option<HttpAdmin>), ServeError> {
    let Some(db) = crate::standby::sqlite_file(&cfg.database_url) else {
        return Ok((None, None));
    };
    let (holder, waiter) = match DbLock::try_acquire(&db)? {
        LockAttempt::Acquired(lock) => return Ok((Some(lock), None)),
        LockAttempt::Held { holder, waiter } => (holder, waiter),
    };
    if let Some(s) = shared {
        s.enter_standby()?;
    }
    let who = holder.map_or_else(|| "another process".to_string(), |p| format!("pid {p}"));
    warn!(
        lock = %waiter.path().display(),
        "waiting for the database lock held by {who} (hot standby)"
    );
    metrics.standby.set(1);
    readiness.set_not_ready(format!(
        "hot standby: waiting for the database lock held by {who}"
    ));
    let admin = bind_admin(cfg, metrics, readiness).await?;
    let t0 = std::time::Instant::now();
    let lock = waiter.wait().await?;
    metrics.standby.set(0);
    let waited = t0.elapsed();
    info!(
        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        lock = %lock.path().display(),
        "hot standby taking over: database lock acquired after {:.3} s of waiting",
        waited.as_secs_f64()
    );
    Ok((Some(lock), admin))
}

/// How long `/ready` waits for the store's answer.
pub const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// `/ready` wants a completed solver round within this many solve intervals…
pub const READY_ROUNDS: u32 = 3;
/// …and never asks for one more recent than this (short intervals, slow rounds).
pub const MIN_ROUND_AGE: Duration = Duration::from_secs(10);

/// The broker's readiness, as `/ready` reports it: the store answers (a cheap query within
/// [`STORE_PROBE_TIMEOUT`]) and the solve loop is solving ([`solver_verdict`]).
///
/// # Errors
/// Every reason it is not ready, joined by `"; "`.
pub async fn broker_ready(engine: &Engine, solve_interval: Duration) -> Result<(), String> {
    let mut reasons = Vec::new();
    if let Err(r) = engine.availability() {
        reasons.push(r);
    }
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, engine.store().ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => reasons.push(format!("store unreachable: {e}")),
        Err(_) => reasons.push(format!(
            "store unreachable: no answer within {} s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
    if let Err(r) = solver_verdict(&engine.loop_health(), now_ms(), solve_interval) {
        reasons.push(r);
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        tracing::debug!(reasons = %reasons.join("; "), "not ready");
        Err(reasons.join("; "))
    }
}

/// Whether the solve loop is solving as of `now_ms`: running, and a round completed within
/// [`READY_ROUNDS`] × `solve_interval` (at least [`MIN_ROUND_AGE`]). Pure.
///
/// # Errors
/// The reason, with the last round's error when it failed.
pub fn solver_verdict(
    health: &LoopHealth,
    now_ms: i64,
    solve_interval: Duration,
) -> Result<(), String> {
    let last_error = health
        .last_error
        .as_ref()
        .map_or_else(String::new, |e| format!("; its last round failed: {e}"));
    if !health.running {
        return Err(format!("solver: the solve loop is not running{last_error}"));
    }
    let Some(last) = health.last_round_ok_ms else {
        return Err(format!("solver: no round completed yet{last_error}"));
    };
    let max_age = (solve_interval * READY_ROUNDS).max(MIN_ROUND_AGE);
    let age_ms = now_ms.saturating_sub(last);
    if age_ms > i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX) {
        return Err(format!(
            "solver: last completed round {} s ago, more than {READY_ROUNDS} solve intervals \
             ({} s){last_error}",
            age_ms / 1000,
            max_age.as_secs()
        ));
    }
    Ok(())
}

/// `url` with `application_name=<replica id>` (PostgreSQL shows it in `pg_stat_activity`)
/// unless it names one already. The id is cut to PostgreSQL's 63 bytes and to URL-safe
/// characters.
fn with_application_name(url: &str, replica_id: &str) -> String {
    if url.contains("application_name=") {
        return url.to_string();
    }
    let name: String = replica_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(running: bool, last: Option<i64>, err: Option<&str>) -> LoopHealth {
        LoopHealth {
            running,
            last_round_ok_ms: last,
            last_error: err.map(str::to_string),
        }
    }

    #[test]
    fn solver_is_ready_only_while_its_loop_completes_rounds() {
        let i = Duration::from_secs(30);
        let now = 1_000_000;
        assert_eq!(
            solver_verdict(&health(true, Some(now - 89_000), None), now, i),
            Ok(())
        );
        let e = solver_verdict(
            &health(true, Some(now - 95_000), Some("database: gone")),
            now,
            i,
        )
        .expect_err("stale");
        assert!(
            e.contains("95 s ago") && e.contains("(90 s)") && e.contains("database: gone"),
            "{e}"
        );
        let e = solver_verdict(&health(true, None, None), now, i).expect_err("no round");
        assert!(e.contains("no round completed yet"), "{e}");
        let e = solver_verdict(&health(false, Some(now), None), now, i).expect_err("stopped");
        assert!(e.contains("not running"), "{e}");
        // Short intervals: never stricter than MIN_ROUND_AGE.
        let short = Duration::from_millis(100);
        assert_eq!(
            solver_verdict(&health(true, Some(now - 9_000), None), now, short),
            Ok(())
        );
        assert!(solver_verdict(&health(true, Some(now - 11_000), None), now, short).is_err());
    }
}
