//! Cost of counting bytes in the kernel (`cgroup_skb/egress` + `ingress`), printed as tables:
//!
//! 1. bulk TCP throughput over loopback, 1 GiB per run (upload: the client writes, the backend
//!    reads; download: the backend writes), through a steered socket (the bench process in a
//!    cgroup with every program attached, dialling a VIP) against an unsteered one (the same
//!    client in a cgroup with no program, dialling the backend), plus the same client in the
//!    attached cgroup dialling the backend directly (the programs run and miss). Runs are
//!    interleaved (one of each case per round) so drift of the shared VM hits all cases alike;
//!    median and min–max in Gbit/s, and the median's difference to unsteered in %.
//! 2. connect()+accept() round trip to the VIP with the skb programs attached against the
//!    connect-only set (their two links removed), alternated in 3 rounds.
//!
//! The backends' listeners are made before the process joins a cgroup, so the accepted
//! sockets belong to the root cgroup and only the client side runs the programs.
//! Run as root: `cargo bench -p ballast-bpf --bench bytes` (BALLAST_BENCH_RUNS=N rounds,
//! default 7; BALLAST_BENCH_MIB=N per run, default 1024; BALLAST_BENCH_SAMPLES=N connects per
//! connect row and round, default 10000).
#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

mod common;

use ballast_bpf::{BackendSpec, Dataplane, Protocol, SelectMode, ServiceSpec};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

const CHUNK: usize = 256 * 1024;

/// A backend that reads every connection to EOF, then closes (upload target).
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    a
}

/// A backend that writes `bytes` to every connection, then closes (download source).
fn source(bytes: u64) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let buf = vec![0x5au8; CHUNK];
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut left = bytes;
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                if c.write_all(&buf[..k]).is_err() {
                    break;
                }
                left -= k as u64;
            }
        }
    });
    a
}

/// Gbit/s of one upload of `bytes` to `to` (until the backend closed after reading it all).
fn upload(to: SocketAddr, bytes: u64) -> f64 {
    let buf = vec![0xa5u8; CHUNK];
    let t = Instant::now();
    let mut c = TcpStream::connect(to).unwrap();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        c.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    gbps(bytes, t.elapsed())
}

