//! gRPC end to end on loopback with real mutual TLS and a real SQLite file: registration,
//! reports, weights pushed to watchers, identity checks, validation, restart, metrics.
#![allow(clippy::unwrap_used, clippy::float_cmp)]

mod support;

use std::time::Duration;

use ballast_broker::certs::generate;
use ballast_proto::v1::{
    Ack, GetWeightsRequest, ListClustersRequest, ListClustersResponse, LoadBalancing,
    SetPolicyRequest, WeightsStatus, WeightsUpdate,
};
use ballast_store::sqlite_url;
use support::{
    admin, admin_as, agent, broker_for, broker_with_c1_c2, cap, capacity_report, cluster_agent,
    cluster_pair, open_watch, register_req, registered_agent, report, rps, rtt, send_reports,
    sqlite_test_config, start_broker, test_config, tls_of, watch_req,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn clusters(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_string()).collect()
}

async fn next_update(s: &mut tonic::Streaming<WeightsUpdate>) -> WeightsUpdate {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an update within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads updates until one of `generation` or later for `service` arrives.
async fn until_generation(
    s: &mut tonic::Streaming<WeightsUpdate>,
    service: &str,
    generation: u64,
) -> WeightsUpdate {
    loop {
        let u = next_update(s).await;
        if u.service == service && u.generation >= generation {
            return u;
        }
    }
}

#[tokio::test]
async fn agent_registers_reports_and_receives_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b) = broker_for(dir.path(), &["c1", "c2", "c3"]).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    let mut a3 = cluster_agent(b.addr, &bundle, "c3").await;
    let r = a1
        .register(register_req("c1", "n1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cluster_id, "c1");
    assert!(r.report_interval_ms > 0);
    a2.register(register_req("c2", "n1")).await.unwrap();
    let r3 = a3
        .register(register_req("c3", "n1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r3.known_cluster_ids, vec!["c1", "c2", "c3"]);

    let mut watch = open_watch(&mut a1, "c1", 0).await;

    // c2 and c3 serve ns/web; c1 is 5 ms from c2 and 80 ms from c3 and sends 100 RPS.
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 1000.0)])
        .await
        .unwrap();
    send_reports(&mut a3, vec![capacity_report("c3", "ns/web", 1000.0)])
        .await
        .unwrap();
    let mut m1 = report("c1", "n1");
    m1.rtt = vec![rtt("c2", 5.0), rtt("c3", 80.0)];
    m1.rps = vec![rps("ns/web", "c2", 60.0), rps("ns/web", "c3", 40.0)];
    let summary = send_reports(&mut a1, vec![m1]).await.unwrap();
    assert_eq!(
        (summary.messages, summary.rtt_samples, summary.rps_samples),
        (1, 2, 2)
    );

    // The watcher receives weights for c1 whose generation covers the last report.
    let mut u = next_update(&mut watch).await;
    loop {
        if (u.weights.get("c2").copied().unwrap_or(0.0) - 0.99).abs() < 1e-6 {
            break;
        }
        u = next_update(&mut watch).await;
    }
    assert_eq!(u.service, "ns/web");
    assert_eq!(u.source_cluster_id, "c1");
    assert!(u.generation >= 1);
    assert_eq!(u.status, i32::from(WeightsStatus::Optimal));
    assert!(u.last_in_batch);
    let total: f64 = u.weights.values().sum();
    assert!(
        (total - 1.0).abs() < 1e-9,
        "weights sum to 1: {:?}",
        u.weights
    );
    // Optimized: the near cluster takes all but the liveness floor (1 RPS of 100) at c3.
    assert!((u.weights["c3"] - 0.01).abs() < 1e-6, "{:?}", u.weights);

    // The agent acknowledges; the operator sees the clusters and the weights.
    a1.ack_weights(Ack {
        cluster_id: "c1".into(),
        node_name: "n1".into(),
        generation: u.generation,
        service: "ns/web".into(),
        applied: true,
        error: String::new(),
    })
    .await
    .unwrap();
    let mut op = admin(b.addr, &bundle).await;
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.clusters.len(), 3);
    let c1 = &list.clusters[0];
    assert_eq!(c1.cluster_id, "c1");
    assert!(!c1.stale);
    assert!(c1.last_report_age_ms >= 0 && c1.last_report_age_ms < 60_000);
    assert_eq!(c1.nodes[0].acked_generation, u.generation);
    let w = op
        .get_weights(GetWeightsRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
            ..GetWeightsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.weights.len(), 1);
    assert_eq!(w.weights[0].weights, u.weights);

    // A policy change is pushed at once: round-robin splits evenly.
    op.set_policy(SetPolicyRequest {
        service: "ns/web".into(),
        policy: LoadBalancing::RoundRobin.into(),
        ..SetPolicyRequest::default()
    })
    .await
    .unwrap();
    let rr = until_generation(&mut watch, "ns/web", u.generation + 1).await;
    assert_eq!(rr.policy, i32::from(LoadBalancing::RoundRobin));
    assert!((rr.weights["c2"] - 0.5).abs() < 1e-9, "{:?}", rr.weights);

    // Explain names the destinations with their costs.
    let ex = op
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.destinations.len(), 2);
    assert_eq!(ex.demand_rps, 100.0);

    // Metrics: generation and watchers; the probes of the same admin port.
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(b.metrics_addr.unwrap())
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(
        get("/ready").await.starts_with("HTTP/1.0 200"),
        "serving: ready"
    );
    assert!(get("/live").await.starts_with("HTTP/1.0 200"));
    let body = get("/metrics").await;
    assert!(
        body.contains(&format!("ballast_broker_generation {}", rr.generation)),
        "{body}"
    );
    assert!(body.contains("ballast_broker_watchers 1"), "{body}");
    assert!(body.contains("ballast_broker_clusters 3"), "{body}");
    drop(watch);
    b.stop().await;
}

