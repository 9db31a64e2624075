//! The loader and typed map API over the pinned maps: the [`Dataplane`] handle (this file:
//! the maps it holds, opening them, id and name bookkeeping), attaching the programs to cgroups
//! (`attach`), writing services (`install`) and reading them back (`read`).
//!
//! Decisions: one `Dataplane` value owns every map handle, and each concern adds its methods in
//! its own `impl` block (child modules see the private fields), so the write path, which must
//! keep the "write aside, then flip one index" rule, reads as one file.

mod attach;
mod install;
mod read;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuHashMap},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use tracing::debug;

use crate::{
    error::{Error, Result},
    layout::{
        Backend, BackendKey, ByteCount, ClusterName, CounterKey, CumTable, SelKey, SelTable,
        SockRev, SvcKey, SvcMeta, SvcState,
    },
    spec::{addr_words, ServiceSpec},
};

/// The compiled BPF object (built by build.rs from `c/`).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ballast.bpf.o"));

/// Default bpffs directory for the pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ballast";

/// The programs and the hooks they attach to.
pub const PROGRAMS: [&str; 11] = [
    "blst_connect4",
    "blst_connect6",
    "blst_sendmsg4",
    "blst_recvmsg4",
    "blst_sendmsg6",
    "blst_recvmsg6",
    "blst_getpeername4",
    "blst_getpeername6",
    "blst_sock_release",
    "blst_skb_egress",
    "blst_skb_ingress",
];

const MAX_ID: u32 = 65_535;

/// A service as installed in the kernel.
#[derive(Clone, Debug, Serialize)]
pub struct InstalledService {
    pub id: u32,
    pub generation: u32,
    /// True when no healthy backend has weight > 0: `connect()` fails with EPERM.
    pub all_down: bool,
    #[serde(flatten)]
    pub spec: ServiceSpec,
}

/// Connects steered to one backend and the payload bytes of those sockets, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendCounter {
    pub service: String,
    pub backend: SocketAddr,
    pub cluster_id: u32,
    pub connects: u64,
    /// Transport payload bytes the steered sockets sent to this backend (the counting rule is
    /// in the crate README: TCP/UDP payload as on the wire, retransmissions included).
    pub bytes_sent: u64,
    /// Transport payload bytes the steered sockets received from this backend.
    pub bytes_received: u64,
}

/// Handle on the pinned maps (created on first open) and the programs.
pub struct Dataplane {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    svc: HashMap<MapData, SvcKey, u32>,
    state: HashMap<MapData, u32, SvcState>,
    sel: HashMap<MapData, SelKey, SelTable>,
    cum: HashMap<MapData, SelKey, CumTable>,
    backends: HashMap<MapData, BackendKey, Backend>,
    meta: HashMap<MapData, u32, SvcMeta>,
    clusters: HashMap<MapData, u32, ClusterName>,
    counters: PerCpuHashMap<MapData, CounterKey, u64>,
    /// per-CPU (service, backend) -> payload bytes sent/received by the steered sockets.
    bytes: PerCpuHashMap<MapData, CounterKey, ByteCount>,
    /// socket cookie -> (backend, VIP) of every connected socket the programs steered.
    conn: HashMap<MapData, u64, SockRev>,
    /// name -> (id, key) of every installed service, read from `blst_meta` at open.
    names: BTreeMap<String, (u32, SvcKey)>,
    next_id: u32,
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { map, source }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn cstr(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn svc_key(spec: &ServiceSpec) -> SvcKey {
    SvcKey {
        addr: addr_words(spec.vip),
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        pad: 0,
    }
}

macro_rules! take {
    ($ebpf:expr, $name:literal) => {{
        let m = $ebpf.take_map($name).ok_or_else(|| Error::Map {
            map: $name,
            source: MapError::InvalidName { name: $name.into() },
        })?;
        m.try_into().map_err(map_err($name))?
    }};
}

impl Dataplane {
    /// Opens the data plane whose maps are pinned under `pin_dir` (a directory on bpffs),
    /// creating and pinning the maps if this is the first loader. Nothing is attached.
    ///
    /// # Errors
    /// [`Error::PinDir`] when `pin_dir` is not on a mounted bpffs; load errors.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        fs::create_dir_all(&pin_dir).map_err(|e| Error::PinDir {
            path: pin_dir.clone(),
            reason: format!(
                "cannot create it ({e}); is bpffs mounted (mount -t bpf bpf /sys/fs/bpf)?"
            ),
        })?;
        // One loader at a time per pin dir: a second process creating the same pinned maps
        // concurrently would fail its BPF_OBJ_PIN with EEXIST.
        let lock = crate::sys::DirLock::acquire(&pin_dir).map_err(|e| Error::PinDir {
            path: pin_dir.clone(),
            reason: format!("cannot lock it ({e})"),
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(BPF_OBJECT)?;
        drop(lock);
        let svc = take!(ebpf, "blst_svc");
        let state = take!(ebpf, "blst_state");
        let sel = take!(ebpf, "blst_sel");
        let cum = take!(ebpf, "blst_cum");
        let backends = take!(ebpf, "blst_backends");
        let meta: HashMap<MapData, u32, SvcMeta> = take!(ebpf, "blst_meta");
        let clusters = take!(ebpf, "blst_clusters");
        let counters = take!(ebpf, "blst_counters");
        let bytes = take!(ebpf, "blst_bytes");
        let conn = take!(ebpf, "blst_conn");
        let mut names = BTreeMap::new();
        let mut max_id = 0;
        for item in meta.iter() {
            let (id, m) = item.map_err(map_err("blst_meta"))?;
            names.insert(cstr(&m.name), (id, m.key));
            max_id = max_id.max(id);
        }
        debug!(pin_dir = %pin_dir.display(), services = names.len(), "opened data plane");
        Ok(Self {
            pin_dir,
            ebpf,
            svc,
            state,
            sel,
            cum,
            backends,
            meta,
            clusters,
            counters,
            bytes,
            conn,
            names,
            next_id: max_id + 1,
        })
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn name_of(&self, id: u32) -> Option<&str> {
        self.names
            .iter()
            .find(|(_, (i, _))| *i == id)
            .map(|(n, _)| n.as_str())
    }
}
