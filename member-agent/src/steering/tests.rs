//! The steering state machine against a fake data plane: no root, no kernel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_bpf::{BackendCounter, InstalledService, ServiceSpec};
use ballast_proto::v1::{Ack, ReportRequest, WeightsUpdate};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::catalog::{Cluster, Endpoint, Protocol, Service, ServicePort};

/// What the fake data plane holds and how it behaves; shared with the test.
#[derive(Default)]
struct PlaneState {
    /// What a successful apply installed last.
    installed: Option<Vec<ServiceSpec>>,
    /// Successful applies that changed something.
    writes: usize,
    /// The next `fail` applies fail.
    fail: usize,
    /// Every `destroy_sockets_to` call's backends.
    destroyed: Vec<BTreeSet<std::net::SocketAddr>>,
}

#[derive(Clone, Default)]
struct FakePlane(Arc<Mutex<PlaneState>>);

#[derive(Debug, thiserror::Error)]
#[error("fake data plane failure")]
struct FakeError;

impl FakePlane {
    fn state(&self) -> std::sync::MutexGuard<'_, PlaneState> {
        self.0.lock().expect("lock")
    }

    /// The healthy weight per cluster of the installed `shop/web`.
    fn web_weights(&self) -> BTreeMap<String, u32> {
        let st = self.state();
        let mut out = BTreeMap::new();
        for s in st
            .installed
            .iter()
            .flatten()
            .filter(|s| s.name == "shop/web")
        {
            for b in s.backends.iter().filter(|b| b.healthy) {
                *out.entry(b.cluster.clone()).or_insert(0) += b.weight;
            }
        }
        out
    }
}

impl DataPlane for FakePlane {
    type Error = FakeError;

    fn apply(&mut self, specs: Vec<ServiceSpec>) -> Result<bool, FakeError> {
        let mut st = self.state();
        if st.fail > 0 {
            st.fail -= 1;
            return Err(FakeError);
        }
        if st.installed.as_ref() == Some(&specs) {
            return Ok(false);
        }
        st.installed = Some(specs);
        st.writes += 1;
        Ok(true)
    }

    fn counters(&self) -> Result<Vec<BackendCounter>, FakeError> {
        Ok(Vec::new())
    }

    fn installed(&self) -> Result<Vec<InstalledService>, FakeError> {
        Ok(Vec::new())
    }

    fn destroy_sockets_to(
        &mut self,
        backends: &BTreeSet<std::net::SocketAddr>,
    ) -> Result<usize, FakeError> {
        let mut st = self.state();
        st.destroyed.push(backends.clone());
        Ok(backends.len())
    }
}

fn cluster(id: &str) -> Cluster {
    Cluster {
        id: id.into(),
        region: None,
        zone: None,
        provider: None,
        gateway: None,
    }
}

fn service(name: &str, vip: &str) -> Service {
    let ep = |addr: &str, cluster: &str| Endpoint {
        address: addr.parse().expect("addr"),
        cluster: cluster.into(),
        ready: true,
        port_name: None,
    };
    Service {
        name: ServiceName::parse(name).expect("name"),
        vips: vec![vip.parse().expect("vip")],
        ports: vec![ServicePort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
        capacity_rps_per_pod: None,
        service_time_per_pod: None,
        service_time_probe: None,
        load_unit: ballast_types::LoadUnit::default(),
        endpoints: vec![ep("127.0.1.1:8080", "east"), ep("127.0.2.1:8080", "west")],
    }
}

/// A catalog of cluster east (this one) and west, importing `services`.
fn catalog(services: &[&str]) -> Arc<Catalog> {
    Arc::new(Catalog {
        local: "east".into(),
        clusters: [
            ("east".into(), cluster("east")),
            ("west".into(), cluster("west")),
        ]
        .into(),
        services: services
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let s = service(n, &format!("127.96.0.{}", 10 + i));
                (s.name.clone(), s)
            })
            .collect(),
        without_vip: Default::default(),
    })
}