/// A cluster whose agent declares its imports is sent weights for those services only, and
/// for a service as soon as it declares it.
/// The imports an agent cannot steer for want of a VIP reach the operator: ListClusters
/// shows, per cluster, the union over its fresh nodes' lists; a node's full-set report
/// replaces its list.
#[tokio::test]
async fn services_without_vip_show_in_list_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, _a2) = broker_with_c1_c2(dir.path()).await;
    let without_vip = |node: &str, services: &[&str]| {
        let mut m = report("c1", node);
        m.full_set = true;
        m.services_without_vip = services.iter().map(|s| (*s).to_string()).collect();
        m
    };
    send_reports(
        &mut a1,
        vec![
            without_vip("n1", &["shop/cart", "shop/db"]),
            without_vip("n2", &["shop/cart"]),
        ],
    )
    .await
    .unwrap();
    let mut op = admin(b.addr, &bundle).await;
    let listed = |list: ListClustersResponse| -> Vec<(String, Vec<String>)> {
        list.clusters
            .into_iter()
            .map(|c| (c.cluster_id, c.services_without_vip))
            .collect()
    };
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed(list),
        vec![
            (
                "c1".to_string(),
                vec!["shop/cart".to_string(), "shop/db".to_string()]
            ),
            ("c2".to_string(), vec![])
        ]
    );
    // n1 gets its VIPs: its (empty) full list replaces what it said; n2 still lacks one
    send_reports(&mut a1, vec![without_vip("n1", &[])])
        .await
        .unwrap();
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed(list),
        vec![
            ("c1".to_string(), vec!["shop/cart".to_string()]),
            ("c2".to_string(), vec![])
        ]
    );
}

