//! RTT to every peer cluster's gateway.
//!
//! ICMP echo with surge-ping (an ICMP DGRAM socket needs `net.ipv4.ping_group_range` to
//! cover the agent's group; a RAW socket needs CAP_NET_RAW — surge-ping tries DGRAM, then
//! RAW). Where neither is permitted (or with `ProbeMode::Tcp`), a TCP connect to the
//! gateway's probe port measures the handshake instead: an accepted connection or a refusal
//! (RST) both prove the path and give an RTT.
//!
//! Each peer keeps an EWMA of its RTT, the outcome of its last `loss_window` probes and its
//! run of consecutive failures. A peer whose last `unhealthy_after` probes all failed is
//! [`Reachability::Unreachable`] — reported as such, never as a large RTT — and the weight
//! expansion drops it at once (see [`crate::weights`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use surge_ping::{Client, Config as PingConfig, PingIdentifier, PingSequence, ICMP};
use tokio::sync::watch;

use crate::catalog::ClusterId;

/// How RTT is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// ICMP when a socket can be opened, TCP connect otherwise.
    Auto,
    /// ICMP only (fails to start if not permitted).
    Icmp,
    /// TCP connect only.
    Tcp,
}

/// Probe settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    pub mode: ProbeMode,
    /// Time between rounds.
    pub interval: Duration,
    /// How long one probe waits for its answer.
    pub timeout: Duration,
    /// EWMA weight of a new sample, in (0, 1]: `ewma = alpha × sample + (1 − alpha) × ewma`.
    pub ewma_alpha: f64,
    /// Number of recent probes loss is counted over.
    pub loss_window: usize,
    /// Consecutive failures after which a peer is unreachable.
    pub unhealthy_after: u32,
    /// Port of the TCP-connect probe.
    pub tcp_port: u16,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            mode: ProbeMode::Auto,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(800),
            ewma_alpha: 0.3,
            loss_window: 20,
            unhealthy_after: 3,
            tcp_port: 443,
        }
    }
}

/// Errors starting the prober.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("ICMP probes are not permitted ({0}); allow them (net.ipv4.ping_group_range or CAP_NET_RAW) or use --probe-mode tcp/auto")]
    IcmpNotPermitted(io::Error),
}

/// The method a probe used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Icmp,
    Tcp,
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered after this long.
    Answered(Duration),
    /// No answer within the timeout, no route, …
    Failed(String),
}

/// Whether a peer answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reachability {
    /// Not probed yet.
    Unknown,
    /// Answering; smoothed and last RTT.
    Reachable {
        rtt_ewma: Duration,
        rtt_last: Duration,
    },
    /// The last `unhealthy_after` probes failed.
    Unreachable,
}

/// Everything known about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub gateway: IpAddr,
    pub reachability: Reachability,
    /// Lost share of the last `loss_window` probes, 0..=1.
    pub loss: f64,
    pub sent: u64,
    pub failed: u64,
    pub consecutive_failures: u32,
    pub method: Option<Method>,
    pub last_error: Option<String>,
    /// EWMA kept across failures so a recovering peer does not start from scratch.
    rtt_ewma: Option<Duration>,
    window: VecDeque<bool>,
}

impl PeerStatus {
    /// A peer not probed yet.
    pub fn new(gateway: IpAddr) -> Self {
        Self {
            gateway,
            reachability: Reachability::Unknown,
            loss: 0.0,
            sent: 0,
            failed: 0,
            consecutive_failures: 0,
            method: None,
            last_error: None,
            rtt_ewma: None,
            window: VecDeque::new(),
        }
    }

    /// Folds one probe outcome in (pure).
    pub fn record(&mut self, outcome: &Outcome, method: Method, cfg: &ProbeConfig) {
        self.sent += 1;
        self.method = Some(method);
        let ok = matches!(outcome, Outcome::Answered(_));
        self.window.push_back(ok);
        while self.window.len() > cfg.loss_window.max(1) {
            self.window.pop_front();
        }
        let lost = self.window.iter().filter(|ok| !**ok).count();
        self.loss = lost as f64 / self.window.len() as f64;
        match outcome {
            Outcome::Answered(rtt) => {
                self.consecutive_failures = 0;
                self.last_error = None;
                let ewma = match self.rtt_ewma {
                    None => *rtt,
                    Some(prev) => Duration::from_secs_f64(
                        cfg.ewma_alpha * rtt.as_secs_f64()
                            + (1.0 - cfg.ewma_alpha) * prev.as_secs_f64(),
                    ),
                };
                self.rtt_ewma = Some(ewma);
                self.reachability = Reachability::Reachable {
                    rtt_ewma: ewma,
                    rtt_last: *rtt,
                };
            }
            Outcome::Failed(why) => {
                self.failed += 1;
                self.consecutive_failures += 1;
                self.last_error = Some(why.clone());
                if self.consecutive_failures >= cfg.unhealthy_after.max(1) {
                    self.reachability = Reachability::Unreachable;
                }
            }
        }
    }

