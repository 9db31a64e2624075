//! The gRPC layer: `ballast.v1.Broker` (agents, [`broker`]) and `ballast.v1.Admin`
//! (operators, [`admin`]). It only converts protobuf <-> engine types, checks identity once
//! per call ([`identity`]: interceptors), and validates every message ([`validate`]: a status
//! naming the field; nothing of an invalid message is stored). What a watcher is sent is
//! [`watch`]. An oversize message is answered RESOURCE_EXHAUSTED ([`oversize`]).

pub mod admin;
pub mod broker;
pub mod identity;
pub mod oversize;
pub mod validate;
pub mod watch;

pub use admin::AdminService;
pub use broker::{AgentSettings, BrokerService};
pub use identity::Authenticate;
pub use validate::{check_cluster_id, validate_report, MAX_IMPORTS, UNKNOWN_CLUSTER_METADATA};
pub use watch::WatchState;