#[tokio::test]
async fn declared_imports_limit_what_a_cluster_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    let declare = |services: &[&str]| {
        let mut m = report("c1", "n1");
        m.rtt = vec![rtt("c2", 5.0)];
        m.imports = Some(ballast_proto::v1::ImportedServices {
            services: services.iter().map(|s| (*s).to_string()).collect(),
        });
        m
    };
    send_reports(&mut a1, vec![declare(&["ns/web"])])
        .await
        .unwrap();
    let mut caps = capacity_report("c2", "ns/web", 1000.0);
    caps.capacity
        .extend(capacity_report("c2", "ns/api", 1000.0).capacity);
    send_reports(&mut a2, vec![caps]).await.unwrap();

    let mut watch = open_watch(&mut a1, "c1", 0).await;
    let web = until_generation(&mut watch, "ns/web", 1).await;
    assert_eq!(web.source_cluster_id, "c1");
    // c2 is a source of both (it never declared), c1 of ns/web only
    let published = b.engine().current();
    let pairs: Vec<(&str, &str)> = published
        .entries
        .keys()
        .map(|(s, c)| (s.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        pairs,
        vec![("ns/api", "c2"), ("ns/web", "c1"), ("ns/web", "c2")]
    );
    let mut op = admin(b.addr, &bundle).await;
    let e = op
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/api".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("does not import"), "{}", e.message());
    let list = op
        .list_clusters(ListClustersRequest {
            include_imports: true,
            ..ListClustersRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<Option<u64>> = list.clusters.iter().map(|c| c.imports_count).collect();
    assert_eq!(counts, vec![Some(1), None]);
    let imports: Vec<Option<Vec<String>>> = list
        .clusters
        .iter()
        .map(|c| c.imports.as_ref().map(|i| i.services.clone()))
        .collect();
    assert_eq!(imports, vec![Some(vec!["ns/web".to_string()]), None]);

    // c1 imports ns/api too: its weights arrive
    send_reports(&mut a1, vec![declare(&["ns/web", "ns/api"])])
        .await
        .unwrap();
    let api = until_generation(&mut watch, "ns/api", web.generation + 1).await;
    assert_eq!(api.source_cluster_id, "c1");
    assert!((api.weights["c2"] - 1.0).abs() < 1e-9, "{:?}", api.weights);
    drop(watch);
    b.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&clusters(&["c1"]), &[]).unwrap();
    let other = generate(&clusters(&["c1"]), &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    // Trusts the right server CA but presents a client certificate of another CA.
    let mut bad = tls_of(&bundle, cluster_pair(&other, "c1"));
    bad.ca_pem.clone_from(&bundle.ca.cert_pem);
    let res = match agent(b.addr, &bad).await {
        Err(_) => None,
        Ok(mut c) => Some(c.register(register_req("c1", "n1")).await),
    };
    if let Some(r) = res {
        let e = r.expect_err("a foreign client certificate must be refused");
        assert_ne!(e.code(), Code::Ok);
    }
    // Nothing was registered.
    let mut op = admin(b.addr, &bundle).await;
    let list = op
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.clusters.is_empty());
    // A server certificate from another CA is refused by a well-configured agent too.
    let good_client_wrong_ca = tls_of(&other, cluster_pair(&other, "c1"));
    let res = match agent(b.addr, &good_client_wrong_ca).await {
        Err(_) => true,
        Ok(mut c) => c.register(register_req("c1", "n1")).await.is_err(),
    };
    assert!(res);
    b.stop().await;
}

#[tokio::test]
async fn cluster_cannot_act_as_another() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, _a2) = broker_with_c1_c2(dir.path()).await;

    let e = a1.register(register_req("c2", "n1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = send_reports(&mut a1, vec![capacity_report("c2", "ns/web", 10.0)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("cluster_id"), "{e:?}");
    let e = a1.watch_weights(watch_req("c2", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a1
        .ack_weights(Ack {
            cluster_id: "c2".into(),
            node_name: "n1".into(),
            generation: 1,
            service: "ns/web".into(),
            applied: true,
            error: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A cluster certificate may not use the Admin service.
    let mut not_admin = admin_as(b.addr, &tls_of(&bundle, cluster_pair(&bundle, "c1"))).await;
    let e = not_admin
        .list_clusters(ListClustersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // No capacity was stored for c2 by c1.
    assert!(b.engine().store().capacity().await.unwrap().is_empty());
    b.stop().await;
}

#[tokio::test]
async fn invalid_reports_are_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&clusters(&["c1", "c2"]), &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.max_message_bytes = 16 * 1024;
    let b = start_broker(cfg).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;

    // Not registered yet.
    let e = send_reports(&mut a1, vec![report("c1", "n1")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    a1.register(register_req("c1", "n1")).await.unwrap();
    let mut a2 = cluster_agent(b.addr, &bundle, "c2").await;
    a2.register(register_req("c2", "n1")).await.unwrap();

    let cases: Vec<(ballast_proto::v1::ReportRequest, &str)> = vec![
        (
            {
                let mut m = report("c1", "n1");
                m.rtt = vec![rtt("c2", -1.0)];
                m
            },
            "rtt[0].rtt_ms",
        ),
        // physical bounds: sums over nodes cannot overflow (1e308 + 1e308 = inf)
        (
            {
                let mut m = report("c1", "n1");
                m.rtt = vec![rtt("c2", 600_001.0)];
                m
            },
            "rtt[0].rtt_ms",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.rps = vec![rps("a/b", "c2", 1e308)];
                m
            },
            "rps[0].rps",
        ),
        // byte rates: negative or not a number
        (
            {
                let mut m = report("c1", "n1");
                let mut r = rps("a/b", "c2", 1.0);
                r.bytes_sent_per_second = -1.0;
                m.rps = vec![r];
                m
            },
            "rps[0].bytes_sent_per_second",
        ),
        (
            {
                let mut m = report("c1", "n1");
                let mut r = rps("a/b", "c2", 1.0);
                r.bytes_received_per_second = f64::NAN;
                m.rps = vec![r];
                m
            },
            "rps[0].bytes_received_per_second",
        ),
        // a load unit outside the enum
        (
            {
                let mut m = report("c1", "n1");
                let mut c = cap("a/b", 10.0);
                c.unit = 7;
                m.capacity = vec![c];
                m
            },
            "capacity[0].unit",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.capacity = vec![cap("a/b", 1e308)];
                m
            },
            "capacity[0].capacity_rps",
        ),
        // a service-time curve that falls with load (not convex) or is not a number
        (
            {
                let mut m = report("c1", "n1");
                let mut c = cap("a/b", 10.0);
                c.service_time = Some(ballast_proto::v1::ServiceTimeCurve {
                    base_ms: 5.0,
                    slope_ms_per_rps: -0.1,
                });
                m.capacity = vec![c];
                m
            },
            "capacity[0].service_time.slope_ms_per_rps",
        ),
        (
            {
                let mut m = report("c1", "n1");
                let mut c = cap("a/b", 10.0);
                c.service_time = Some(ballast_proto::v1::ServiceTimeCurve {
                    base_ms: f64::INFINITY,
                    slope_ms_per_rps: 0.1,
                });
                m.capacity = vec![c];
                m
            },
            "capacity[0].service_time.base_ms",
        ),
        // a measured service time that is negative or not a number
        (
            {
                let mut m = report("c1", "n1");
                let mut c = cap("a/b", 10.0);
                c.measured_service_ms = Some(-3.0);
                m.capacity = vec![c];
                m
            },
            "capacity[0].measured_service_ms",
        ),
        (
            {
                let mut m = report("c1", "n1");
                let mut c = cap("a/b", 10.0);
                c.measured_service_ms = Some(f64::NAN);
                m.capacity = vec![c];
                m
            },
            "capacity[0].measured_service_ms",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.rtt = vec![rtt("c2", f64::NAN)];
                m
            },
            "rtt[0].rtt_ms",
        ),
        (
            {
                let mut m = report("c1", "n1");
                let mut s = rtt("c2", 5.0);
                s.loss_ratio = 1.5;
                m.rtt = vec![s];
                m
            },
            "rtt[0].loss_ratio",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.rtt = vec![rtt("c9", 5.0)];
                m
            },
            "rtt[0].peer_cluster_id",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.rps = vec![rps("ns/web", "c2", 1.0), rps("ns/web", "c2", f64::INFINITY)];
                m
            },
            "rps[1]",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.capacity = vec![cap("", 5.0)];
                m
            },
            "capacity[0].service",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.imports = Some(ballast_proto::v1::ImportedServices {
                    services: vec!["ns/web".into(), String::new()],
                });
                m
            },
            "imports.services[1]",
        ),
        // the one service-name rule (ballast_types::ServiceName): namespace/name, DNS labels
        (
            {
                let mut m = report("c1", "n1");
                m.capacity = vec![cap("web", 5.0)];
                m
            },
            "capacity[0].service",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.rps = vec![rps("ns/Web", "c2", 1.0)];
                m
            },
            "rps[0].service",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.imports = Some(ballast_proto::v1::ImportedServices {
                    services: vec!["ns/web".into(), "ns/web".into()],
                });
                m
            },
            "imports.services[1]",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.services_without_vip = vec!["shop/cart".into(), "shop/Cart".into()];
                m
            },
            "services_without_vip[1]",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.services_without_vip = vec!["shop/cart".into(), "shop/cart".into()];
                m
            },
            "services_without_vip[1]",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.services_without_vip = vec!["cart".into()];
                m
            },
            "services_without_vip[0]",
        ),
        (
            {
                let mut m = report("c1", "n1");
                m.measured_at_ms = 0;
                m
            },
            "measured_at_ms",
        ),
        (
            {
                let mut m = report("c1", "");
                m.capacity = vec![cap("ns/web", 5.0)];
                m
            },
            "node_name",
        ),
    ];
    for (m, field) in cases {
        let e = send_reports(&mut a1, vec![m]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
        // only a refusal about an unknown cluster names one in the metadata agents read
        let named = e
            .metadata()
            .get(ballast_broker::grpc::UNKNOWN_CLUSTER_METADATA)
            .map(|v| v.to_str().unwrap().to_owned());
        let expected = (field == "rtt[0].peer_cluster_id").then(|| "c9".to_owned());
        assert_eq!(named, expected, "{field}: {e:?}");
    }
    // an RPS sample toward an unknown destination is named the same way
    let mut m = report("c1", "n1");
    m.rps = vec![rps("ns/web", "c7", 1.0)];
    let e = send_reports(&mut a1, vec![m]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.metadata()
            .get(ballast_broker::grpc::UNKNOWN_CLUSTER_METADATA)
            .map(|v| v.to_str().unwrap()),
        Some("c7")
    );
    // Nothing of the rejected reports was stored (the valid first rps sample included).
    let s = b.engine().store();
    assert!(s.rtt().await.unwrap().is_empty());
    assert!(s.rps().await.unwrap().is_empty());
    assert!(s.capacity().await.unwrap().is_empty());

    // Over the message size limit.
    let mut big = report("c1", "n1");
    big.capacity = (0..2000)
        .map(|i| cap(&format!("ns/service-{i}"), 1.0))
        .collect();
    let e = send_reports(&mut a1, vec![big]).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "gRPC's code for over-limit: {e:?}"
    );
    assert!(e.message().contains("--max-message-bytes"), "{e:?}");
    // A unary message over the limit (refused before any handler) too.
    let mut r = register_req("c1", "n1");
    r.agent_version = "x".repeat(20 * 1024);
    let e = a1.register(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    b.stop().await;
}

