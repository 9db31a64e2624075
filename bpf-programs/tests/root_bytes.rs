//! Bytes per (service, backend), counted in the kernel by `cgroup_skb/egress` + `ingress`
//! (root). Clients are `ballast-probe` processes in the test's cgroup (`--bulk-send N`: one
//! connection writes N bytes, shuts down writing, reads to EOF); bulk backends read to EOF and
//! answer with a fixed number of bytes. Every figure is asserted exactly: the counting rule is
//! transport payload (no IP/TCP/UDP headers), retransmissions included. Loopback loses
//! nothing, but on a loaded host a delayed ACK makes TCP send a tail loss probe (a
//! retransmission, counted again by the rule), so the expected TCP figures are the payload plus
//! the bytes each side's socket says it retransmitted (`TCP_INFO` `tcpi_bytes_retrans`: the
//! probe's for sent, the backend's for received); without retransmissions they are the payload.
//! VIPs are 127.96.40.0/24 on loopback; nothing leaves the machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use ballast_bpf::{layout::ByteCount, layout::CounterKey, BackendCounter, Dataplane, Protocol};
use common::{probe, service, Backend, BulkStats, Env};

const MB: u64 = 1 << 20;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The counter of `backend` in `service`, asserting it is listed.
fn counter(env: &mut Env, service: &str, backend: SocketAddr) -> BackendCounter {
    env.dp()
        .counters()
        .unwrap()
        .into_iter()
        .find(|c| c.service == service && c.backend == backend)
        .unwrap_or_else(|| panic!("no counter for {service} {backend}"))
}

fn bytes_of(env: &mut Env, service: &str, backend: SocketAddr) -> (u64, u64) {
    let c = counter(env, service, backend);
    (c.bytes_sent, c.bytes_received)
}

/// (sent, received) summed over every key and CPU of the pinned `blst_bytes` map: what the
/// kernel counted at all, whether or not `counters()` would list it.
fn raw_total(env: &Env) -> (u64, u64) {
    let m = aya::maps::MapData::from_pin(env.pin_dir.join("blst_bytes")).unwrap();
    let m: aya::maps::PerCpuHashMap<_, CounterKey, ByteCount> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(m)).unwrap();
    let mut t = (0, 0);
    for item in m.iter() {
        let (_, v) = item.unwrap();
        for c in v.iter() {
            t.0 += c.sent;
            t.1 += c.received;
        }
    }
    t
}

/// One bulk connection from the test's cgroup (or from outside with `cgroup = None`) to `to`.
fn bulk(cgroup: Option<&std::path::Path>, to: SocketAddr, send: u64) -> common::Report {
    let r = probe(
        cgroup,
        to,
        &["--bulk-send", &send.to_string(), "--count", "1"],
    );
    assert_eq!(r.errors_total(), 0, "bulk to {to}: {:?}", r.errors);
    assert_eq!(r.bytes_sent, send);
    r
}

/// A bulk backend and what the kernel should have counted for it: payload plus
/// retransmissions, from the probes' reports and the backend's own sockets.
struct Bulk {
    be: Backend,
    stats: Arc<BulkStats>,
    reply: u64,
    conns: u64,
    sent: u64,
    received: u64,
}

impl Bulk {
    fn new(reply: u64) -> Self {
        let stats = Arc::new(BulkStats::default());
        Self {
            be: Backend::bulk(reply, stats.clone()),
            stats,
            reply,
            conns: 0,
            sent: 0,
            received: 0,
        }
    }

    /// One steered connection sending `n` bytes that this backend served.
    fn served(&mut self, r: &common::Report) {
        assert_eq!(r.bytes_received, self.reply, "reply of {}", self.be.addr);
        self.conns += 1;
        self.stats.wait_done(self.conns);
        if r.bytes_retrans > 0 {
            println!("client retransmitted {} B", r.bytes_retrans);
        }
        self.sent += r.bytes_sent + r.bytes_retrans;
        self.received = self.conns * self.reply + self.stats.retrans.load(Ordering::Relaxed);
    }

    /// (sent, received) the kernel should report.
    fn want(&self) -> (u64, u64) {
        (self.sent, self.received)
    }
}

