//! The pure second half of a round: plans ([`Inputs`]) and what is published now ->
//! the next entries and whether they make a new generation ([`round`]). No I/O: the shell
//! ([`super::Engine::run_round`]) reads the snapshot, persists the outcome, publishes it to
//! the watchers and records the metrics.
//!
//! Per service:
//! - stale inputs: the previous weights of the sources the plan still has are kept, flagged
//!   `stale` with the reason (none published when there were none);
//! - no serving cluster: no weights;
//! - otherwise solved, damped against the previous weights ([`EngineConfig::max_step`]);
//!   a plan whose digest, previous weights and damping did not change reuses the last
//!   solutions ([`RoundMemory`]);
//! - a failed solve keeps the previous weights, flagged `degraded` with the error;
//! - publication hysteresis ([`EngineConfig::publish_threshold`], `--publish-threshold`): a
//!   service whose new entries are of the same class as the published ones (status, policy,
//!   params, destinations, which destinations get traffic, the same sources) and whose
//!   weights all moved by at most the threshold keeps its published entries
//!   ([`super::published::hold`]); a real move or any class change re-publishes the whole
//!   service.
//!
//! A pair whose entry did not change keeps its published entry (and computation time); a new
//! generation is made only when some pair changed, and then only the changed pairs are
//! written (plus tombstones for removed pairs).

use std::collections::BTreeMap;

use ballast_model::{Matrix, ServiceSolution, SolveOptions};
use ballast_store::WeightRecord;
use ballast_types::WeightsStatus;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::plan::{Inputs, ServicePlan};
use super::published::{hold, same_entries, Entry, PairKey, Published};
use super::EngineConfig;

/// What one round remembers for the next: the digest of all its inputs (an identical round
/// is skipped) and each service's solutions by the digest of what produced them.
#[derive(Debug, Clone, Default)]
pub struct RoundMemory {
    pub last_digest: String,
    /// Service -> (digest of its plan, previous weights and damping, its solutions).
    pub solved: BTreeMap<String, (String, Vec<ServiceSolution>)>,
}

/// The overall result of a round, as recorded in the solver run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Optimal,
    Degraded,
    Error,
}

impl RunStatus {
    /// The store's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Optimal => "optimal",
            Self::Degraded => "degraded",
            Self::Error => "error",
        }
    }
}

/// What a round decided.
#[derive(Debug, Clone)]
pub enum RoundOutcome {
    /// The inputs (and the generation they were planned against) are those of the last
    /// round: nothing to do.
    Unchanged,
    /// A round was computed.
    Computed(Box<Computed>),
}

/// A computed round.
#[derive(Debug, Clone)]
pub struct Computed {
    /// Digest of the round's inputs.
    pub digest: String,
    /// Every (service, source) entry in force after the round.
    pub entries: BTreeMap<PairKey, Entry>,
    /// The generation in force after the round: the current one + 1 when some pair changed.
    pub generation: u64,
    /// Whether some pair changed (a new generation is to be published).
    pub changed: bool,
    /// Rows of the pairs that changed (only written when `changed`).
    pub rows: Vec<WeightRecord>,
    /// Pairs that no longer have weights (tombstones).
    pub removed: Vec<PairKey>,
    pub status: RunStatus,
    pub objective: f64,
    /// Errors, then degradation reasons, `; `-joined.
    pub detail: String,
    pub services: usize,
    pub stale_services: usize,
    /// Services whose new weights were within the publish threshold of the published ones
    /// and were not re-published (hysteresis).
    pub held_services: usize,
    /// The memory for the next round.
    pub memory: RoundMemory,
}

fn digest_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// The previous entries of `svc` whose source the plan still has (a cluster that stopped
/// importing the service loses them).
fn previous<'a>(
    current: &'a Published,
    svc: &str,
    plan: &ServicePlan,
) -> Vec<(&'a PairKey, &'a Entry)> {
    current
        .entries
        .range((svc.to_owned(), String::new())..)
        .take_while(|((s, _), _)| s == svc)
        .filter(|((_, src), _)| plan.has_source(src))
        .collect()
}

