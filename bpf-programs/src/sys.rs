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
