//! Prerequisites, checked so that a missing one is named — in the log, in `/ready`'s reason
//! and in `ballast_agent_prerequisite_missing{prerequisite}` — instead of surfacing as a
//! timeout or a BPF error.
//!
//! - Host prerequisites ([`check_host`]): kernel >= 5.8 (`kernel`), cgroup v2 mounted at
//!   `--cgroup` (`cgroup_v2`), BTF at `/sys/kernel/btf/vmlinux` (`btf`), bpffs under the pin
//!   directory (`bpffs`). They cannot appear while the agent runs, so they are fatal at start
//!   (with the prerequisite named).
//! - The Kubernetes prerequisite ([`mcs_served`], [`wait_for_mcs`]): the API server serves
//!   `serviceimports` in group `multicluster.x-k8s.io` (v1beta1 or v1alpha1). CRDs may be
//!   installed later, so the agent stays up, not ready, and checks again periodically.
//!
//! Paths are parameters ([`HostPaths`]) so that the checks can be tried on fake trees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_runtime::Readiness;
use kube::Client;

use crate::metrics::Metrics;

/// The MCS API group the agent reads `ServiceImport`s from.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// The versions accepted, newest first.
pub const MCS_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// How often the MCS check is repeated while the CRDs are missing.
pub const RECHECK: Duration = Duration::from_secs(15);
/// The oldest kernel the data plane runs on (bpf links for cgroups, CAP_BPF).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One prerequisite; [`Prerequisite::name`] is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prerequisite {
    /// The MCS CRDs (`ServiceImport`) served by the API server.
    McsCrds,
    /// Linux >= 5.8.
    Kernel,
    /// cgroup v2 mounted at the `--cgroup` path.
    CgroupV2,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`).
    Btf,
    /// bpffs mounted where the pin directory is.
    Bpffs,
}

impl Prerequisite {
    pub const ALL: [Self; 5] = [
        Self::McsCrds,
        Self::Kernel,
        Self::CgroupV2,
        Self::Btf,
        Self::Bpffs,
    ];

    /// The label value of `ballast_agent_prerequisite_missing`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::McsCrds => "mcs_crds",
            Self::Kernel => "kernel",
            Self::CgroupV2 => "cgroup_v2",
            Self::Btf => "btf",
            Self::Bpffs => "bpffs",
        }
    }
}

/// A prerequisite found missing, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prerequisite missing: {} ({detail})", prerequisite.name())]
pub struct Missing {
    pub prerequisite: Prerequisite,
    pub detail: String,
}

/// Several missing host prerequisites, all named.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct MissingAll(pub Vec<Missing>);

/// Where the host checks look.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The kernel release (`/proc/sys/kernel/osrelease`).
    pub osrelease: PathBuf,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: PathBuf,
    /// `--cgroup`.
    pub cgroup: PathBuf,
    /// `--pin-dir` (may not exist yet: its nearest existing ancestor must be on bpffs).
    pub pin_dir: PathBuf,
}

impl HostPaths {
    /// The real paths for an agent attaching to `cgroup` and pinning under `pin_dir`.
    #[must_use]
    pub fn host(cgroup: &Path, pin_dir: &Path) -> Self {
        Self {
            osrelease: "/proc/sys/kernel/osrelease".into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            cgroup: cgroup.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
        }
    }
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v669` or `5.4.0-150-generic`.
#[must_use]
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor_text: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor_text.parse().ok()?))
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

fn nearest_existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

/// Checks the host prerequisites; empty when all are there.
#[must_use]
pub fn check_host(paths: &HostPaths) -> Vec<Missing> {
    let mut missing = Vec::new();
    let mut miss = |prerequisite, detail: String| {
        missing.push(Missing {
            prerequisite,
            detail,
        });
    };
    match std::fs::read_to_string(&paths.osrelease) {
        Ok(r) => match kernel_version(&r) {
            Some(v) if v >= MIN_KERNEL => {}
            Some(_) => miss(
                Prerequisite::Kernel,
                format!(
                    "kernel {} is older than {}.{}",
                    r.trim(),
                    MIN_KERNEL.0,
                    MIN_KERNEL.1
                ),
            ),
            None => miss(
                Prerequisite::Kernel,
                format!("cannot read a version from {:?}", r.trim()),
            ),
        },
        Err(e) => miss(
            Prerequisite::Kernel,
            format!("cannot read {}: {e}", paths.osrelease.display()),
        ),
    }
    match fs_magic(&paths.cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(other) => miss(
            Prerequisite::CgroupV2,
            format!(
                "{} is not on a cgroup v2 mount (filesystem magic {other:#x}); mount cgroup2 \
                 there or give --cgroup",
                paths.cgroup.display()
            ),
        ),
        Err(e) => miss(
            Prerequisite::CgroupV2,
            format!("{}: {e}", paths.cgroup.display()),
        ),
    }
    if !paths.btf.is_file() {
        miss(
            Prerequisite::Btf,
            format!(
                "{} absent: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF)",
                paths.btf.display()
            ),
        );
    }
    let on = nearest_existing(&paths.pin_dir);
    match on.map(fs_magic) {
        Some(Ok(BPF_FS_MAGIC)) => {}
        Some(Ok(other)) => miss(
            Prerequisite::Bpffs,
            format!(
                "the pin dir {} is not on bpffs ({} has filesystem magic {other:#x}); mount \
                 it (mount -t bpf bpf /sys/fs/bpf)",
                paths.pin_dir.display(),
                on.map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            ),
        ),
        Some(Err(e)) => miss(
            Prerequisite::Bpffs,
            format!("{}: {e}", paths.pin_dir.display()),
        ),
        None => miss(
            Prerequisite::Bpffs,
            format!("{}: no existing ancestor", paths.pin_dir.display()),
        ),
    }
    missing
}