    pub fn is_unreachable(&self) -> bool {
        self.reachability == Reachability::Unreachable
    }
}

/// Peers' status by cluster id.
pub type PeerTable = BTreeMap<ClusterId, PeerStatus>;

/// The clusters that do not answer probes (for [`crate::weights::expand`]).
pub fn unhealthy(table: &PeerTable) -> BTreeSet<ClusterId> {
    table
        .iter()
        .filter(|(_, s)| s.is_unreachable())
        .map(|(c, _)| c.clone())
        .collect()
}

/// One ICMP echo or TCP connect at a time, to one address.
#[derive(Clone)]
pub struct Pinger {
    icmp: Option<Client>,
    cfg: ProbeConfig,
    ident: u16,
}

impl Pinger {
    /// Opens the ICMP socket (per the mode). `Auto` falls back to TCP when ICMP is not
    /// permitted; `Icmp` fails instead. Must run inside a tokio runtime.
    pub fn new(cfg: ProbeConfig) -> Result<Self, ProbeError> {
        let icmp = match cfg.mode {
            ProbeMode::Tcp => None,
            ProbeMode::Icmp => Some(
                Client::new(&PingConfig::builder().kind(ICMP::V4).build())
                    .map_err(ProbeError::IcmpNotPermitted)?,
            ),
            ProbeMode::Auto => match Client::new(&PingConfig::builder().kind(ICMP::V4).build()) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, port = cfg.tcp_port, "ICMP not permitted; probing with TCP connect");
                    None
                }
            },
        };
        Ok(Self {
            icmp,
            cfg,
            ident: rand::random(),
        })
    }

    /// The method probes of IPv4 gateways use.
    pub fn method(&self) -> Method {
        if self.icmp.is_some() {
            Method::Icmp
        } else {
            Method::Tcp
        }
    }

    /// Probes `ip` once. IPv6 gateways are probed with TCP (the ICMP socket is IPv4).
    pub async fn probe(&self, ip: IpAddr, seq: u16) -> (Outcome, Method) {
        match (&self.icmp, ip) {
            (Some(client), IpAddr::V4(_)) => {
                let mut pinger = client.pinger(ip, PingIdentifier(self.ident)).await;
                pinger.timeout(self.cfg.timeout);
                let outcome = match pinger.ping(PingSequence(seq), &[0u8; 16]).await {
                    Ok((_, rtt)) => Outcome::Answered(rtt),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                (outcome, Method::Icmp)
            }
            _ => (
                tcp_probe(SocketAddr::new(ip, self.cfg.tcp_port), self.cfg.timeout).await,
                Method::Tcp,
            ),
        }
    }
}

/// Times a TCP handshake to `addr`. An accepted connection and a refusal both answer.
pub async fn tcp_probe(addr: SocketAddr, timeout: Duration) -> Outcome {
    let start = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Outcome::Answered(start.elapsed()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Outcome::Answered(start.elapsed())
        }
        Ok(Err(e)) => Outcome::Failed(format!("connect {addr}: {e}")),
        Err(_) => Outcome::Failed(format!("connect {addr}: no answer within {timeout:?}")),
    }
}

/// Probes a changing set of targets every interval and publishes the table.
pub struct Prober {
    pinger: Pinger,
    cfg: ProbeConfig,
    table: watch::Sender<Arc<PeerTable>>,
}

impl Prober {
    /// Opens the sockets (see [`Pinger::new`]).
    pub fn new(cfg: ProbeConfig) -> Result<Self, ProbeError> {
        let pinger = Pinger::new(cfg.clone())?;
        let (table, _) = watch::channel(Arc::new(PeerTable::new()));
        Ok(Self { pinger, cfg, table })
    }

