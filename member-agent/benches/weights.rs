//! Cost of turning broker cluster weights into per-backend integer weights (what the agent
//! does on every WeightsUpdate, discovery change and health change).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::net::SocketAddr;

use ballast_agent::catalog::Endpoint;
use ballast_agent::weights::expand;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn setup(clusters: usize, per_cluster: usize) -> (BTreeMap<String, f64>, Vec<Endpoint>) {
    let mut weights = BTreeMap::new();
    let mut eps = Vec::new();
    for c in 0..clusters {
        let id = format!("c{c}");
        weights.insert(id.clone(), (c + 1) as f64);
        for i in 0..per_cluster {
            let n = u32::try_from(c * per_cluster + i).unwrap();
            eps.push(Endpoint {
                address: SocketAddr::from((n.to_be_bytes(), 8080)),
                cluster: id.clone(),
                ready: i % 10 != 9,
                port_name: None,
            });
        }
    }
    (weights, eps)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("expand");
    for (clusters, per) in [(3, 10), (10, 100), (50, 20)] {
        let (w, eps) = setup(clusters, per);
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let unhealthy: BTreeSet<String> = ["c1".to_owned()].into();
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{clusters}x{per}")),
            &refs,
            |b, refs| b.iter(|| expand(black_box(&w), black_box(refs), &unhealthy, 4096).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