/// (a) exact TCP counts for the backend that served, 0 for the other; (b) a second connection
/// to the other backend gets its own counts; a v6 socket dialling the v4-mapped VIP (IPv4
/// packets on an AF_INET6 socket) is counted too.
#[test]
fn root_bytes_tcp_exact_per_backend() {
    let Some(mut env) = Env::for_test("root_bytes_tcp_exact_per_backend", "bytes-tcp") else {
        return;
    };
    let (mut a, mut b) = (Bulk::new(MB + 5), Bulk::new(2 * MB + 333));
    let name = "t/bulk";
    let mut s = service(name, "127.96.40.1", 80, vec![a.be.spec(1), b.be.spec(0)]);
    env.dp().upsert_service(&s).unwrap();
    assert_eq!(bytes_of(&mut env, name, a.be.addr), (0, 0));
    let to = addr("127.96.40.1:80");

    let n = 3 * MB + 17;
    let r = bulk(Some(&env.cgroup), to, n);
    assert_eq!(r.peer_is_target, 1);
    a.served(&r);
    assert_eq!(a.stats.read.load(Ordering::Relaxed), n, "backend a read");
    assert_eq!(bytes_of(&mut env, name, a.be.addr), a.want());
    assert_eq!(bytes_of(&mut env, name, b.be.addr), (0, 0));
    assert_eq!(counter(&mut env, name, a.be.addr).connects, 1);

    // (b) the other backend, another connection: its own counts, a's unchanged
    s.backends = vec![a.be.spec(0), b.be.spec(1)];
    env.dp().upsert_service(&s).unwrap();
    let n2 = 5 * MB + 1;
    b.served(&bulk(Some(&env.cgroup), to, n2));
    assert_eq!(b.stats.read.load(Ordering::Relaxed), n2, "backend b read");
    assert_eq!(bytes_of(&mut env, name, a.be.addr), a.want());
    assert_eq!(bytes_of(&mut env, name, b.be.addr), b.want());

    // three more connections to b add up
    for i in 1..=3u64 {
        b.served(&bulk(Some(&env.cgroup), to, i * 1000));
    }
    assert_eq!(
        bytes_of(&mut env, name, b.be.addr),
        b.want(),
        "4 connections to b"
    );

    // an AF_INET6 socket dialling the v4-mapped VIP sends IPv4 packets: counted the same
    let r = bulk(Some(&env.cgroup), addr("[::ffff:127.96.40.1]:80"), 777);
    assert_eq!(r.peer_is_target, 1, "getpeername is the mapped VIP");
    b.served(&r);
    assert_eq!(bytes_of(&mut env, name, b.be.addr), b.want());
    assert_eq!(raw_total(&env), (a.sent + b.sent, a.received + b.received));
    env.assert_no_conn_records();
}

/// (c) UDP through a VIP, connected sockets and unconnected `sendto()`: request payloads
/// ("ping", 4 bytes) sent, reply payloads (the backend's id) received, per backend.
#[test]
fn root_bytes_udp_connected_and_unconnected() {
    let Some(mut env) = Env::for_test("root_bytes_udp_connected_and_unconnected", "bytes-udp")
    else {
        return;
    };
    let (a, b) = (Backend::udp(), Backend::udp());
    let name = "t/dns";
    let mut s = service(name, "127.96.40.2", 53, vec![a.spec(1), b.spec(1)]);
    s.protocol = Protocol::Udp;
    env.dp().upsert_service(&s).unwrap();
    let to = addr("127.96.40.2:53");
    let want = |n: u64, be: &Backend| (4 * n, n * be.id.len() as u64);

    // connected: a fresh connect()ed socket per request (blst_conn)
    let r = probe(
        Some(&env.cgroup),
        to,
        &["--udp", "--connected", "--count", "300"],
    );
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.peer_is_target, 300);
    let (ca, cb) = (r.count(&a), r.count(&b));
    assert_eq!(ca + cb, 300);
    assert!(ca > 0 && cb > 0, "1:1 split gave {ca}/{cb}");
    assert_eq!(bytes_of(&mut env, name, a.addr), want(ca, &a));
    assert_eq!(bytes_of(&mut env, name, b.addr), want(cb, &b));

    // unconnected sendto() on one socket (blst_rev per peer, parsed from the headers)
    let r = probe(Some(&env.cgroup), to, &["--udp", "--count", "500"]);
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.peer_is_target, 500, "reply source must be the VIP");
    let (ua, ub) = (r.count(&a), r.count(&b));
    assert_eq!(ua + ub, 500);
    assert!(ua > 0 && ub > 0, "1:1 split gave {ua}/{ub}");
    assert_eq!(bytes_of(&mut env, name, a.addr), want(ca + ua, &a));
    assert_eq!(bytes_of(&mut env, name, b.addr), want(cb + ub, &b));

    // the same backend dialled directly from inside the cgroup: not a service, not counted
    let r = probe(Some(&env.cgroup), a.addr, &["--udp", "--count", "50"]);
    assert_eq!(r.count(&a), 50);
    let r = probe(
        Some(&env.cgroup),
        a.addr,
        &["--udp", "--connected", "--count", "50"],
    );
    assert_eq!(r.count(&a), 50);
    assert_eq!(bytes_of(&mut env, name, a.addr), want(ca + ua, &a));
    let (wa, wb) = (want(ca + ua, &a), want(cb + ub, &b));
    assert_eq!(raw_total(&env), (wa.0 + wb.0, wa.1 + wb.1));
    env.assert_no_conn_records();
}

