//! IPv6 steering, for real: the client and the backends live in a network namespace of the
//! test's own with only `lo` (the backends' addresses on it) and no other route, so an
//! unsteered connect to the VIP fails locally with ENETUNREACH and nothing can leave the
//! machine. The client (`ballast-probe --cgroup .. --netns ..`) joins the test cgroup first,
//! then the namespace.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, sync::atomic::Ordering};

use ballast_bpf::Protocol;

use common::{probe, service, Backend, Env, Netns, Report};

/// The service VIP: no route to it in the namespace.
const VIP: &str = "fd00:ba11:a57:96::10";
const B1: &str = "fd00:ba11:a57::1";
const B2: &str = "fd00:ba11:a57::2";
/// Not a service: a plain listener the steering must leave alone.
const OTHER: &str = "fd00:ba11:a57::3";

fn ns_with_backends(name: &str) -> Netns {
    let ns = Netns::new(
        name,
        &[
            &format!("{B1}/128"),
            &format!("{B2}/128"),
            &format!("{OTHER}/128"),
        ],
    );
    // network safety, checked rather than assumed: no default route, none to the VIP
    assert!(ns.ip(&["-6", "route", "show", "default"]).trim().is_empty());
    assert!(ns.ip(&["-4", "route", "show", "default"]).trim().is_empty());
    assert!(!ns.routes_to(VIP), "the namespace must not route the VIP");
    assert!(
        ns.routes_to(B1),
        "backend address must be local in the namespace"
    );
    ns
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// Runs the probe in the test cgroup (when given) and the namespace.
fn probe_in(env: Option<&Env>, ns: &Netns, to: SocketAddr, extra: &[&str]) -> Report {
    let mut args = vec!["--netns", ns.name.as_str()];
    args.extend_from_slice(extra);
    probe(env.map(|e| e.cgroup.as_path()), to, &args)
}

fn all_errno(r: &Report, errno: u32) -> bool {
    let tag = format!("errno {errno})");
    !r.errors.is_empty() && r.errors.keys().all(|k| k.contains(&tag))
}

#[test]
fn root_ipv6_tcp_steering_in_netns() {
    let Some(mut env) = Env::for_test("root_ipv6_tcp_steering_in_netns", "ipv6-tcp") else {
        return;
    };
    let ns = ns_with_backends("v6tcp");
    let (b1, b2, other) = (
        Backend::tcp_in(&ns, B1),
        Backend::tcp_in(&ns, B2),
        Backend::tcp_in(&ns, OTHER),
    );

    // before any service: the VIP is unreachable from the client's place
    let r = probe_in(Some(&env), &ns, vip(80), &["--count", "20"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 101), "want ENETUNREACH: {:?}", r.errors);

    env.dp()
        .upsert_service(&service("v6/web", VIP, 80, vec![b1.spec(3), b2.spec(1)]))
        .unwrap();
    let n = 4000;
    let r = probe_in(Some(&env), &ns, vip(80), &["--count", &n.to_string()]);
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.ok, n);
    assert_eq!(r.count(&b1) + r.count(&b2), n, "{:?}", r.by_backend);
    let share = r.share(&b1);
    println!(
        "ipv6 3:1 over {n} connects: b1 {share:.4}, b2 {:.4}",
        r.share(&b2)
    );
    assert!(
        (share - 0.75).abs() <= 0.03,
        "weights 3:1 gave b1 {share:.4} over {n} connects"
    );
    assert_eq!(r.peer_is_target, n, "getpeername must return the VIP");
    // the kernel's own counters agree with what the backends saw
    let c = env.dp().counters().unwrap();
    let of = |b: &Backend| {
        c.iter()
            .filter(|c| c.backend == b.addr)
            .map(|c| c.connects)
            .sum::<u64>()
    };
    assert_eq!((of(&b1), of(&b2)), (r.count(&b1), r.count(&b2)), "{c:?}");
    env.assert_no_conn_records();

    // an unrelated IPv6 destination from inside the cgroup: reached as dialled
    let r = probe_in(Some(&env), &ns, other.addr, &["--count", "200"]);
    assert_eq!(r.count(&other), 200, "{:?} {:?}", r.by_backend, r.errors);
    assert_eq!(r.peer_is_target, 200);
    // the VIP on a port that is not a service: untouched, so unreachable
    let r = probe_in(Some(&env), &ns, vip(81), &["--count", "20"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 101), "want ENETUNREACH: {:?}", r.errors);
    // a process in the namespace but outside the cgroup: not steered
    let r = probe_in(None, &ns, vip(80), &["--count", "20"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 101), "want ENETUNREACH: {:?}", r.errors);
    let total: u64 = env
        .dp()
        .counters()
        .unwrap()
        .iter()
        .map(|c| c.connects)
        .sum();
    assert_eq!(total, n, "unsteered connects must not be counted");

    // fast-fail: every backend unhealthy -> EPERM at once, not a hang on a dead address
    env.set_health("v6/web", &[&b1, &b2], false);
    assert!(env.dp().service("v6/web").unwrap().all_down);
    let r = probe_in(Some(&env), &ns, vip(80), &["--count", "200"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert_eq!(r.errors_total(), 200);
    assert!(all_errno(&r, 1), "want EPERM: {:?}", r.errors);
    println!(
        "ipv6 fast-fail: median {} us, max {} us",
        r.median_fail_us, r.max_fail_us
    );
    assert!(
        r.median_fail_us < 1000,
        "median failing connect took {} us",
        r.median_fail_us
    );
    assert!(
        r.max_fail_us < 100_000,
        "slowest failing connect took {} us",
        r.max_fail_us
    );
    // one healthy again -> all traffic goes there
    env.set_health("v6/web", &[&b2], true);
    let r = probe_in(Some(&env), &ns, vip(80), &["--count", "500"]);
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.count(&b2), 500);
    assert_eq!(r.peer_is_target, 500);
}

#[test]
fn root_ipv6_udp_reply_comes_from_vip() {
    let Some(mut env) = Env::for_test("root_ipv6_udp_reply_comes_from_vip", "ipv6-udp") else {
        return;
    };
    let ns = ns_with_backends("v6udp");
    let (b1, b2) = (Backend::udp_in(&ns, B1), Backend::udp_in(&ns, B2));
    let mut s = service("v6/dns", VIP, 53, vec![b1.spec(1), b2.spec(1)]);
    s.protocol = Protocol::Udp;
    env.dp().upsert_service(&s).unwrap();
    let n = 2000;
    let r = probe_in(
        Some(&env),
        &ns,
        vip(53),
        &["--udp", "--count", &n.to_string()],
    );
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.ok, n);
    assert_eq!(r.peer_is_target, n, "reply source must be the VIP");
    let share = r.share(&b1);
    println!("ipv6 udp 1:1 over {n} datagrams: b1 {share:.4}");
    assert!((share - 0.5).abs() <= 0.05, "udp split {share:.4}");
    assert_eq!(
        b1.accepted.load(Ordering::Relaxed) + b2.accepted.load(Ordering::Relaxed),
        n
    );
    // connected UDP sockets (as resolvers use): connect6 steers, getpeername6 and recvmsg6
    // show the VIP, and sock_release drops each socket's record
    let r = probe_in(
        Some(&env),
        &ns,
        vip(53),
        &["--udp", "--connected", "--count", "1000"],
    );
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.count(&b1) + r.count(&b2), 1000, "{:?}", r.by_backend);
    assert_eq!(
        r.peer_is_target, 1000,
        "connected: peer and reply source must be the VIP"
    );
    env.assert_no_conn_records();
    // TCP to the same VIP:port is another service (none): not steered, unreachable
    let r = probe_in(Some(&env), &ns, vip(53), &["--count", "5"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 101), "want ENETUNREACH: {:?}", r.errors);
    // UDP from outside the cgroup: not steered, the send fails locally
    let r = probe_in(None, &ns, vip(53), &["--udp", "--count", "5"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 101), "want ENETUNREACH: {:?}", r.errors);
    // all unhealthy: the send fails at once with EPERM
    env.set_health("v6/dns", &[&b1, &b2], false);
    let r = probe_in(Some(&env), &ns, vip(53), &["--udp", "--count", "20"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 1), "want EPERM: {:?}", r.errors);
}

