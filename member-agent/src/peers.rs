//! Which clusters to probe: the peers the broker streams (every registered cluster with its
//! gateway, `WatchPeers`), overridden per cluster by this agent's own configuration (the
//! topology file or the config file's `clusters:`), which is also the only source without a
//! broker.
//!
//! The rule, per cluster id other than this one: a gateway from the configuration wins;
//! otherwise the broker's. A cluster in neither with a gateway is not probed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ballast_proto::v1::Peer;
use tokio::sync::watch;

use crate::catalog::{validate_cluster_id, Catalog, Cluster, ClusterId};
use crate::metrics::Metrics;

/// A peer the broker sent that cannot be used, and why (the agent logs it and skips the
/// peer, or only its gateway).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker peer {index} ({cluster_id:?}): {field}: {message}")]
pub struct PeerProblem {
    pub index: usize,
    pub cluster_id: String,
    pub field: &'static str,
    pub message: String,
}

/// Turns the broker's peer set into clusters. A peer with an invalid id is skipped; one whose
/// gateway does not parse keeps its other facts without a gateway (not probed). Each problem
/// is returned for the caller to log.
pub fn from_broker(peers: &[Peer]) -> (Vec<Cluster>, Vec<PeerProblem>) {
    let mut out = Vec::with_capacity(peers.len());
    let mut problems = Vec::new();
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    for (index, p) in peers.iter().enumerate() {
        let problem = |field, message: String| PeerProblem {
            index,
            cluster_id: p.cluster_id.clone(),
            field,
            message,
        };
        if let Err(e) = validate_cluster_id(&p.cluster_id) {
            problems.push(problem("cluster_id", e));
            continue;
        }
        let gateway = match p.gateway_address.as_str() {
            "" => None,
            g => match g.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    problems.push(problem(
                        "gateway_address",
                        format!("{g:?} is not an IP address; the peer is not probed"),
                    ));
                    None
                }
            },
        };
        out.push(Cluster {
            id: p.cluster_id.clone(),
            region: text(&p.region),
            zone: text(&p.zone),
            provider: text(&p.provider),
            gateway,
        });
    }
    (out, problems)
}

/// Where each probe target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The agent's configuration (topology file, config file): an override.
    Configuration,
    /// The broker's peer set.
    Broker,
}

impl Source {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configuration => "configuration",
            Self::Broker => "broker",
        }
    }
}

/// The probe targets: every cluster but `catalog.local` with a gateway, from the catalog's
/// configuration when it has one, else from the broker's peers. Sorted by cluster id.
#[must_use]
pub fn probe_targets(catalog: &Catalog, broker: &[Cluster]) -> Vec<(ClusterId, IpAddr, Source)> {
    let mut out: BTreeMap<ClusterId, (IpAddr, Source)> = BTreeMap::new();
    for c in broker.iter().filter(|c| c.id != catalog.local) {
        if let Some(g) = c.gateway {
            out.insert(c.id.clone(), (g, Source::Broker));
        }
    }
    for (id, g) in catalog.probe_targets() {
        out.insert(id, (g, Source::Configuration));
    }
    out.into_iter().map(|(id, (g, s))| (id, g, s)).collect()
}

