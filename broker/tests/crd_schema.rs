//! The CRD types: schema enums agree with the model, validation names the field, and the
//! objects -> settings rules (singleton, overrides, conflicts, last accepted value).

use ballast_broker::policy::{ClusterPolicy, PolicySettings};
use ballast_k8s_api::policy::{
    crds, CrdError, LoadBalancingPolicy, LoadBalancingPolicySpec, PolicyChoice,
    ServiceLoadBalancingPolicy, ServiceLoadBalancingPolicySpec, ServiceOverrideSpec, FIELD_PARAMS,
    FIELD_POLICY, FIELD_SERVICE_IMPORT,
};
use ballast_model::{Params, Policy, PriceTable, Problem, ServiceInput};
use kube::api::ObjectMeta;
use serde_json::Value;

const FALLBACK: ClusterPolicy = ClusterPolicy {
    policy: Policy::Optimized,
    params: Params::Mixed,
};

/// Every variant; the `match` makes this fail to compile when the model gains one.
fn all_policies() -> Vec<Policy> {
    let v = vec![
        Policy::RoundRobin,
        Policy::LocalFirstRoundRobin,
        Policy::WeightedRoundRobin,
        Policy::Optimized,
    ];
    for p in &v {
        match p {
            Policy::RoundRobin
            | Policy::LocalFirstRoundRobin
            | Policy::WeightedRoundRobin
            | Policy::Optimized => {}
        }
    }
    v
}

fn all_params() -> Vec<Params> {
    let v = vec![Params::Cost, Params::Performance, Params::Mixed];
    for p in &v {
        match p {
            Params::Cost | Params::Performance | Params::Mixed => {}
        }
    }
    v
}

fn wire<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .expect("serialise")
        .as_str()
        .expect("a string")
        .to_string()
}

fn spec_property(crd_index: usize, field: &str) -> Value {
    let crd = serde_json::to_value(&crds()[crd_index]).expect("crd json");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        [field]
        .clone()
}

#[test]
fn crd_schema_enums_are_the_models_values() {
    let policies: Vec<String> = all_policies().iter().map(wire).collect();
    let params: Vec<String> = all_params().iter().map(wire).collect();
    for i in 0..2 {
        let p = spec_property(i, "serviceDiscoveryLoadBalancing");
        let got: Vec<String> = serde_json::from_value(p["enum"].clone()).expect("enum");
        assert_eq!(got, policies, "CRD {i} serviceDiscoveryLoadBalancing enum");
        let p = spec_property(i, "optimizedLoadBalancingParams");
        let got: Vec<String> = serde_json::from_value(p["enum"].clone()).expect("enum");
        assert_eq!(got, params, "CRD {i} optimizedLoadBalancingParams enum");
    }
    // Every schema value converts into the model.
    for v in &policies {
        let spec = LoadBalancingPolicySpec {
            service_discovery_load_balancing: Some(v.clone()),
            optimized_load_balancing_params: None,
            egress_prices: Vec::new(),
        };
        let c = PolicyChoice::try_from(&spec).expect("valid policy");
        assert_eq!(c.policy.map(|p| wire(&p)), Some(v.clone()));
    }
}