#[tokio::test]
async fn restart_on_the_same_sqlite_file_continues_the_generation_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir.path().join("b.db"));
    let bundle = generate(&clusters(&["c1", "c2"]), &[]).unwrap();
    let t1 = tls_of(&bundle, cluster_pair(&bundle, "c1"));
    let t2 = tls_of(&bundle, cluster_pair(&bundle, "c2"));

    let b = start_broker(test_config(&bundle, &db)).await;
    let mut a1 = registered_agent(b.addr, &t1, "c1").await;
    let mut a2 = registered_agent(b.addr, &t2, "c2").await;
    let mut watch = open_watch(&mut a1, "c1", 0).await;
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 500.0)])
        .await
        .unwrap();
    let first = until_generation(&mut watch, "ns/web", 1).await;
    send_reports(&mut a1, vec![capacity_report("c1", "ns/web", 500.0)])
        .await
        .unwrap();
    let second = until_generation(&mut watch, "ns/web", first.generation + 1).await;
    let before = b.engine().current().generation;
    assert_eq!(before, second.generation);
    drop(watch);
    b.stop().await;

    // Restarted on the same file: the last generation and its weights are served at once.
    let b = start_broker(test_config(&bundle, &db)).await;
    assert_eq!(b.engine().current().generation, before);
    let mut a1 = agent(b.addr, &t1).await.unwrap();
    let mut a2 = agent(b.addr, &t2).await.unwrap();
    let mut watch = open_watch(&mut a1, "c1", before).await;
    let u = next_update(&mut watch).await;
    assert_eq!(u.generation, before);
    assert_eq!(u.weights, second.weights);
    // The next change continues the sequence.
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 0.0)])
        .await
        .unwrap();
    let next = until_generation(&mut watch, "ns/web", before + 1).await;
    assert_eq!(next.generation, before + 1);
    assert!(
        (next.weights["c1"] - 1.0).abs() < 1e-9,
        "{:?}",
        next.weights
    );
    drop(watch);
    b.stop().await;
}

