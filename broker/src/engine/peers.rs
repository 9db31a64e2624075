//! The peer set agents probe (pure): every registered cluster that has not expired, with the
//! facts it registered. The shell keeps the current set on a watch channel
//! ([`super::Engine::subscribe_peers`]) and refreshes it on registration and every round.

use std::collections::BTreeSet;

use ballast_store::ClusterRecord;

/// A registered cluster as agents see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub cluster_id: String,
    pub region: String,
    pub zone: String,
    pub provider: String,
    /// An IP address, or empty (the cluster registered none).
    pub gateway_address: String,
}

impl From<&ClusterRecord> for Peer {
    fn from(c: &ClusterRecord) -> Self {
        Self {
            cluster_id: c.cluster_id.clone(),
            region: c.region.clone(),
            zone: c.zone.clone(),
            provider: c.provider.clone(),
            gateway_address: c.gateway_address.clone(),
        }
    }
}

/// The peers: `clusters` but the `expired` ones, sorted by id.
#[must_use]
pub fn peers(clusters: &[ClusterRecord], expired: &BTreeSet<String>) -> Vec<Peer> {
    let mut out: Vec<Peer> = clusters
        .iter()
        .filter(|c| !expired.contains(&c.cluster_id))
        .map(Peer::from)
        .collect();
    out.sort_by(|a, b| a.cluster_id.cmp(&b.cluster_id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, gw: &str) -> ClusterRecord {
        ClusterRecord {
            cluster_id: id.into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            provider: "aws".into(),
            gateway_address: gw.into(),
            registered_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[test]
    fn expired_clusters_are_not_peers_and_the_rest_are_sorted() {
        let clusters = [rec("c3", "10.0.0.3"), rec("c1", "10.0.0.1"), rec("c2", "")];
        let expired = BTreeSet::from(["c3".to_string()]);
        let p = peers(&clusters, &expired);
        let ids: Vec<&str> = p.iter().map(|p| p.cluster_id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert_eq!(p[0].gateway_address, "10.0.0.1");
        assert_eq!(p[1].gateway_address, "");
        assert_eq!(peers(&clusters, &BTreeSet::new()).len(), 3);
    }
}
