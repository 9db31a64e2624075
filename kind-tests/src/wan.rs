//! The WAN emulator: a forwarder in the wan namespace between TUN `wan-in` (where policy
//! routing sends every packet arriving from a cluster) and TUN `wan-out` (whose packets the
//! main table routes to the destination cluster's veth). Each packet is held for the delay
//! of its (source cluster, destination cluster) link, and a configurable share is dropped.
//!
//! The link table lives in `wan.json` in the state dir; the forwarder reloads it when told
//! so on its control socket `wan.sock` (line protocol: `reload` -> `ok N`, `stats` -> JSON).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{cluster_of_addr, parse_cluster_id, TUN_IN, TUN_OUT};
use crate::error::{IoContext, LabError, Result};

pub const TABLE_FILE: &str = "wan.json";
pub const SOCKET_FILE: &str = "wan.sock";
/// Upper bound of a link delay (a guard against typos such as 25000).
pub const MAX_DELAY_MS: f64 = 10_000.0;

/// One direction of a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub from: String,
    pub to: String,
    /// One-way delay.
    pub delay_ms: f64,
    /// Share of packets dropped, 0.0..=1.0.
    #[serde(default)]
    pub loss: f64,
}

/// The link table (`wan.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkTable {
    pub links: Vec<Link>,
}

impl LinkTable {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(TABLE_FILE)
    }

    pub fn load(state_dir: &Path) -> Result<LinkTable> {
        let path = Self::path(state_dir);
        let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        let t: LinkTable =
            serde_json::from_str(&text).map_err(|source| LabError::Parse { path, source })?;
        t.validate()?;
        Ok(t)
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        self.validate()?;
        let data = serde_json::to_vec_pretty(self).map_err(|e| LabError::Other(e.to_string()))?;
        crate::sys::write_atomic(&Self::path(state_dir), &data)
    }

    pub fn validate(&self) -> Result<()> {
        for l in &self.links {
            for id in [&l.from, &l.to] {
                if parse_cluster_id(id).is_none() {
                    return Err(LabError::invalid("link cluster", format!("{id:?}")));
                }
            }
            validate_delay(l.delay_ms)?;
            validate_loss(l.loss)?;
        }
        Ok(())
    }

    /// Sets both directions between `a` and `b`.
    pub fn set(&mut self, a: &str, b: &str, delay_ms: f64, loss: f64) -> Result<()> {
        if a == b {
            return Err(LabError::invalid(
                "clusters",
                format!("{a} to itself does not cross the wan"),
            ));
        }
        validate_delay(delay_ms)?;
        validate_loss(loss)?;
        for (from, to) in [(a, b), (b, a)] {
            match self.links.iter_mut().find(|l| l.from == from && l.to == to) {
                Some(l) => {
                    l.delay_ms = delay_ms;
                    l.loss = loss;
                }
                None => self.links.push(Link {
                    from: from.to_string(),
                    to: to.to_string(),
                    delay_ms,
                    loss,
                }),
            }
        }
        Ok(())
    }

    pub fn get(&self, from: &str, to: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }

    /// (src index, dst index) -> (delay, loss): what the forwarder looks up per packet.
    fn compile(&self) -> HashMap<(u8, u8), (Duration, f64)> {
        self.links
            .iter()
            .filter_map(|l| {
                let s = parse_cluster_id(&l.from)? as u8;
                let d = parse_cluster_id(&l.to)? as u8;
                Some((
                    (s, d),
                    (Duration::from_secs_f64(l.delay_ms / 1000.0), l.loss),
                ))
            })
            .collect()
    }
}

pub fn validate_delay(ms: f64) -> Result<()> {
    if !ms.is_finite() || !(0.0..=MAX_DELAY_MS).contains(&ms) {
        return Err(LabError::invalid(
            "delay",
            format!("{ms} ms: want 0..={MAX_DELAY_MS}"),
        ));
    }
    Ok(())
}

pub fn validate_loss(loss: f64) -> Result<()> {
    if !loss.is_finite() || !(0.0..=1.0).contains(&loss) {
        return Err(LabError::invalid(
            "loss",
            format!("{loss}: want a share in 0..=1"),
        ));
    }
    Ok(())
}

/// Source and destination IPv4 addresses of an IP packet (None for anything else).
pub fn ipv4_endpoints(pkt: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
    let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
    Some((src, dst))
}

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_unknown: AtomicU64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub forwarded: u64,
    pub dropped_loss: u64,
    pub dropped_unknown: u64,
    pub links: usize,
}