#[tokio::test]
async fn plain_text_only_with_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let (_bundle, b) = broker_for(dir.path(), &["c1"]).await;
    // A plain-text client cannot talk to the default (mTLS) server.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", b.addr.port()))
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
    let res = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => ballast_proto::v1::broker_client::BrokerClient::new(ch)
            .register(register_req("c1", "n1"))
            .await
            .is_err(),
    };
    assert!(res, "plain text must be refused by the mTLS server");
    b.stop().await;
}

#[tokio::test]
async fn insecure_mode_serves_plain_text_and_trusts_the_claimed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&clusters(&["c1"]), &[]).unwrap();
    let mut cfg = sqlite_test_config(&bundle, dir.path());
    cfg.tls = None;
    let b = start_broker(cfg).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", b.addr.port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ballast_proto::v1::broker_client::BrokerClient::new(ch);
    let r = c
        .register(register_req("c7", "n1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cluster_id, "c7");
    b.stop().await;
}

#[tokio::test]
async fn postgres_backed_broker_serves_and_survives_a_restart() {
    let Some(pg) =
        support::PgSchema::create("postgres_backed_broker_serves_and_survives_a_restart").await
    else {
        return;
    };
    let bundle = generate(&clusters(&["c1", "c2"]), &[]).unwrap();
    let t1 = tls_of(&bundle, cluster_pair(&bundle, "c1"));
    let t2 = tls_of(&bundle, cluster_pair(&bundle, "c2"));
    let b = start_broker(test_config(&bundle, &pg.url)).await;
    let mut a1 = registered_agent(b.addr, &t1, "c1").await;
    let mut a2 = registered_agent(b.addr, &t2, "c2").await;
    let mut watch = open_watch(&mut a1, "c1", 0).await;
    send_reports(&mut a2, vec![capacity_report("c2", "ns/api", 200.0)])
        .await
        .unwrap();
    let u = until_generation(&mut watch, "ns/api", 1).await;
    assert!((u.weights["c2"] - 1.0).abs() < 1e-9, "{:?}", u.weights);
    let before = b.engine().current().generation;
    drop(watch);
    b.stop().await;

    let b = start_broker(test_config(&bundle, &pg.url)).await;
    assert_eq!(b.engine().current().generation, before);
    let mut a1 = agent(b.addr, &t1).await.unwrap();
    send_reports(&mut a1, vec![capacity_report("c1", "ns/api", 200.0)])
        .await
        .unwrap();
    let mut watch = open_watch(&mut a1, "c1", before).await;
    let next = until_generation(&mut watch, "ns/api", before + 1).await;
    assert_eq!(next.generation, before + 1);
    assert!(next.weights.contains_key("c1"), "{:?}", next.weights);
    drop(watch);
    b.stop().await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn register_rejects_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b) = broker_for(dir.path(), &["c1"]).await;
    let mut a1 = cluster_agent(b.addr, &bundle, "c1").await;
    let mut r = register_req("c1", "n1");
    r.zone = String::new();
    let e = a1.register(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("zone"), "{e:?}");
    let mut r = register_req("c1", "n1");
    r.cluster_id = "C 1".into();
    let e = a1.register(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("cluster_id"), "{e:?}");
    let e = a1.watch_weights(watch_req("c1", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "watching before registering");
    b.stop().await;
}

#[test]
fn certs_writes_pems_with_private_keys_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&clusters(&["c1", "c-2"]), &["broker.example".into()]).unwrap();
    let files = bundle.write_to(dir.path()).unwrap();
    assert_eq!(files.len(), 10);
    let key = std::fs::metadata(dir.path().join("cluster-c-2-key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let pem = std::fs::read_to_string(dir.path().join("cluster-c-2.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        ballast_broker::grpc::identity::identity_of_der(&der).unwrap(),
        ballast_broker::grpc::identity::Caller::Cluster("c-2".into())
    );
    assert!(generate(&clusters(&["Bad_Id"]), &[]).is_err());
    assert!(generate(&clusters(&["c1"]), &["bad name!".into()]).is_err());
}

