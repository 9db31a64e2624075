//! Region prices in the solve: a multi-continent AWS fleet (real RTTs from `broker/data/`)
//! solved once with the four tiers and once with the per-source-region price table; the
//! egress bill of each answer is computed with the real (table) prices.

use std::collections::BTreeMap;

use ballast_model::data::RegionData;
use ballast_model::egress_prices::EgressPrices;
use ballast_model::{
    explain, solve, Cluster, Matrix, Params, Policy, Problem, ServiceInput, SolveOptions, Status,
};

const REGIONS: [&str; 6] = [
    "us-east-1",
    "eu-west-1",
    "ap-southeast-1",
    "sa-east-1",
    "ap-northeast-2",
    "ap-southeast-2",
];

fn fleet(with_pair_prices: bool, params: Params) -> Problem {
    let data = RegionData::embedded().expect("embedded data");
    let table = EgressPrices::builtin().expect("builtin prices");
    let clusters: Vec<Cluster> = REGIONS
        .iter()
        .map(|r| Cluster {
            id: (*r).to_owned(),
            region: (*r).to_owned(),
            zone: format!("{r}a"),
            provider: "aws".into(),
        })
        .collect();
    let mut rtt_ms = Matrix::new();
    let mut pair_prices = Matrix::new();
    for a in REGIONS {
        for b in REGIONS {
            if a == b {
                continue;
            }
            rtt_ms
                .entry(a.to_owned())
                .or_default()
                .insert(b.to_owned(), data.rtt_ms(a, b).expect("measured pair"));
            if with_pair_prices {
                let p = table
                    .request_price(("aws", a), ("aws", b), REQUEST_SHARE)
                    .expect("covered pair");
                pair_prices
                    .entry(a.to_owned())
                    .or_default()
                    .insert(b.to_owned(), p);
            }
        }
    }
    // Every region sends; Singapore is a front-end without backends and capacity is tight
    // (1.05 x demand) and uneven, so much traffic crosses regions. Whose response bytes come
    // back (Seoul's and Sydney's at 0.08-0.098 USD/GB, Virginia's and Ireland's at 0.02) is
    // what the tiers cannot see.
    let demand: BTreeMap<String, f64> = REGIONS
        .iter()
        .zip([3000.0, 2500.0, 2000.0, 1500.0, 1200.0, 800.0])
        .map(|(r, d)| ((*r).to_owned(), d))
        .collect();
    let total: f64 = demand.values().sum();
    let capacity: BTreeMap<String, f64> = REGIONS
        .iter()
        .zip([0.35, 0.30, 0.0, 0.05, 0.20, 0.10])
        .map(|(r, share)| ((*r).to_owned(), share * total * 1.05))
        .collect();
    Problem {
        policy: Policy::Optimized,
        params,
        clusters,
        rtt_ms,
        prices: data.price_table("aws").expect("aws tiers"),
        pair_prices,
        cost: None,
        services: vec![ServiceInput {
            name: "shop/api".into(),
            demand_rps: demand,
            capacity_rps: capacity,
            policy: None,
            params: None,
            service_time: Default::default(),
        }],
    }
}

/// The requests' share of the bytes the scenario assumes (as the engine does until bytes
/// are measured): 1 kB request, 1 kB response.
const REQUEST_SHARE: f64 = 0.5;

/// USD per hour of the flows (1 kB request from source to destination, 1 kB response back),
/// each direction priced with the table's price for the direction it leaves.
fn bill(flows: &Matrix) -> f64 {
    let table = EgressPrices::builtin().expect("builtin prices");
    let kb = 1e-6;
    let price = |a: &str, b: &str| {
        table
            .price("aws", a, "aws", b)
            .map_or(0.0, |m| m.usd_per_gb)
    };
    flows
        .iter()
        .flat_map(|(s, row)| row.iter().map(move |(t, rps)| (s, t, rps)))
        .map(|(s, t, rps)| rps * 3600.0 * (kb * price(s, t) + kb * price(t, s)))
        .sum()
}

#[test]
fn per_source_region_prices_give_a_cheaper_split_than_tiers_on_a_multi_continent_aws_fleet() {
    let real = fleet(true, Params::Cost);
    let tiers = fleet(false, Params::Cost);
    let with_table = &solve(&real, &SolveOptions::default()).expect("solves")[0];
    let with_tiers = &solve(&tiers, &SolveOptions::default()).expect("solves")[0];
    assert_eq!(with_table.status, Status::Optimal);
    assert_eq!(with_tiers.status, Status::Optimal);
    let (a, b) = (bill(&with_table.flows), bill(&with_tiers.flows));
    println!(
        "egress bill at 1 kB/request: table {a:.4} USD/h, tiers {b:.4} USD/h ({:+.1} %)",
        (b / a - 1.0) * 100.0
    );
    // The tier model thinks leaving São Paulo or Singapore costs what leaving Virginia does.
    assert!(
        b > a * 1.05,
        "tiers {b} vs table {a}: expected the tier split >= 5 % dearer"
    );
}

#[test]
fn explain_quotes_the_price_the_cost_used() {
    let real = fleet(true, Params::Mixed);
    let e = explain(&real, "shop/api", "sa-east-1").expect("explains");
    let to_us = e
        .destinations
        .iter()
        .find(|d| d.destination == "us-east-1")
        .expect("us-east-1 serves");
    // Request bytes leave São Paulo (0.138), response bytes leave Virginia (0.02).
    assert!(
        (to_us.usd_per_gb - 0.079).abs() < 1e-12,
        "{}",
        to_us.usd_per_gb
    );
    let e = explain(&real, "shop/api", "us-east-1").expect("explains");
    let to_sa = e
        .destinations
        .iter()
        .find(|d| d.destination == "sa-east-1")
        .expect("sa-east-1 serves");
    assert!(
        (to_sa.usd_per_gb - 0.079).abs() < 1e-12,
        "{}",
        to_sa.usd_per_gb
    );
    let to_eu = e
        .destinations
        .iter()
        .find(|d| d.destination == "eu-west-1")
        .expect("eu-west-1 serves");
    assert!(
        (to_eu.usd_per_gb - 0.02).abs() < 1e-12,
        "{}",
        to_eu.usd_per_gb
    );
    // Without the table: the tier.
    let tiers = fleet(false, Params::Mixed);
    let e = explain(&tiers, "shop/api", "sa-east-1").expect("explains");
    assert!(e
        .destinations
        .iter()
        .all(|d| d.destination == "sa-east-1" || (d.usd_per_gb - 0.02).abs() < 1e-12));
}

#[test]
fn a_pair_price_for_an_unknown_cluster_is_refused_by_name() {
    let mut p = fleet(true, Params::Mixed);
    p.pair_prices
        .entry("us-east-1".into())
        .or_default()
        .insert("c9".into(), 0.01);
    let e = solve(&p, &SolveOptions::default())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("pair_prices"), "{e}");
    let mut p = fleet(true, Params::Mixed);
    p.pair_prices
        .entry("us-east-1".into())
        .or_default()
        .insert("eu-west-1".into(), -0.01);
    let e = solve(&p, &SolveOptions::default())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("pair_prices.us-east-1.eu-west-1"), "{e}");
}
