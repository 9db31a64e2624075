use std::{net::IpAddr, path::PathBuf};

/// Everything the data plane API can reject or fail at. Variants name the bad field or value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("service {service}: weight sum is zero (at least one backend needs a weight > 0)")]
    WeightSumZero { service: String },
    #[error("service {service}: {count} backends, more than the table allows ({max})")]
    TooManyBackends {
        service: String,
        count: usize,
        max: usize,
    },
    #[error("service {service}: no backends")]
    NoBackends { service: String },
    #[error("service {service}: VIP {vip}:{port}/{protocol} is already used by service {other}")]
    VipInUse {
        service: String,
        vip: IpAddr,
        port: u16,
        protocol: &'static str,
        other: String,
    },
    #[error("cgroup path {0} is missing (not a directory on a cgroup v2 mount)")]
    CgroupMissing(PathBuf),
    #[error("pin dir {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error("service name {0:?} is invalid: must be 1..=127 bytes without NUL")]
    InvalidName(String),
    #[error("cluster name {0:?} is invalid: must be 1..=63 bytes without NUL")]
    InvalidCluster(String),
    #[error("cluster names {a:?} and {b:?} hash to the same cluster id {id}")]
    ClusterIdCollision { a: String, b: String, id: u32 },
    #[error("service {service}: backend {backend}: address family differs from the VIP's")]
    FamilyMismatch { service: String, backend: String },
    #[error("service {service}: backend {backend}: port 0")]
    BackendPortZero { service: String, backend: String },
    #[error("service {service}: VIP port 0")]
    VipPortZero { service: String },
    #[error("service {service}: canary percent {percent} is outside 0..=100")]
    CanaryPercent { service: String, percent: f64 },
    #[error("service {service}: canary target {target} is unknown")]
    CanaryTargetUnknown { service: String, target: String },
    #[error("service {service}: canary target {target} must not be the service itself or have a canary of its own")]
    CanaryTargetInvalid { service: String, target: String },
    #[error("service {service} is the canary target of {by}; remove or change that canary first")]
    CanaryTargetInUse { service: String, by: String },
    #[error("service {0} is unknown")]
    UnknownService(String),
    #[error("service {service}: backend {backend} is unknown")]
    UnknownBackend { service: String, backend: String },
    #[error("no free service id (all {0} in use)")]
    NoFreeId(u32),
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("bpf map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("bpf program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
