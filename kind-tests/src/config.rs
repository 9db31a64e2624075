//! Names, addresses and default WAN delays of a lab.
//!
//! Every name derives from one prefix (default `ballast`), so a test lab (`--prefix
//! blt1234`) never clashes with a running one:
//! - namespaces `PREFIX-c1..N` and `PREFIX-wan`
//! - cgroups `<cgroup2>/PREFIX-lab/cN`
//! - pinned maps `/sys/fs/bpf/PREFIX-lab/cN`
//! - state `/run/PREFIX-lab/`
//!
//! Addresses (inside the lab's own namespaces only): cluster `cK` is `10.77.K.2/24` on its
//! `eth0`; the wan side of that link is `10.77.K.1`; the broker lives on `10.77.0.1` in the
//! wan namespace. Cluster namespaces route only `10.77.0.0/16`: no default route.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::error::{LabError, Result};

/// The lab's own subnet: the only thing a cluster namespace has a route to.
pub const LAB_SUBNET: &str = "10.77.0.0/16";
pub const LAB_NET: [u8; 2] = [10, 77];
/// Where the broker listens (wan namespace, on `lo`).
pub const BROKER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Interface of a cluster namespace towards the wan.
pub const CLUSTER_IF: &str = "eth0";
/// TUN devices of the WAN emulator (wan namespace).
pub const TUN_IN: &str = "wan-in";
pub const TUN_OUT: &str = "wan-out";
/// Routing table that sends cluster traffic into `wan-in`.
pub const WAN_TABLE: &str = "100";
/// One-way delay between two clusters placed in the same region.
pub const SAME_REGION_ONE_WAY_MS: f64 = 1.0;
pub const MAX_CLUSTERS: usize = 32;
/// Nodes (agents) per cluster: each node is an agent with its own cgroup, pins and metrics
/// port on the cluster's loopback.
pub const MAX_NODES: usize = 8;
/// Most broker replicas a lab runs (ports 7443.. and 9464..).
pub const MAX_BROKERS: usize = 5;
/// Port of node 1's agent metrics on its cluster's loopback; node k listens on + k - 1.
pub const AGENT_METRICS_PORT: u16 = 9464;

/// Default regions of c1, c2, c3, … (cycled past the end).
pub const DEFAULT_REGIONS: [&str; 8] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "ap-northeast-1",
    "eu-central-1",
    "ap-southeast-2",
    "sa-east-1",
    "ca-central-1",
];

/// The names every lab object derives from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub prefix: String,
}

impl Naming {
    pub fn new(prefix: &str) -> Result<Self> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 16
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok {
            return Err(LabError::invalid(
                "prefix",
                format!("{prefix:?}: want 1-16 chars [a-z0-9], starting with a letter"),
            ));
        }
        Ok(Naming {
            prefix: prefix.to_string(),
        })
    }
    pub fn lab_dir_name(&self) -> String {
        format!("{}-lab", self.prefix)
    }
    pub fn cluster_netns(&self, id: &str) -> String {
        format!("{}-{id}", self.prefix)
    }
    pub fn wan_netns(&self) -> String {
        format!("{}-wan", self.prefix)
    }
    /// Whether a namespace name belongs to this lab (`PREFIX-wan` or `PREFIX-cN`).
    pub fn owns_netns(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(&format!("{}-", self.prefix)) else {
            return false;
        };
        rest == "wan" || parse_cluster_id(rest).is_some()
    }
    pub fn default_state_dir(&self) -> PathBuf {
        Path::new("/run").join(self.lab_dir_name())
    }
    pub fn cgroup_root(&self, cgroup2: &Path) -> PathBuf {
        cgroup2.join(self.lab_dir_name())
    }
    pub fn bpf_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(self.lab_dir_name())
    }
}

/// `c7` -> 7.
pub fn parse_cluster_id(id: &str) -> Option<usize> {
    let n = id.strip_prefix('c')?;
    if n.is_empty() || n.starts_with('0') || !n.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|&k| (1..=MAX_CLUSTERS).contains(&k))
}