    /// Subscribes to the table (updated after every round).
    pub fn subscribe(&self) -> watch::Receiver<Arc<PeerTable>> {
        self.table.subscribe()
    }

    pub fn method(&self) -> Method {
        self.pinger.method()
    }

    /// Runs one round: probes every distinct gateway once, concurrently, and folds the
    /// outcomes into every peer behind it. Peers no longer targeted are forgotten; a peer
    /// whose gateway changed starts afresh.
    pub async fn round(&self, targets: &[(ClusterId, IpAddr)], seq: u16) -> Arc<PeerTable> {
        let gateways: BTreeSet<IpAddr> = targets.iter().map(|(_, ip)| *ip).collect();
        let answers: BTreeMap<IpAddr, (Outcome, Method)> =
            futures::future::join_all(gateways.into_iter().map(|ip| {
                let pinger = &self.pinger;
                async move { (ip, pinger.probe(ip, seq).await) }
            }))
            .await
            .into_iter()
            .collect();
        let prev = self.table.borrow().clone();
        let mut next = PeerTable::new();
        for (cluster, ip) in targets {
            let (cluster, ip) = (cluster.clone(), *ip);
            let Some((outcome, method)) = answers.get(&ip).cloned() else {
                continue;
            };
            let mut st = match prev.get(&cluster) {
                Some(s) if s.gateway == ip => s.clone(),
                _ => PeerStatus::new(ip),
            };
            let was_unreachable = st.is_unreachable();
            st.record(&outcome, method, &self.cfg);
            if st.is_unreachable() && !was_unreachable {
                tracing::warn!(%cluster, gateway = %ip, error = ?st.last_error, "peer unreachable");
            } else if was_unreachable && !st.is_unreachable() {
                tracing::info!(%cluster, gateway = %ip, "peer reachable again");
            }
            next.insert(cluster, st);
        }
        let next = Arc::new(next);
        self.table.send_replace(next.clone());
        next
    }

