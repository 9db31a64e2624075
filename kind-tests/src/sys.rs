//! Host plumbing: running commands, network namespaces (found by name), cgroup v2
//! directories, entering a cluster (cgroup + netns), spawning and ending the lab's own
//! processes. Changing the network (`ip`) is `net`'s.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{IoContext, LabError, Result};

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running {program}"))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the network namespaces under /run/netns.
pub fn list_netns() -> Vec<String> {
    let Ok(rd) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    list_netns().iter().any(|n| n == name)
}

/// The cgroup v2 mount point: the lookup of the data plane (`ballast_bpf::sys`), one for
/// every crate.
pub fn cgroup2_mount() -> Result<PathBuf> {
    ballast_bpf::sys::cgroup2_mount()
        .ok_or_else(|| LabError::Other("no cgroup2 mount in /proc/mounts".into()))
}

/// Pids listed in `cgroup.procs` of a cgroup and all its descendants.
pub fn pids_in_cgroup(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(pids_in_cgroup(&e.path()));
            }
        }
    }
    out
}

/// Removes a cgroup directory tree (children first). Fails if processes are left.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let rd = fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))?;
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    // rmdir may race with an exiting process: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("rmdir {}: {e}; retrying", dir.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(LabError::io(
                    format!("removing cgroup {}", dir.display()),
                    e,
                ))
            }
        }
    }
}

/// Pids whose network namespace is the one bind-mounted at `path`.
pub fn pids_in_netns(path: &Path) -> Vec<i32> {
    let Ok(meta) = fs::metadata(path) else {
        return Vec::new();
    };
    let want = format!("net:[{}]", meta.ino());
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(link) = fs::read_link(e.path().join("ns/net")) {
            if link.to_string_lossy() == want {
                out.push(pid);
            }
        }
    }
    out
}