pub fn cluster_id(index: usize) -> String {
    format!("c{index}")
}

/// Node `k` (1-based) of cluster `id`: `c1-n2`. The node's cgroup and pin directory are
/// named by [`node_dir`] under its cluster's.
pub fn node_name(cluster: &str, k: usize) -> String {
    format!("{cluster}-n{k}")
}

/// The directory of node `k` under its cluster's cgroup and pin directory: `n2`.
pub fn node_dir(k: usize) -> String {
    format!("n{k}")
}

/// Where node `k`'s agent serves its metrics (on its cluster's loopback).
pub fn agent_metrics_addr(k: usize) -> std::net::SocketAddr {
    let port = AGENT_METRICS_PORT + u16::try_from(k.saturating_sub(1)).unwrap_or(0);
    std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub fn cluster_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(LAB_NET[0], LAB_NET[1], index as u8, 2)
}

pub fn wan_side_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(LAB_NET[0], LAB_NET[1], index as u8, 1)
}

/// The wan-side veth of cluster `id`.
pub fn wan_if(id: &str) -> String {
    format!("v-{id}")
}

/// Which cluster an address belongs to (`10.77.K.x` -> K), if any.
pub fn cluster_of_addr(a: [u8; 4]) -> Option<u8> {
    (a[0] == LAB_NET[0] && a[1] == LAB_NET[1] && a[2] >= 1 && a[2] as usize <= MAX_CLUSTERS)
        .then_some(a[2])
}

/// Region data from `broker/data/` (embedded, read by `ballast_model::data`), with the
/// lab's own conventions: clusters in one region sit 2 × [`SAME_REGION_ONE_WAY_MS`] apart,
/// and prices follow the source provider's list.
#[derive(Debug, Clone)]
pub struct RegionData(ballast_model::data::RegionData);

impl RegionData {
    /// The embedded tables.
    pub fn embedded() -> Result<Self> {
        ballast_model::data::RegionData::embedded()
            .map(Self)
            .map_err(|e| LabError::Other(format!("broker/data: {e}")))
    }

    /// Egress price (USD/GB, the source provider's list price) of traffic from a cluster in
    /// `src` to one in `dst`: lab clusters in one region sit in different zones; another
    /// provider is internet egress.
    pub fn egress_usd_per_gb(&self, src: &str, dst: &str) -> Option<f64> {
        let (s, d) = (self.0.region(src)?, self.0.region(dst)?);
        let tier = if s.provider != d.provider {
            "internet_egress_first_tier"
        } else if src == dst {
            "cross_zone"
        } else if s.continent == d.continent {
            "cross_region_same_continent"
        } else {
            "cross_continent"
        };
        self.0.price(&s.provider, tier)
    }

    pub fn provider(&self, region: &str) -> Option<&str> {
        self.0.region(region).map(|r| r.provider.as_str())
    }

    /// Measured RTT between two regions (mean of both directions when both exist); two
    /// clusters of one region are [`SAME_REGION_ONE_WAY_MS`] apart each way.
    pub fn rtt_ms(&self, a: &str, b: &str) -> Option<f64> {
        if a == b {
            return self.0.region(a).map(|_| 2.0 * SAME_REGION_ONE_WAY_MS);
        }
        self.0.rtt_ms(a, b)
    }

    /// The default one-way delay of a link: half the regions' RTT.
    pub fn one_way_ms(&self, a: &str, b: &str) -> Result<f64> {
        self.rtt_ms(a, b).map(|r| r / 2.0).ok_or_else(|| {
            LabError::invalid(
                "regions",
                format!("no RTT between {a} and {b} in broker/data/region_rtt_ms.csv"),
            )
        })
    }

