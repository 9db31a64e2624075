//! The broker session: tonic over rustls mTLS with this cluster's certificate.
//!
//! One loop: connect → `Register` → four concurrent legs — the `Report` client stream (the
//! latest report every report interval), the `WatchWeights` server stream (updates grouped
//! into batches by `last_in_batch`, handed to the installer), `AckWeights` for what the
//! installer acknowledges, and the `WatchPeers` server stream (the registered clusters, for
//! the probes: [`crate::peers`]; `Register` answers the first set). When any leg fails, the session reconnects with exponential
//! backoff and jitter (backon's, see [`Backoff`]). The data plane is never touched here: while the broker is away the
//! last installed weights stay.
//!
//! Broker replicas ([`crate::brokers`]): every leg of a session runs on one replica. The
//! addresses are resolved again before every attempt; a session that ends with the replica
//! unreachable or `UNAVAILABLE` ([`moves_on`]) tries the next address (round-robin, after the
//! same backoff), any other failure the same one again. A healthy session never moves. The new
//! replica is registered with and `WatchWeights` resumes from the installed generation
//! (generations are global across replicas); a session established on another replica than
//! the last one is a failover (`ballast_agent_broker_failovers_total`, a warning naming
//! both).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use ballast_proto::v1::broker_client::BrokerClient;
use ballast_proto::v1::{
    Ack, ImportedServices, Peer, RegisterRequest, ReportRequest, WatchPeersRequest, WatchRequest,
    WeightsUpdate,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::brokers::{self, Target};
use crate::catalog::Cluster;
use crate::metrics::Metrics;

/// Errors of one session attempt.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("broker endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// With the causes (tonic's own message is only "transport error"), e.g. a certificate
    /// not valid for the name.
    #[error("connecting to the broker: {}", with_causes(.0))]
    Connect(tonic::transport::Error),
    #[error("broker {rpc}: {status}")]
    Rpc {
        rpc: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("the installer stopped")]
    InstallerGone,
}

/// `e` and its causes, `: `-separated.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !out.ends_with(&c_text) {
            out.push_str(": ");
            out.push_str(&c_text);
        }
        cause = c.source();
    }
    out
}

/// What the session needs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The broker's addresses (`--broker`, checked by [`brokers::parse_list`]); names are
    /// resolved before every attempt, each address a replica.
    pub endpoints: Vec<Uri>,
    /// TLS server name to verify (default: the endpoint's host name, also for the addresses
    /// a name resolved to).
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cluster: Cluster,
    pub node_name: String,
    pub report_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Reconnect waits: backon's exponential backoff with jitter (factor 2, no limit on the
/// number of attempts). backon jitters upwards — a wait is its delay plus up to that delay
/// again — so it is built on half the bounds: the n-th wait is in
/// `[min/2, min(max, min × 2^n))`, never above `max`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min / 2)
            .with_max_delay(max.max(min) / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            waits: builder.build(),
            max: max.max(min),
        }
    }

    /// Starts again from the shortest wait.
    pub fn reset(&mut self) {
        self.waits = self.builder.build();
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        // without_max_times: the iterator never ends; the max is the fallback all the same
        self.waits.next().unwrap_or(self.max)
    }
}

fn read(what: &'static str, path: &PathBuf) -> Result<String, SessionError> {
    std::fs::read_to_string(path).map_err(|source| SessionError::Read {
        what,
        path: path.clone(),
        source,
    })
}

/// Opens an mTLS channel to the broker replica `target`, verifying its certificate against
/// `cfg.server_name` or else the target's name (the DNS name an IP was resolved from).
pub async fn connect(cfg: &SessionConfig, target: &Target) -> Result<Channel, SessionError> {
    let ca = read("--ca", &cfg.ca)?;
    let cert = read("--cert", &cfg.cert)?;
    let key = read("--key", &cfg.key)?;
    let ep_err = |source| SessionError::Endpoint {
        endpoint: target.uri.clone(),
        source,
    };
    let mut ep = Endpoint::from_shared(target.uri.clone()).map_err(ep_err)?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    tls = tls.domain_name(
        cfg.server_name
            .clone()
            .unwrap_or_else(|| target.domain.clone()),
    );
    ep = ep
        .tls_config(tls)
        .map_err(ep_err)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    ep.connect().await.map_err(SessionError::Connect)
}