/// Field 22 of /proc/PID/stat (start time in clock ticks): with the pid, identifies a
/// process even after pid reuse.
pub fn proc_starttime(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    // after ") " the fields start at field 3 (state); starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive and still the process started at `starttime`; zombies count
/// as dead.
pub fn proc_alive(pid: i32, starttime: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if let Some(i) = stat.rfind(')') {
        if stat[i..].starts_with(") Z") {
            return false;
        }
    }
    match starttime {
        Some(st) => proc_starttime(pid) == Some(st),
        None => true,
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions; pid > 0 is checked by callers.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Ends one process: SIGTERM, then SIGKILL after `grace`. Only if it is still the process
/// identified by (pid, starttime). Returns whether it had to be ended.
pub fn end_process(pid: i32, starttime: Option<u64>, grace: Duration) -> bool {
    if pid <= 1 || pid == std::process::id() as i32 || !proc_alive(pid, starttime) {
        return false;
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !proc_alive(pid, starttime) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && proc_alive(pid, starttime) {
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Where to put a process: a cgroup (its directory) and/or a network namespace (name).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub cgroup: Option<PathBuf>,
    pub netns: Option<String>,
}

impl Placement {
    pub fn cluster(cgroup: &Path, netns: &str) -> Self {
        Placement {
            cgroup: Some(cgroup.to_path_buf()),
            netns: Some(netns.to_string()),
        }
    }
    pub fn netns(netns: &str) -> Self {
        Placement {
            cgroup: None,
            netns: Some(netns.to_string()),
        }
    }

    fn open(&self) -> Result<Opened> {
        let procs = match &self.cgroup {
            Some(dir) => {
                let p = dir.join("cgroup.procs");
                if !p.exists() {
                    return Err(LabError::Other(format!(
                        "cgroup {} does not exist (is the lab up?)",
                        dir.display()
                    )));
                }
                Some(
                    CString::new(p.as_os_str().as_encoded_bytes())
                        .map_err(|_| LabError::invalid("cgroup", "path contains NUL"))?,
                )
            }
            None => None,
        };
        let ns = match &self.netns {
            Some(name) => {
                let path = netns_path(name);
                let f = fs::File::open(&path).ctx(|| {
                    format!(
                        "opening network namespace {} (is the lab up?)",
                        path.display()
                    )
                })?;
                Some(OwnedFd::from(f))
            }
            None => None,
        };
        Ok(Opened { procs, ns })
    }

    /// Moves the calling process into the cgroup (first: /sys stays this host's), then
    /// the calling thread into the network namespace. Call before starting threads (the
    /// tokio runtime): new threads inherit the namespace of the thread that makes them.
    pub fn enter_current(&self) -> Result<()> {
        let opened = self.open()?;
        opened.enter().ctx(|| format!("entering {self:?}"))
    }

    /// Makes `cmd` start in the placement (cgroup first, then netns) in its own session.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        let opened = self.open()?;
        // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close,
        // setns, setsid) on data prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                opened.enter()?;
                libc::setsid();
                Ok(())
            });
        }
        Ok(())
    }
}

struct Opened {
    procs: Option<CString>,
    ns: Option<OwnedFd>,
}

impl Opened {
    fn enter(&self) -> std::io::Result<()> {
        if let Some(procs) = &self.procs {
            // SAFETY: procs is a valid NUL-terminated path; the buffer is a static string.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing process.
                let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if r < 0 {
                    return Err(err);
                }
            }
        }
        if let Some(ns) = &self.ns {
            // SAFETY: ns is an open nsfs file descriptor.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A process the lab started and must end in `down`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Spawned {
    pub role: String,
    pub pid: i32,
    pub starttime: Option<u64>,
    pub log: PathBuf,
}

/// Starts a long-lived process in `placement`, detached (own session, stdin null,
/// stdout+stderr appended to `log`).
pub fn spawn_daemon(
    role: &str,
    program: &Path,
    args: &[String],
    placement: &Placement,
    log: &Path,
    envs: &[(&str, &str)],
) -> Result<Spawned> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    let mut logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ctx(|| format!("opening log {}", log.display()))?;
    let _ = writeln!(logf, "--- {role}: {} {}", program.display(), args.join(" "));
    let errf = logf.try_clone().ctx(|| "cloning log fd".into())?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(errf));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    placement.apply(&mut cmd)?;
    let child = cmd
        .spawn()
        .ctx(|| format!("starting {role} ({})", program.display()))?;
    let pid = child.id() as i32;
    // Not waited for: the daemon outlives this command and is reparented.
    drop(child);
    Ok(Spawned {
        role: role.to_string(),
        pid,
        starttime: proc_starttime(pid),
        log: log.to_path_buf(),
    })
}

/// Runs `f` on a fresh thread that has entered network namespace `netns` (the calling
/// thread's namespace is untouched).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let placement = Placement::netns(netns);
    std::thread::spawn(move || -> Result<T> {
        placement.enter_current()?;
        Ok(f())
    })
    .join()
    .map_err(|_| LabError::Other("netns thread panicked".into()))?
}

/// Whether something accepts TCP on `addr` inside `netns` (one connect, 200 ms at most).
pub fn listening_in(netns: &str, addr: std::net::SocketAddr) -> bool {
    in_netns(netns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .unwrap_or(false)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An exclusive advisory lock on a file, held until drop.
pub struct FileLock {
    _file: fs::File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ctx(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on an open fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(LabError::io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FileLock { _file: file })
    }
}

/// Writes a file atomically (temp file + rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).ctx(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn starttime_of_self_is_stable_and_alive() {
        let me = std::process::id() as i32;
        let st = proc_starttime(me);
        assert!(st.is_some());
        assert!(proc_alive(me, st));
        assert!(!proc_alive(me, st.map(|s| s + 1)));
    }

    #[test]
    fn cgroup2_mount_is_found() {
        // Every machine ballast runs on has cgroup v2 (setup.sh checks it).
        let m = cgroup2_mount().expect("cgroup2 mount");
        assert!(m.join("cgroup.controllers").exists(), "{}", m.display());
    }

    #[test]
    fn run_reports_stderr_of_failing_command() {
        let e = run("ip", &["link", "show", "dev", "no-such-dev-xyz"]).unwrap_err();
        assert!(e.to_string().contains("no-such-dev-xyz"), "{e}");
    }
}