/// (d) the counts live in the pinned map: a new loader on the same pin dir reads the same
/// figures, and the still-attached programs keep adding to them.
#[test]
fn root_bytes_survive_loader_restart() {
    let Some(mut env) = Env::for_test("root_bytes_survive_loader_restart", "bytes-restart") else {
        return;
    };
    let mut a = Bulk::new(64 * 1024 + 9);
    let name = "t/restart";
    env.dp()
        .upsert_service(&service(name, "127.96.40.3", 80, vec![a.be.spec(1)]))
        .unwrap();
    let to = addr("127.96.40.3:80");
    a.served(&bulk(Some(&env.cgroup), to, 2 * MB + 3));
    assert_eq!(bytes_of(&mut env, name, a.be.addr), a.want());

    env.dp = None; // the loader goes; links and maps stay pinned
    a.served(&bulk(Some(&env.cgroup), to, 1000)); // counted while no loader runs
    env.dp = Some(Dataplane::open(&env.pin_dir).unwrap());
    assert_eq!(bytes_of(&mut env, name, a.be.addr), a.want());
    let cg = env.cgroup.clone();
    env.dp().attach(&cg).unwrap(); // a no-op: already attached, nothing doubled
    a.served(&bulk(Some(&env.cgroup), to, 4321));
    assert_eq!(bytes_of(&mut env, name, a.be.addr), a.want());
    assert!(a.sent >= 2 * MB + 5324 && a.received >= 3 * a.reply);
    assert_eq!(counter(&mut env, name, a.be.addr).connects, 3);
}

/// (e) sockets that were not steered are never counted: a process outside the cgroup (to the
/// backend, and to the VIP, which it cannot reach), and a connection from inside the cgroup to
/// an address that is no service.
#[test]
fn root_bytes_unsteered_not_counted() {
    let Some(mut env) = Env::for_test("root_bytes_unsteered_not_counted", "bytes-unsteered") else {
        return;
    };
    let mut a = Bulk::new(100_000);
    let name = "t/only";
    env.dp()
        .upsert_service(&service(name, "127.96.40.4", 80, vec![a.be.spec(1)]))
        .unwrap();

    // outside the cgroup, straight to the backend: served, not counted
    let r = bulk(None, a.be.addr, MB);
    assert_eq!(r.bytes_received, a.reply);
    // inside the cgroup, straight to the backend (not a service address): not counted
    let r = bulk(Some(&env.cgroup), a.be.addr, 2 * MB);
    assert_eq!(r.bytes_received, a.reply);
    // outside the cgroup, the VIP: not steered, refused locally
    let r = probe(
        None,
        addr("127.96.40.4:80"),
        &["--bulk-send", "10", "--count", "1"],
    );
    assert_eq!(r.ok, 0);
    assert_eq!(
        a.stats.read.load(Ordering::Relaxed),
        3 * MB,
        "the backend did serve"
    );
    assert_eq!(bytes_of(&mut env, name, a.be.addr), (0, 0));
    assert_eq!(raw_total(&env), (0, 0), "nothing counted at all");

    // the same process steered through the VIP: counted (the checks above can fail)
    a.stats.wait_done(2);
    a.conns = 2; // the two unsteered connections, and whatever they retransmitted
    let unsteered_retrans = a.stats.retrans.load(Ordering::Relaxed);
    a.served(&bulk(Some(&env.cgroup), addr("127.96.40.4:80"), 12_345));
    let want = (a.sent, a.received - 2 * a.reply - unsteered_retrans);
    assert_eq!(bytes_of(&mut env, name, a.be.addr), want);
    assert_eq!(raw_total(&env), want);
}
