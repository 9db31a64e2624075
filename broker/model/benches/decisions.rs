//! Decision-quality report (issue 13, part 5): every policy on scenarios built from
//! `broker/data/` (real RTTs and per-region egress prices), scored by one evaluator
//! (`decision_report/scenarios.rs` documents the scenarios and the evaluator).
//!
//! `cargo bench -p ballast-model --bench decisions` prints the table of `broker/BENCHMARKS.md`.
//! The scenarios are drawn from fixed seeds and the solvers are deterministic, so the table is
//! the same on every run and machine.

#[path = "decision_report/scenarios.rs"]
mod scenarios;

use scenarios::{report, scenarios, Choice, World};

fn main() {
    let world = World::load();
    for sc in scenarios() {
        let services: Vec<String> = sc
            .services
            .iter()
            .map(|s| format!("{} ({} hosts)", s.name, s.capacity.len()))
            .collect();
        println!(
            "\n### {}, {:.0} % utilisation, params {:?}\n\n{} clusters; front-ends {}; chain {}\n",
            sc.name,
            sc.target_utilisation * 100.0,
            sc.params,
            sc.clusters.len(),
            sc.frontend_rps
                .iter()
                .map(|(c, r)| format!("{c} {r:.0} rps"))
                .collect::<Vec<_>>()
                .join(", "),
            services.join(" -> "),
        );
        let rows = match report(&world, &sc) {
            Ok(rows) => rows,
            Err(e) => {
                eprintln!("{}: {e}", sc.name);
                std::process::exit(1);
            }
        };
        println!("| policy | mean response (ms) | egress USD/h | peak utilisation |");
        println!("|---|---:|---:|---:|");
        for (choice, o) in &rows {
            println!(
                "| {} | {:.1} | {:.2} | {:.0} %{}{} |",
                choice.label(),
                o.mean_response_ms,
                o.usd_per_hour,
                o.peak_utilisation * 100.0,
                if o.peak_utilisation > 1.0 + 1e-9 {
                    " overloaded"
                } else {
                    ""
                },
                if o.degraded > 0 { " (degraded)" } else { "" },
            );
        }
        let get = |c: Choice| rows.iter().find(|(k, _)| *k == c).map(|(_, o)| *o);
        if let (Some(rr), Some(lin), Some(la), Some(tiers)) = (
            get(Choice::RoundRobin),
            get(Choice::Linear),
            get(Choice::LoadAware),
            get(Choice::LinearTiers),
        ) {
            println!(
                "\nload-aware vs linear: {:+.1} % response time; vs round-robin: {:+.1} % \
                 response time, {:+.1} % USD; linear with tiers vs table: {:+.1} % USD",
                (la.mean_response_ms / lin.mean_response_ms - 1.0) * 100.0,
                (la.mean_response_ms / rr.mean_response_ms - 1.0) * 100.0,
                (la.usd_per_hour / rr.usd_per_hour - 1.0) * 100.0,
                (tiers.usd_per_hour / lin.usd_per_hour - 1.0) * 100.0,
            );
        }
    }
}
