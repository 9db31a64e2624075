//! ballast member agent: discovery, RTT measurement, capacity, weight expansion, data-plane
//! install, the steering loop, broker session, metrics, configuration. The binary
//! (`ballast-agent`, `main.rs`) only wires them together.
//!
//! - [`catalog`]: the plain model every discovery source produces
//! - [`discovery`]: the `Discovery` trait, the topology file and the Kubernetes (MCS) sources
//! - [`peers`]: which clusters to probe (the broker's peer set, the configuration overrides)
//! - [`probe`]: RTT to peer gateways (ICMP with surge-ping, TCP-connect fallback)
//! - [`capacity`]: per-pod capacity × ready local endpoints
//! - [`weights`]: broker cluster weights → per-backend integer weights (pure)
//! - [`install`]: catalog + weights + health → `ballast-bpf` service specs; RPS from counters
//! - [`steering`]: the steering state machine (updates, refusals, retries, acks, reports)
//!   over a [`steering::DataPlane`]
//! - [`session`]: Register / Report / WatchWeights / AckWeights over mTLS, with reconnects
//! - [`brokers`]: the `--broker` addresses, names resolved to one replica per address, and
//!   the order replicas are tried in
//! - [`config`]: CLI flags with their environment variables, and the clusters file
//! - [`metrics`]: the Prometheus registry (served by `ballast-runtime`'s admin server)
//! - [`prereq`]: prerequisites (MCS CRDs, kernel, cgroup v2, BTF, bpffs), each named when missing
//! - [`lifecycle`]: on exit, whether to detach (`--detach-on-exit auto`: the DaemonSet gone)

pub mod brokers;
pub mod capacity;
pub mod catalog;
pub mod config;
pub mod discovery;
pub mod install;
pub mod lifecycle;
pub mod metrics;
pub mod peers;
pub mod prereq;
pub mod probe;
pub mod service_probe;
pub mod session;
pub mod steering;
pub mod weights;