fn update(service: &str, generation: u64, west: f64) -> WeightsUpdate {
    WeightsUpdate {
        generation,
        service: service.into(),
        source_cluster_id: "east".into(),
        weights: [("east".to_owned(), 1.0 - west), ("west".to_owned(), west)].into(),
        computed_at_ms: ballast_types::now_ms(),
        last_in_batch: true,
        ..WeightsUpdate::default()
    }
}

/// A steerer over a fake plane, with the test's ends of its channels.
struct Rig {
    steer: Steerer<FakePlane>,
    plane: FakePlane,
    metrics: Metrics,
    catalog: watch::Sender<Arc<Catalog>>,
    updates: mpsc::Sender<Vec<WeightsUpdate>>,
    acks: mpsc::Receiver<Ack>,
    reports: watch::Receiver<Option<ReportRequest>>,
    generation: watch::Receiver<u64>,
    _peers: watch::Sender<Arc<PeerTable>>,
}

fn rig(services: &[&str], pending_retry: Duration) -> Rig {
    let (catalog_tx, catalog_rx) = watch::channel(catalog(services));
    let (peers_tx, peers_rx) = watch::channel(Arc::new(PeerTable::new()));
    let (updates_tx, updates_rx) = mpsc::channel(16);
    let (acks_tx, acks_rx) = mpsc::channel(64);
    let (reports_tx, reports_rx) = watch::channel(None);
    let (gen_tx, gen_rx) = watch::channel(0);
    let plane = FakePlane::default();
    let metrics = Metrics::new();
    let steer = Steerer::new(
        SteerConfig {
            cluster_id: "east".into(),
            node_name: "n1".into(),
            weight_scale: 1000,
            report_interval: Duration::from_millis(20),
            pending_retry,
            close_grace: Duration::ZERO,
        },
        metrics.clone(),
        plane.clone(),
        SteerIo {
            catalog: catalog_rx,
            peers: peers_rx,
            updates: updates_rx,
            acks: acks_tx,
            reports: reports_tx,
            installed_generation: gen_tx,
            service_times: watch::channel(Arc::default()).1,
        },
    );
    Rig {
        steer,
        plane,
        metrics,
        catalog: catalog_tx,
        updates: updates_tx,
        acks: acks_rx,
        reports: reports_rx,
        generation: gen_rx,
        _peers: peers_tx,
    }
}

/// A rig importing shop/web that got (and acked the refusal of) an update for shop/db.
fn rig_with_db_refused() -> Rig {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/db", 3, 0.5));
    assert_eq!(r.acks().len(), 1);
    r
}

impl Rig {
    /// Discovery now knows `services`; the loop hears of it.
    fn discover(&mut self, services: &[&str]) {
        self.catalog.send_replace(catalog(services));
        self.steer.on_discovery_change();
    }

    /// A batch of one update straight from the broker.
    fn push(&mut self, u: WeightsUpdate) {
        self.steer.on_batch(vec![u], &BTreeMap::new());
    }

    fn acks(&mut self) -> Vec<Ack> {
        std::iter::from_fn(|| self.acks.try_recv().ok()).collect()
    }

    /// The one ack sent since the last look.
    fn only_ack(&mut self) -> Ack {
        let mut acks = self.acks();
        assert_eq!(acks.len(), 1, "{acks:?}");
        acks.remove(0)
    }

    fn refused(&self, service: &str) -> u64 {
        self.metrics
            .updates_refused
            .get_or_create(&ServiceLabels {
                service: service.into(),
            })
            .get()
    }

    fn pending(&self) -> BTreeMap<String, Refusal> {
        self.steer
            .pending()
            .map(|(s, r)| (s.to_owned(), r.clone()))
            .collect()
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn applied_update_is_installed_and_acked_with_its_generation() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/web", 7, 0.75));
    let a = r.only_ack();
    assert!(a.applied, "{a:?}");
    assert_eq!((a.generation, a.service.as_str()), (7, "shop/web"));
    assert_eq!(
        (a.cluster_id.as_str(), a.node_name.as_str()),
        ("east", "n1")
    );
    assert!(a.error.is_empty());
    assert_eq!(*r.generation.borrow(), 7, "published for WatchRequest");
    assert_eq!(
        r.plane.web_weights(),
        [("east".to_owned(), 250), ("west".to_owned(), 750)].into()
    );
    let installed = r
        .metrics
        .installed_generation
        .get_or_create(&ServiceLabels {
            service: "shop/web".into(),
        })
        .get();
    assert_eq!(installed, 7);
    assert!(r.pending().is_empty());
}

#[test]
fn update_for_a_service_not_imported_is_refused_as_such_and_kept() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/db", 3, 0.5));
    let a = r.only_ack();
    assert!(!a.applied && a.generation == 3, "{a:?}");
    assert!(a.error.contains("unknown to discovery"), "{a:?}");
    assert_eq!(r.refused("shop/db"), 1);
    assert!(matches!(
        r.pending().get("shop/db"),
        Some(Refusal::NotImported(_))
    ));
    assert_eq!(*r.generation.borrow(), 0, "nothing installed");
}

