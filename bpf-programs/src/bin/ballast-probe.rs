//! `ballast-probe`: a client for tests, the benchmark and the demo. Optionally joins a cgroup
//! (writes its pid to `cgroup.procs`, so the BPF programs attached there see its sockets)
//! and then a network namespace (`--netns NAME`, `/run/netns/NAME`: the cgroup first, since
//! `ip netns exec` would remount /sys and hide the cgroup mount), then connects to (or sends UDP datagrams to) one address many times and prints JSON:
//! which backend answered (each backend replies with its own id), errors by kind, whether
//! `getpeername()` / the reply's source showed the address dialled, and the slowest failure.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "ballast-probe",
    about = "connect to an address N times and report who answered"
)]
struct Cli {
    /// join this cgroup v2 directory first
    #[arg(long, env = "BALLAST_PROBE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// then enter this network namespace (a name under /run/netns, as `ip netns add` makes)
    #[arg(long, env = "BALLAST_PROBE_NETNS", value_parser = netns_name)]
    netns: Option<String>,
    /// address to dial (a service VIP:port)
    #[arg(long, env = "BALLAST_PROBE_TO")]
    to: SocketAddr,
    /// connects (or datagrams) per thread
    #[arg(long, env = "BALLAST_PROBE_COUNT", default_value_t = 1000)]
    count: u64,
    /// client threads
    #[arg(long, env = "BALLAST_PROBE_THREADS", default_value_t = 1)]
    threads: u64,
    /// UDP request/reply instead of TCP connect
    #[arg(long, env = "BALLAST_PROBE_UDP")]
    udp: bool,
    /// with --udp: each request on a fresh socket `connect()`ed to the target (as resolvers
    /// do), so the connect hook steers it and `getpeername` / the reply's source are checked
    #[arg(long, env = "BALLAST_PROBE_CONNECTED", requires = "udp")]
    connected: bool,
    /// keep going until this file exists (instead of --count)
    #[arg(long, env = "BALLAST_PROBE_UNTIL")]
    until: Option<PathBuf>,
    /// TCP keep-alive: one connection per thread, a `ping` line and its answer line per
    /// request (as an HTTP/1.1 keep-alive client); after an error, a new connection
    #[arg(long, env = "BALLAST_PROBE_HOLD", conflicts_with = "udp")]
    hold: bool,
    /// bulk TCP: per request, one connection that sends this many bytes, shuts down its
    /// sending side and reads until EOF (the byte-counting tests and bench); the report's
    /// `bytes_sent` / `bytes_received` are the totals, and the backend's reply is not an id
    #[arg(long, env = "BALLAST_PROBE_BULK_SEND", conflicts_with_all = ["udp", "hold"])]
    bulk_send: Option<u64>,
    /// pause between requests, in ms
    #[arg(long, env = "BALLAST_PROBE_INTERVAL_MS", default_value_t = 0)]
    interval_ms: u64,
}

/// A namespace name as `ip netns` accepts it: one path component under /run/netns.
fn netns_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(format!(
            "{s:?} is not a network namespace name (one component under /run/netns)"
        ));
    }
    Ok(s.to_string())
}

/// Moves the calling thread into `/run/netns/NAME`; threads started afterwards inherit it.
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = std::path::Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path)
        .with_context(|| format!("--netns: opening {}", path.display()))?;
    #[allow(unsafe_code)]
    // SAFETY: setns on an open nsfs fd; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("--netns: entering {}", path.display()));
    }
    Ok(())
}

#[derive(Default, Serialize)]
struct Report {
    ok: u64,
    errors: BTreeMap<String, u64>,
    by_backend: BTreeMap<String, u64>,
    /// getpeername (TCP) or the reply's source (UDP) was the address dialled
    peer_is_target: u64,
    max_fail_us: u64,
    /// median duration of a failed connect (the fast-fail figure; the max is noisy on a busy host)
    median_fail_us: u64,
    /// TCP connections opened (with --hold: 1 + reconnects)
    connections: u64,
    /// --bulk-send: payload bytes written and read, over all connections
    bytes_sent: u64,
    bytes_received: u64,
    /// --bulk-send: payload bytes the kernel retransmitted on those connections (TCP_INFO)
    bytes_retrans: u64,
    #[serde(skip)]
    fail_us: Vec<u64>,
}

/// One request on the held connection `conn` (opened first when there is none); an error
/// drops the connection, so the next request opens a new one (and is steered afresh).
fn one_held(
    conn: &mut Option<BufReader<TcpStream>>,
    to: SocketAddr,
    opened: &mut u64,
) -> std::io::Result<(String, bool)> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        *opened += 1;
        *conn = Some(BufReader::new(s));
    }
    let r = (|| {
        let c = conn
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no connection"))?;
        let peer_ok = c.get_ref().peer_addr()? == to;
        c.get_mut().write_all(b"ping\n")?;
        let mut line = String::new();
        if c.read_line(&mut line)? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        Ok((line.trim().to_string(), peer_ok))
    })();
    if r.is_err() {
        *conn = None;
    }
    r
}

fn one_tcp(to: SocketAddr) -> std::io::Result<(String, bool)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    let peer_ok = s.peer_addr()? == to;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 32];
    let mut n = 0;
    loop {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') || n == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && n > 0 => break,
            Err(e) => return Err(e),
        }
    }
    ballast_bpf::sys::linger_zero(&s);
    Ok((
        String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        peer_ok,
    ))
}