/// Accumulates one round's entries and findings.
#[derive(Default)]
struct Tally {
    entries: BTreeMap<PairKey, Entry>,
    objective: f64,
    errors: Vec<String>,
    degraded: Vec<String>,
    stale_services: usize,
    solved: BTreeMap<String, (String, Vec<ServiceSolution>)>,
}

impl Tally {
    fn keep(&mut self, prev: &[(&PairKey, &Entry)], status: WeightsStatus, reason: &str) {
        for (k, e) in prev {
            let mut e = (*e).clone();
            e.status = status;
            reason.clone_into(&mut e.reason);
            self.entries.insert((*k).clone(), e);
        }
    }

    fn add(&mut self, plan: &ServicePlan, solutions: Vec<ServiceSolution>, now_ms: i64) {
        let (policy, params) = (plan.problem.policy, plan.problem.params);
        for sol in solutions {
            self.objective += sol.objective;
            let status = WeightsStatus::from(sol.status);
            let reason = sol.reason.clone().unwrap_or_default();
            if status == WeightsStatus::Degraded {
                self.degraded.push(format!("{}: {reason}", sol.name));
            }
            for (src, weights) in sol.weights {
                if weights.is_empty() {
                    continue;
                }
                self.entries.insert(
                    (sol.name.clone(), src),
                    Entry {
                        weights,
                        status,
                        reason: reason.clone(),
                        policy,
                        params,
                        computed_at_ms: now_ms,
                    },
                );
            }
        }
    }
}

/// One round over `inputs` against what is published (`current`), as of `now_ms`.
#[must_use]
pub fn round(
    inputs: &Inputs,
    current: &Published,
    memory: &RoundMemory,
    cfg: &EngineConfig,
    now_ms: i64,
) -> RoundOutcome {
    // One digest per service plan (reused to skip solving unchanged services), and the
    // round's over all of them.
    let plan_digests: BTreeMap<&String, String> = inputs
        .services
        .iter()
        .map(|(svc, plan)| {
            let json = serde_json::to_vec(plan).unwrap_or_default();
            (svc, digest_of(&[svc.as_bytes(), &json]))
        })
        .collect();
    let digest = {
        let mut parts: Vec<&[u8]> = plan_digests.values().map(String::as_bytes).collect();
        let tail = format!("{:?}|{}", cfg.max_step, current.generation);
        parts.push(tail.as_bytes());
        digest_of(&parts)
    };
    if digest == memory.last_digest {
        debug!("inputs unchanged, round skipped");
        return RoundOutcome::Unchanged;
    }

    let mut t = Tally::default();
    for (svc, plan) in &inputs.services {
        let prev = previous(current, svc, plan);
        if !plan.stale.is_empty() {
            t.stale_services += 1;
            let reason = plan.stale.join("; ");
            if prev.is_empty() {
                warn!(service = %svc, %reason, "stale inputs and no previous weights: none published");
            }
            t.keep(&prev, WeightsStatus::Stale, &reason);
            continue;
        }
        if plan
            .problem
            .services
            .iter()
            .all(|s| s.capacity_rps.is_empty())
        {
            debug!(service = %svc, "no serving cluster: no weights");
            continue;
        }
        let mut opts = SolveOptions {
            max_step: cfg.max_step,
            previous: BTreeMap::new(),
        };
        if !prev.is_empty() {
            let m: Matrix = prev
                .iter()
                .map(|((_, src), e)| (src.clone(), e.weights.clone()))
                .collect();
            opts.previous.insert(svc.clone(), m);
        }
        // Same plan, same previous weights, same damping: the same solutions.
        let key = digest_of(&[
            plan_digests.get(svc).map_or("", String::as_str).as_bytes(),
            format!("{:?}", opts.max_step).as_bytes(),
            &serde_json::to_vec(&opts.previous).unwrap_or_default(),
        ]);
        let result = match memory.solved.get(svc) {
            Some((k, sols)) if *k == key => Ok(sols.clone()),
            _ => ballast_model::solve(&plan.problem, &opts),
        };
        match result {
            Ok(solutions) => {
                t.solved.insert(svc.clone(), (key, solutions.clone()));
                t.add(plan, solutions, now_ms);
            }
            Err(e) => {
                warn!(service = %svc, error = %e, "solve failed; previous weights kept");
                t.errors.push(format!("{svc}: {e}"));
                let reason = format!("solve failed ({e}); previous weights kept");
                t.keep(&prev, WeightsStatus::Degraded, &reason);
            }
        }
    }

    let held_services = apply_hysteresis(current, &mut t.entries, cfg.publish_threshold);

    // A pair whose weights did not change keeps its entry as published before (with its
    // computation time), so the entries in memory are what the store holds and reloads.
    for (k, e) in &mut t.entries {
        if let Some(old) = current.entries.get(k) {
            if old.same_as(e) {
                e.clone_from(old);
            }
        }
    }
    let changed = !same_entries(&current.entries, &t.entries);
    let rows = if changed {
        changed_rows(current, &t.entries)
    } else {
        Vec::new()
    };
    let removed = if changed {
        current
            .entries
            .keys()
            .filter(|k| !t.entries.contains_key(*k))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let status = if !t.errors.is_empty() {
        RunStatus::Error
    } else if !t.degraded.is_empty() || t.stale_services > 0 {
        RunStatus::Degraded
    } else {
        RunStatus::Optimal
    };
    RoundOutcome::Computed(Box::new(Computed {
        digest: digest.clone(),
        generation: current.generation + u64::from(changed),
        changed,
        rows,
        removed,
        status,
        objective: t.objective,
        detail: t
            .errors
            .iter()
            .chain(t.degraded.iter())
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
        services: inputs.services.len(),
        stale_services: t.stale_services,
        held_services,
        entries: t.entries,
        memory: RoundMemory {
            last_digest: digest,
            solved: t.solved,
        },
    }))
}

/// The entries of `svc` in `entries`.
fn of_service<'a>(
    entries: &'a BTreeMap<PairKey, Entry>,
    svc: &str,
) -> Vec<(&'a PairKey, &'a Entry)> {
    entries
        .range((svc.to_owned(), String::new())..)
        .take_while(|((s, _), _)| s == svc)
        .collect()
}