fn rpc(rpc: &'static str) -> impl Fn(tonic::Status) -> SessionError {
    move |status| SessionError::Rpc {
        rpc,
        status: Box::new(status),
    }
}

/// The channels between the session and the rest of the agent.
pub struct SessionIo {
    /// The latest report (sent every report interval while connected).
    pub reports: watch::Receiver<Option<ReportRequest>>,
    /// Batches of weights updates to install.
    pub updates: mpsc::Sender<Vec<WeightsUpdate>>,
    /// Acknowledgements to send.
    pub acks: mpsc::Receiver<Ack>,
    /// The last generation installed (for `WatchRequest.last_generation`).
    pub installed_generation: watch::Receiver<u64>,
    /// The broker's peer set (kept when the session is lost: the last known set is the best).
    pub peers: watch::Sender<Arc<Vec<Cluster>>>,
    /// `broker_replica` and `broker_failovers` are kept here.
    pub metrics: Metrics,
}

/// Publishes the broker's peer set `peers` (checked by [`crate::peers::from_broker`]; what
/// cannot be used is logged) when it differs from the last one.
fn publish_peers(tx: &watch::Sender<Arc<Vec<Cluster>>>, peers: &[Peer]) {
    let (clusters, problems) = crate::peers::from_broker(peers);
    for p in &problems {
        tracing::warn!(problem = %p, "skipping what cannot be used of a broker peer");
    }
    tx.send_if_modified(|cur| {
        if **cur == clusters {
            false
        } else {
            tracing::info!(
                peers = ?clusters.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                "peer set from the broker"
            );
            *cur = Arc::new(clusters);
            true
        }
    });
}

/// Runs one session on the replica `target` until it fails.
pub async fn run_once(
    cfg: &SessionConfig,
    target: &Target,
    io: &mut SessionIo,
    excluded: BTreeSet<String>,
    on_registered: impl FnOnce(),
) -> SessionError {
    let channel = match connect(cfg, target).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut client = BrokerClient::new(channel);
    let reg = RegisterRequest {
        cluster_id: cfg.cluster.id.clone(),
        region: cfg.cluster.region.clone().unwrap_or_default(),
        zone: cfg.cluster.zone.clone().unwrap_or_default(),
        provider: cfg.cluster.provider.clone().unwrap_or_default(),
        gateway_address: cfg
            .cluster
            .gateway
            .map(|g| g.to_string())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        node_name: cfg.node_name.clone(),
    };
    let resp = match client.register(reg).await.map_err(rpc("Register")) {
        Ok(r) => r.into_inner(),
        Err(e) => return e,
    };
    tracing::info!(generation = resp.generation, broker = %target.uri, "registered with the broker");
    publish_peers(&io.peers, &resp.peers);
    on_registered();

    // WatchPeers: the peer set for the probes. A broker without the RPC (older) leaves the
    // peer set of Register in place for the session.
    let peers_req = WatchPeersRequest {
        cluster_id: cfg.cluster.id.clone(),
        node_name: cfg.node_name.clone(),
    };
    let mut peers_client = client.clone();
    let peers_tx = io.peers.clone();
    let peers_leg = async move {
        let mut stream = match peers_client.watch_peers(peers_req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::warn!("the broker does not stream peers (older version); using the peers it answered at registration");
                return std::future::pending().await;
            }
            Err(s) => return rpc("WatchPeers")(s),
        };
        loop {
            match stream.message().await {
                Ok(Some(u)) => publish_peers(&peers_tx, &u.peers),
                Ok(None) => {
                    return rpc("WatchPeers")(tonic::Status::unavailable("stream ended"));
                }
                Err(s) => return rpc("WatchPeers")(s),
            }
        }
    };

    // Report: the latest report every interval
    let reports = io.reports.clone();
    let interval = cfg.report_interval;
    let report_stream = async_stream_reports(reports, interval, excluded);
    let mut report_client = client.clone();
    let report_leg = async move {
        match report_client.report(report_stream).await {
            Ok(summary) => SessionError::Rpc {
                rpc: "Report",
                status: Box::new(tonic::Status::unavailable(format!(
                    "report stream closed: {:?}",
                    summary.into_inner()
                ))),
            },
            Err(s) => rpc("Report")(s),
        }
    };

    // WatchWeights: batches to the installer
    let watch_req = WatchRequest {
        cluster_id: cfg.cluster.id.clone(),
        node_name: cfg.node_name.clone(),
        last_generation: *io.installed_generation.borrow(),
    };
    let mut watch_client = client.clone();
    let updates = io.updates.clone();
    let watch_leg = async move {
        let mut stream = match watch_client.watch_weights(watch_req).await {
            Ok(s) => s.into_inner(),
            Err(s) => return rpc("WatchWeights")(s),
        };
        let mut batch = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(u)) => {
                    let last = u.last_in_batch;
                    batch.push(u);
                    if last && updates.send(std::mem::take(&mut batch)).await.is_err() {
                        return SessionError::InstallerGone;
                    }
                }
                Ok(None) => {
                    return rpc("WatchWeights")(tonic::Status::unavailable("stream ended"));
                }
                Err(s) => return rpc("WatchWeights")(s),
            }
        }
    };

    // AckWeights
    let acks = &mut io.acks;
    let ack_leg = async move {
        while let Some(ack) = acks.recv().await {
            if let Err(s) = client.ack_weights(ack).await {
                return rpc("AckWeights")(s);
            }
        }
        SessionError::InstallerGone
    };

    tokio::select! {
        e = report_leg => e,
        e = watch_leg => e,
        e = ack_leg => e,
        e = peers_leg => e,
    }
}

