//! connect()+accept round trip on loopback (median and p99), printed as a table:
//! direct; through a VIP steered by ballast with 10 / 1,000 / 10,000 services; through
//! kube-proxy-style iptables DNAT chains with 10 / 1,000 / 10,000 services (inside a
//! dedicated network namespace, so the host's rules are never touched); and the O(1) slot
//! table against the O(log n) binary search at 2 / 64 / 1,024 backends, with the kernel's
//! own per-run time of `cgroup/connect4` (BPF stats); and IPv6 (`cgroup/connect6`) in a
//! network namespace with the backend's address on `lo` and no route off the machine.
//!
//! Run as root: `cargo bench -p ballast-bpf --bench connect` (BALLAST_BENCH_SAMPLES=N to change
//! the number of connects per row, default 20000; BALLAST_BENCH_NO_IPTABLES=1 skips those rows).
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

mod common;

use ballast_bpf::{BackendSpec, Dataplane, Protocol, SelectMode, ServiceSpec};

fn samples() -> usize {
    std::env::var("BALLAST_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

fn vip(i: usize) -> String {
    format!("127.96.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn svc(i: usize, backend: SocketAddr, n_backends: usize, select: SelectMode) -> ServiceSpec {
    ServiceSpec {
        name: format!("bench/s{i}"),
        vip: vip(i).parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        backends: (0..n_backends)
            .map(|_| BackendSpec {
                addr: backend,
                cluster: "c1".into(),
                weight: 1,
                healthy: true,
            })
            .collect(),
        canary: None,
        select,
    }
}

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        Self(name.into())
    }
    /// Moves the calling thread into the namespace (network namespaces are per thread).
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
    fn iptables_restore(&self, rules: &str) {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-restore"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "iptables-restore failed");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// kube-proxy's iptables mode: KUBE-SERVICES matches each service VIP in turn, jumps to a
/// per-service chain that picks an endpoint with `statistic`, which DNATs.
fn kube_proxy_rules(services: usize, backend: SocketAddr) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..services {
        let _ = writeln!(
            r,
            ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i}A - [0:0]\n:KUBE-SEP-{i}B - [0:0]"
        );
    }
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for i in 0..services {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n\
             -A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i}A\n\
             -A KUBE-SVC-{i} -j KUBE-SEP-{i}B\n\
             -A KUBE-SEP-{i}A -p tcp -m tcp -j DNAT --to-destination {backend}\n\
             -A KUBE-SEP-{i}B -p tcp -m tcp -j DNAT --to-destination {backend}",
            vip(i)
        );
    }
    r.push_str("COMMIT\n");
    r
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping the connect benchmark: needs root (BPF, cgroups, netns)");
        return;
    }
    let n = samples();
    let mut rows: Vec<(String, f64, f64, String)> = Vec::new();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();

    // (a) direct, before any program is attached to this process's cgroup
    let (m, p) = common::connect_rtt(&l, backend, n);
    rows.push(("direct (no cgroup program)".into(), m, p, String::new()));

    // (c) iptables DNAT in a dedicated netns (this thread only)
    if std::env::var_os("BALLAST_BENCH_NO_IPTABLES").is_none() {
        let ns = Netns::new(&format!("ballast-bench-{}", std::process::id()));
        let ns_name = ns.0.clone();
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter();
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let be = l.local_addr().unwrap();
                let mut out = vec![];
                let (m, p) = common::connect_rtt(&l, be, n);
                out.push(("direct in netns".to_string(), m, p, String::new()));
                for services in [10, 1000, 10_000] {
                    ns.iptables_restore(&kube_proxy_rules(services, be));
                    let target = format!("{}:80", vip(services - 1)).parse().unwrap();
                    let (m, p) = common::connect_rtt(&l, target, n);
                    out.push((
                        format!("iptables DNAT, {services} services (last rule)"),
                        m,
                        p,
                        String::new(),
                    ));
                }
                out
            })
            .join()
            .unwrap()
        });
        rows.extend(out);
        drop(ns);
        let _ = ns_name;
    }

    // (b) ballast: this process joins its own cgroup with the programs attached
    let root = ballast_bpf::sys::cgroup2_mount().expect("cgroup v2 mount");
    let bpffs = ballast_bpf::sys::bpffs_mount().expect("bpffs mounted (kind-tests/setup.sh)");
    let unique = format!("ballast-bench-{}", std::process::id());
    let cg = root.join(&unique);
    let pins = bpffs.join(&unique);
    std::fs::create_dir_all(&cg).unwrap();
    let mut dp = Dataplane::open(&pins).unwrap();
    dp.attach(&cg).unwrap();
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let bpf_ns_of = |dp: &Dataplane, prog: &str, before: Option<(Duration, u64)>| -> String {
        match (before, dp.program_stats(prog)) {
            (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => {
                format!("{:.0} ns", (t1 - t0).as_nanos() as f64 / (c1 - c0) as f64)
            }
            _ => "-".into(),
        }
    };
    let bpf_ns = |dp: &Dataplane, before| bpf_ns_of(dp, "blst_connect4", before);
    let b0 = dp.program_stats("blst_connect4");
    let (m, p) = common::connect_rtt(&l, backend, n);
    rows.push((
        "direct, in cgroup (hook miss)".into(),
        m,
        p,
        bpf_ns(&dp, b0),
    ));
    let mut installed = 0;
    for services in [10, 1000, 10_000] {
        while installed < services {
            dp.upsert_service(&svc(installed, backend, 2, SelectMode::Slots))
                .unwrap();
            installed += 1;
        }
        let to = format!("{}:80", vip(services - 1)).parse().unwrap();
        let b0 = dp.program_stats("blst_connect4");
        let (m, p) = common::connect_rtt(&l, to, n);
        rows.push((
            format!("ballast VIP, {services} services"),
            m,
            p,
            bpf_ns(&dp, b0),
        ));
    }
    for backends in [2, 64, 1024] {
        for (label, mode) in [
            ("slot table", SelectMode::Slots),
            ("binary search", SelectMode::BinarySearch),
        ] {
            dp.upsert_service(&svc(0, backend, backends, mode)).unwrap();
            let to = format!("{}:80", vip(0)).parse().unwrap();
            let b0 = dp.program_stats("blst_connect4");
            let (m, p) = common::connect_rtt(&l, to, n);
            rows.push((
                format!("ballast {label}, {backends} backends"),
                m,
                p,
                bpf_ns(&dp, b0),
            ));
        }
    }
    // IPv6: loopback is only ::1, so the backend lives on lo of a namespace of its own (no
    // other interface, no route) and this thread enters it; the process stays in the cgroup
    {
        const V6_BACKEND: &str = "fd00:ba11:a57::1";
        const V6_VIP: &str = "fd00:ba11:a57:96::10";
        let ns = Netns::new(&format!("ballast-bench6-{}", std::process::id()));
        assert!(Command::new("ip")
            .args(["-n", &ns.0, "addr", "add", &format!("{V6_BACKEND}/128")])
            .args(["dev", "lo", "nodad"])
            .status()
            .unwrap()
            .success());
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter();
                let l = TcpListener::bind((V6_BACKEND.parse::<std::net::Ipv6Addr>().unwrap(), 0))
                    .unwrap();
                let be = l.local_addr().unwrap();
                let mut out = vec![];
                let b0 = dp.program_stats("blst_connect6");
                let (m, p) = common::connect_rtt(&l, be, n);
                out.push((
                    "IPv6 direct in netns, in cgroup (hook miss)".to_string(),
                    m,
                    p,
                    bpf_ns_of(&dp, "blst_connect6", b0),
                ));
                let mut spec = svc(0, be, 2, SelectMode::Slots);
                spec.name = "bench/v6".into();
                spec.vip = V6_VIP.parse().unwrap();
                dp.upsert_service(&spec).unwrap();
                let to = SocketAddr::new(spec.vip, 80);
                let b0 = dp.program_stats("blst_connect6");
                let (m, p) = common::connect_rtt(&l, to, n);
                out.push((
                    "ballast IPv6 VIP in netns, 2 backends".to_string(),
                    m,
                    p,
                    bpf_ns_of(&dp, "blst_connect6", b0),
                ));
                out
            })
            .join()
            .unwrap()
        });
        rows.extend(out);
    }
    std::fs::write(root.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    dp.detach(&cg).unwrap();
    let _ = std::fs::remove_dir(&cg);

    println!(
        "\nconnect()+accept() round trip on loopback, {n} connects per row (kernel {})",
        kernel()
    );
    println!("| case | median µs | p99 µs | connect4/6 BPF run time |");
    println!("|---|---:|---:|---:|");
    for (name, m, p, b) in rows {
        println!("| {name} | {m:.1} | {p:.1} | {b} |");
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
