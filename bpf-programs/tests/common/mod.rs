//! Shared helpers of the root tests: a cgroup and a pin dir per test (removed on drop), real
//! loopback backends that answer with their own id, and the `ballast-probe` client.
#![allow(dead_code, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use ballast_bpf::{BackendSpec, Dataplane, Protocol, SelectMode, ServiceSpec};

pub fn is_root() -> bool {
    ballast_bpf::sys::root_for_tests()
}

/// Returns false (and prints why) when the test cannot run here.
pub fn can_run(test: &str) -> bool {
    if !is_root() {
        println!("skipping {test}: needs root (BPF, cgroups)");
        return false;
    }
    assert!(
        ballast_bpf::sys::cgroup2_mount().is_some(),
        "no cgroup v2 mount"
    );
    if ballast_bpf::sys::bpffs_mount().is_none() {
        std::fs::create_dir_all("/sys/fs/bpf").unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .unwrap();
        assert!(st.success(), "mounting bpffs");
    }
    true
}

/// A test's own cgroup and pin dir; detaches, unpins and removes both on drop.
pub struct Env {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub dp: Option<Dataplane>,
}

impl Env {
    pub fn new(name: &str) -> Self {
        let unique = format!("ballast-test-{name}-{}", std::process::id());
        let cgroup = ballast_bpf::sys::cgroup2_mount().unwrap().join(&unique);
        let bpffs = ballast_bpf::sys::bpffs_mount().unwrap();
        let pin_dir = bpffs.join(&unique);
        let _ = std::fs::create_dir(&cgroup);
        // built first, so a failing open/attach below still removes the cgroup and pins
        let mut env = Self {
            cgroup,
            pin_dir,
            dp: None,
        };
        let mut dp = Dataplane::open(&env.pin_dir).unwrap();
        dp.attach(&env.cgroup).unwrap();
        env.dp = Some(dp);
        env
    }

    /// The test's `Env::new(name)`, or None (with the reason printed) when `test` cannot run
    /// here (see `can_run`).
    pub fn for_test(test: &str, name: &str) -> Option<Self> {
        can_run(test).then(|| Self::new(name))
    }

    pub fn dp(&mut self) -> &mut Dataplane {
        self.dp.as_mut().unwrap()
    }

    /// Marks each of `backends` of `service` healthy or not.
    pub fn set_health(&mut self, service: &str, backends: &[&Backend], healthy: bool) {
        for b in backends {
            self.dp()
                .set_backend_health(service, b.addr, healthy)
                .unwrap();
        }
    }

    /// Asserts every client socket is closed: sock_release removed each per-connection record
    /// from the pinned `blst_conn` map.
    pub fn assert_no_conn_records(&self) {
        let conn = aya::maps::MapData::from_pin(self.pin_dir.join("blst_conn")).unwrap();
        let conn: aya::maps::HashMap<_, u64, ballast_bpf::layout::SockRev> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(conn)).unwrap();
        assert_eq!(
            conn.keys().count(),
            0,
            "records of closed sockets left behind"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut dp) = self.dp.take() {
            let _ = dp.detach(&self.cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // the probes have exited; move any straggler out before removing the cgroup
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            let root = ballast_bpf::sys::cgroup2_mount().unwrap();
            for p in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), p);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a [`Backend::bulk`] saw: payload bytes read, payload bytes its sockets retransmitted,
/// connections finished (everything acknowledged).
#[derive(Default)]
pub struct BulkStats {
    pub read: AtomicU64,
    pub retrans: AtomicU64,
    pub done: AtomicU64,
}

impl BulkStats {
    /// Waits until `n` connections are finished (at most 10 s).
    pub fn wait_done(&self, n: u64) {
        for _ in 0..1000 {
            if self.done.load(Ordering::Relaxed) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "bulk backend finished {} of {n} connections",
            self.done.load(Ordering::Relaxed)
        );
    }
}

/// A real loopback backend answering every TCP connection (and UDP datagram) with its id.
pub struct Backend {
    pub addr: SocketAddr,
    pub id: String,
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Set for backends in a network namespace: drop shuts this listener down to wake the
    /// accept loop (a wake-up connect from the test's own namespace could leave the machine).
    netns_listener: Option<TcpListener>,
    in_netns: bool,
}

impl Backend {
    /// The backend's fields, nothing served yet; the constructors below start the server.
    fn new(
        addr: SocketAddr,
        id: String,
        netns_listener: Option<TcpListener>,
        in_netns: bool,
    ) -> Self {
        Self {
            addr,
            id,
            accepted: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            netns_listener,
            in_netns,
        }
    }

