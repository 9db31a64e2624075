//! Input validation: every bad value is reported with the path of the field that holds it.

use std::collections::HashSet;

use super::{Matrix, ModelError, Problem};

/// Checks a problem before anything is solved: nothing is half-applied.
///
/// Rejected: empty or duplicate cluster ids, empty region / zone / provider, an RTT, price,
/// cost, demand or capacity that is negative, NaN or infinite, a reference to a cluster that is
/// not in `clusters` (in `rtt_ms`, `cost`, `demand_rps`, `capacity_rps`), empty or duplicate
/// service names.
///
/// # Errors
/// [`ModelError::Invalid`] naming the first bad field, e.g.
/// `services[0].demand_rps.c9: unknown cluster "c9"`.
pub fn validate(problem: &Problem) -> Result<(), ModelError> {
    let mut ids: HashSet<&str> = HashSet::with_capacity(problem.clusters.len());
    for (i, c) in problem.clusters.iter().enumerate() {
        for (field, value) in [
            ("id", &c.id),
            ("region", &c.region),
            ("zone", &c.zone),
            ("provider", &c.provider),
        ] {
            if value.trim().is_empty() {
                return Err(ModelError::invalid(
                    format!("clusters[{i}].{field}"),
                    "must not be empty",
                ));
            }
        }
        if !ids.insert(c.id.as_str()) {
            return Err(ModelError::invalid(
                format!("clusters[{i}].id"),
                format!("duplicate cluster id {:?}", c.id),
            ));
        }
    }
    let p = &problem.prices;
    for (field, value) in [
        ("same_zone", p.same_zone),
        ("cross_zone", p.cross_zone),
        ("cross_region", p.cross_region),
        ("internet", p.internet),
    ] {
        check_value(|| format!("prices.{field}"), value)?;
    }
    check_matrix("rtt_ms", &problem.rtt_ms, &ids)?;
    check_matrix("pair_prices", &problem.pair_prices, &ids)?;
    if let Some(cost) = &problem.cost {
        check_matrix("cost", cost, &ids)?;
    }
    let mut names: HashSet<&str> = HashSet::with_capacity(problem.services.len());
    for (i, svc) in problem.services.iter().enumerate() {
        if svc.name.trim().is_empty() {
            return Err(ModelError::invalid(
                format!("services[{i}].name"),
                "must not be empty",
            ));
        }
        if !names.insert(svc.name.as_str()) {
            return Err(ModelError::invalid(
                format!("services[{i}].name"),
                format!("duplicate service name {:?}", svc.name),
            ));
        }
        for (cluster, curve) in &svc.service_time {
            let path = || format!("services[{i}].service_time.{cluster}");
            check_cluster(path, cluster, &ids)?;
            curve
                .check(&path())
                .map_err(|(field, why)| ModelError::invalid(field, why))?;
        }
        for (field, map) in [
            ("demand_rps", &svc.demand_rps),
            ("capacity_rps", &svc.capacity_rps),
        ] {
            for (cluster, value) in map {
                let path = || format!("services[{i}].{field}.{cluster}");
                check_cluster(path, cluster, &ids)?;
                check_value(path, *value)?;
            }
        }
    }
    Ok(())
}

fn check_matrix(name: &str, m: &Matrix, ids: &HashSet<&str>) -> Result<(), ModelError> {
    for (src, row) in m {
        check_cluster(|| format!("{name}.{src}"), src, ids)?;
        for (dst, value) in row {
            let path = || format!("{name}.{src}.{dst}");
            check_cluster(path, dst, ids)?;
            check_value(path, *value)?;
        }
    }
    Ok(())
}

// Paths are built only on error: a 1,000-cluster RTT matrix has a million entries.
fn check_cluster(
    path: impl Fn() -> String,
    id: &str,
    ids: &HashSet<&str>,
) -> Result<(), ModelError> {
    if ids.contains(id) {
        Ok(())
    } else {
        Err(ModelError::invalid(
            path(),
            format!("unknown cluster {id:?}"),
        ))
    }
}

fn check_value(path: impl Fn() -> String, value: f64) -> Result<(), ModelError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ModelError::invalid(
            path(),
            format!("must be a finite number >= 0, got {value}"),
        ))
    }
}