/// Follows the catalog and the broker's peers and publishes the probe targets when they
/// change; keeps `ballast_agent_probe_targets{source}` current.
pub fn targets_following(
    mut catalog: watch::Receiver<Arc<Catalog>>,
    mut broker: watch::Receiver<Arc<Vec<Cluster>>>,
    metrics: Metrics,
) -> (
    watch::Receiver<Vec<(ClusterId, IpAddr)>>,
    tokio::task::JoinHandle<()>,
) {
    let compute = move |catalog: &Catalog, broker: &[Cluster]| {
        let t = probe_targets(catalog, broker);
        for s in [Source::Configuration, Source::Broker] {
            let n = t.iter().filter(|(_, _, src)| *src == s).count();
            metrics.set_probe_targets(s.as_str(), n);
        }
        t.into_iter().map(|(id, g, _)| (id, g)).collect::<Vec<_>>()
    };
    let first = compute(&catalog.borrow_and_update(), &broker.borrow_and_update());
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        // without a broker session (no --broker) the sender is gone: follow the catalog only
        let mut broker_open = true;
        loop {
            tokio::select! {
                r = catalog.changed() => if r.is_err() { return },
                r = broker.changed(), if broker_open => {
                    if r.is_err() {
                        broker_open = false;
                        continue;
                    }
                }
            }
            let t = compute(&catalog.borrow_and_update(), &broker.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = *cur != t;
                *cur = t;
                changed
            });
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, gw: &str) -> Peer {
        Peer {
            cluster_id: id.into(),
            region: "us-west-2".into(),
            zone: "us-west-2a".into(),
            provider: "aws".into(),
            gateway_address: gw.into(),
        }
    }

    fn cluster(id: &str, gw: Option<&str>) -> Cluster {
        Cluster {
            id: id.into(),
            region: None,
            zone: None,
            provider: None,
            gateway: gw.map(|g| g.parse().expect("ip")),
        }
    }

    fn catalog(clusters: &[Cluster]) -> Catalog {
        Catalog {
            local: "c1".into(),
            clusters: clusters.iter().map(|c| (c.id.clone(), c.clone())).collect(),
            services: BTreeMap::new(),
            without_vip: Default::default(),
        }
    }

    #[test]
    fn broker_peers_are_checked_field_by_field() {
        let (clusters, problems) = from_broker(&[
            peer("c2", "10.0.0.2"),
            peer("Bad Id", "10.0.0.9"),
            peer("c3", "gw.example.com"),
            peer("c4", ""),
        ]);
        let ids: Vec<&str> = clusters.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c2", "c3", "c4"]);
        assert_eq!(clusters[0].gateway, Some("10.0.0.2".parse().expect("ip")));
        assert_eq!(clusters[0].region.as_deref(), Some("us-west-2"));
        assert_eq!(
            clusters[1].gateway, None,
            "an unparsable gateway is dropped"
        );
        assert_eq!(clusters[2].gateway, None);
        let fields: Vec<(usize, &str)> = problems.iter().map(|p| (p.index, p.field)).collect();
        assert_eq!(fields, [(1, "cluster_id"), (2, "gateway_address")]);
        assert!(problems[1].to_string().contains("gw.example.com"));
    }

    #[test]
    fn configuration_overrides_the_broker_and_the_local_cluster_is_never_a_target() {
        let cat = catalog(&[
            cluster("c1", Some("10.0.0.1")),
            cluster("c2", Some("192.168.0.2")),
            cluster("c4", None),
        ]);
        let broker = [
            cluster("c1", Some("10.9.9.1")),
            cluster("c2", Some("10.0.0.2")),
            cluster("c3", Some("10.0.0.3")),
            cluster("c4", Some("10.0.0.4")),
            cluster("c5", None),
        ];
        let t = probe_targets(&cat, &broker);
        let want: Vec<(ClusterId, IpAddr, Source)> = vec![
            (
                "c2".into(),
                "192.168.0.2".parse().expect("ip"),
                Source::Configuration,
            ),
            ("c3".into(), "10.0.0.3".parse().expect("ip"), Source::Broker),
            ("c4".into(), "10.0.0.4".parse().expect("ip"), Source::Broker),
        ];
        assert_eq!(t, want);
        // without a broker, only the configuration
        assert_eq!(probe_targets(&cat, &[]).len(), 1);
    }

    #[tokio::test]
    async fn targets_follow_the_broker_peer_set() {
        let (_cat_tx, cat_rx) = watch::channel(Arc::new(catalog(&[cluster("c1", None)])));
        let (peers_tx, peers_rx) = watch::channel(Arc::new(Vec::new()));
        let metrics = Metrics::new();
        let (mut targets, task) = targets_following(cat_rx, peers_rx, metrics.clone());
        assert!(targets.borrow_and_update().is_empty());
        peers_tx
            .send(Arc::new(vec![cluster("c2", Some("10.0.0.2"))]))
            .expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(5), targets.changed())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(
            *targets.borrow(),
            [("c2".to_string(), "10.0.0.2".parse::<IpAddr>().expect("ip"))]
        );
        assert!(metrics
            .encode()
            .contains("ballast_agent_probe_targets{source=\"broker\"} 1"));
        task.abort();
    }

    #[tokio::test]
    async fn without_a_broker_the_catalog_is_still_followed() {
        let (cat_tx, cat_rx) = watch::channel(Arc::new(catalog(&[cluster("c1", None)])));
        let (peers_tx, peers_rx) = watch::channel(Arc::new(Vec::new()));
        drop(peers_tx);
        let (mut targets, task) = targets_following(cat_rx, peers_rx, Metrics::new());
        cat_tx
            .send(Arc::new(catalog(&[
                cluster("c1", None),
                cluster("c2", Some("10.0.0.2")),
            ])))
            .expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(5), targets.changed())
            .await
            .expect("in time")
            .expect("open");
        assert_eq!(targets.borrow().len(), 1);
        task.abort();
    }
}
