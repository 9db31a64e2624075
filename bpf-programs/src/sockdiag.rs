//! Destroying sockets by cookie through the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`,
//! `SOCK_DESTROY`, as `ss -K` does; kernel config `CONFIG_INET_DIAG_DESTROY`).
//!
//! Why not a BPF socket iterator with `bpf_sock_destroy` (kernel >= 6.5): that kfunc is called
//! through a `__ksym` relocation, which aya 0.14 (aya-obj 0.3) cannot load. `SOCK_DESTROY`
//! reaches the same kernel function (`tcp_abort` / `udp_abort`: the peer gets a RST, the
//! application `ECONNABORTED` on its next call) and works on older kernels too. A socket is
//! named by its exact 4-tuple and its cookie — the cookie `bpf_get_socket_cookie` gave the
//! steering program — so only the sockets asked for are touched.
//!
//! Scope: the sockets of the calling thread's network namespace (diagnostics are per
//! namespace); the caller enters the namespaces it wants ([`crate::sys`]). The netlink messages
//! are written by hand (`libc` only): four fixed C structs, no crate needed.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` (what we read of it)
const MSG_MIN_LEN: usize = 4 + SOCKID_LEN;
/// Established sockets only (`1 << TCP_ESTABLISHED`; a connected UDP socket is in that state
/// too): a connect still in its handshake is left to finish or fail on its own.
const ESTABLISHED: u32 = 1 << 1;

/// What one destroy pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Sockets found but not destroyed (already closing, or the kernel refused), with why.
    pub failed: Vec<String>,
}

/// One socket as the dump names it: family, protocol and the raw `inet_diag_sockid`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    family: u8,
    protocol: u8,
    sockid: [u8; SOCKID_LEN],
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn message(kind: u16, flags: u16, seq: u32, req: &[u8; REQ_LEN]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(req);
    m
}