fn async_stream_reports(
    reports: watch::Receiver<Option<ReportRequest>>,
    interval: Duration,
    excluded: BTreeSet<String>,
) -> impl futures::Stream<Item = ReportRequest> + Send + 'static {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_imports = None;
    tokio_stream::wrappers::IntervalStream::new(tick).filter_map(move |_| {
        let r = reports
            .borrow()
            .clone()
            .map(|r| imports_when_changed(without_peers(r, &excluded), &mut sent_imports));
        async move { r }
    })
}

/// Keeps the report's imports only when they differ from those last sent on this stream
/// (`sent`, updated): the broker keeps a node's declaration until the next one, so a stream
/// carries the list on its first report and after each change, not every interval.
pub fn imports_when_changed(
    mut r: ReportRequest,
    sent: &mut Option<ImportedServices>,
) -> ReportRequest {
    if r.imports.is_some() {
        if r.imports == *sent {
            r.imports = None;
        } else {
            sent.clone_from(&r.imports);
        }
    }
    r
}

/// Drops RTT and RPS samples about `excluded` clusters.
pub fn without_peers(mut r: ReportRequest, excluded: &BTreeSet<String>) -> ReportRequest {
    r.rtt.retain(|s| !excluded.contains(&s.peer_cluster_id));
    r.rps
        .retain(|s| !excluded.contains(&s.destination_cluster_id));
    r
}

/// Metadata key the broker sets on a refusal of a sample about a cluster it does not know
/// (`ballast_broker::grpc::UNKNOWN_CLUSTER_METADATA`; the agent does not link the broker).
pub const UNKNOWN_CLUSTER_METADATA: &str = "ballast-unknown-cluster";

