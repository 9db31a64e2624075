//! Reading services and counters back from the kernel maps (what is installed is what the
//! maps say, not what this process last wrote: another loader may share the pin dir).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use super::{cstr, map_err, not_found, BackendCounter, Dataplane, InstalledService};
use crate::{
    error::{Error, Result},
    layout::{BackendKey, CounterKey, BE_HEALTHY, F_ALL_DOWN, F_CANARY, MODE_BSEARCH},
    spec::{
        addr_words, cluster_id, words_addr, BackendSpec, Canary, Protocol, SelectMode, ServiceSpec,
    },
};

impl Dataplane {
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

    /// Connect and byte counters per (service, backend) of the current backends, summed over
    /// CPUs (0 where the kernel has counted nothing yet).
    ///
    /// # Errors
    /// Map read errors.
    pub fn counters(&self) -> Result<Vec<BackendCounter>> {
        let mut out = Vec::new();
        for svc in self.services()? {
            let mut seen = HashMap::new();
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
                let (bytes_sent, bytes_received) = match self.bytes.get(&key, 0) {
                    Ok(v) => v.iter().fold((0u64, 0u64), |(s, r), c| {
                        (s.wrapping_add(c.sent), r.wrapping_add(c.received))
                    }),
                    Err(e) if not_found(&e) => (0, 0),
                    Err(e) => return Err(map_err("blst_bytes")(e)),
                };
                out.push(BackendCounter {
                    service: svc.spec.name.clone(),
                    backend: b.addr,
                    cluster_id: cluster_id(&b.cluster),
                    connects,
                    bytes_sent,
                    bytes_received,
                });
            }
        }
        Ok(out)
    }

    /// The connected sockets the programs steered to one of `backends`: cookie -> backend
    /// (from `blst_conn`; a socket leaves it when it is released).
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn steered_sockets_to(
        &self,
        backends: &BTreeSet<SocketAddr>,
    ) -> Result<BTreeMap<u64, SocketAddr>> {
        let mut out = BTreeMap::new();
        if backends.is_empty() {
            return Ok(out);
        }
        for item in self.conn.iter() {
            let (cookie, rev) = match item {
                Ok(x) => x,
                // released between the key walk and the lookup
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(map_err("blst_conn")(e)),
            };
            let backend = SocketAddr::new(words_addr(rev.backend), u16::from_be(rev.backend_port));
            if backends.contains(&backend) {
                out.insert(cookie, backend);
            }
        }
        Ok(out)
    }

    /// Destroys the connected sockets the programs steered to one of `backends`, in the
    /// calling thread's network namespace ([`crate::sockdiag`]): their peers get a RST, the
    /// applications `ECONNABORTED`, and their next connection is steered afresh. Sockets not
    /// steered by these programs, or to other destinations, are never touched.
    ///
    /// # Errors
    /// Reading `blst_conn` or the socket dump failed.
    pub fn destroy_sockets_to(
        &self,
        backends: &BTreeSet<SocketAddr>,
    ) -> Result<crate::sockdiag::DestroyReport> {
        let cookies: BTreeSet<u64> = self.steered_sockets_to(backends)?.into_keys().collect();
        crate::sockdiag::destroy_by_cookie(&cookies).map_err(|source| Error::Io {
            context: "destroying steered sockets (sock_diag)".into(),
            source,
        })
    }

    /// [`Dataplane::destroy_sockets_to`] in the caller's network namespace and in those of the
    /// processes of `cgroup` (where the programs are attached: the node's pods).
    ///
    /// # Errors
    /// Reading `blst_conn` or the caller's own socket dump failed.
    pub fn destroy_sockets_to_in(
        &self,
        backends: &BTreeSet<SocketAddr>,
        cgroup: &std::path::Path,
    ) -> Result<crate::sockdiag::DestroyReport> {
        let cookies: BTreeSet<u64> = self.steered_sockets_to(backends)?.into_keys().collect();
        crate::sockdiag::destroy_in_cgroup(&cookies, cgroup).map_err(|source| Error::Io {
            context: "destroying steered sockets (sock_diag)".into(),
            source,
        })
    }
}