/// Gbit/s of one download of `bytes` from `to`.
fn download(to: SocketAddr, bytes: u64) -> f64 {
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut c = TcpStream::connect(to).unwrap();
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, bytes);
    gbps(bytes, t.elapsed())
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn join(cg: &Path) {
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spec(name: &str, vip: &str, backend: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        vip: vip.parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        backends: vec![BackendSpec {
            addr: backend,
            cluster: "c1".into(),
            weight: 1,
            healthy: true,
        }],
        canary: None,
        select: SelectMode::Slots,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping the bytes benchmark: needs root (BPF, cgroups)");
        return;
    }
    let runs = env_or("BALLAST_BENCH_RUNS", 7).max(1);
    let bytes = env_or("BALLAST_BENCH_MIB", 1024) as u64 * 1024 * 1024;
    let samples = env_or("BALLAST_BENCH_SAMPLES", 10_000).max(10);

    // listeners first: their accepted sockets stay in the root cgroup
    let (up, down) = (sink(), source(bytes));
    let rtt_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rtt_backend = rtt_listener.local_addr().unwrap();

    let root = ballast_bpf::sys::cgroup2_mount().expect("cgroup v2 mount");
    let bpffs = ballast_bpf::sys::bpffs_mount().expect("bpffs mounted (kind-tests/setup.sh)");
    let unique = format!("ballast-bench-bytes-{}", std::process::id());
    let (cg, plain, pins) = (
        root.join(&unique),
        root.join(format!("{unique}-plain")),
        bpffs.join(&unique),
    );
    std::fs::create_dir_all(&cg).unwrap();
    std::fs::create_dir_all(&plain).unwrap();
    let mut dp = Dataplane::open(&pins).unwrap();
    dp.attach(&cg).unwrap();
    dp.upsert_service(&spec("bench/up", "127.96.41.1", up))
        .unwrap();
    dp.upsert_service(&spec("bench/down", "127.96.41.2", down))
        .unwrap();
    dp.upsert_service(&spec("bench/rtt", "127.96.41.3", rtt_backend))
        .unwrap();
    // BPF stats (run time per program) for the throughput rows only: they add two clock
    // reads to every run, so they are off again for the connect rows
    let stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let stats = |dp: &Dataplane| {
        let e = dp.program_stats("blst_skb_egress").unwrap_or_default();
        let i = dp.program_stats("blst_skb_ingress").unwrap_or_default();
        (e.0 + i.0, e.1 + i.1)
    };

    // 1. throughput: per round, each case once
    let cases = [
        (
            "unsteered (cgroup without programs), to backend",
            false,
            false,
        ),
        (
            "in attached cgroup, to backend (programs miss)",
            true,
            false,
        ),
        ("steered: in attached cgroup, to VIP (counted)", true, true),
    ];
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); cases.len()]; 2];
    let mut bpf: Vec<Vec<(Duration, u64)>> = vec![vec![(Duration::ZERO, 0); cases.len()]; 2];
    // warm-up: one of each direction, unmeasured
    join(&plain);
    upload(up, bytes.min(256 << 20));
    download(down, bytes);
    for _ in 0..runs {
        for (dir, target) in [(0usize, up), (1usize, down)] {
            for (ci, &(_, in_cg, via_vip)) in cases.iter().enumerate() {
                join(if in_cg { &cg } else { &plain });
                let to: SocketAddr = if via_vip {
                    if dir == 0 {
                        "127.96.41.1:80".parse().unwrap()
                    } else {
                        "127.96.41.2:80".parse().unwrap()
                    }
                } else {
                    target
                };
                let s0 = stats(&dp);
                let g = if dir == 0 {
                    upload(to, bytes)
                } else {
                    download(to, bytes)
                };
                let s1 = stats(&dp);
                results[dir][ci].push(g);
                bpf[dir][ci].0 += s1.0 - s0.0;
                bpf[dir][ci].1 += s1.1 - s0.1;
            }
        }
    }
    let counters = dp.counters().unwrap();
    drop(stats_on);

    // 2. connect()+accept() to the VIP: all programs vs the connect-only set
    join(&cg);
    let vip: SocketAddr = "127.96.41.3:80".parse().unwrap();
    let link_dir = {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&cg).unwrap().ino();
        pins.join("links").join(format!("cgroup-{ino}"))
    };
    let mut with_skb = Vec::new();
    let mut without = Vec::new();
    for _ in 0..3 {
        dp.attach(&cg).unwrap(); // re-adds the skb links removed below
        with_skb.push(common::connect_rtt(&rtt_listener, vip, samples));
        for p in ["blst_skb_egress", "blst_skb_ingress"] {
            let link = aya::programs::links::PinnedLink::from_pin(link_dir.join(p)).unwrap();
            drop(link.unpin().unwrap()); // last reference: the kernel detaches it
        }
        without.push(common::connect_rtt(&rtt_listener, vip, samples));
    }

    join(&root);
    dp.detach(&cg).unwrap();
    let _ = std::fs::remove_dir(&cg);
    let _ = std::fs::remove_dir(&plain);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nbulk TCP over loopback, {} MiB per run, {runs} runs per row (kernel {})",
        bytes >> 20,
        kernel.trim()
    );
    println!(
        "| direction | case | median Gbit/s | min–max | vs unsteered | skb prog runs/run | ns/run | BPF ms/run (% of median run) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (dir, label) in [(0, "upload"), (1, "download")] {
        let base = median(&mut results[dir][0].clone());
        for (ci, (name, ..)) in cases.iter().enumerate() {
            let v = &mut results[dir][ci];
            let m = median(v);
            let (lo, hi) = (v[0], v[v.len() - 1]);
            let (t, n) = bpf[dir][ci];
            let per_run = if n > 0 {
                format!("{}", n / runs as u64)
            } else {
                "0".into()
            };
            let ns = if n > 0 {
                format!("{:.0}", t.as_nanos() as f64 / n as f64)
            } else {
                "-".into()
            };
            // the programs' own time per run against the median run's wall time: a figure
            // that other load on the host barely moves, unlike the throughput itself
            let bpf_ms = t.as_secs_f64() * 1e3 / runs as f64;
            let run_ms = bytes as f64 * 8.0 / (m * 1e9) * 1e3;
            let share = if n > 0 {
                format!("{bpf_ms:.1} ({:.2} %)", bpf_ms / run_ms * 100.0)
            } else {
                "-".into()
            };
            println!(
                "| {label} | {name} | {m:.2} | {lo:.2}–{hi:.2} | {:+.1} % | {per_run} | {ns} | {share} |",
                (m / base - 1.0) * 100.0
            );
        }
    }
    for c in counters.iter().filter(|c| c.service != "bench/rtt") {
        println!(
            "counted {}: sent {} B, received {} B over {} connections",
            c.service, c.bytes_sent, c.bytes_received, c.connects
        );
    }
    println!("\nconnect()+accept() to the VIP, {samples} connects per round, 3 rounds");
    println!("| programs | median µs per round | p99 µs per round |");
    println!("|---|---:|---:|");
    for (name, v) in [
        ("connect-only (skb links removed)", &without),
        ("all, with cgroup_skb egress+ingress", &with_skb),
    ] {
        let med: Vec<String> = v.iter().map(|x| format!("{:.1}", x.0)).collect();
        let p99: Vec<String> = v.iter().map(|x| format!("{:.1}", x.1)).collect();
        println!("| {name} | {} | {} |", med.join(" / "), p99.join(" / "));
    }
}