fn request(family: u8, protocol: u8, sockid: Option<&[u8; SOCKID_LEN]>) -> [u8; REQ_LEN] {
    let mut r = [0u8; REQ_LEN];
    r[0] = family;
    r[1] = protocol;
    r[4..8].copy_from_slice(&ESTABLISHED.to_ne_bytes());
    if let Some(id) = sockid {
        r[8..].copy_from_slice(id);
    }
    r
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a valid fd and a buffer of msg.len() bytes.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid fd and a writable buffer of buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// The cookie in a raw `inet_diag_sockid` (two u32 words, low first).
fn cookie_of(sockid: &[u8; SOCKID_LEN]) -> u64 {
    u64::from(u32_at(sockid, 40)) | (u64::from(u32_at(sockid, 44)) << 32)
}

/// Dumps the sockets of one (family, protocol) whose cookie is in `cookies`.
fn dump(family: u8, protocol: u8, cookies: &BTreeSet<u64>) -> io::Result<Vec<Found>> {
    let fd = netlink()?;
    send(
        &fd,
        &message(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            &request(family, protocol, None),
        ),
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&fd, &mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag: truncated message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes([
                        buf[at + 16],
                        buf[at + 17],
                        buf[at + 18],
                        buf[at + 19],
                    ]);
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDRLEN + MSG_MIN_LEN => {
                    let body = &buf[at + NLMSG_HDRLEN..at + len];
                    let mut sockid = [0u8; SOCKID_LEN];
                    sockid.copy_from_slice(&body[4..4 + SOCKID_LEN]);
                    if cookies.contains(&cookie_of(&sockid)) {
                        out.push(Found {
                            family: body[0],
                            protocol,
                            sockid,
                        });
                    }
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
    }
}

/// Destroys one socket; Ok(()) on the kernel's zero acknowledgement.
fn destroy(f: &Found) -> io::Result<()> {
    let fd = netlink()?;
    send(
        &fd,
        &message(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            &request(f.family, f.protocol, Some(&f.sockid)),
        ),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(&fd, &mut buf)?;
    if n >= NLMSG_HDRLEN + 4 && u16_at(&buf, 4) == NLMSG_ERROR {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code == 0 {
            return Ok(());
        }
        return Err(io::Error::from_raw_os_error(-code));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "sock_diag: no acknowledgement",
    ))
}

/// Destroys the established TCP and connected UDP sockets (IPv4 and IPv6) of the calling
/// thread's network namespace whose cookie is in `cookies`.
///
/// # Errors
/// The dump itself failed (no netlink, no permission: `CAP_NET_ADMIN` is needed). A socket
/// that cannot be destroyed is listed in [`DestroyReport::failed`], not an error.
pub fn destroy_by_cookie(cookies: &BTreeSet<u64>) -> io::Result<DestroyReport> {
    let mut report = DestroyReport::default();
    if cookies.is_empty() {
        return Ok(report);
    }
    let families = [libc::AF_INET as u8, libc::AF_INET6 as u8];
    let protocols = [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8];
    for family in families {
        for protocol in protocols {
            for found in dump(family, protocol, cookies)? {
                match destroy(&found) {
                    Ok(()) => report.destroyed += 1,
                    // gone meanwhile: nothing left to do
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => report
                        .failed
                        .push(format!("cookie {}: {e}", cookie_of(&found.sockid))),
                }
            }
        }
    }
    Ok(report)
}

/// The backends `before` steered to (healthy, weight > 0) that `after` lists for the same
/// service as unhealthy: whose established connections should go (`ballast-dataplane apply`
/// uses it; the agent has a rule of its own over its catalog).
#[must_use]
pub fn newly_unhealthy(
    before: &[crate::ServiceSpec],
    after: &[crate::ServiceSpec],
) -> BTreeSet<std::net::SocketAddr> {
    let mut out = BTreeSet::new();
    for a in after {
        let Some(b) = before.iter().find(|b| b.name == a.name) else {
            continue;
        };
        for now in a.backends.iter().filter(|x| !x.healthy) {
            if b.backends
                .iter()
                .any(|x| x.addr == now.addr && x.healthy && x.weight > 0)
            {
                out.insert(now.addr);
            }
        }
    }
    out
}

/// The network namespaces of the processes in `cgroup` and its descendants, one process's
/// `/proc/PID/ns/net` per namespace (by inode), without the caller's own.
fn netns_of_cgroup(cgroup: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen: BTreeSet<u64> = own.into_iter().collect();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(m) = std::fs::metadata(&ns) {
                    if seen.insert(m.ino()) {
                        out.push(ns);
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// [`destroy_by_cookie`] in the caller's network namespace and in every namespace of the
/// processes of `cgroup` (pods have their own): each visited from a thread of its own that
/// enters it (`setns`), so the caller's namespace never changes. A namespace that cannot be
/// entered (its process gone meanwhile) is skipped.
///
/// # Errors
/// The caller's own pass failed.
pub fn destroy_in_cgroup(cookies: &BTreeSet<u64>, cgroup: &Path) -> io::Result<DestroyReport> {
    let mut report = destroy_by_cookie(cookies)?;
    if cookies.is_empty() {
        return Ok(report);
    }
    for ns in netns_of_cgroup(cgroup) {
        let cookies = cookies.clone();
        let pass = std::thread::spawn(move || -> io::Result<DestroyReport> {
            let f = std::fs::File::open(&ns)?;
            // SAFETY: setns on a valid namespace fd; it changes this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            destroy_by_cookie(&cookies)
        })
        .join();
        match pass {
            Ok(Ok(r)) => {
                report.destroyed += r.destroyed;
                report.failed.extend(r.failed);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "a pod network namespace was skipped"),
            Err(_) => report.failed.push("a namespace pass panicked".into()),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backends_that_turned_unhealthy_in_the_same_service_count() {
        let spec = |name: &str, b: Vec<(&str, u32, bool)>| crate::ServiceSpec {
            name: name.into(),
            vip: "127.96.0.1".parse().expect("vip"),
            port: 80,
            protocol: crate::Protocol::Tcp,
            backends: b
                .into_iter()
                .map(|(a, weight, healthy)| crate::BackendSpec {
                    addr: a.parse().expect("addr"),
                    cluster: "c".into(),
                    weight,
                    healthy,
                })
                .collect(),
            canary: None,
            select: crate::SelectMode::Slots,
        };
        let before = [spec(
            "a/b",
            vec![
                ("127.0.0.1:1", 1, true),
                ("127.0.0.1:2", 0, true),
                ("127.0.0.1:3", 1, true),
            ],
        )];
        let after = [
            spec(
                "a/b",
                vec![
                    ("127.0.0.1:1", 1, false),
                    ("127.0.0.1:2", 1, false),
                    ("127.0.0.1:3", 0, true),
                ],
            ),
            spec("x/y", vec![("127.0.0.1:9", 1, false)]),
        ];
        // :2 carried no weight, :3 only lost its weight, x/y is new
        assert_eq!(
            newly_unhealthy(&before, &after),
            BTreeSet::from(["127.0.0.1:1".parse().expect("addr")])
        );
    }

    #[test]
    fn messages_have_the_kernels_layout() {
        let mut id = [0u8; SOCKID_LEN];
        id[40..44].copy_from_slice(&7u32.to_ne_bytes());
        id[44..48].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(cookie_of(&id), (1 << 32) | 7);
        let m = message(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            &request(2, 6, Some(&id)),
        );
        assert_eq!(m.len(), 16 + 56);
        assert_eq!(u32_at(&m, 0), 72);
        assert_eq!(u16_at(&m, 4), SOCK_DESTROY);
        assert_eq!((m[16], m[17]), (2, 6));
        assert_eq!(u32_at(&m, 20), ESTABLISHED);
        assert_eq!(&m[24..], &id[..]);
    }
}