/// Checks the host, publishing each prerequisite's state in `metrics`.
///
/// # Errors
/// Every missing host prerequisite, named.
pub fn require_host(paths: &HostPaths, metrics: &Metrics) -> Result<(), MissingAll> {
    let missing = check_host(paths);
    for p in Prerequisite::ALL {
        if p != Prerequisite::McsCrds {
            metrics.set_prerequisite_missing(p.name(), missing.iter().any(|m| m.prerequisite == p));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingAll(missing))
    }
}

/// The capabilities the data plane needs (measured on Linux 6.18: CAP_BPF to create maps
/// and load programs, CAP_NET_ADMIN to load and attach cgroup sock/sock_addr programs,
/// CAP_PERFMON for the verifier to accept them), each also satisfied by CAP_SYS_ADMIN.
pub const NEEDED_CAPS: [(&str, u32); 3] =
    [("CAP_BPF", 39), ("CAP_NET_ADMIN", 12), ("CAP_PERFMON", 38)];
const CAP_SYS_ADMIN: u32 = 21;

/// The capabilities of [`NEEDED_CAPS`] missing from the `CapEff:` line of a
/// `/proc/PID/status` text (none when CAP_SYS_ADMIN is there; `None` when the line is absent).
#[must_use]
pub fn missing_capabilities(proc_status: &str) -> Option<Vec<&'static str>> {
    let hex = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let eff = u64::from_str_radix(hex, 16).ok()?;
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) {
        return Some(Vec::new());
    }
    Some(
        NEEDED_CAPS
            .iter()
            .filter(|(_, bit)| !has(*bit))
            .map(|(name, _)| *name)
            .collect(),
    )
}

/// What to add to a data-plane error: the needed capabilities this process lacks, if any.
#[must_use]
pub fn capability_hint() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match missing_capabilities(&status) {
        Some(m) if !m.is_empty() => format!(
            "; missing capabilities: {} (the agent needs CAP_BPF, CAP_NET_ADMIN and \
             CAP_PERFMON, or CAP_SYS_ADMIN)",
            m.join(", ")
        ),
        _ => String::new(),
    }
}

/// The version of `multicluster.x-k8s.io` serving `serviceimports` (v1beta1 preferred), or
/// `None` when no accepted version serves it.
///
/// # Errors
/// The API server's errors other than 404 (a group version not served).
pub async fn mcs_served(client: &Client) -> Result<Option<&'static str>, kube::Error> {
    for v in MCS_VERSIONS {
        match client
            .list_api_group_resources(&format!("{MCS_GROUP}/{v}"))
            .await
        {
            Ok(list) => {
                if list.resources.iter().any(|r| r.name == "serviceimports") {
                    return Ok(Some(v));
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Waits until the MCS CRDs are served, checking every `interval`. Meanwhile the agent is not
/// ready (reason in `/ready`), `ballast_agent_prerequisite_missing{prerequisite="mcs_crds"}`
/// is 1 and each failed check is logged.
pub async fn wait_for_mcs(
    client: &Client,
    metrics: &Metrics,
    ready: &Readiness,
    interval: Duration,
) -> &'static str {
    let name = Prerequisite::McsCrds.name();
    loop {
        match mcs_served(client).await {
            Ok(Some(v)) => {
                metrics.set_prerequisite_missing(name, false);
                tracing::info!(
                    version = v,
                    "MCS API served: {MCS_GROUP}/{v} serviceimports"
                );
                return v;
            }
            Ok(None) => {
                let m = Missing {
                    prerequisite: Prerequisite::McsCrds,
                    detail: format!(
                        "the API server serves no serviceimports in {MCS_GROUP} (v1beta1 or \
                         v1alpha1): install the MCS CRDs (or Lighthouse/Cilium providing them); \
                         checking again every {}",
                        humantime::format_duration(interval)
                    ),
                };
                metrics.set_prerequisite_missing(name, true);
                tracing::error!("{m}");
                ready.set_not_ready(m.to_string());
            }
            Err(e) => {
                // unknown: neither served nor missing; say so without claiming either
                tracing::warn!(error = %e, "cannot check the MCS API; retrying");
                ready.set_not_ready(format!("cannot check the MCS API ({MCS_GROUP}): {e}"));
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests;