type Compiled = Arc<RwLock<HashMap<(u8, u8), (Duration, f64)>>>;

/// Runs the forwarder (inside the wan namespace) until killed.
pub async fn run_forwarder(state_dir: PathBuf) -> Result<()> {
    let table = LinkTable::load(&state_dir)?;
    let compiled: Compiled = Arc::new(RwLock::new(table.compile()));
    let stats = Arc::new(Stats::default());

    let tun_in = tun_rs::DeviceBuilder::new()
        .name(TUN_IN)
        .mtu(1500)
        .packet_information(false)
        .enable(true)
        .build_async()
        .ctx(|| format!("creating TUN device {TUN_IN}"))?;
    let tun_out = tun_rs::DeviceBuilder::new()
        .name(TUN_OUT)
        .mtu(1500)
        .packet_information(false)
        .enable(true)
        .build_sync()
        .ctx(|| format!("creating TUN device {TUN_OUT}"))?;

    let sock_path = state_dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener =
        UnixListener::bind(&sock_path).ctx(|| format!("binding {}", sock_path.display()))?;
    tracing::info!(links = table.links.len(), "wan forwarder up");

    let control = tokio::spawn(control_loop(
        listener,
        state_dir.clone(),
        compiled.clone(),
        stats.clone(),
    ));

    // Reader (tokio task): stamp each packet with its due time. Releaser (a thread): hold
    // packets in a heap and write each to wan-out at its due time. The thread sleeps with
    // a futex timeout (microsecond precision) rather than tokio's millisecond timer
    // wheel, which would add up to a millisecond to every hop.
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let reader_stats = stats.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = tun_in
                .recv(&mut buf)
                .await
                .ctx(|| "reading wan-in".into())?;
            let now = std::time::Instant::now();
            let pkt = &buf[..n];
            let Some((src, dst)) = ipv4_endpoints(pkt) else {
                reader_stats.dropped_unknown.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let key = match (cluster_of_addr(src), cluster_of_addr(dst)) {
                (Some(s), Some(d)) => (s, d),
                _ => {
                    reader_stats.dropped_unknown.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let (delay, loss) = match compiled.read() {
                Ok(t) => t.get(&key).copied().unwrap_or((Duration::ZERO, 0.0)),
                Err(_) => (Duration::ZERO, 0.0),
            };
            if loss > 0.0 && rand::random::<f64>() < loss {
                reader_stats.dropped_loss.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if tx.send((now + delay, pkt.to_vec())).is_err() {
                return Err(LabError::Other("the releaser thread stopped".into()));
            }
        }
    });

    let writer_stats = stats.clone();
    std::thread::Builder::new()
        .name("wan-release".into())
        .spawn(move || release_loop(rx, tun_out, writer_stats))
        .ctx(|| "starting the releaser thread".into())?;

    tokio::select! {
        r = reader => r.map_err(|e| LabError::Other(e.to_string()))??,
        r = control => r.map_err(|e| LabError::Other(e.to_string()))??,
    }
    Ok(())
}

type Due = Reverse<(std::time::Instant, u64, Vec<u8>)>;

fn release_loop(
    rx: std::sync::mpsc::Receiver<(std::time::Instant, Vec<u8>)>,
    tun_out: tun_rs::SyncDevice,
    stats: Arc<Stats>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut heap: BinaryHeap<Due> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let msg = match heap.peek() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(Reverse((due, _, _))) => {
                let wait = due.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(wait)
            }
        };
        match msg {
            Ok((due, pkt)) => {
                seq += 1;
                heap.push(Reverse((due, seq, pkt)));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = std::time::Instant::now();
        while heap.peek().is_some_and(|Reverse((t, _, _))| *t <= now) {
            if let Some(Reverse((_, _, pkt))) = heap.pop() {
                match tun_out.send(&pkt) {
                    Ok(_) => {
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!("write wan-out: {e}"),
                }
            }
        }
    }
}

async fn control_loop(
    listener: UnixListener,
    state_dir: PathBuf,
    compiled: Compiled,
    stats: Arc<Stats>,
) -> Result<()> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .ctx(|| "accepting on wan.sock".into())?;
        let state_dir = state_dir.clone();
        let compiled = compiled.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match line.trim() {
                    "reload" => match LinkTable::load(&state_dir) {
                        Ok(t) => {
                            let n = t.links.len();
                            if let Ok(mut c) = compiled.write() {
                                *c = t.compile();
                            }
                            tracing::info!(links = n, "link table reloaded");
                            format!("ok {n}")
                        }
                        Err(e) => format!("error {e}"),
                    },
                    "stats" => {
                        let links = compiled.read().map(|c| c.len()).unwrap_or(0);
                        let v = StatsView {
                            forwarded: stats.forwarded.load(Ordering::Relaxed),
                            dropped_loss: stats.dropped_loss.load(Ordering::Relaxed),
                            dropped_unknown: stats.dropped_unknown.load(Ordering::Relaxed),
                            links,
                        };
                        serde_json::to_string(&v).unwrap_or_else(|e| format!("error {e}"))
                    }
                    "ping" => "ok pong".to_string(),
                    other => format!("error unknown command {other:?}"),
                };
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one line to a running forwarder and returns its reply.
pub async fn control(state_dir: &Path, line: &str) -> Result<String> {
    let path = state_dir.join(SOCKET_FILE);
    let stream = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&path))
        .await
        .map_err(|_| LabError::Timeout(format!("connecting to {}", path.display())))?
        .ctx(|| {
            format!(
                "connecting to the wan forwarder at {} (is the lab up?)",
                path.display()
            )
        })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{line}\n").as_bytes())
        .await
        .ctx(|| "writing to wan.sock".into())?;
    let mut lines = BufReader::new(r).lines();
    let reply = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
        .await
        .map_err(|_| LabError::Timeout("the wan forwarder's reply".into()))?
        .ctx(|| "reading wan.sock".into())?
        .ok_or_else(|| LabError::Other("the wan forwarder closed the socket".into()))?;
    match reply.strip_prefix("error ") {
        Some(e) => Err(LabError::Other(format!("wan forwarder: {e}"))),
        None => Ok(reply),
    }
}