/// One bulk connection: writes `n` bytes, shuts down writing, reads to EOF, then keeps the
/// socket open 50 ms (a retransmission the backend sent before everything was acknowledged
/// still arrives while it is open). Returns the bytes read, the bytes this socket
/// retransmitted (final: the peer's FIN acknowledged everything), and whether `getpeername()`
/// was the address dialled.
fn one_bulk(to: SocketAddr, n: u64) -> std::io::Result<(u64, u64, bool)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    let peer_ok = s.peer_addr()? == to;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        s.write_all(&chunk[..k])?;
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let got = std::io::copy(&mut s, &mut std::io::sink())?;
    std::thread::sleep(Duration::from_millis(50));
    let (retrans, _) = ballast_bpf::sys::tcp_retrans(&s)?;
    Ok((got, retrans, peer_ok))
}

fn one_udp(sock: &UdpSocket, to: SocketAddr) -> std::io::Result<(String, bool)> {
    sock.send_to(b"ping", to)?;
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf)?;
    Ok((
        String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        from == to,
    ))
}

/// A UDP socket for requests to `to`, with a 2 s read timeout.
fn udp_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    // an IPv6 target gets a dual-stack socket bound to the wildcard, so a v4-mapped VIP
    // (::ffff:a.b.c.d) works too and the source follows the (steered) destination
    let bind = if to.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn one_udp_connected(to: SocketAddr) -> std::io::Result<(String, bool)> {
    let s = udp_socket(to)?;
    s.connect(to)?;
    let peer_ok = s.peer_addr()? == to;
    s.send(b"ping")?;
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((
        String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        peer_ok && from == to,
    ))
}

fn run(cli: &Cli, report: &Mutex<Report>) -> Result<()> {
    let udp = if cli.udp && !cli.connected {
        Some(udp_socket(cli.to)?)
    } else {
        None
    };
    let mut held: Option<BufReader<TcpStream>> = None;
    let mut opened = 0;
    let mut i = 0;
    loop {
        match &cli.until {
            Some(p) => {
                if p.exists() {
                    break;
                }
            }
            None => {
                if i >= cli.count {
                    break;
                }
            }
        }
        i += 1;
        let t = Instant::now();
        if i > 1 && cli.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(cli.interval_ms));
        }
        let mut bulk = None;
        let r = match &udp {
            Some(s) => one_udp(s, cli.to),
            None if cli.connected => one_udp_connected(cli.to),
            None if cli.hold => one_held(&mut held, cli.to, &mut opened),
            None if cli.bulk_send.is_some() => {
                opened += 1;
                let n = cli.bulk_send.unwrap_or(0);
                one_bulk(cli.to, n).map(|(got, retrans, peer_ok)| {
                    bulk = Some((n, got, retrans));
                    ("bulk".to_string(), peer_ok)
                })
            }
            None => {
                opened += 1;
                one_tcp(cli.to)
            }
        };
        let mut rep = report
            .lock()
            .map_err(|_| anyhow::anyhow!("report lock poisoned"))?;
        rep.connections += std::mem::take(&mut opened);
        if let Some((sent, got, retrans)) = bulk {
            rep.bytes_sent += sent;
            rep.bytes_received += got;
            rep.bytes_retrans += retrans;
        }
        match r {
            Ok((id, peer_ok)) => {
                rep.ok += 1;
                *rep.by_backend.entry(id).or_default() += 1;
                rep.peer_is_target += u64::from(peer_ok);
            }
            Err(e) => {
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                rep.max_fail_us = rep.max_fail_us.max(us);
                rep.fail_us.push(us);
                let kind = e.raw_os_error().map_or_else(
                    || format!("{:?}", e.kind()),
                    |c| {
                        std::io::Error::from_raw_os_error(c).kind().to_string()
                            + &format!(" (errno {c})")
                    },
                );
                *rep.errors.entry(kind).or_default() += 1;
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    if let Some(cg) = &cli.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(ns) = &cli.netns {
        enter_netns(ns)?;
    }
    let report = Arc::new(Mutex::new(Report::default()));
    let mut handles = Vec::new();
    for _ in 0..cli.threads.max(1) {
        let (cli, report) = (cli.clone(), report.clone());
        handles.push(std::thread::spawn(move || run(&cli, &report)));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let mut rep = report
        .lock()
        .map_err(|_| anyhow::anyhow!("report lock poisoned"))?;
    rep.fail_us.sort_unstable();
    rep.median_fail_us = rep.fail_us.get(rep.fail_us.len() / 2).copied().unwrap_or(0);
    println!("{}", serde_json::to_string(&*rep)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_one_component() {
        assert!(netns_name("blst-v6-1").is_ok());
        for bad in ["", ".", "..", "a/b", "../etc", "/run/netns/x"] {
            assert!(netns_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn connected_requires_udp() {
        let e = Cli::try_parse_from(["ballast-probe", "--to", "[::1]:53", "--connected"]);
        assert!(e.is_err());
        let ok = Cli::try_parse_from(["ballast-probe", "--to", "[::1]:53", "--udp", "--connected"]);
        assert!(ok.is_ok());
        let e = Cli::try_parse_from(["ballast-probe", "--to", "[::1]:53", "--netns", "a/b"]);
        assert!(e.is_err());
    }
}