    /// Probes the catalog's targets (re-read from `targets` before each round) forever.
    pub async fn run(self, mut targets: watch::Receiver<Vec<(ClusterId, IpAddr)>>) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u16 = 0;
        loop {
            tick.tick().await;
            let t = targets.borrow_and_update().clone();
            self.round(&t, seq).await;
            seq = seq.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProbeConfig {
        ProbeConfig {
            mode: ProbeMode::Auto,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            ewma_alpha: 0.5,
            loss_window: 4,
            unhealthy_after: 2,
            tcp_port: 1,
        }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn ewma_loss_and_unreachable_state() {
        let c = cfg();
        let mut s = PeerStatus::new(IP);
        assert_eq!(s.reachability, Reachability::Unknown);
        s.record(
            &Outcome::Answered(Duration::from_millis(100)),
            Method::Icmp,
            &c,
        );
        s.record(
            &Outcome::Answered(Duration::from_millis(50)),
            Method::Icmp,
            &c,
        );
        let Reachability::Reachable { rtt_ewma, rtt_last } = s.reachability else {
            panic!("reachable expected, got {:?}", s.reachability)
        };
        assert_eq!(rtt_ewma, Duration::from_millis(75));
        assert_eq!(rtt_last, Duration::from_millis(50));
        // one failure: still reachable (threshold 2), loss counted
        s.record(&Outcome::Failed("x".into()), Method::Icmp, &c);
        assert!(!s.is_unreachable());
        assert!((s.loss - 1.0 / 3.0).abs() < 1e-9);
        // second consecutive failure: unreachable, not a large RTT
        s.record(&Outcome::Failed("x".into()), Method::Icmp, &c);
        assert_eq!(s.reachability, Reachability::Unreachable);
        assert!((s.loss - 0.5).abs() < 1e-9);
        assert_eq!(unhealthy(&[("west".to_owned(), s.clone())].into()).len(), 1);
        // window of 4 slides; recovery keeps the old EWMA
        s.record(
            &Outcome::Answered(Duration::from_millis(25)),
            Method::Icmp,
            &c,
        );
        assert_eq!(
            s.reachability,
            Reachability::Reachable {
                rtt_ewma: Duration::from_millis(50),
                rtt_last: Duration::from_millis(25)
            }
        );
        assert!((s.loss - 0.5).abs() < 1e-9); // [ok, fail, fail, ok]
        assert_eq!((s.sent, s.failed), (5, 2));
    }

    #[tokio::test]
    async fn tcp_probe_measures_a_real_listener_and_a_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        assert!(matches!(
            tcp_probe(addr, Duration::from_secs(1)).await,
            Outcome::Answered(d) if d < Duration::from_secs(1)
        ));
        drop(l);
        // nothing listens now: the RST answers, so the path is up
        assert!(matches!(
            tcp_probe(addr, Duration::from_secs(1)).await,
            Outcome::Answered(_)
        ));
    }

    #[tokio::test]
    async fn tcp_mode_prober_reports_rtt_per_peer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let p = Prober::new(ProbeConfig {
            mode: ProbeMode::Tcp,
            tcp_port: port,
            ..cfg()
        })
        .expect("tcp needs no privilege");
        assert_eq!(p.method(), Method::Tcp);
        let t = p.round(&[("west".into(), IP)], 0).await;
        let st = &t["west"];
        assert_eq!(st.method, Some(Method::Tcp));
        assert!(
            matches!(st.reachability, Reachability::Reachable { .. }),
            "{st:?}"
        );
        // peers sharing a gateway share one probe (and both answer)
        let t = p
            .round(&[("west".into(), IP), ("south".into(), IP)], 1)
            .await;
        assert_eq!(t.len(), 2);
        assert!(
            t.values()
                .all(|s| matches!(s.reachability, Reachability::Reachable { .. })),
            "{t:?}"
        );
        // a target that goes away is forgotten
        let t = p.round(&[], 2).await;
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn icmp_or_fallback_probe_of_loopback_answers() {
        // Auto: ICMP if this process may open an ICMP socket (root or ping_group_range),
        // TCP connect otherwise; either way loopback answers.
        let p = Prober::new(cfg()).expect("auto never fails");
        let t = p
            .round(&[("self".into(), IP), ("twin".into(), IP)], 7)
            .await;
        assert!(
            matches!(t["twin"].reachability, Reachability::Reachable { .. }),
            "{t:?}"
        );
        let st = &t["self"];
        assert!(
            matches!(st.reachability, Reachability::Reachable { rtt_ewma, .. } if rtt_ewma < Duration::from_millis(300)),
            "{st:?}"
        );
        eprintln!("loopback probe via {:?}", st.method);
    }

    fn is_root() -> bool {
        ballast_bpf::sys::root_for_tests()
    }

    /// Runs `f` on a thread moved into a fresh network namespace (only `lo`, down: no
    /// route anywhere, so nothing can leave) with its own runtime.
    fn in_empty_netns<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::Result<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
            f()
        })
        .join()
    }

    #[test]
    fn root_icmp_loopback_answers() {
        if !is_root() {
            eprintln!("skipped: needs root (CAP_NET_RAW) for a guaranteed ICMP socket");
            return;
        }
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let p = Prober::new(ProbeConfig {
                mode: ProbeMode::Icmp,
                ..cfg()
            })
            .expect("root may open ICMP sockets");
            assert_eq!(p.method(), Method::Icmp);
            let t = p.round(&[("self".into(), IP)], 1).await;
            assert!(
                matches!(t["self"].reachability, Reachability::Reachable { .. }),
                "{:?}",
                t["self"]
            );
        });
    }

    #[test]
    fn root_unroutable_peer_is_unreachable_icmp_and_tcp() {
        if !is_root() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let tables = in_empty_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut out = Vec::new();
                for mode in [ProbeMode::Icmp, ProbeMode::Tcp] {
                    let p = Prober::new(ProbeConfig {
                        mode,
                        tcp_port: 9,
                        ..cfg()
                    })
                    .expect("prober");
                    // loopback is down in the new namespace: no route to it
                    let targets = [("west".to_owned(), IP)];
                    let first = p.round(&targets, 1).await;
                    let second = p.round(&targets, 2).await;
                    out.push((mode, first["west"].clone(), second["west"].clone()));
                }
                out
            })
        })
        .expect("netns thread");
        for (mode, first, second) in tables {
            assert!(
                !first.is_unreachable(),
                "{mode:?}: one failure is below the threshold"
            );
            assert_eq!(first.consecutive_failures, 1, "{mode:?}: {first:?}");
            assert_eq!(
                second.reachability,
                Reachability::Unreachable,
                "{mode:?}: {second:?}"
            );
            assert!((second.loss - 1.0).abs() < 1e-9);
            assert!(second.last_error.is_some());
        }
    }
}
