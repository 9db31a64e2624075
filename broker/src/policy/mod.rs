//! The load-balancing policy from Kubernetes objects (the CRDs of
//! [`ballast_k8s_api::policy`]): [`settings`] resolves objects into what the broker applies
//! (pure), [`watch`] follows them in a cluster and reports each object's status, [`sync`]
//! writes the settings into a running broker's store.
//!
//! ```yaml
//! apiVersion: ballast.io/v1alpha1
//! kind: LoadBalancingPolicy
//! metadata: {name: default}
//! spec: {serviceDiscoveryLoadBalancing: optimized, optimizedLoadBalancingParams: mixed}
//! ---
//! apiVersion: ballast.io/v1alpha1
//! kind: ServiceLoadBalancingPolicy
//! metadata: {name: echo, namespace: demo}
//! spec: {serviceImportName: echo, serviceDiscoveryLoadBalancing: round-robin}
//! ```

pub mod settings;
pub mod sync;
pub mod watch;

pub use settings::{ClusterPolicy, PolicySettings, Rejected, ServiceOverride};
pub use watch::{
    run_policy_watcher, spawn_policy_watcher, spawn_policy_watcher_from_env, watch_enabled,
    WatchSetupError, WATCH_ENV,
};