/// `full_set` over the wire: a report stating all of the node's facts withdraws the capacity
/// it no longer states; one without the flag withdraws nothing.
#[tokio::test]
async fn a_full_set_report_withdraws_what_it_no_longer_states() {
    let dir = tempfile::tempdir().unwrap();
    let (_bundle, b, _a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    let mut both = report("c2", "n1");
    both.capacity = vec![cap("ns/web", 10.0), cap("ns/api", 20.0)];
    send_reports(&mut a2, vec![both]).await.unwrap();
    let services = |b: &ballast_broker::server::Running| {
        let store = b.engine().store().clone();
        async move {
            let mut v: Vec<String> = store
                .capacity()
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.service)
                .collect();
            v.sort();
            v
        }
    };
    // without the flag, a report that leaves ns/api out withdraws nothing
    send_reports(&mut a2, vec![capacity_report("c2", "ns/web", 10.0)])
        .await
        .unwrap();
    assert_eq!(services(&b).await, ["ns/api", "ns/web"]);
    let mut full = capacity_report("c2", "ns/web", 10.0);
    full.full_set = true;
    send_reports(&mut a2, vec![full]).await.unwrap();
    assert_eq!(services(&b).await, ["ns/web"]);
    b.stop().await;
}

/// Explain states the capacity the last round solved with: with three nodes of c2 each
/// reporting the cluster's figure, c2's capacity is that figure once, not three times.
#[tokio::test]
async fn explain_states_the_solved_capacity_of_a_cluster_once_over_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    for node in ["n2", "n3"] {
        a2.register(register_req("c2", node)).await.unwrap();
    }
    let mut m1 = report("c1", "n1");
    m1.rtt = vec![rtt("c2", 5.0)];
    send_reports(&mut a1, vec![m1]).await.unwrap();
    let mut watch = open_watch(&mut a1, "c1", 0).await;
    let mut reports = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let mut m = report("c2", node);
        m.capacity = vec![cap("ns/web", 1000.0)];
        m.full_set = true;
        reports.push(m);
    }
    send_reports(&mut a2, reports).await.unwrap();
    let u = until_generation(&mut watch, "ns/web", 1).await;
    // The published generation may come from a round that saw only some of the reports;
    // the figure is the same either way (counted once), so wait for any round after them.
    b.engine().run_round().await.unwrap();
    let mut op = admin(b.addr, &bundle).await;
    let ex = op
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ex.generation >= u.generation);
    assert_eq!(
        ex.solved_capacity_rps,
        [("c2".to_string(), 1000.0)].into(),
        "c2's capacity counted once over its three nodes"
    );
    // `ballast-broker admin explain` prints it in the destination's row
    use ballast_broker::cli::admin::{run, AdminArgs, AdminCommand};
    let files = tls_of(&bundle, &bundle.admin);
    for (name, pem) in [
        ("ca.pem", &files.ca_pem),
        ("admin.pem", &files.cert_pem),
        ("admin-key.pem", &files.key_pem),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let out = run(&AdminArgs {
        broker: format!("https://127.0.0.1:{}", b.addr.port()),
        server_name: "localhost".into(),
        tls: ballast_broker::cli::args::TlsArgs {
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("admin.pem")),
            key: Some(dir.path().join("admin-key.pem")),
            insecure: false,
        },
        command: AdminCommand::Explain {
            service: "ns/web".into(),
            source: "c1".into(),
            json: false,
        },
    })
    .await
    .unwrap();
    assert!(out.contains("CAPACITY"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("c2 "))
        .unwrap_or_else(|| panic!("a row for c2 in\n{out}"));
    assert!(row.contains("1000.0"), "{row}");
    drop(watch);
    b.stop().await;
}

/// The notes of destination `id` of an explanation, joined.
fn notes_of(ex: &ballast_proto::v1::ExplainResponse, id: &str) -> String {
    ex.destinations
        .iter()
        .find(|d| d.cluster_id == id)
        .unwrap_or_else(|| panic!("{id} in {:?}", ex.destinations))
        .notes
        .join("; ")
}