/// The cluster a broker refusal names as unknown (an `INVALID_ARGUMENT` carrying the
/// `ballast-unknown-cluster` metadata): a peer that has not registered yet. Its samples are
/// left out of reports for a while instead of having every report refused.
pub fn unknown_peer(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::InvalidArgument {
        return None;
    }
    let id = status
        .metadata()
        .get(UNKNOWN_CLUSTER_METADATA)?
        .to_str()
        .ok()?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// Whether a session that ended with `err` should go on on the next replica: the replica is
/// unreachable (connection, transport) or says it cannot serve (`UNAVAILABLE`, e.g. a
/// replica that lost the database). Refusals of what was sent (`INVALID_ARGUMENT`,
/// `PERMISSION_DENIED`, ...) would be the same on every replica: the session stays.
pub fn moves_on(err: &SessionError) -> bool {
    match err {
        // an address that cannot be dialed (or whose endpoint cannot be built) is left for
        // the next one
        SessionError::Connect(_) | SessionError::Endpoint { .. } => true,
        SessionError::Rpc { status, .. } => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ),
        // the TLS files are the same for every replica
        SessionError::Read { .. } | SessionError::InstallerGone => false,
    }
}

/// Runs sessions forever, reconnecting with backoff and moving between broker replicas on
/// failure; never returns unless the installer goes away.
pub async fn run(cfg: SessionConfig, mut io: SessionIo) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // peers the broker does not know yet, and until when they are left out of reports
    let mut excluded: BTreeMap<String, Instant> = BTreeMap::new();
    // the target to try (None: the first), and the replica the last session registered with
    let mut current: Option<String> = None;
    let mut stay = true;
    let mut last_replica: Option<String> = None;
    let seed = brokers::spread_seed(&cfg.cluster.id, &cfg.node_name);
    loop {
        let now = Instant::now();
        excluded.retain(|_, until| *until > now);
        // resolved again on every attempt: replicas come and go
        let targets = brokers::resolve(&cfg.endpoints).await;
        let Some(target) = targets
            .get(brokers::next_after(
                &targets,
                current.as_deref(),
                stay,
                seed,
            ))
            .cloned()
        else {
            // cannot happen: parse_list refuses an empty list and a name that does not
            // resolve stays a target
            tracing::error!("no broker address to try");
            tokio::time::sleep(backoff.next_wait()).await;
            continue;
        };
        if current.as_deref().is_some_and(|c| c != target.uri) {
            tracing::info!(from = ?current, to = %target.uri, "trying the next broker replica");
        }
        current = Some(target.uri.clone());
        io.metrics
            .set_broker_replicas(targets.iter().map(|t| t.uri.as_str()), None);
        let started = Instant::now();
        let mut registered = false;
        let metrics = io.metrics.clone();
        let err = run_once(
            &cfg,
            &target,
            &mut io,
            excluded.keys().cloned().collect(),
            || {
                registered = true;
                metrics.set_broker_replicas(
                    targets.iter().map(|t| t.uri.as_str()),
                    Some(target.uri.as_str()),
                );
                if let Some(from) = last_replica.as_deref().filter(|l| *l != target.uri) {
                    metrics.broker_failovers.inc();
                    tracing::warn!(%from, to = %target.uri, "failed over to another broker replica; weights resume from the installed generation");
                }
                last_replica = Some(target.uri.clone());
            },
        )
        .await;
        io.metrics
            .set_broker_replicas(targets.iter().map(|t| t.uri.as_str()), None);
        // a session that lasted resets the backoff; one that fails right after
        // registering does not (no hot reconnect loop)
        if registered && started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        if matches!(err, SessionError::InstallerGone) {
            tracing::info!("installer gone; broker session ends");
            return;
        }
        if let SessionError::Rpc { status, .. } = &err {
            if let Some(peer) = unknown_peer(status) {
                tracing::info!(%peer, "broker does not know this peer yet; leaving it out of reports for 10s");
                excluded.insert(peer, Instant::now() + Duration::from_secs(10));
                backoff.reset();
            }
        }
        stay = !moves_on(&err) || targets.len() < 2;
        let wait = backoff.next_wait();
        tracing::warn!(error = %err, broker = %target.uri, retry_in = ?wait, next = if stay { "the same replica" } else { "the next replica" }, "broker session lost; the installed weights stay");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_go_on_the_first_report_and_after_each_change() {
        let report = |services: &[&str]| ReportRequest {
            cluster_id: "east".into(),
            imports: Some(ImportedServices {
                services: services.iter().map(|s| (*s).to_owned()).collect(),
            }),
            ..ReportRequest::default()
        };
        let mut sent = None;
        let sent_now = |r: ReportRequest| r.imports.map(|i| i.services);
        assert_eq!(
            sent_now(imports_when_changed(report(&["a/x"]), &mut sent)),
            Some(vec!["a/x".to_owned()])
        );
        assert_eq!(
            sent_now(imports_when_changed(report(&["a/x"]), &mut sent)),
            None
        );
        assert_eq!(
            sent_now(imports_when_changed(report(&["a/x", "a/y"]), &mut sent)),
            Some(vec!["a/x".to_owned(), "a/y".to_owned()])
        );
        // an empty list is a declaration too (imports nothing), sent once
        assert_eq!(
            sent_now(imports_when_changed(report(&[]), &mut sent)),
            Some(vec![])
        );
        assert_eq!(sent_now(imports_when_changed(report(&[]), &mut sent)), None);
        // a new stream starts with nothing sent
        let mut fresh = None;
        assert!(imports_when_changed(report(&[]), &mut fresh)
            .imports
            .is_some());
    }

    #[test]
    fn unknown_peer_is_read_from_the_refusal_and_left_out() {
        let refusal = |code: tonic::Code, msg: &str| {
            let mut st = tonic::Status::new(code, msg);
            st.metadata_mut()
                .insert(UNKNOWN_CLUSTER_METADATA, "west".parse().expect("ascii"));
            st
        };
        let st = refusal(
            tonic::Code::InvalidArgument,
            "rtt[0].peer_cluster_id: unknown cluster \"west\"",
        );
        assert_eq!(unknown_peer(&st).as_deref(), Some("west"));
        // another code, or the words without the metadata, name no peer
        assert_eq!(
            unknown_peer(&refusal(
                tonic::Code::Unavailable,
                "unknown cluster \"west\""
            )),
            None
        );
        assert_eq!(
            unknown_peer(&tonic::Status::invalid_argument(
                "rtt[0].peer_cluster_id: unknown cluster \"west\""
            )),
            None
        );
        assert_eq!(
            unknown_peer(&tonic::Status::invalid_argument("node_name: empty")),
            None
        );
        let r = ReportRequest {
            rtt: vec![
                ballast_proto::v1::RttSample {
                    peer_cluster_id: "west".into(),
                    ..Default::default()
                },
                ballast_proto::v1::RttSample {
                    peer_cluster_id: "south".into(),
                    ..Default::default()
                },
            ],
            rps: vec![ballast_proto::v1::RpsSample {
                destination_cluster_id: "west".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = without_peers(r, &["west".to_owned()].into());
        assert_eq!(r.rtt.len(), 1);
        assert_eq!(r.rtt[0].peer_cluster_id, "south");
        assert!(r.rps.is_empty());
    }

    #[test]
    fn only_an_unreachable_or_unavailable_replica_is_left() {
        let st = |code| SessionError::Rpc {
            rpc: "WatchWeights",
            status: Box::new(tonic::Status::new(code, "x")),
        };
        assert!(moves_on(&st(tonic::Code::Unavailable)));
        assert!(moves_on(&st(tonic::Code::Unknown)), "h2 transport errors");
        assert!(!moves_on(&st(tonic::Code::InvalidArgument)));
        assert!(!moves_on(&st(tonic::Code::PermissionDenied)));
        assert!(!moves_on(&SessionError::InstallerGone));
        assert!(!moves_on(&SessionError::Read {
            what: "--ca",
            path: "/nowhere".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..12).map(|_| b.next_wait()).collect();
        for (i, w) in waits.iter().enumerate() {
            let ceiling =
                Duration::from_millis(100 * (1u64 << i.min(20))).min(Duration::from_secs(2));
            assert!(
                *w >= Duration::from_millis(50) && *w <= ceiling,
                "wait {i}: {w:?}"
            );
        }
        // late waits are spread (jitter), not all equal
        let late: std::collections::BTreeSet<Duration> = waits[6..].iter().copied().collect();
        assert!(late.len() > 1);
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
