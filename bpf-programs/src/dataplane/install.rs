//! Writing services into the maps. Every write of a service goes aside first (the backends and
//! selection table of the unused generation parity), then one update of the service state
//! flips to it: a concurrent `connect()` sees the old or the new table, never a mix.
//! Validation happens before anything is written.

use std::{collections::HashSet, net::SocketAddr};

use aya::maps::MapError;
use tracing::debug;

use super::{cstr, map_err, not_found, svc_key, Dataplane, MAX_ID};
use crate::{
    error::{Error, Result},
    layout::{
        Backend, BackendKey, ClusterName, CounterKey, CumTable, SelKey, SelTable, SvcKey, SvcMeta,
        SvcState, BE_HEALTHY, CLUSTER_NAME_LEN, F_ALL_DOWN, F_CANARY, MAX_BACKENDS, MODE_BSEARCH,
        MODE_SLOTS, NAME_LEN, SLOTS,
    },
    spec::{addr_words, cluster_id, cumulative, slot_table, Canary, SelectMode, ServiceSpec},
};

impl Dataplane {
    fn alloc_id(&mut self) -> Result<u32> {
        let used: HashSet<u32> = self.names.values().map(|(id, _)| *id).collect();
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

    /// Makes the maps hold exactly `specs` (as `ballast-dataplane apply` does): validates all
    /// first (nothing is written when one is invalid), frees VIPs held by services that are
    /// going away, upserts (canary targets first), then removes the services not in `specs`.
    ///
    /// # Errors
    /// The first invalid spec, or a map error.
    pub fn apply(&mut self, specs: &[ServiceSpec]) -> Result<()> {
        crate::config::validate_set(specs)?;
        let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let keys: HashSet<SvcKey> = specs.iter().map(svc_key).collect();
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
        let targets: HashSet<&str> = specs
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