/// Blocking wrapper of [`control`] for synchronous callers.
pub fn control_blocking(state_dir: &Path, line: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx(|| "building a runtime".into())?;
    rt.block_on(control(state_dir, line))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn set_updates_both_directions_and_validates() {
        let mut t = LinkTable::default();
        t.set("c1", "c2", 25.0, 0.0).unwrap();
        t.set("c1", "c2", 40.0, 0.1).unwrap();
        assert_eq!(t.links.len(), 2);
        assert_eq!(t.get("c2", "c1").map(|l| l.delay_ms), Some(40.0));
        assert!(t.set("c1", "c1", 1.0, 0.0).is_err());
        assert!(t
            .set("c1", "c2", -1.0, 0.0)
            .unwrap_err()
            .to_string()
            .contains("delay"));
        assert!(t
            .set("c1", "c2", 1.0, 1.5)
            .unwrap_err()
            .to_string()
            .contains("loss"));
        assert!(t.set("c1", "c2", f64::NAN, 0.0).is_err());
        // Nothing half-applied by the rejected calls.
        assert_eq!(t.get("c1", "c2").map(|l| l.delay_ms), Some(40.0));
        let c = t.compile();
        assert_eq!(c.get(&(2, 1)).map(|x| x.0), Some(Duration::from_millis(40)));
    }

    #[test]
    fn table_file_round_trips_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = LinkTable::default();
        t.set("c1", "c3", 12.5, 0.0).unwrap();
        t.save(dir.path()).unwrap();
        assert_eq!(LinkTable::load(dir.path()).unwrap(), t);
        std::fs::write(
            LinkTable::path(dir.path()),
            r#"{"links": [{"from": "c1", "to": "c2", "delay_ms": 1, "jitter": 3}]}"#,
        )
        .unwrap();
        let e = LinkTable::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("jitter"), "{e}");
        std::fs::write(
            LinkTable::path(dir.path()),
            r#"{"links": [{"from": "c1", "to": "wan", "delay_ms": 1}]}"#,
        )
        .unwrap();
        let e = LinkTable::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("link cluster"), "{e}");
    }

    #[test]
    fn ipv4_endpoints_are_parsed() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 77, 1, 2]);
        p[16..20].copy_from_slice(&[10, 77, 2, 2]);
        assert_eq!(ipv4_endpoints(&p), Some(([10, 77, 1, 2], [10, 77, 2, 2])));
        p[0] = 0x60;
        assert_eq!(ipv4_endpoints(&p), None);
        assert_eq!(ipv4_endpoints(&[0x45; 10]), None);
    }
}