#[test]
fn crd_scopes_names_and_singleton_rule() {
    let all = crds();
    assert_eq!(all.len(), 2);
    let cluster = serde_json::to_value(&all[0]).expect("json");
    assert_eq!(
        cluster["metadata"]["name"],
        "loadbalancingpolicies.ballast.io"
    );
    assert_eq!(cluster["spec"]["scope"], "Cluster");
    let rules =
        &cluster["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"];
    assert_eq!(rules[0]["rule"], "self.metadata.name == 'default'");

    let service = serde_json::to_value(&all[1]).expect("json");
    assert_eq!(
        service["metadata"]["name"],
        "serviceloadbalancingpolicies.ballast.io"
    );
    assert_eq!(service["spec"]["scope"], "Namespaced");
    let spec = &service["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["serviceImportName"]));
    assert_eq!(spec["properties"]["serviceImportName"]["maxLength"], 63);
}

#[test]
fn crd_try_from_rejects_bad_values_naming_the_field() {
    let spec = LoadBalancingPolicySpec {
        service_discovery_load_balancing: Some("Round-Robin".into()),
        optimized_load_balancing_params: Some("cost".into()),
        egress_prices: Vec::new(),
    };
    let e = PolicyChoice::try_from(&spec).expect_err("case matters");
    assert!(matches!(e, CrdError::InvalidValue { field, .. } if field == FIELD_POLICY));
    assert!(
        e.to_string().contains("spec.serviceDiscoveryLoadBalancing"),
        "{e}"
    );
    assert!(e.to_string().contains("Round-Robin"), "{e}");

    let spec = LoadBalancingPolicySpec {
        service_discovery_load_balancing: None,
        optimized_load_balancing_params: Some("latency".into()),
        egress_prices: Vec::new(),
    };
    let e = PolicyChoice::try_from(&spec).expect_err("not a params value");
    assert!(matches!(e, CrdError::InvalidValue { field, .. } if field == FIELD_PARAMS));
    assert!(e.to_string().contains("cost | performance | mixed"), "{e}");

    for bad in ["", "Echo", "-echo", "echo-", "a.b", &"x".repeat(64)] {
        let spec = ServiceLoadBalancingPolicySpec {
            service_import_name: bad.to_string(),
            ..Default::default()
        };
        let e = ServiceOverrideSpec::try_from(&spec).expect_err(bad);
        assert!(e.to_string().starts_with(FIELD_SERVICE_IMPORT), "{e}");
    }
    let ok = ServiceOverrideSpec::try_from(&ServiceLoadBalancingPolicySpec {
        service_import_name: "echo-2".into(),
        service_discovery_load_balancing: None,
        optimized_load_balancing_params: Some("performance".into()),
    })
    .expect("valid");
    assert_eq!(ok.choice.params, Some(Params::Performance));
    assert_eq!(ok.choice.policy, None);
}

fn cluster_obj(name: &str, policy: Option<&str>, params: Option<&str>) -> LoadBalancingPolicy {
    let mut o = LoadBalancingPolicy::new(
        name,
        LoadBalancingPolicySpec {
            service_discovery_load_balancing: policy.map(str::to_string),
            optimized_load_balancing_params: params.map(str::to_string),
            egress_prices: Vec::new(),
        },
    );
    o.metadata = ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    };
    o
}

fn service_obj(
    ns: &str,
    name: &str,
    import: &str,
    policy: Option<&str>,
    params: Option<&str>,
) -> ServiceLoadBalancingPolicy {
    let mut o = ServiceLoadBalancingPolicy::new(
        name,
        ServiceLoadBalancingPolicySpec {
            service_import_name: import.into(),
            service_discovery_load_balancing: policy.map(str::to_string),
            optimized_load_balancing_params: params.map(str::to_string),
        },
    );
    o.metadata.namespace = Some(ns.into());
    o
}

#[test]
fn crd_settings_partial_cluster_policy_keeps_broker_default_for_the_rest() {
    let s = PolicySettings::from_objects(
        &[cluster_obj("default", None, Some("cost"))],
        &[],
        FALLBACK,
        None,
    );
    assert!(s.from_crd);
    assert_eq!(s.cluster.policy, Policy::Optimized);
    assert_eq!(s.cluster.params, Params::Cost);
}

#[test]
fn crd_settings_conflicting_overrides_first_name_wins() {
    let s = PolicySettings::from_objects(
        &[],
        &[
            service_obj("demo", "b-second", "echo", Some("optimized"), None),
            service_obj("demo", "a-first", "echo", Some("round-robin"), None),
            // Same ServiceImport name in another namespace is another service.
            service_obj("other", "x", "echo", Some("weighted-round-robin"), None),
        ],
        FALLBACK,
        None,
    );
    assert_eq!(s.services["demo/echo"].source, "demo/a-first");
    assert_eq!(s.for_service("demo/echo").0, Policy::RoundRobin);
    assert_eq!(s.for_service("other/echo").0, Policy::WeightedRoundRobin);
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(
        s.rejected[0].object,
        "ServiceLoadBalancingPolicy/demo/b-second"
    );
    assert!(s.rejected[0].error.contains(FIELD_SERVICE_IMPORT));
}

#[test]
fn crd_settings_invalid_edit_keeps_last_accepted_values() {
    let good = PolicySettings::from_objects(
        &[cluster_obj("default", Some("round-robin"), Some("cost"))],
        &[service_obj(
            "demo",
            "echo",
            "echo",
            None,
            Some("performance"),
        )],
        FALLBACK,
        None,
    );
    let bad = PolicySettings::from_objects(
        &[cluster_obj("default", Some("random"), Some("cost"))],
        &[service_obj("demo", "echo", "echo", None, Some("fast"))],
        FALLBACK,
        Some(&good),
    );
    assert_eq!(bad.cluster, good.cluster);
    assert_eq!(bad.services, good.services);
    assert_eq!(bad.rejected.len(), 2);
    // Without a previous accepted value, the broker's defaults apply.
    let fresh = PolicySettings::from_objects(
        &[cluster_obj("default", Some("random"), None)],
        &[],
        FALLBACK,
        None,
    );
    assert_eq!(fresh.cluster, FALLBACK);
    assert!(!fresh.from_crd);
}

