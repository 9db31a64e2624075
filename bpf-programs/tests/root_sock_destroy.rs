//! Long-lived connections follow a failover (root, real kernel): a keep-alive client in the
//! steered cgroup holds one connection through a VIP; its backend turns unhealthy and the
//! library destroys the steered sockets to it; the client's next request goes through a new
//! connection, steered to the healthy backend. Sockets to the same backend that were not
//! steered — dialled directly from inside the cgroup, or from a process outside it — are
//! untouched.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{finish, service, Backend, Env};

/// Marks `a` of `name` unhealthy and gives `b` the weight (what health does when a fails).
fn fail_over(env: &mut Env, name: &str, vip: &str, a: &Backend, b: &Backend) {
    let unhealthy = ballast_bpf::BackendSpec {
        healthy: false,
        ..a.spec(1)
    };
    env.dp()
        .upsert_service(&service(name, vip, 80, vec![unhealthy, b.spec(1)]))
        .unwrap();
}

/// Waits (up to `within`) until `b` accepted `n` connections.
fn wait_accepted(b: &Backend, n: u64, within: Duration) {
    let t0 = Instant::now();
    while b.accepted.load(Ordering::Relaxed) < n && t0.elapsed() < within {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn root_steered_keepalive_connections_to_a_failed_backend_are_destroyed_and_move() {
    let Some(mut env) = Env::for_test(
        "root_steered_keepalive_connections_to_a_failed_backend_are_destroyed_and_move",
        "destroy",
    ) else {
        return;
    };
    let (a, b) = (Backend::tcp_lines(), Backend::tcp_lines());
    let vip: std::net::SocketAddr = "127.96.9.1:80".parse().unwrap();
    // everything to a first
    env.dp()
        .upsert_service(&service(
            "t/kv",
            "127.96.9.1",
            80,
            vec![a.spec(1), b.spec(0)],
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let hold = |cgroup: Option<&std::path::Path>, to: std::net::SocketAddr| {
        let mut c = common::probe_cmd(cgroup, to, &["--hold", "--interval-ms", "10"]);
        c.arg("--until").arg(&stop);
        c.spawn().unwrap()
    };
    let steered = hold(Some(&env.cgroup), vip);
    let direct_inside = hold(Some(&env.cgroup), a.addr);
    let outside = hold(None, a.addr);
    // each holds one connection to a
    wait_accepted(&a, 3, Duration::from_secs(5));
    assert_eq!(a.accepted.load(Ordering::Relaxed), 3);
    std::thread::sleep(Duration::from_millis(200));

    // a fails: health drains it, b takes the weight, and the steered sockets to a go
    fail_over(&mut env, "t/kv", "127.96.9.1", &a, &b);
    let to_a: BTreeSet<_> = [a.addr].into();
    let listed = env.dp().steered_sockets_to(&to_a).unwrap();
    assert_eq!(
        listed.len(),
        1,
        "only the steered socket is a's: {listed:?}"
    );
    let destroyed_at = Instant::now();
    let report = env.dp().destroy_sockets_to(&to_a).unwrap();
    assert_eq!(report.destroyed, 1, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    // the client reconnects through the VIP, steered to b, within a second
    wait_accepted(&b, 1, Duration::from_secs(1));
    let moved_after = destroyed_at.elapsed();
    assert_eq!(
        b.accepted.load(Ordering::Relaxed),
        1,
        "no reconnection to b"
    );
    assert!(moved_after < Duration::from_secs(1), "{moved_after:?}");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&stop, b"").unwrap();

    let steered = finish(steered);
    let direct_inside = finish(direct_inside);
    let outside = finish(outside);
    println!(
        "moved after {moved_after:?}; steered {:?} errors {:?}",
        steered.by_backend, steered.errors
    );
    // one request failed (the destroyed connection), then b answered on a new connection
    assert_eq!(steered.errors_total(), 1, "{:?}", steered.errors);
    assert!(steered.count(&b) > 0 && steered.count(&a) > 0);
    // untouched: not steered (direct from inside the cgroup, or from outside it)
    for (name, r) in [("direct inside", &direct_inside), ("outside", &outside)] {
        assert_eq!(r.errors_total(), 0, "{name}: {:?}", r.errors);
        assert_eq!(r.count(&b), 0, "{name}");
    }
    assert_eq!(
        a.accepted.load(Ordering::Relaxed),
        3,
        "nobody reconnected to a"
    );
}

/// The client in a network namespace of its own (as a pod is), the library in the host's: it
/// enters the namespaces of the cgroup's processes to find and destroy the socket.
#[test]
fn root_steered_sockets_in_a_pod_network_namespace_are_destroyed_from_outside_it() {
    let Some(mut env) = Env::for_test(
        "root_steered_sockets_in_a_pod_network_namespace_are_destroyed_from_outside_it",
        "destroy-ns",
    ) else {
        return;
    };
    let ns = common::Netns::new("destroy", &[]);
    let (a, b) = (
        Backend::tcp_lines_in(&ns, "127.0.0.1"),
        Backend::tcp_lines_in(&ns, "127.0.0.1"),
    );
    env.dp()
        .upsert_service(&service(
            "t/pod",
            "127.96.9.2",
            80,
            vec![a.spec(1), b.spec(0)],
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let mut c = common::probe_cmd(
        Some(&env.cgroup),
        "127.96.9.2:80".parse().unwrap(),
        &["--netns", &ns.name, "--hold", "--interval-ms", "10"],
    );
    c.arg("--until").arg(&stop);
    let client = c.spawn().unwrap();
    wait_accepted(&a, 1, Duration::from_secs(5));
    fail_over(&mut env, "t/pod", "127.96.9.2", &a, &b);
    let to_a: BTreeSet<_> = [a.addr].into();
    // from the host's namespace alone: not found there
    assert_eq!(env.dp().destroy_sockets_to(&to_a).unwrap().destroyed, 0);
    let cgroup = env.cgroup.clone();
    let report = env.dp().destroy_sockets_to_in(&to_a, &cgroup).unwrap();
    assert_eq!(report.destroyed, 1, "{report:?}");
    wait_accepted(&b, 1, Duration::from_secs(1));
    assert_eq!(
        b.accepted.load(Ordering::Relaxed),
        1,
        "the client did not move to b"
    );
    std::fs::write(&stop, b"").unwrap();
    let r = finish(client);
    assert_eq!(r.errors_total(), 1, "{:?}", r.errors);
    assert!(r.count(&b) > 0, "{:?}", r.by_backend);
}