#[test]
fn connections_to_a_backend_that_turns_unready_are_closed_not_on_a_weight_change() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/web", 7, 0.75));
    r.only_ack();
    // an ordinary weight change (west to 0): nothing is closed
    r.push(update("shop/web", 8, 0.0));
    r.only_ack();
    r.push(update("shop/web", 9, 0.75));
    r.only_ack();
    assert!(r.plane.state().destroyed.is_empty());
    // west's endpoint turns unready: its steered connections are closed, once
    let mut c = (*catalog(&["shop/web"])).clone();
    for s in c.services.values_mut() {
        for e in &mut s.endpoints {
            if e.cluster == "west" {
                e.ready = false;
            }
        }
    }
    r.catalog.send_replace(Arc::new(c));
    r.steer.on_discovery_change();
    r.steer.on_discovery_change();
    let west: std::net::SocketAddr = "127.0.2.1:8080".parse().expect("addr");
    assert_eq!(r.plane.state().destroyed, vec![BTreeSet::from([west])]);
    assert_eq!(r.metrics.sockets_destroyed.get(), 1);
}

#[test]
fn connections_to_a_failed_backend_close_only_after_the_grace() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.steer.cfg.close_grace = Duration::from_secs(2);
    r.push(update("shop/web", 7, 0.75));
    r.only_ack();
    let mut c = (*catalog(&["shop/web"])).clone();
    for s in c.services.values_mut() {
        for e in &mut s.endpoints {
            e.ready = e.cluster != "west";
        }
    }
    let t0 = Instant::now();
    r.catalog.send_replace(Arc::new(c));
    r.steer.on_discovery_change();
    let due = r.steer.next_close().expect("a close is pending");
    assert!(due >= t0 + Duration::from_secs(2), "grace kept");
    r.steer.close_due(t0 + Duration::from_secs(1));
    assert!(r.plane.state().destroyed.is_empty(), "not before the grace");
    r.steer.close_due(due);
    assert_eq!(r.plane.state().destroyed.len(), 1);
    assert_eq!(r.steer.next_close(), None);
}

#[test]
fn refused_update_is_retried_when_discovery_changes() {
    let mut r = rig_with_db_refused();
    // discovery learns the service: the kept update is installed without a new broker push
    r.discover(&["shop/web", "shop/db"]);
    let a = r.only_ack();
    assert!(a.applied && a.generation == 3, "{a:?}");
    assert!(r.pending().is_empty());
    assert_eq!(*r.generation.borrow(), 3);
    assert_eq!(r.refused("shop/db"), 1, "counted once, when refused");
}

#[test]
fn a_retry_refused_the_same_way_is_not_acked_or_counted_again() {
    let mut r = rig_with_db_refused();
    // discovery changes, but not for shop/db: still refused, silently
    r.discover(&["shop/web", "shop/api"]);
    r.steer.on_discovery_change();
    assert!(r.acks().is_empty());
    assert_eq!(r.refused("shop/db"), 1);
    assert!(r.pending().contains_key("shop/db"), "still kept");
}