/// Publication hysteresis: every service of `entries` whose new entries [`hold`] against the
/// published ones gets its published entries back (weights, reason and computation time), so
/// nothing of it is re-published. Returns how many services had a change held back.
fn apply_hysteresis(
    current: &Published,
    entries: &mut BTreeMap<PairKey, Entry>,
    threshold: f64,
) -> usize {
    if threshold <= 0.0 {
        return 0;
    }
    let services: Vec<String> = {
        let mut v: Vec<String> = entries.keys().map(|(svc, _)| svc.clone()).collect();
        v.dedup();
        v
    };
    let mut held = 0;
    for svc in services {
        let published = of_service(&current.entries, &svc);
        let new = of_service(entries, &svc);
        if !hold(&published, &new, threshold) {
            continue;
        }
        // Counted only when something was actually held back.
        if new
            .iter()
            .zip(&published)
            .any(|((_, a), (_, b))| !a.same_as(b))
        {
            held += 1;
        }
        let keep: Vec<(PairKey, Entry)> = published
            .into_iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        entries.extend(keep);
    }
    if held > 0 {
        debug!(
            held,
            threshold, "services within the publish threshold keep their published weights"
        );
    }
    held
}

/// The rows of every pair of `entries` that is new or changed against `current`.
fn changed_rows(current: &Published, entries: &BTreeMap<PairKey, Entry>) -> Vec<WeightRecord> {
    entries
        .iter()
        .filter(|(k, e)| current.entries.get(*k).is_none_or(|old| !old.same_as(e)))
        .flat_map(|((svc, src), e)| {
            e.weights.iter().map(move |(dst, w)| WeightRecord {
                service: svc.clone(),
                src: src.clone(),
                dst: dst.clone(),
                weight: *w,
                status: e.status.to_string(),
                reason: e.reason.clone(),
                policy: e.policy.to_string(),
                params: e.params.to_string(),
                computed_at_ms: e.computed_at_ms,
            })
        })
        .collect()
}