/// Runs solver rounds until c1's weight on c2 for ns/web is above `share` (rounds are damped:
/// a bounded step each), 30 at most; returns c1's last published weights.
async fn rounds_until_c2_above(
    b: &ballast_broker::server::Running,
    op: &mut ballast_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    share: f64,
) -> std::collections::BTreeMap<String, f64> {
    let mut last = std::collections::BTreeMap::new();
    for _ in 0..30 {
        b.engine().run_round().await.unwrap();
        let w = op
            .get_weights(GetWeightsRequest {
                service: "ns/web".into(),
                source_cluster_id: "c1".into(),
                ..GetWeightsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(w) = w.weights.first() {
            last = w.weights.clone().into_iter().collect();
            if last.get("c2").copied().unwrap_or(0.0) > share {
                break;
            }
        }
    }
    last
}

/// Measured service times (the agents' probes) travel with the capacity over real gRPC; the
/// leader pairs them with the load it sees on the cluster, fits the curve, and the load-aware
/// solve and explain use it: c1 serves its own traffic and measures 5 ms + 1 ms per rps at
/// loads 10..60 rps, c2 (5 ms away) measures a flat 5 ms; no curve is declared anywhere.
#[tokio::test]
async fn measured_service_times_are_fitted_into_a_curve_the_solve_uses() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    let start = ballast_types::now_ms() - 30_000;
    let mut op = admin(b.addr, &bundle).await;
    for i in 0..8_i64 {
        let load = 10.0 * (i + 1) as f64;
        let at = start + i * 2_500;
        let measured = |service: &str, ms: f64| {
            let mut c = cap(service, 1000.0);
            c.measured_service_ms = Some(ms);
            c.measured_at_ms = at;
            c
        };
        let mut m2 = report("c2", "n1");
        m2.rtt = vec![rtt("c1", 5.0)];
        m2.capacity = vec![measured("ns/web", 5.0)];
        send_reports(&mut a2, vec![m2]).await.unwrap();
        let mut m1 = report("c1", "n1");
        m1.rtt = vec![rtt("c2", 5.0)];
        m1.rps = vec![rps("ns/web", "c1", load)];
        m1.capacity = vec![measured("ns/web", 5.0 + load)];
        send_reports(&mut a1, vec![m1]).await.unwrap();
        b.engine().run_round().await.unwrap();
    }
    let ex = op
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let note = |id: &str| notes_of(&ex, id);
    // "(B + S ms/rps, fitted from 8 measured points)". Not exactly 5 + 1: a solve round of the
    // broker's own loop may read the RPS just before a report and its sample just after, so a
    // point may pair a sample with the load of a moment before (as on a real fleet).
    let c1 = note("c1");
    let curve = c1
        .split_once(" ms/rps, fitted from 8 measured points)")
        .and_then(|(before, _)| before.rsplit_once('('))
        .and_then(|(_, bs)| bs.split_once(" + "))
        .map(|(b, s)| (b.parse::<f64>().unwrap(), s.parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("no fitted curve in {c1}"));
    assert!(
        (curve.0 - 5.0).abs() < 6.0 && (curve.1 - 1.0).abs() < 0.15,
        "{curve:?} from {c1}"
    );
    // c1 only sends to itself, so c2's load never moved: flat at what it measured
    assert!(
        note("c2").contains("(5.000 + 0.0000 ms/rps, flat at the median of 8 measured points)"),
        "{}",
        note("c2")
    );
    // and the solve moves c1's traffic toward c2 (damped: several rounds)
    let last = rounds_until_c2_above(&b, &mut op, 0.5).await;
    assert!(
        last.get("c2").copied().unwrap_or(0.0) > 0.5,
        "c1 should send most of its 80 rps to c2: {last:?}"
    );
    b.stop().await;
}

/// Declared service-time curves travel with the capacity over real gRPC, and the load-aware
/// solve uses them: c1 serves its own 100 rps but slows down steeply with load (1 ms per
/// rps), c2 is 5 ms away and barely slows down; `optimized` (params mixed) moves most of c1's
/// traffic to c2, and explain shows each curve and the marginal cost.
#[tokio::test]
async fn declared_service_time_curves_move_weight_to_the_cluster_that_slows_down_less() {
    use ballast_proto::v1::ServiceTimeCurve;
    let dir = tempfile::tempdir().unwrap();
    let (bundle, b, mut a1, mut a2) = broker_with_c1_c2(dir.path()).await;
    let curve = |service: &str, base_ms: f64, slope_ms_per_rps: f64| {
        let mut c = cap(service, 1000.0);
        c.service_time = Some(ServiceTimeCurve {
            base_ms,
            slope_ms_per_rps,
        });
        c
    };
    let mut m2 = report("c2", "n1");
    m2.rtt = vec![rtt("c1", 5.0)];
    m2.capacity = vec![curve("ns/web", 5.0, 0.001)];
    send_reports(&mut a2, vec![m2]).await.unwrap();
    let mut m1 = report("c1", "n1");
    m1.rtt = vec![rtt("c2", 5.0)];
    m1.rps = vec![rps("ns/web", "c1", 100.0)];
    m1.capacity = vec![curve("ns/web", 5.0, 1.0)];
    send_reports(&mut a1, vec![m1]).await.unwrap();
    let mut op = admin(b.addr, &bundle).await;
    let last = rounds_until_c2_above(&b, &mut op, 0.8).await;
    assert!(
        last.get("c2").copied().unwrap_or(0.0) > 0.8,
        "c1 should send most to c2: {last:?}"
    );
    let ex = op
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let note = |id: &str| notes_of(&ex, id);
    assert!(
        note("c1").contains("(5.000 + 1.0000 ms/rps, declared)"),
        "{}",
        note("c1")
    );
    assert!(
        note("c2").contains("(5.000 + 0.0010 ms/rps, declared)"),
        "{}",
        note("c2")
    );
    assert!(note("c2").contains("marginal cost"), "{}", note("c2"));
    assert!(
        ex.detail_json.contains("\"slope_ms_per_rps\":1.0"),
        "{}",
        ex.detail_json
    );
    b.stop().await;
}

#[tokio::test]
async fn a_capacity_in_another_unit_is_refused_and_savings_price_the_measured_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = generate(&clusters(&["c1", "c2", "c3"]), &[]).unwrap();
    let b = start_broker(sqlite_test_config(&bundle, dir.path())).await;
    let mut agents = Vec::new();
    for c in ["c1", "c2", "c3"] {
        let mut a = cluster_agent(b.addr, &bundle, c).await;
        a.register(register_req(c, "n1")).await.unwrap();
        agents.push(a);
    }
    let bytes_cap = |v| {
        let mut c = cap("ns/web", v);
        c.unit = ballast_proto::v1::LoadUnit::Bytes.into();
        c
    };
    // c2 counts ns/web in bytes
    let mut m = report("c2", "n1");
    m.capacity = vec![bytes_cap(1e9)];
    send_reports(&mut agents[1], vec![m]).await.unwrap();
    // c3 states connections (the default): refused, naming the field, nothing stored
    let mut m = report("c3", "n1");
    m.capacity = vec![cap("ns/web", 100.0)];
    let e = send_reports(&mut agents[2], vec![m]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("capacity[0].unit"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("\"c2\""), "{}", e.message());
    let stored = b.engine().store().capacity().await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].load_unit, "bytes");
    // in bytes it is accepted; c2 may change its own unit only with the others
    let mut m = report("c3", "n1");
    m.capacity = vec![bytes_cap(1e9)];
    send_reports(&mut agents[2], vec![m]).await.unwrap();

    // c1 sends 1 MB/s and receives 3 MB/s through c2
    let mut m = report("c1", "n1");
    let mut r = rps("ns/web", "c2", 5.0);
    r.bytes_sent_per_second = 1e6;
    r.bytes_received_per_second = 3e6;
    m.rps = vec![r];
    send_reports(&mut agents[0], vec![m]).await.unwrap();

    let mut admin = admin(b.addr, &bundle).await;
    let s = admin
        .savings(ballast_proto::v1::SavingsRequest {
            service: "ns/web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let to = |d: &str| {
        s.flows
            .iter()
            .find(|f| f.destination_cluster_id == d)
            .unwrap()
            .clone()
    };
    let c2 = to("c2");
    assert_eq!(c2.bytes_sent_per_second, 1e6);
    assert_eq!(c2.bytes_received_per_second, 3e6);
    let spent = (1e6 * c2.usd_per_gb_sent + 3e6 * c2.usd_per_gb_received) * 3600.0 / 1e9;
    assert!((c2.usd_per_hour - spent).abs() < 1e-12, "{s:?}");
    // round-robin: half of each direction to c2 and to c3
    let c3 = to("c3");
    assert_eq!(c3.bytes_sent_per_second, 0.0);
    let rr3 = (0.5e6 * c3.usd_per_gb_sent + 1.5e6 * c3.usd_per_gb_received) * 3600.0 / 1e9;
    assert!((c3.round_robin_usd_per_hour - rr3).abs() < 1e-12, "{s:?}");
    let total = s.total.unwrap();
    assert!(
        (total.saved_usd_per_hour - (total.round_robin_usd_per_hour - total.usd_per_hour)).abs()
            < 1e-12
    );
    assert_eq!(total.bytes_per_second, 4e6);
    // the metrics integrate a node's byte rates over the time between its reports (the first
    // report here only started the clock) and price each direction
    let t0 = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut m = report("c1", "n1");
    let mut r = rps("ns/web", "c2", 5.0);
    r.bytes_sent_per_second = 1e6;
    r.bytes_received_per_second = 3e6;
    m.rps = vec![r];
    send_reports(&mut agents[0], vec![m]).await.unwrap();
    let upper = t0.elapsed().as_secs_f64() + 0.5;
    let text = b.engine().metrics().render();
    let value = |name: &str| -> f64 {
        let key = format!("{name}{{service=\"ns/web\",src=\"c1\",dst=\"c2\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("{key} in {text}"));
        line[key.len()..].trim().parse().unwrap()
    };
    let bytes = value("ballast_broker_egress_bytes_total");
    assert!(bytes >= 4e6 * 0.3 && bytes <= 4e6 * upper, "{bytes}");
    let usd = value("ballast_broker_egress_usd_total");
    let per_byte = (1e6 * c2.usd_per_gb_sent + 3e6 * c2.usd_per_gb_received) / 4e6 / 1e9;
    assert!(
        (usd - bytes * per_byte).abs() < 1e-12,
        "{usd} vs {}",
        bytes * per_byte
    );
    // explain quotes the measured bytes and dollars, in the service's unit
    let ex = admin
        .explain(ballast_proto::v1::ExplainRequest {
            service: "ns/web".into(),
            source_cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.unit, i32::from(ballast_proto::v1::LoadUnit::Bytes));
    assert_eq!(ex.demand_rps, 4e6);
    let d2 = ex
        .destinations
        .iter()
        .find(|d| d.cluster_id == "c2")
        .unwrap();
    assert_eq!(d2.bytes_received_per_second, 3e6);
    assert!((d2.egress_usd_per_hour - spent).abs() < 1e-12);
    b.stop().await;
}
