//! What the decision-quality report (`cargo bench -p ballast-model --bench decisions`, table in
//! `broker/BENCHMARKS.md`) claims, asserted on the same scenarios and the same evaluator.

#[path = "../benches/decision_report/scenarios.rs"]
mod scenarios;

use ballast_model::Params;
use scenarios::{report, scenarios, Choice, Outcome, World};

fn outcome(rows: &[(Choice, Outcome)], c: Choice) -> Outcome {
    rows.iter()
        .find(|(k, _)| *k == c)
        .map(|(_, o)| *o)
        .expect("every choice is reported")
}

#[test]
fn the_report_holds_on_every_scenario() {
    let world = World::load();
    let mut aws_strictly_cheaper = 0;
    for sc in scenarios() {
        let rows = report(&world, &sc).expect("every policy solves");
        let name = format!(
            "{} at {:.0} % ({:?})",
            sc.name,
            sc.target_utilisation * 100.0,
            sc.params
        );
        let rr = outcome(&rows, Choice::RoundRobin);
        let linear = outcome(&rows, Choice::Linear);
        let tiers = outcome(&rows, Choice::LinearTiers);
        let aware = outcome(&rows, Choice::LoadAware);
        for (c, o) in &rows {
            assert!(
                o.mean_response_ms.is_finite() && o.usd_per_hour.is_finite(),
                "{name}: {c:?}"
            );
        }
        for o in [linear, tiers, aware] {
            assert!(
                o.peak_utilisation <= 1.0 + 1e-6,
                "{name}: an optimized answer overloads: {o:?}"
            );
            assert_eq!(o.degraded, 0, "{name}");
        }
        // Round-robin ignores capacity: the scenarios are uneven enough that it overloads
        // somewhere above 50 % utilisation (which is why its response time is flattered).
        if sc.target_utilisation > 0.5 {
            assert!(rr.peak_utilisation > 1.0, "{name}: {rr:?}");
        }
        assert!(
            aware.mean_response_ms < rr.mean_response_ms,
            "{name}: {aware:?} vs {rr:?}"
        );
        assert!(
            aware.usd_per_hour < rr.usd_per_hour,
            "{name}: {aware:?} vs {rr:?}"
        );
        if sc.params == Params::Cost {
            // `cost` stays linear in dollars: the curves change nothing.
            assert!(
                (aware.mean_response_ms - linear.mean_response_ms).abs() < 1e-9,
                "{name}"
            );
        } else if sc.target_utilisation > 0.5 {
            assert!(
                aware.mean_response_ms < linear.mean_response_ms * 0.99,
                "{name}: load-aware {aware:?} vs linear {linear:?}"
            );
        }
        if sc.aws_only {
            assert!(
                linear.usd_per_hour <= tiers.usd_per_hour * (1.0 + 1e-6),
                "{name}: the price table cost more than the tiers: {linear:?} vs {tiers:?}"
            );
            if linear.usd_per_hour * 1.05 < tiers.usd_per_hour {
                aws_strictly_cheaper += 1;
            }
        }
    }
    assert!(
        aws_strictly_cheaper >= 1,
        "no AWS scenario where the table saved >= 5 %"
    );
}
