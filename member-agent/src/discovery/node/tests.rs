//! Node topology: real object shapes (EKS, GKE, AKS, kind, kubeadm) and the read through
//! kube's tower-test mock API service (the one fake allowed: the Kubernetes API).
#![allow(clippy::unwrap_used)]

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::json;

use super::*;

/// A Node as the API server returns it, with the given labels and providerID.
fn node(name: &str, labels: serde_json::Value, provider_id: Option<&str>) -> Node {
    let mut spec = json!({"podCIDR": "10.244.1.0/24"});
    if let Some(p) = provider_id {
        spec["providerID"] = json!(p);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))
    .unwrap()
}

fn local(provider: Option<&str>, zone: Option<&str>) -> Cluster {
    Cluster {
        id: "c1".into(),
        region: None,
        zone: zone.map(Into::into),
        provider: provider.map(Into::into),
        gateway: None,
    }
}

#[test]
fn provider_ids_of_the_clouds_name_their_provider() {
    for (id, want) in [
        ("aws:///us-east-1a/i-0123456789abcdef0", "aws"),
        ("gce://my-project/us-central1-a/gke-pool-1-abcd", "gcp"),
        (
            "azure:///subscriptions/0000/resourceGroups/mc_rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-nodepool1-1234-vmss/virtualMachines/0",
            "azure",
        ),
        ("kind://docker/c1/c1-control-plane", "kind"),
    ] {
        assert_eq!(provider_of(id).unwrap(), want, "{id}");
    }
    let e = provider_of("openstack:///6e8b-4d2a")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("openstack:///6e8b-4d2a") && e.contains("--provider"),
        "{e}"
    );
}

#[test]
fn an_eks_node_fills_what_the_flags_leave_unset() {
    let n = node(
        "ip-10-0-1-23.ec2.internal",
        json!({
            "topology.kubernetes.io/region": "us-east-1",
            "topology.kubernetes.io/zone": "us-east-1a",
            "kubernetes.io/os": "linux"
        }),
        Some("aws:///us-east-1a/i-0123456789abcdef0"),
    );
    let topo = topology_of(&n);
    assert_eq!(topo.region.as_deref(), Some("us-east-1"));
    // the zone flag wins; region and provider come from the Node
    let clusters = with_node_topology(Vec::new(), &local(None, Some("us-east-1b")), topo).unwrap();
    assert_eq!(clusters.len(), 1);
    let c = &clusters[0];
    assert_eq!(c.id, "c1");
    assert_eq!(c.region.as_deref(), Some("us-east-1"));
    assert_eq!(
        c.zone, None,
        "the flag's zone is taken over this entry by identity()"
    );
    assert_eq!(c.provider.as_deref(), Some("aws"));
}

#[test]
fn an_unknown_provider_scheme_is_an_error_only_where_nothing_names_the_provider() {
    let n = node(
        "worker-1",
        json!({"topology.kubernetes.io/region": "dc1"}),
        Some("openstack:///6e8b-4d2a"),
    );
    assert!(matches!(
        with_node_topology(Vec::new(), &local(None, None), topology_of(&n)),
        Err(NodeError::UnknownProvider(_))
    ));
    // with --provider the providerID is not parsed
    let ok = with_node_topology(Vec::new(), &local(Some("onprem"), None), topology_of(&n)).unwrap();
    assert_eq!(ok[0].provider, None);
    assert_eq!(ok[0].region.as_deref(), Some("dc1"));
    // the config file's entry for this cluster also wins over the Node
    let filed = vec![Cluster {
        id: "c1".into(),
        region: Some("eu-west-1".into()),
        zone: None,
        provider: Some("aws".into()),
        gateway: None,
    }];
    let merged = with_node_topology(filed, &local(None, None), topology_of(&n)).unwrap();
    assert_eq!(merged[0].region.as_deref(), Some("eu-west-1"));
    assert_eq!(merged[0].provider.as_deref(), Some("aws"));
}

#[test]
fn a_kubeadm_node_without_labels_or_provider_id_leaves_the_fields_unset() {
    let n = node(
        "kubeadm-1",
        json!({"kubernetes.io/hostname": "kubeadm-1"}),
        None,
    );
    assert_eq!(topology_of(&n), NodeTopology::default());
    let c = with_node_topology(Vec::new(), &local(None, None), topology_of(&n)).unwrap();
    assert_eq!((c[0].region.clone(), c[0].provider.clone()), (None, None));
}

#[tokio::test]
async fn kube_mock_api_the_agent_reads_its_own_node() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let (req, send) = handle.next_request().await.unwrap();
        let path = req.uri().path().to_owned();
        let body = serde_json::to_vec(&node(
            "gke-pool-1-abcd",
            json!({
                "topology.kubernetes.io/region": "us-central1",
                "topology.kubernetes.io/zone": "us-central1-a"
            }),
            Some("gce://my-project/us-central1-a/gke-pool-1-abcd"),
        ))
        .unwrap();
        send.send_response(Response::builder().body(Body::from(body)).unwrap());
        path
    });
    let client = Client::new(svc, "default");
    let topo = read(&client, "gke-pool-1-abcd").await.unwrap();
    assert_eq!(server.await.unwrap(), "/api/v1/nodes/gke-pool-1-abcd");
    let c = with_node_topology(Vec::new(), &local(None, None), topo).unwrap();
    assert_eq!(c[0].region.as_deref(), Some("us-central1"));
    assert_eq!(c[0].zone.as_deref(), Some("us-central1-a"));
    assert_eq!(c[0].provider.as_deref(), Some("gcp"));
}