#[test]
fn only_data_plane_failures_are_retried_on_the_timer() {
    let mut r = rig_with_db_refused();
    r.plane.state().fail = 1;
    r.push(update("shop/web", 4, 0.75));
    let a = r.only_ack();
    assert!(!a.applied && a.error.starts_with("data plane"), "{a:?}");
    assert!(matches!(
        r.pending().get("shop/web"),
        Some(Refusal::DataPlane(_))
    ));
    assert_eq!(
        r.plane.web_weights().get("west"),
        Some(&500),
        "nothing of the batch stays: the even split is in force"
    );

    r.steer.retry_pending(true);
    let a = r.only_ack(); // only the data-plane failure is offered again
    assert!(
        a.applied && a.service == "shop/web" && a.generation == 4,
        "{a:?}"
    );
    assert_eq!(r.plane.web_weights().get("west"), Some(&750));
    let pending = r.pending();
    assert_eq!(pending.len(), 1);
    assert!(
        matches!(pending.get("shop/db"), Some(Refusal::NotImported(_))),
        "the timer leaves what only discovery can change"
    );
}

#[test]
fn a_data_plane_failure_puts_the_previous_weights_back() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/web", 1, 0.25));
    r.plane.state().fail = 1;
    r.push(update("shop/web", 2, 0.75));
    assert_eq!(r.steer.steering().weights.len(), 1);
    let kept = &r.steer.steering().weights[&ServiceName::parse("shop/web").expect("name")];
    assert_eq!(kept.generation, 1);
    assert_eq!(r.plane.web_weights().get("west"), Some(&250));
    assert_eq!(*r.generation.borrow(), 1);
    // the same failure on the timer is not acked again
    r.acks();
    r.plane.state().fail = 2;
    r.steer.retry_pending(true);
    assert!(r.acks().is_empty());
    assert_eq!(r.refused("shop/web"), 1);
}

#[test]
fn an_older_pending_update_does_not_replace_a_newer_one() {
    let mut r = rig(&["shop/web"], MINUTE);
    r.push(update("shop/db", 5, 0.5));
    r.push(update("shop/db", 4, 0.5));
    r.discover(&["shop/web", "shop/db"]);
    let applied: Vec<u64> = r
        .acks()
        .into_iter()
        .filter(|a| a.applied)
        .map(|a| a.generation)
        .collect();
    assert_eq!(applied, [5]);
}

async fn next_ack(acks: &mut mpsc::Receiver<Ack>) -> Ack {
    tokio::time::timeout(Duration::from_secs(10), acks.recv())
        .await
        .expect("an ack in time")
        .expect("channel open")
}

#[tokio::test]
async fn the_loop_acks_batches_retries_on_its_timer_reports_and_stops() {
    let Rig {
        steer,
        plane,
        catalog: _catalog,
        updates,
        mut acks,
        mut reports,
        _peers,
        ..
    } = rig(&["shop/web"], Duration::from_millis(100));
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(steer.run(stop_rx));

    // a report is published every interval, naming the imports
    tokio::time::timeout(Duration::from_secs(10), reports.wait_for(Option::is_some))
        .await
        .expect("a report in time")
        .expect("open");
    let report = reports.borrow().clone().expect("report");
    assert_eq!(report.cluster_id, "east");
    assert_eq!(
        report.imports.map(|i| i.services),
        Some(vec!["shop/web".to_owned()])
    );

    plane.state().fail = 1;
    updates
        .send(vec![update("shop/web", 9, 0.75)])
        .await
        .expect("send");
    let a = next_ack(&mut acks).await;
    assert!(!a.applied && a.generation == 9, "{a:?}");
    // the timer offers it again; the data plane takes it now
    let a = next_ack(&mut acks).await;
    assert!(a.applied && a.generation == 9, "{a:?}");

    stop_tx.send(true).expect("stop");
    let plane = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops in time")
        .expect("no panic");
    assert_eq!(plane.web_weights().get("west"), Some(&750));
}

#[test]
fn identity_takes_flags_over_the_catalog() {
    let mut cat = (*catalog(&[])).clone();
    cat.clusters.insert(
        "east".into(),
        Cluster {
            region: Some("file-region".into()),
            zone: Some("file-zone".into()),
            ..cluster("east")
        },
    );
    let given = Cluster {
        region: Some("flag-region".into()),
        ..cluster("east")
    };
    let id = report::identity(&given, &cat);
    assert_eq!(id.region.as_deref(), Some("flag-region"));
    assert_eq!(id.zone.as_deref(), Some("file-zone"));
}
