//! Waiting on the broker: until the agents installed a new generation, until a policy is in
//! force, until the weights stop moving. Each polls the Admin API every 250 ms.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_types::Policy;

use super::{broker_view, BrokerView, ControlPlane};
use crate::error::{LabError, Result};
use crate::lab::LabState;

/// Waits until the broker has published weights newer than `after` for every (service,
/// source) and every cluster's agent acknowledged that generation.
pub fn wait_installed(
    cp: &ControlPlane,
    state: &LabState,
    after: u64,
    timeout: Duration,
) -> Result<BrokerView> {
    wait_published(cp, state, timeout, after, |v| v.generation > after)
}

/// Waits until every (service, source) of the lab has weights computed with `policy`
/// and every agent installed the current generation (a switch to the policy in force
/// publishes nothing new, and that is fine).
pub fn wait_policy(
    cp: &ControlPlane,
    state: &LabState,
    policy: Policy,
    timeout: Duration,
) -> Result<BrokerView> {
    wait_published(cp, state, timeout, 0, |v| {
        state.services.iter().all(|s| {
            v.policy.get(&s.name).is_some_and(|by_src| {
                state
                    .clusters
                    .iter()
                    .all(|c| by_src.get(&c.id) == Some(&policy))
            })
        })
    })
}

fn wait_published(
    cp: &ControlPlane,
    state: &LabState,
    timeout: Duration,
    after: u64,
    ready: impl Fn(&BrokerView) -> bool,
) -> Result<BrokerView> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<BrokerView> = None;
    let mut last_err = None;
    loop {
        match broker_view(cp, &state.wan_netns) {
            Ok(v) => {
                let g = v.generation;
                let published = ready(&v)
                    && state.services.iter().all(|s| {
                        v.weights
                            .get(&s.name)
                            .is_some_and(|w| state.clusters.iter().all(|c| w.contains_key(&c.id)))
                    });
                let acked = state
                    .clusters
                    .iter()
                    .all(|c| v.acked.get(&c.id).is_some_and(|a| *a >= g));
                if published && acked {
                    return Ok(v);
                }
                last = Some(v);
            }
            Err(e) => last_err = Some(e.to_string()),
        }
        if Instant::now() >= deadline {
            let detail = match (&last, last_err) {
                (Some(v), _) => {
                    let missing: Vec<String> = state
                        .clusters
                        .iter()
                        .filter(|c| v.acked.get(&c.id).is_none_or(|a| *a < v.generation))
                        .map(|c| {
                            format!(
                                "{} (acked {})",
                                c.id,
                                v.acked
                                    .get(&c.id)
                                    .map_or("nothing".into(), |a| a.to_string())
                            )
                        })
                        .collect();
                    format!(
                        "broker generation {} (waiting for {}); not installed by: {}",
                        v.generation,
                        if ready(v) {
                            "the agents".to_string()
                        } else if after > 0 {
                            format!("weights newer than generation {after}")
                        } else {
                            "the broker's weights".to_string()
                        },
                        if missing.is_empty() {
                            "-".into()
                        } else {
                            missing.join(", ")
                        }
                    )
                }
                (None, Some(e)) => format!("broker not answering: {e}"),
                (None, None) => "no answer".into(),
            };
            return Err(LabError::Timeout(format!(
                "agents to install weights ({detail})"
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Follows the broker until its weights stop moving: returns once every agent installed
/// the current generation and no new one came for `stable_for`. `on_change` sees every
/// new generation (weights move in damped steps, so a change takes several).
pub fn settle(
    cp: &ControlPlane,
    state: &LabState,
    stable_for: Duration,
    timeout: Duration,
    mut on_change: impl FnMut(&BrokerView),
) -> Result<BrokerView> {
    let deadline = Instant::now() + timeout;
    let mut last_gen = None;
    let mut since = Instant::now();
    loop {
        let v = broker_view(cp, &state.wan_netns)?;
        if last_gen != Some(v.generation) {
            on_change(&v);
            last_gen = Some(v.generation);
            since = Instant::now();
        }
        let acked = state
            .clusters
            .iter()
            .all(|c| v.acked.get(&c.id).is_some_and(|a| *a >= v.generation));
        if acked && v.generation > 0 && since.elapsed() >= stable_for {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout(format!(
                "weights to settle (generation {}, installed {:?})",
                v.generation, v.acked
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One line of weights: `c2 60.0%  c3 40.0%`.
pub fn fmt_weights(w: &BTreeMap<String, f64>) -> String {
    w.iter()
        .map(|(c, x)| format!("{c} {:.1}%", 100.0 * x))
        .collect::<Vec<_>>()
        .join("  ")
}