    pub fn tcp() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let b = Self::new(addr, addr.port().to_string(), None, false);
        let (a, s, reply) = (b.accepted.clone(), b.stop.clone(), format!("{}\n", b.id));
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut c) = c {
                    a.fetch_add(1, Ordering::Relaxed);
                    // reply, then FIN; the client resets after reading, so nobody keeps TIME_WAIT
                    let _ = c.write_all(reply.as_bytes());
                    let _ = c.shutdown(std::net::Shutdown::Write);
                }
            }
        });
        b
    }

    /// A TCP backend that keeps each connection and answers every line with its id (a
    /// keep-alive server); `accepted` counts connections.
    pub fn tcp_lines() -> Self {
        Self::serve_lines(TcpListener::bind("127.0.0.1:0").unwrap(), false)
    }

    /// [`Backend::tcp_lines`] on `ip` inside `ns`; its id is its full address.
    pub fn tcp_lines_in(ns: &Netns, ip: &str) -> Self {
        let bind = SocketAddr::new(ip.parse().unwrap(), 0);
        Self::serve_lines(ns.run(move || TcpListener::bind(bind)).unwrap(), true)
    }

    fn serve_lines(l: TcpListener, in_netns: bool) -> Self {
        let addr = l.local_addr().unwrap();
        let id = if in_netns {
            addr.to_string()
        } else {
            addr.port().to_string()
        };
        let waker = in_netns.then(|| l.try_clone().unwrap());
        let b = Self::new(addr, id, waker, in_netns);
        let (a, s, reply) = (b.accepted.clone(), b.stop.clone(), format!("{}\n", b.id));
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let c = match c {
                    Ok(c) => c,
                    // shutdown(2) on the listener (drop) makes accept fail with EINVAL
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(_) => continue,
                };
                a.fetch_add(1, Ordering::Relaxed);
                let reply = reply.clone();
                std::thread::spawn(move || {
                    use std::io::{BufRead, BufReader};
                    let mut w = c.try_clone().unwrap();
                    for line in BufReader::new(c).lines() {
                        if line.is_err() || w.write_all(reply.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        b
    }

    /// A TCP backend for byte counts: reads each connection to EOF (adding what it read to
    /// `stats.read`), writes `reply_len` bytes, shuts down writing, waits until the client
    /// acknowledged everything (so it retransmits no more) and adds the payload bytes it
    /// retransmitted to `stats.retrans`, then closes. `accepted` counts connections.
    pub fn bulk(reply_len: u64, stats: Arc<BulkStats>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let b = Self::new(addr, addr.port().to_string(), None, false);
        let (a, s) = (b.accepted.clone(), b.stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                let stats = stats.clone();
                std::thread::spawn(move || {
                    let n = std::io::copy(&mut c, &mut std::io::sink()).unwrap_or(0);
                    stats.read.fetch_add(n, Ordering::Relaxed);
                    let chunk = vec![0xa5u8; 64 * 1024];
                    let mut left = reply_len;
                    while left > 0 {
                        let k = left.min(chunk.len() as u64) as usize;
                        if c.write_all(&chunk[..k]).is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                    let _ = c.shutdown(std::net::Shutdown::Write);
                    for _ in 0..5000 {
                        match ballast_bpf::sys::tcp_retrans(&c) {
                            Ok((_, 0)) | Err(_) => break,
                            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                    let (retrans, _) = ballast_bpf::sys::tcp_retrans(&c).unwrap_or((0, 0));
                    stats.retrans.fetch_add(retrans, Ordering::Relaxed);
                    stats.done.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        b
    }

    pub fn udp() -> Self {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let id = s.local_addr().unwrap().port().to_string();
        Self::serve_udp(s, id, false)
    }

    /// Answers every datagram on `s` with `id` until dropped.
    fn serve_udp(s: UdpSocket, id: String, in_netns: bool) -> Self {
        let b = Self::new(s.local_addr().unwrap(), id, None, in_netns);
        let (a, st, reply) = (b.accepted.clone(), b.stop.clone(), b.id.clone());
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    a.fetch_add(1, Ordering::Relaxed);
                    let _ = s.send_to(reply.as_bytes(), from);
                }
            }
        });
        b
    }

    /// A TCP backend listening on `ip` (port picked by the kernel) inside `ns`; its id is its
    /// full address, so backends on different addresses never share an id.
    pub fn tcp_in(ns: &Netns, ip: &str) -> Self {
        let bind = SocketAddr::new(ip.parse().unwrap(), 0);
        let l = ns.run(move || TcpListener::bind(bind)).unwrap();
        let addr = l.local_addr().unwrap();
        let waker = l.try_clone().unwrap();
        let b = Self::new(addr, addr.to_string(), Some(waker), true);
        let (a, reply) = (b.accepted.clone(), format!("{}\n", b.id));
        std::thread::spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(mut c) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let _ = c.write_all(reply.as_bytes());
                        let _ = c.shutdown(std::net::Shutdown::Write);
                    }
                    // shutdown(2) on the listener (drop) makes accept fail with EINVAL
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(_) => {}
                }
            }
        });
        b
    }

    /// A UDP backend on `ip` inside `ns`, replying to every datagram with its id.
    pub fn udp_in(ns: &Netns, ip: &str) -> Self {
        let bind = SocketAddr::new(ip.parse().unwrap(), 0);
        let s = ns.run(move || UdpSocket::bind(bind)).unwrap();
        let id = s.local_addr().unwrap().to_string();
        Self::serve_udp(s, id, true)
    }

    pub fn spec(&self, weight: u32) -> BackendSpec {
        BackendSpec {
            addr: self.addr,
            cluster: format!("c{}", self.addr.port() % 3),
            weight,
            healthy: true,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(l) = &self.netns_listener {
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown on a valid, owned socket fd.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if self.in_netns {
            return;
        }
        // wake the accept loop
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// A network namespace of the test's own (`ip netns add`), `lo` up with the given addresses
/// and no other interface or route: nothing sent in it can leave the machine, and a
/// destination that is not on `lo` fails at once (ENETUNREACH). Deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str, addrs: &[&str]) -> Self {
        let name = format!("blst-{name}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        for a in addrs {
            ns.ip(&["addr", "add", a, "dev", "lo", "nodad"]);
        }
        ns
    }

    /// `ip -n NAME ARGS`, asserting success; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the namespace has a route to `dst` (`ip route get`).
    pub fn routes_to(&self, dst: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "route", "get", dst])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Runs `f` on a thread that entered the namespace (sockets made there stay in it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid nsfs fd; affects only this (scoped) thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {}", self.name);
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn service(name: &str, vip: &str, port: u16, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: vip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
        backends,
        canary: None,
        select: SelectMode::Slots,
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct Report {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub by_backend: BTreeMap<String, u64>,
    pub peer_is_target: u64,
    pub max_fail_us: u64,
    pub median_fail_us: u64,
    /// `--bulk-send`: payload bytes the probe wrote and read
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
    /// `--bulk-send`: payload bytes the probe's sockets retransmitted
    #[serde(default)]
    pub bytes_retrans: u64,
}

impl Report {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
    pub fn share(&self, b: &Backend) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let r = *self.by_backend.get(&b.id).unwrap_or(&0) as f64 / self.ok.max(1) as f64;
        r
    }
    pub fn count(&self, b: &Backend) -> u64 {
        *self.by_backend.get(&b.id).unwrap_or(&0)
    }
}

pub fn probe_cmd(cgroup: Option<&Path>, to: SocketAddr, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ballast-probe"));
    if let Some(cg) = cgroup {
        c.arg("--cgroup").arg(cg);
    }
    c.arg("--to").arg(to.to_string()).args(extra);
    c.stdout(Stdio::piped());
    c
}

/// Runs the probe to completion and parses its report.
pub fn probe(cgroup: Option<&Path>, to: SocketAddr, extra: &[&str]) -> Report {
    report(probe_cmd(cgroup, to, extra).output().unwrap())
}

pub fn spawn_probe(cgroup: &Path, to: SocketAddr, extra: &[&str]) -> Child {
    probe_cmd(Some(cgroup), to, extra).spawn().unwrap()
}

pub fn finish(child: Child) -> Report {
    report(child.wait_with_output().unwrap())
}

/// A finished probe's report; asserts the probe succeeded.
fn report(out: Output) -> Report {
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