/// Dual-stack sockets: an IPv6 socket dialling an IPv4 VIP as `::ffff:a.b.c.d` (what many
/// runtimes do) runs the IPv6 hooks with a v4-mapped address. On the host: the VIP is in
/// 127.96.0.0/16, so an unsteered connect is refused locally.
#[test]
fn root_ipv6_dual_stack_socket_to_v4_vip() {
    let Some(mut env) = Env::for_test("root_ipv6_dual_stack_socket_to_v4_vip", "ipv6-dual") else {
        return;
    };
    let (a, b) = (Backend::tcp(), Backend::tcp());
    env.dp()
        .upsert_service(&service(
            "v4/web",
            "127.96.7.1",
            80,
            vec![a.spec(1), b.spec(3)],
        ))
        .unwrap();
    let mapped: SocketAddr = "[::ffff:127.96.7.1]:80".parse().unwrap();
    let r = probe(Some(&env.cgroup), mapped, &["--count", "2000"]);
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    let share = r.share(&b);
    println!("dual-stack tcp 1:3 over 2000 connects: b {share:.4}");
    assert!((share - 0.75).abs() <= 0.03, "1:3 gave b {share:.4}");
    assert_eq!(
        r.peer_is_target, 2000,
        "getpeername must return the mapped VIP"
    );
    // outside the cgroup: refused on loopback
    let r = probe(None, mapped, &["--count", "5"]);
    assert_eq!(r.ok, 0, "{:?}", r.by_backend);
    assert!(all_errno(&r, 111), "want ECONNREFUSED: {:?}", r.errors);

    // UDP: the send takes the IPv4 path (sendmsg4), the reply the IPv6 one (recvmsg6)
    let (ua, ub) = (Backend::udp(), Backend::udp());
    let mut s = service("v4/dns", "127.96.7.2", 53, vec![ua.spec(1), ub.spec(1)]);
    s.protocol = Protocol::Udp;
    env.dp().upsert_service(&s).unwrap();
    let mapped: SocketAddr = "[::ffff:127.96.7.2]:53".parse().unwrap();
    let r = probe(Some(&env.cgroup), mapped, &["--udp", "--count", "1000"]);
    assert_eq!(r.errors_total(), 0, "{:?}", r.errors);
    assert_eq!(r.count(&ua) + r.count(&ub), 1000, "{:?}", r.by_backend);
    assert_eq!(
        r.peer_is_target, 1000,
        "reply source must be the mapped VIP"
    );
}
