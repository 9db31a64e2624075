//! Kubernetes API types of ballast, in one place for the broker and the agent: the policy
//! CRDs ([`policy`], which the broker watches and `crdgen` prints) and the Multi-Cluster
//! Services objects ([`mcs`], which the agent's discovery reads). Types only: no client, no
//! watcher.

pub mod mcs;
pub mod policy;
