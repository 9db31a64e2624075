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

/// A gRPC server process (`tests/grpc_where.py`, Debian's python3-grpcio) on a free
/// loopback port, killed on drop.
struct GrpcServer {
    addr: std::net::SocketAddr,
    child: std::process::Child,
}

impl GrpcServer {
    fn start(name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_where.py"))
            .args(["serve", name, &addr.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening", "{name}");
        Self { addr, child }
    }

    fn spec(&self, weight: u32) -> ballast_bpf::BackendSpec {
        ballast_bpf::BackendSpec {
            addr: self.addr,
            cluster: "c1".into(),
            weight,
            healthy: true,
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One call of the gRPC client, as it printed it.
#[derive(Debug, serde::Deserialize)]
struct Call {
    at_ms: u64,
    ok: bool,
    #[serde(default)]
    server: String,
    #[serde(default)]
    peer: String,
}

/// The gRPC client (one channel: one HTTP/2 connection) to `target`, in `cgroup` when given
/// (a shell moves itself there, then execs the client).
fn grpc_client(
    cgroup: Option<&std::path::Path>,
    target: std::net::SocketAddr,
    stop: &std::path::Path,
) -> std::process::Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_where.py");
    let run = format!(
        "exec /usr/bin/python3 {script} client {target} 20 {}",
        stop.display()
    );
    let sh = match cgroup {
        Some(cg) => format!("echo $$ > {}/cgroup.procs && {run}", cg.display()),
        None => run,
    };
    std::process::Command::new("sh")
        .args(["-c", &sh])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn calls(child: std::process::Child) -> Vec<Call> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "gRPC client failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A real gRPC client holding one HTTP/2 connection through a VIP follows a failover: its
/// backend turns unhealthy, the library destroys the steered socket, grpc reconnects and the
/// new connection is steered to the healthy backend within a second. A gRPC client outside
/// the cgroup, dialling the failed backend directly, keeps its connection (same peer).
#[test]
fn root_steered_grpc_channel_follows_a_failover() {
    if std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import grpc"])
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-grpcio is missing (kind-tests/setup.sh installs it)"
        );
        eprintln!("skipped: /usr/bin/python3 without grpc");
        return;
    }
    let Some(mut env) = Env::for_test("root_steered_grpc_channel_follows_a_failover", "grpc")
    else {
        return;
    };
    let (a, b) = (GrpcServer::start("a"), GrpcServer::start("b"));
    let vip: std::net::SocketAddr = "127.96.9.3:80".parse().unwrap();
    env.dp()
        .upsert_service(&service(
            "t/grpc",
            "127.96.9.3",
            80,
            vec![a.spec(1), b.spec(0)],
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let steered = grpc_client(Some(&env.cgroup), vip, &stop);
    let outside = grpc_client(None, a.addr, &stop);
    // both hold a connection to a and call it
    std::thread::sleep(Duration::from_millis(1500));
    let unhealthy = ballast_bpf::BackendSpec {
        healthy: false,
        ..a.spec(1)
    };
    env.dp()
        .upsert_service(&service(
            "t/grpc",
            "127.96.9.3",
            80,
            vec![unhealthy, b.spec(1)],
        ))
        .unwrap();
    let to_a: BTreeSet<_> = [a.addr].into();
    let destroyed_ms = unix_ms();
    let report = env.dp().destroy_sockets_to(&to_a).unwrap();
    assert_eq!(
        report.destroyed, 1,
        "only the steered channel's socket: {report:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop, b"").unwrap();
    let steered = calls(steered);
    let outside = calls(outside);

    let before: Vec<&Call> = steered.iter().filter(|c| c.at_ms < destroyed_ms).collect();
    assert!(
        before.iter().any(|c| c.ok && c.server == "a"),
        "the steered client called a first: {before:?}"
    );
    let first_b = steered
        .iter()
        .find(|c| c.ok && c.server == "b")
        .unwrap_or_else(|| panic!("never reached b: {steered:?}"));
    let moved_ms = first_b.at_ms.saturating_sub(destroyed_ms);
    let failed = steered.iter().filter(|c| !c.ok).count();
    println!("gRPC client moved to b {moved_ms} ms after the destroy; {failed} call(s) failed");
    assert!(moved_ms < 1000, "moved after {moved_ms} ms: {steered:?}");
    // after the move, every call went to b (a is unhealthy)
    assert!(
        steered
            .iter()
            .filter(|c| c.ok && c.at_ms >= first_b.at_ms)
            .all(|c| c.server == "b"),
        "{steered:?}"
    );
    // untouched: the outside client kept calling a on the same connection
    assert!(
        outside.iter().all(|c| c.ok && c.server == "a"),
        "{outside:?}"
    );
    let peers: BTreeSet<&str> = outside.iter().map(|c| c.peer.as_str()).collect();
    assert_eq!(peers.len(), 1, "the outside client reconnected: {peers:?}");
}
