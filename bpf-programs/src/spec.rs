//! Plain service types and the pure parts of an update: validation, cluster ids, tables.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::{
    error::{Error, Result},
    layout::{CLUSTER_NAME_LEN, MAX_BACKENDS, NAME_LEN, SLOTS},
};

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
    #[must_use]
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// How the kernel picks a backend. Both read the same backend table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectMode {
    /// O(1): `slots[rand % 4096]`, slots filled in proportion to the weights.
    #[default]
    Slots,
    /// O(log n): binary search over cumulative weights (the seed project's method).
    BinarySearch,
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendSpec {
    #[serde(rename = "address")]
    pub addr: SocketAddr,
    /// Cluster name; the kernel stores [`cluster_id`] of it (FNV-1a 32-bit).
    pub cluster: String,
    pub weight: u32,
    pub healthy: bool,
}

/// Part of a service's new connections sent to another service (e.g. its next version).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Canary {
    pub service: String,
    /// 0..=100, kept to 0.01 (basis points in the kernel).
    pub percent: f64,
}

/// A service VIP:port/protocol and its weighted backends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<BackendSpec>,
    pub canary: Option<Canary>,
    pub select: SelectMode,
}

/// Cluster id of a cluster name: FNV-1a 32-bit of its UTF-8 bytes, so every host and the
/// broker derive the same id without coordination. A name that is a decimal `u32` is that
/// number. Collisions between two names in use are rejected ([`Error::ClusterIdCollision`]).
#[must_use]
pub fn cluster_id(name: &str) -> u32 {
    if let Ok(n) = name.parse::<u32>() {
        return n;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// IPv4 becomes v4-mapped IPv6; both as four network-order words.
#[must_use]
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut w = [0u32; 4];
    for (i, c) in o.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

/// Inverse of [`addr_words`]: v4-mapped addresses come back as IPv4.
#[must_use]
pub fn words_addr(w: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl ServiceSpec {
    /// Checks everything that does not need the kernel's state.
    ///
    /// # Errors
    /// The first problem found, naming the service and field.
    pub fn validate(&self) -> Result<()> {
        let service = || self.name.clone();
        if self.name.is_empty() || self.name.len() >= NAME_LEN || self.name.contains('\0') {
            return Err(Error::InvalidName(self.name.clone()));
        }
        if self.port == 0 {
            return Err(Error::VipPortZero { service: service() });
        }
        if self.backends.is_empty() {
            return Err(Error::NoBackends { service: service() });
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(Error::TooManyBackends {
                service: service(),
                count: self.backends.len(),
                max: MAX_BACKENDS,
            });
        }
        let mut sum: u64 = 0;
        for b in &self.backends {
            let backend = || b.addr.to_string();
            if b.addr.port() == 0 {
                return Err(Error::BackendPortZero {
                    service: service(),
                    backend: backend(),
                });
            }
            if b.addr.is_ipv4() != self.vip.is_ipv4() {
                return Err(Error::FamilyMismatch {
                    service: service(),
                    backend: backend(),
                });
            }
            if b.cluster.is_empty()
                || b.cluster.len() >= CLUSTER_NAME_LEN
                || b.cluster.contains('\0')
            {
                return Err(Error::InvalidCluster(b.cluster.clone()));
            }
            sum += u64::from(b.weight);
        }
        if sum == 0 {
            return Err(Error::WeightSumZero { service: service() });
        }
        if let Some(c) = &self.canary {
            if !(0.0..=100.0).contains(&c.percent) || c.percent.is_nan() {
                return Err(Error::CanaryPercent {
                    service: service(),
                    percent: c.percent,
                });
            }
            if c.service == self.name {
                return Err(Error::CanaryTargetInvalid {
                    service: service(),
                    target: c.service.clone(),
                });
            }
        }
        Ok(())
    }

    /// Weights that count for selection: unhealthy backends weigh nothing.
    #[must_use]
    pub fn effective_weights(&self) -> Vec<u32> {
        self.backends
            .iter()
            .map(|b| if b.healthy { b.weight } else { 0 })
            .collect()
    }
}

/// Fills `SLOTS` slots in proportion to `weights` (largest remainder), so a uniform slot pick
/// follows the weights to within 1/`SLOTS`. Returns `None` when every weight is zero.
#[must_use]
pub fn slot_table(weights: &[u32]) -> Option<Vec<u16>> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 || weights.len() > MAX_BACKENDS {
        return None;
    }
    let slots = SLOTS as u64;
    let mut counts: Vec<u64> = weights
        .iter()
        .map(|w| u64::from(*w) * slots / total)
        .collect();
    let used: u64 = counts.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // largest remainder first; ties to the lower index
    order.sort_by_key(|&i| std::cmp::Reverse((u64::from(weights[i]) * slots) % total));
    for &i in order
        .iter()
        .take(usize::try_from(slots - used).unwrap_or(0))
    {
        counts[i] += 1;
    }
    let mut out = Vec::with_capacity(SLOTS);
    for (i, c) in counts.iter().enumerate() {
        let idx = u16::try_from(i).ok()?;
        out.extend(std::iter::repeat_n(idx, usize::try_from(*c).ok()?));
    }
    debug_assert_eq!(out.len(), SLOTS);
    Some(out)
}

/// `cum[i]` = sum of `weights[0..=i]` (for the binary search mode).
#[must_use]
pub fn cumulative(weights: &[u32]) -> Vec<u32> {
    let mut acc: u32 = 0;
    weights
        .iter()
        .map(|w| {
            acc = acc.saturating_add(*w);
            acc
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_table_follows_weights() {
        let t = slot_table(&[3, 1]).expect("table");
        assert_eq!(t.len(), SLOTS);
        assert_eq!(t.iter().filter(|&&i| i == 0).count(), 3072);
        let t = slot_table(&[1, 0, 1, 1]).expect("table");
        assert_eq!(t.iter().filter(|&&i| i == 1).count(), 0);
        let ones = t.iter().filter(|&&i| i == 0).count();
        assert!((1365..=1366).contains(&ones));
        assert!(slot_table(&[0, 0]).is_none());
        assert_eq!(slot_table(&[1; 1024]).expect("table").len(), SLOTS);
    }

    #[test]
    fn cluster_ids_are_stable() {
        assert_eq!(cluster_id("7"), 7);
        assert_eq!(cluster_id("c2"), cluster_id("c2"));
        assert_ne!(cluster_id("c2"), cluster_id("c3"));
        // FNV-1a 32 reference value for "a"
        assert_eq!(cluster_id("a"), 0xe40c_292c);
    }

    #[test]
    fn addr_words_round_trip() {
        for s in ["127.96.0.10", "::1", "fd00::5"] {
            let ip: IpAddr = s.parse().expect("ip");
            assert_eq!(words_addr(addr_words(ip)), ip);
        }
    }
}