#[test]
fn crd_egress_prices_are_checked_whole_and_a_bad_row_keeps_the_last_accepted_object() {
    use ballast_k8s_api::policy::EgressPriceRow;
    let row = |from: &str, usd_per_gb: f64| EgressPriceRow {
        provider: "aws".into(),
        from: from.into(),
        to: "*".into(),
        usd_per_gb,
        note: Some("contract".into()),
    };
    let with_prices = |policy: &str, rows: Vec<EgressPriceRow>| {
        let mut o = cluster_obj("default", Some(policy), None);
        o.spec.egress_prices = rows;
        o
    };
    let good = PolicySettings::from_objects(
        &[with_prices("round-robin", vec![row("sa-east-1", 0.018)])],
        &[],
        FALLBACK,
        None,
    );
    assert!(good.rejected.is_empty(), "{:?}", good.rejected);
    assert_eq!(good.egress_prices, vec![row("sa-east-1", 0.018)]);
    for (rows, named) in [
        (
            vec![row("sa-east-1", 0.018), row("us-east-1", -0.5)],
            "spec.egressPrices[1].usdPerGb",
        ),
        (vec![row("us-moon-1", 0.01)], "spec.egressPrices[0].from"),
        (
            vec![row("us-east-1", 0.01), row("us-east-1", 0.02)],
            "spec.egressPrices[1].from",
        ),
    ] {
        // the policy of the same object changes too: nothing of it is applied
        let bad = PolicySettings::from_objects(
            &[with_prices("optimized", rows)],
            &[],
            FALLBACK,
            Some(&good),
        );
        assert_eq!(bad.rejected.len(), 1, "{named}");
        assert!(
            bad.rejected[0].error.starts_with(named),
            "{}",
            bad.rejected[0].error
        );
        assert_eq!(bad.cluster, good.cluster, "{named}");
        assert_eq!(bad.egress_prices, good.egress_prices, "{named}");
    }
}

#[test]
fn crd_settings_apply_to_problem_sets_overrides_per_service() {
    let s = PolicySettings::from_objects(
        &[cluster_obj(
            "default",
            Some("weighted-round-robin"),
            Some("cost"),
        )],
        &[service_obj(
            "demo",
            "echo",
            "echo",
            Some("round-robin"),
            None,
        )],
        FALLBACK,
        None,
    );
    let svc = |name: &str| ServiceInput {
        name: name.into(),
        demand_rps: Default::default(),
        capacity_rps: Default::default(),
        policy: Some(Policy::Optimized),
        params: Some(Params::Mixed),
        service_time: Default::default(),
    };
    let mut problem = Problem {
        policy: Policy::Optimized,
        params: Params::Mixed,
        clusters: vec![],
        rtt_ms: Default::default(),
        prices: PriceTable {
            same_zone: 0.0,
            cross_zone: 0.01,
            cross_region: 0.02,
            internet: 0.09,
        },
        pair_prices: Default::default(),
        cost: None,
        services: vec![svc("demo/echo"), svc("demo/web")],
    };
    s.apply_to(&mut problem);
    assert_eq!(problem.policy, Policy::WeightedRoundRobin);
    assert_eq!(problem.params, Params::Cost);
    assert_eq!(problem.services[0].policy, Some(Policy::RoundRobin));
    assert_eq!(problem.services[0].params, None);
    assert_eq!(problem.services[1].policy, None);
    assert_eq!(problem.services[1].params, None);
}

#[test]
fn crd_watch_env_parses_and_names_the_variable() {
    use ballast_broker::policy::{watch_enabled, WATCH_ENV};
    assert!(!watch_enabled(None).expect("unset"));
    assert!(!watch_enabled(Some("")).expect("empty"));
    assert!(watch_enabled(Some("true")).expect("true"));
    assert!(watch_enabled(Some("TRUE")).expect("TRUE"));
    assert!(watch_enabled(Some("1")).expect("1"));
    assert!(!watch_enabled(Some("false")).expect("false"));
    let e = watch_enabled(Some("yes please")).expect_err("not a boolean");
    assert!(e.to_string().starts_with(WATCH_ENV), "{e}");
    assert!(e.to_string().contains("yes please"), "{e}");
}