    /// Regions for `n` clusters: `given` (validated) or the defaults, cycled.
    pub fn regions_for(&self, n: usize, given: &[String]) -> Result<Vec<String>> {
        if !given.is_empty() && given.len() != n {
            return Err(LabError::invalid(
                "regions",
                format!("{} regions given for {n} clusters", given.len()),
            ));
        }
        let regions: Vec<String> = if given.is_empty() {
            (0..n)
                .map(|i| DEFAULT_REGIONS[i % DEFAULT_REGIONS.len()].to_string())
                .collect()
        } else {
            given.to_vec()
        };
        for r in &regions {
            if self.0.region(r).is_none() {
                return Err(LabError::invalid(
                    "regions",
                    format!("unknown region {r:?} (see broker/data/regions.csv)"),
                ));
            }
        }
        Ok(regions)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_validated() {
        assert!(Naming::new("ballast").is_ok());
        assert!(Naming::new("blt123").is_ok());
        for bad in ["", "Ballast", "1abc", "a-b", "abcdefghijklmnopq"] {
            let e = Naming::new(bad).unwrap_err();
            assert!(e.to_string().contains("prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_derive_from_prefix() {
        let n = Naming::new("ballast").unwrap();
        assert_eq!(n.cluster_netns("c2"), "ballast-c2");
        assert_eq!(n.wan_netns(), "ballast-wan");
        assert_eq!(n.bpf_dir(), PathBuf::from("/sys/fs/bpf/ballast-lab"));
        assert_eq!(
            n.cgroup_root(Path::new("/sys/fs/cgroup")),
            PathBuf::from("/sys/fs/cgroup/ballast-lab")
        );
        assert!(n.owns_netns("ballast-c1"));
        assert!(n.owns_netns("ballast-wan"));
        assert!(!n.owns_netns("ballast-cx"));
        assert!(!n.owns_netns("other-c1"));
        assert!(!n.owns_netns("ballastx-c1"));
    }

    #[test]
    fn cluster_ids_parse_strictly() {
        assert_eq!(parse_cluster_id("c1"), Some(1));
        assert_eq!(parse_cluster_id("c32"), Some(32));
        for bad in ["c0", "c01", "c33", "c", "x1", "c1a"] {
            assert_eq!(parse_cluster_id(bad), None, "{bad}");
        }
        assert_eq!(cluster_of_addr([10, 77, 3, 2]), Some(3));
        assert_eq!(cluster_of_addr([10, 77, 0, 1]), None);
        assert_eq!(cluster_of_addr([10, 78, 3, 2]), None);
    }

    #[test]
    fn default_delays_come_from_real_data() {
        let d = RegionData::embedded().unwrap();
        let r = d.regions_for(3, &[]).unwrap();
        assert_eq!(r, ["us-east-1", "us-west-2", "eu-west-1"]);
        let east_west = d.one_way_ms("us-east-1", "us-west-2").unwrap();
        let east_eu = d.one_way_ms("us-east-1", "eu-west-1").unwrap();
        let west_eu = d.one_way_ms("us-west-2", "eu-west-1").unwrap();
        // Cross-region one-way delays are tens of ms, and the data orders them.
        assert!((25.0..50.0).contains(&east_west), "{east_west}");
        assert!((25.0..50.0).contains(&east_eu), "{east_eu}");
        assert!(west_eu > east_eu, "{west_eu} vs {east_eu}");
        assert_eq!(
            d.one_way_ms("us-east-1", "us-east-1").unwrap(),
            SAME_REGION_ONE_WAY_MS
        );
        assert_eq!(d.provider("eu-west-1"), Some("aws"));
        assert_eq!(d.egress_usd_per_gb("us-east-1", "us-west-2"), Some(0.02));
        assert_eq!(d.egress_usd_per_gb("us-east-1", "us-east-1"), Some(0.01));
        assert_eq!(d.egress_usd_per_gb("us-east-1", "westeurope"), Some(0.09));
        assert_eq!(d.egress_usd_per_gb("us-east-1", "mars-1"), None);
    }

    #[test]
    fn bad_regions_are_rejected() {
        let d = RegionData::embedded().unwrap();
        assert!(d.regions_for(2, &["us-east-1".into()]).is_err());
        let e = d
            .regions_for(1, &["mars-north-1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mars-north-1"), "{e}");
    }
}
