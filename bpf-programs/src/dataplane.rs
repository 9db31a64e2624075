//! The loader and typed map API over the pinned maps.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuHashMap},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSock, CgroupSockAddr,
    },
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use tracing::{debug, info};

use crate::{
    error::{Error, Result},
    layout::{
        Backend, BackendKey, ClusterName, CounterKey, CumTable, SelKey, SelTable, SvcKey, SvcMeta,
        SvcState, BE_HEALTHY, CLUSTER_NAME_LEN, F_ALL_DOWN, F_CANARY, MAX_BACKENDS, MODE_BSEARCH,
        MODE_SLOTS, NAME_LEN, SLOTS,
    },
    spec::{
        addr_words, cluster_id, cumulative, slot_table, words_addr, BackendSpec, Canary, Protocol,
        SelectMode, ServiceSpec,
    },
};

/// The compiled BPF object (built by build.rs from `c/`).
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ballast.bpf.o"));

/// Default bpffs directory for the pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ballast";

/// The programs and the hooks they attach to.
pub const PROGRAMS: [&str; 9] = [
    "blst_connect4",
    "blst_connect6",
    "blst_sendmsg4",
    "blst_recvmsg4",
    "blst_sendmsg6",
    "blst_recvmsg6",
    "blst_getpeername4",
    "blst_getpeername6",
    "blst_sock_release",
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

/// Connects steered to one backend, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendCounter {
    pub service: String,
    pub backend: SocketAddr,
    pub cluster_id: u32,
    pub connects: u64,
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
            names,
            next_id: max_id + 1,
        })
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_dir(&self, cgroup: &Path) -> Result<PathBuf> {
        let md = fs::metadata(cgroup).map_err(|_| Error::CgroupMissing(cgroup.to_path_buf()))?;
        if !md.is_dir() || !cgroup.join("cgroup.procs").exists() {
            return Err(Error::CgroupMissing(cgroup.to_path_buf()));
        }
        Ok(self
            .pin_dir
            .join("links")
            .join(format!("cgroup-{}", md.ino())))
    }

    /// Whether the programs are attached to `cgroup` (their links are pinned).
    ///
    /// # Errors
    /// [`Error::CgroupMissing`].
    pub fn is_attached(&self, cgroup: impl AsRef<Path>) -> Result<bool> {
        let dir = self.link_dir(cgroup.as_ref())?;
        Ok(PROGRAMS.iter().all(|p| dir.join(p).exists()))
    }

    /// Attaches every program to the cgroup v2 directory `cgroup` through bpf links pinned under
    /// `<pin_dir>/links/cgroup-<inode>/`; programs already attached by any loader are kept, so
    /// attaching twice is a no-op.
    ///
    /// # Errors
    /// [`Error::CgroupMissing`], program load/attach or pin errors.
    pub fn attach(&mut self, cgroup: impl AsRef<Path>) -> Result<()> {
        let cgroup = cgroup.as_ref();
        let dir = self.link_dir(cgroup)?;
        // Two processes attaching at once would both see "no pinned link" and race.
        let _lock = crate::sys::DirLock::acquire(&self.pin_dir).map_err(|e| Error::PinDir {
            path: self.pin_dir.clone(),
            reason: format!("cannot lock it ({e})"),
        })?;
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        for name in PROGRAMS {
            let path = dir.join(name);
            if path.exists() && PinnedLink::from_pin(&path).is_ok() {
                continue;
            }
            let _ = fs::remove_file(&path);
            let perr = |source| Error::Program {
                program: name,
                source,
            };
            let file =
                fs::File::open(cgroup).map_err(|_| Error::CgroupMissing(cgroup.to_path_buf()))?;
            let program = self.ebpf.program_mut(name).ok_or(Error::Program {
                program: name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let pin_err = |e: aya::programs::links::LinkError| Error::Pin {
                path: path.clone(),
                reason: format!("{e}"),
            };
            macro_rules! attach_as {
                ($ty:ty) => {{
                    let prog: &mut $ty = program.try_into().map_err(perr)?;
                    if prog.fd().is_err() {
                        prog.load().map_err(perr)?;
                    }
                    let id = prog.attach(file, CgroupAttachMode::Single).map_err(perr)?;
                    let fd: FdLink = prog
                        .take_link(id)
                        .map_err(perr)?
                        .try_into()
                        .map_err(pin_err)?;
                    fd
                }};
            }
            let fd = if name == "blst_sock_release" {
                attach_as!(CgroupSock)
            } else {
                attach_as!(CgroupSockAddr)
            };
            fd.pin(&path).map_err(|e| Error::Pin {
                path: path.clone(),
                reason: format!("{e}"),
            })?;
        }
        info!(cgroup = %cgroup.display(), "programs attached");
        Ok(())
    }

    /// Detaches the programs from `cgroup` and removes their pinned links. When no cgroup is
    /// left attached, the maps are unpinned too (steering state is gone).
    ///
    /// # Errors
    /// [`Error::CgroupMissing`], I/O errors on the pin dir.
    pub fn detach(&mut self, cgroup: impl AsRef<Path>) -> Result<()> {
        let dir = self.link_dir(cgroup.as_ref())?;
        for name in PROGRAMS {
            let path = dir.join(name);
            if let Ok(link) = PinnedLink::from_pin(&path) {
                if let Ok(fd) = link.unpin() {
                    drop(fd); // last reference: the kernel detaches the program
                }
            }
            let _ = fs::remove_file(&path);
        }
        let _ = fs::remove_dir(&dir);
        let links = self.pin_dir.join("links");
        let empty = fs::read_dir(&links)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            let _ = fs::remove_dir(&links);
            for entry in fs::read_dir(&self.pin_dir).map_err(io("reading pin dir"))? {
                let entry = entry.map_err(io("reading pin dir"))?;
                if entry.file_name().to_string_lossy().starts_with("blst_") {
                    fs::remove_file(entry.path()).map_err(io("unpinning map"))?;
                }
            }
            let _ = fs::remove_dir(&self.pin_dir);
        }
        info!(cgroup = %cgroup.as_ref().display(), "programs detached");
        Ok(())
    }

    /// Accumulated run time and run count of a program loaded (attached) by this loader, from
    /// the kernel's BPF stats (they only grow while `aya::sys::enable_stats` is held).
    #[must_use]
    pub fn program_stats(&self, name: &str) -> Option<(std::time::Duration, u64)> {
        let info = self.ebpf.program(name)?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    fn alloc_id(&mut self) -> Result<u32> {
        let used: std::collections::HashSet<u32> = self.names.values().map(|(id, _)| *id).collect();
        for _ in 0..MAX_ID {
            let id = if self.next_id == 0 || self.next_id > MAX_ID {
                1
            } else {
                self.next_id
            };
            self.next_id = id + 1;
            if !used.contains(&id) {
                return Ok(id);
            }
        }
        Err(Error::NoFreeId(MAX_ID))
    }

    fn name_of(&self, id: u32) -> Option<&str> {
        self.names
            .iter()
            .find(|(_, (i, _))| *i == id)
            .map(|(n, _)| n.as_str())
    }

    fn register_clusters(&mut self, spec: &ServiceSpec) -> Result<()> {
        for b in &spec.backends {
            let id = cluster_id(&b.cluster);
            match self.clusters.get(&id, 0) {
                Ok(c) => {
                    let have = cstr(&c.name);
                    if have != b.cluster && b.cluster.parse::<u32>().is_err() {
                        return Err(Error::ClusterIdCollision {
                            a: have,
                            b: b.cluster.clone(),
                            id,
                        });
                    }
                }
                Err(e) if not_found(&e) => {
                    let mut name = [0u8; CLUSTER_NAME_LEN];
                    name[..b.cluster.len()].copy_from_slice(b.cluster.as_bytes());
                    self.clusters
                        .insert(id, ClusterName { name }, 0)
                        .map_err(map_err("blst_clusters"))?;
                }
                Err(e) => return Err(map_err("blst_clusters")(e)),
            }
        }
        Ok(())
    }

    /// Installs or replaces a service. The new backend and selection tables are written under
    /// the unused generation, then the service state is replaced in one map update (the flip):
    /// a concurrent `connect()` sees the old or the new table, never a mix, and the service is
    /// never absent.
    ///
    /// # Errors
    /// Validation errors ([`Error::WeightSumZero`], [`Error::TooManyBackends`],
    /// [`Error::VipInUse`], [`Error::CanaryTargetUnknown`], ...) before anything is written.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        spec.validate()?;
        let key = svc_key(spec);
        let existing = self.names.get(&spec.name).copied();
        if let Ok(other) = self.svc.get(&key, 0) {
            if existing.map(|(id, _)| id) != Some(other) {
                return Err(Error::VipInUse {
                    service: spec.name.clone(),
                    vip: spec.vip,
                    port: spec.port,
                    protocol: spec.protocol.as_str(),
                    other: self.name_of(other).unwrap_or("?").to_string(),
                });
            }
        }
        let canary = match &spec.canary {
            None => None,
            Some(c) => {
                let (cid, _) = self.names.get(&c.service).copied().ok_or_else(|| {
                    Error::CanaryTargetUnknown {
                        service: spec.name.clone(),
                        target: c.service.clone(),
                    }
                })?;
                let target_state = self.state.get(&cid, 0).map_err(map_err("blst_state"))?;
                if target_state.flags & F_CANARY != 0 {
                    return Err(Error::CanaryTargetInvalid {
                        service: spec.name.clone(),
                        target: c.service.clone(),
                    });
                }
                // basis points; percent validated to 0..=100
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let bp = (c.percent * 100.0).round() as u32;
                Some((cid, bp))
            }
        };
        if spec.canary.is_none() {
            // a service that is a canary target may not get a canary of its own: checked above
        } else if let Some((id, _)) = existing {
            if let Some(by) = self.canary_referrer(id)? {
                return Err(Error::CanaryTargetInvalid {
                    service: by,
                    target: spec.name.clone(),
                });
            }
        }
        self.register_clusters(spec)?;

        let (id, old_key, old_gen) = match existing {
            Some((id, k)) => {
                let gen = match self.state.get(&id, 0) {
                    Ok(s) => s.gen,
                    Err(e) if not_found(&e) => 0,
                    Err(e) => return Err(map_err("blst_state")(e)),
                };
                (id, Some(k), gen)
            }
            None => (self.alloc_id()?, None, 0),
        };
        let gen = old_gen.wrapping_add(1);
        let parity = gen & 1;

        // 1. backends of the new generation, aside
        for (i, b) in spec.backends.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            let rec = Backend {
                addr: addr_words(b.addr.ip()),
                port: b.addr.port().to_be(),
                flags: if b.healthy { BE_HEALTHY } else { 0 },
                pad: 0,
                cluster: cluster_id(&b.cluster),
                weight: b.weight,
                gen,
            };
            self.backends
                .insert(BackendKey { id, parity, idx }, rec, 0)
                .map_err(map_err("blst_backends"))?;
        }
        self.clear_backends(id, parity, spec.backends.len())?;

        // 2. selection table of the new generation
        let weights = spec.effective_weights();
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let all_down = total == 0;
        let sk = SelKey { id, parity };
        if let Some(slots) = slot_table(&weights) {
            let mut t = Box::new(SelTable { slots: [0; SLOTS] });
            t.slots.copy_from_slice(&slots);
            self.sel.insert(sk, *t, 0).map_err(map_err("blst_sel"))?;
        }
        if spec.select == SelectMode::BinarySearch && !all_down {
            let mut t = Box::new(CumTable {
                cum: [u32::MAX; MAX_BACKENDS],
            });
            let cum = cumulative(&weights);
            t.cum[..cum.len()].copy_from_slice(&cum);
            self.cum.insert(sk, *t, 0).map_err(map_err("blst_cum"))?;
        }

        // 3. metadata, then the flip
        let mut name = [0u8; NAME_LEN];
        name[..spec.name.len()].copy_from_slice(spec.name.as_bytes());
        self.meta
            .insert(id, SvcMeta { name, key }, 0)
            .map_err(map_err("blst_meta"))?;
        let mut flags = 0;
        if all_down {
            flags |= F_ALL_DOWN;
        }
        let (canary_id, canary_pct) = match canary {
            Some((cid, bp)) => {
                flags |= F_CANARY;
                (cid, bp)
            }
            None => (0, 0),
        };
        let st = SvcState {
            gen,
            count: u32::try_from(spec.backends.len()).unwrap_or(u32::MAX),
            total: u32::try_from(total).unwrap_or(u32::MAX),
            canary_id,
            canary_pct,
            mode: match spec.select {
                SelectMode::Slots => MODE_SLOTS,
                SelectMode::BinarySearch => MODE_BSEARCH,
            },
            flags,
            proto: spec.protocol.number(),
            pad: 0,
        };
        self.state
            .insert(id, st, 0)
            .map_err(map_err("blst_state"))?;
        // 4. the VIP points at the service id (unchanged for an existing service)
        self.svc.insert(key, id, 0).map_err(map_err("blst_svc"))?;
        if let Some(k) = old_key {
            if k != key {
                let _ = self.svc.remove(&k);
            }
        }
        self.names.insert(spec.name.clone(), (id, key));
        debug!(service = %spec.name, id, gen, "service installed");
        Ok(())
    }

    fn clear_backends(&mut self, id: u32, parity: u32, from: usize) -> Result<()> {
        let mut idx = u32::try_from(from).unwrap_or(u32::MAX);
        loop {
            match self.backends.remove(&BackendKey { id, parity, idx }) {
                Ok(()) => idx += 1,
                Err(e) if not_found(&e) => return Ok(()),
                Err(e) => return Err(map_err("blst_backends")(e)),
            }
        }
    }

    fn canary_referrer(&self, id: u32) -> Result<Option<String>> {
        for (name, (sid, _)) in &self.names {
            if *sid == id {
                continue;
            }
            if let Ok(s) = self.state.get(sid, 0) {
                if s.flags & F_CANARY != 0 && s.canary_id == id {
                    return Ok(Some(name.clone()));
                }
            }
        }
        Ok(None)
    }

    /// Removes a service. Its VIP goes first, so no `connect()` is steered by half a service.
    ///
    /// # Errors
    /// [`Error::UnknownService`], [`Error::CanaryTargetInUse`].
    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let (id, _) = *self
            .names
            .get(name)
            .ok_or_else(|| Error::UnknownService(name.into()))?;
        if let Some(by) = self.canary_referrer(id)? {
            return Err(Error::CanaryTargetInUse {
                service: name.into(),
                by,
            });
        }
        self.remove_unchecked(name)
    }

    fn remove_unchecked(&mut self, name: &str) -> Result<()> {
        let Some((id, key)) = self.names.remove(name) else {
            return Ok(());
        };
        let ignore = |r: Result<(), MapError>, map| match r {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(map)(e)),
        };
        ignore(self.svc.remove(&key), "blst_svc")?;
        ignore(self.state.remove(&id), "blst_state")?;
        for parity in 0..2 {
            ignore(self.sel.remove(&SelKey { id, parity }), "blst_sel")?;
            ignore(self.cum.remove(&SelKey { id, parity }), "blst_cum")?;
            self.clear_backends(id, parity, 0)?;
        }
        ignore(self.meta.remove(&id), "blst_meta")?;
        let stale: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| k.id == id)
            .collect();
        for k in stale {
            ignore(self.counters.remove(&k), "blst_counters")?;
        }
        debug!(service = name, id, "service removed");
        Ok(())
    }

    fn installed(&self, name: &str, id: u32) -> Result<InstalledService> {
        let st = self.state.get(&id, 0).map_err(map_err("blst_state"))?;
        let meta = self.meta.get(&id, 0).map_err(map_err("blst_meta"))?;
        let parity = st.gen & 1;
        let mut backends = Vec::with_capacity(st.count as usize);
        for idx in 0..st.count {
            let b = self
                .backends
                .get(&BackendKey { id, parity, idx }, 0)
                .map_err(map_err("blst_backends"))?;
            let cluster = self
                .clusters
                .get(&b.cluster, 0)
                .map_or_else(|_| b.cluster.to_string(), |c| cstr(&c.name));
            backends.push(BackendSpec {
                addr: SocketAddr::new(words_addr(b.addr), u16::from_be(b.port)),
                cluster,
                weight: b.weight,
                healthy: b.flags & BE_HEALTHY != 0,
            });
        }
        let canary = if st.flags & F_CANARY != 0 {
            Some(Canary {
                service: self.name_of(st.canary_id).unwrap_or("?").to_string(),
                percent: f64::from(st.canary_pct) / 100.0,
            })
        } else {
            None
        };
        Ok(InstalledService {
            id,
            generation: st.gen,
            all_down: st.flags & F_ALL_DOWN != 0,
            spec: ServiceSpec {
                name: name.to_string(),
                vip: words_addr(meta.key.addr),
                port: u16::from_be(meta.key.port),
                protocol: Protocol::from_number(meta.key.proto).unwrap_or(Protocol::Tcp),
                backends,
                canary,
                select: if st.mode == MODE_BSEARCH {
                    SelectMode::BinarySearch
                } else {
                    SelectMode::Slots
                },
            },
        })
    }

    /// Every installed service, read back from the kernel maps.
    ///
    /// # Errors
    /// Map read errors.
    pub fn services(&self) -> Result<Vec<InstalledService>> {
        self.names
            .iter()
            .map(|(n, (id, _))| self.installed(n, *id))
            .collect()
    }

    /// One installed service.
    ///
    /// # Errors
    /// [`Error::UnknownService`], map read errors.
    pub fn service(&self, name: &str) -> Result<InstalledService> {
        let (id, _) = self
            .names
            .get(name)
            .ok_or_else(|| Error::UnknownService(name.into()))?;
        self.installed(name, *id)
    }

    /// Marks one backend healthy or not (a new generation; unhealthy backends get no slots).
    ///
    /// # Errors
    /// [`Error::UnknownService`], [`Error::UnknownBackend`].
    pub fn set_backend_health(
        &mut self,
        service: &str,
        backend: SocketAddr,
        healthy: bool,
    ) -> Result<()> {
        let mut spec = self.service(service)?.spec;
        let b = spec
            .backends
            .iter_mut()
            .find(|b| b.addr == backend)
            .ok_or_else(|| Error::UnknownBackend {
                service: service.into(),
                backend: backend.to_string(),
            })?;
        b.healthy = healthy;
        self.upsert_service(&spec)
    }

    /// Sets or clears the canary of a service.
    ///
    /// # Errors
    /// As [`Dataplane::upsert_service`].
    pub fn set_canary(&mut self, service: &str, canary: Option<Canary>) -> Result<()> {
        let mut spec = self.service(service)?.spec;
        spec.canary = canary;
        self.upsert_service(&spec)
    }

    /// Connect counters per (service, backend) of the current backends, summed over CPUs.
    ///
    /// # Errors
    /// Map read errors.
    pub fn counters(&self) -> Result<Vec<BackendCounter>> {
        let mut out = Vec::new();
        for svc in self.services()? {
            let mut seen = StdHashMap::new();
            for b in &svc.spec.backends {
                let key = CounterKey {
                    id: svc.id,
                    addr: addr_words(b.addr.ip()),
                    port: b.addr.port().to_be(),
                    pad: 0,
                };
                if seen.insert(key, ()).is_some() {
                    continue;
                }
                let connects = match self.counters.get(&key, 0) {
                    Ok(v) => v.iter().sum(),
                    Err(e) if not_found(&e) => 0,
                    Err(e) => return Err(map_err("blst_counters")(e)),
                };
                out.push(BackendCounter {
                    service: svc.spec.name.clone(),
                    backend: b.addr,
                    cluster_id: cluster_id(&b.cluster),
                    connects,
                });
            }
        }
        Ok(out)
    }

    /// Makes the maps hold exactly `specs` (as `ballast-dataplane apply` does): validates all
    /// first (nothing is written when one is invalid), frees VIPs held by services that are
    /// going away, upserts (canary targets first), then removes the services not in `specs`.
    ///
    /// # Errors
    /// The first invalid spec, or a map error.
    pub fn apply(&mut self, specs: &[ServiceSpec]) -> Result<()> {
        crate::config::validate_set(specs)?;
        let wanted: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let keys: std::collections::HashSet<SvcKey> = specs.iter().map(svc_key).collect();
        let going: Vec<(String, SvcKey)> = self
            .names
            .iter()
            .filter(|(n, _)| !wanted.contains(n.as_str()))
            .map(|(n, (_, k))| (n.clone(), *k))
            .collect();
        for (n, k) in &going {
            if keys.contains(k) {
                self.remove_unchecked(n)?;
            }
        }
        // a service that becomes a canary target must lose its own canary first
        let targets: std::collections::HashSet<&str> = specs
            .iter()
            .filter_map(|s| s.canary.as_ref().map(|c| c.service.as_str()))
            .collect();
        for t in &targets {
            if let Ok(cur) = self.service(t) {
                if cur.spec.canary.is_some() {
                    self.set_canary(t, None)?;
                }
            }
        }
        let (plain, with_canary): (Vec<&ServiceSpec>, Vec<&ServiceSpec>) =
            specs.iter().partition(|s| s.canary.is_none());
        for s in plain.into_iter().chain(with_canary) {
            self.upsert_service(s)?;
        }
        for (n, _) in going {
            self.remove_unchecked(&n)?;
        }
        Ok(())
    }
}
