//! Host helpers shared by the binary, the tests and the benchmark.

use std::path::PathBuf;

/// Where cgroup v2 is mounted (read from /proc/mounts; hybrid hosts use /sys/fs/cgroup/unified).
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    mount_of("cgroup2")
}

/// Where bpffs is mounted, if it is.
#[must_use]
pub fn bpffs_mount() -> Option<PathBuf> {
    mount_of("bpf")
}

/// For tests that need root: whether this process is root. They skip without it, except
/// under CI (`CI=true`), which runs them as root: there a missing root fails the test rather
/// than letting it pass having checked nothing.
///
/// # Panics
/// When not root and `CI` is `true`.
#[must_use]
pub fn root_for_tests() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not root: this test needs root and must not be skipped in CI"
    );
    root
}

fn mount_of(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

/// `SO_LINGER` 0: `close()` sends RST and leaves no TIME_WAIT (keeps 20,000-connect runs fast).
pub fn linger_zero(sock: &impl std::os::fd::AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: setsockopt with a valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            u32::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

/// A TCP socket's retransmission state from `TCP_INFO`: payload bytes it retransmitted so far
/// (`tcpi_bytes_retrans`) and segments still unacknowledged (`tcpi_unacked`).
///
/// # Errors
/// `getsockopt` failed (not a TCP socket).
pub fn tcp_retrans(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<(u64, u32)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| std::io::Error::other("tcp_info size"))?;
    #[allow(unsafe_code)]
    // SAFETY: getsockopt with a valid fd, a buffer of `len` bytes and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((info.tcpi_bytes_retrans, info.tcpi_unacked))
}

/// An exclusive `flock(2)` on a directory, released on drop (the fd closes).
///
/// Serializes data-plane loaders across processes: two loaders creating the pinned maps of
/// one pin dir at once would race between "not pinned yet" and `BPF_OBJ_PIN` (EEXIST).
#[derive(Debug)]
pub struct DirLock {
    _dir: std::fs::File,
}

impl DirLock {
    /// Blocks until the lock on `dir` is held.
    ///
    /// # Errors
    /// The directory cannot be opened or locked.
    pub fn acquire(dir: &std::path::Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dir)?;
        loop {
            #[allow(unsafe_code)]
            // SAFETY: flock on a valid, owned fd; no memory is passed.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self { _dir: f });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
