//! ballast's vocabulary, spelled once: [`Policy`], [`Params`], [`WeightsStatus`],
//! [`ClusterId`], [`ServiceName`] and [`ServiceTime`], with one validity rule each, their text spelling
//! (`FromStr` / `Display`, the same as serde's and the CLIs'), and [`now_ms`].
//!
//! Every other crate (model, store, broker, agent, data plane, lab) takes these types or
//! their rules from here: the proto enum conversions live in `ballast-proto`, which depends
//! on this crate; clap's `ValueEnum` is behind the `clap` feature. No I/O, no async.

mod id;
mod policy;
mod service_time;

pub use id::{ClusterId, InvalidName, ServiceName, MAX_SERVICE_NAME_LEN};
pub use policy::{LoadUnit, Params, Policy, UnknownValue, WeightsStatus};
pub use service_time::ServiceTime;

/// Milliseconds since the Unix epoch (0 before it, `i64::MAX` past year 292 million).
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
