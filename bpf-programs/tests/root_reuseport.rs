//! The broker's `sk_reuseport` program and its loader on the real kernel (root; skipped with
//! the reason otherwise): slot 0 wins, slot 1 takes over when slot 0's socket closes, a closed
//! listener's accept queue migrates to slot 1, `promote` moves a socket from slot 1 to slot 0,
//! and a second loader opens the same pins.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::time::Duration;

use ballast_bpf::reuseport::{socket_cookie, ReuseportGroup, Slot};

struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A listening socket with `SO_REUSEPORT` on `port` of 127.0.0.1 (0 = any).
fn reuseport_listener(port: u16) -> TcpListener {
    #[allow(unsafe_code)]
    // SAFETY: plain socket calls on a fresh fd we own; the sockaddr is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        let len = u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
        assert_eq!(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&raw const one).cast(),
                len
            ),
            0
        );
        let addr = libc::sockaddr_in {
            sin_family: u16::try_from(libc::AF_INET).unwrap(),
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let alen = u32::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap();
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), alen), 0);
        assert_eq!(libc::listen(fd, 128), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// Connects, and reads which listener accepted: each test server answers with its name.
fn who(addr: SocketAddr, a: &TcpListener, b: &TcpListener) -> &'static str {
    let _c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    for l in [a, b] {
        l.set_nonblocking(true).unwrap();
    }
    for _ in 0..200 {
        if a.accept().is_ok() {
            return "a";
        }
        if b.accept().is_ok() {
            return "b";
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no listener accepted");
}

#[test]
fn slot_zero_wins_slot_one_takes_over_and_the_queue_migrates() {
    if !ballast_bpf::sys::root_for_tests() {
        eprintln!("skipped: not root (sk_reuseport needs CAP_BPF + CAP_NET_ADMIN)");
        return;
    }
    let Some(bpffs) = ballast_bpf::sys::bpffs_mount() else {
        eprintln!("skipped: no bpffs mounted");
        return;
    };
    let pins = Pins(bpffs.join(format!("ballast-test-reuseport-{}", std::process::id())));
    let mut group = ReuseportGroup::open(&pins.0).unwrap();

    let a = reuseport_listener(0);
    let addr = a.local_addr().unwrap();
    let b = reuseport_listener(addr.port());
    group.attach(&a).unwrap();
    group.set(Slot::Primary, &a).unwrap();
    group.set(Slot::Standby, &b).unwrap();
    assert_eq!(
        group.cookie(Slot::Primary).unwrap(),
        Some(socket_cookie(&a).unwrap())
    );
    for _ in 0..20 {
        assert_eq!(who(addr, &a, &b), "a", "slot 0 takes every new connection");
    }

    // A second loader opens the same pins and sees the same slots.
    let again = ReuseportGroup::open(&pins.0).unwrap();
    assert_eq!(
        again.cookie(Slot::Standby).unwrap(),
        Some(socket_cookie(&b).unwrap())
    );

    // Three connections queue on a (never accepted), then a closes: they migrate to b.
    a.set_nonblocking(false).unwrap();
    let mut queued: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap())
        .collect();
    for (i, c) in queued.iter_mut().enumerate() {
        c.write_all(&[u8::try_from(i).unwrap()]).unwrap();
    }
    let before = group.stats().unwrap();
    drop(a);
    assert_eq!(
        group.cookie(Slot::Primary).unwrap(),
        None,
        "the kernel emptied slot 0"
    );
    b.set_nonblocking(false).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let (mut s, _) = b.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).unwrap();
        got.push(byte[0]);
    }
    got.sort_unstable();
    assert_eq!(
        got,
        [0, 1, 2],
        "the queued connections, with their data, moved to b"
    );
    let after = group.stats().unwrap();
    assert_eq!(after.migrated_standby - before.migrated_standby, 3);

    // With slot 0 empty, new connections go to slot 1; promote moves b to slot 0.
    let c = reuseport_listener(addr.port());
    assert_eq!(
        who(addr, &b, &c),
        "a",
        "slot 1 (b, the first argument) takes them"
    );
    group.promote(&b).unwrap();
    assert_eq!(
        group.cookie(Slot::Primary).unwrap(),
        Some(socket_cookie(&b).unwrap())
    );
    assert_eq!(group.cookie(Slot::Standby).unwrap(), None);
    // clear_if leaves another socket's slot alone.
    group.set(Slot::Standby, &c).unwrap();
    assert!(!group.clear_if(Slot::Standby, &b).unwrap());
    assert!(group.clear_if(Slot::Standby, &c).unwrap());
}
