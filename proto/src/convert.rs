//! The one conversion between the wire enums and the vocabulary of `ballast-types`.
//!
//! Each wire enum has an `UNSPECIFIED` zero value ("not set"), so the decoding direction
//! yields `Option`: [`policy`], [`params`] and [`status`] return `Ok(None)` for it and an
//! error naming the field for a number no variant has.

use ballast_types::{Params, Policy, WeightsStatus};

use crate::v1::{LoadBalancing, OptimizedParams, WeightsStatus as WireStatus};

/// A wire enum number that no variant has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: unknown value {value}")]
pub struct UnknownEnumValue {
    pub field: &'static str,
    pub value: i32,
}

impl From<Policy> for LoadBalancing {
    fn from(p: Policy) -> Self {
        match p {
            Policy::RoundRobin => Self::RoundRobin,
            Policy::WeightedRoundRobin => Self::WeightedRoundRobin,
            Policy::Optimized => Self::Optimized,
        }
    }
}

impl From<Params> for OptimizedParams {
    fn from(p: Params) -> Self {
        match p {
            Params::Cost => Self::Cost,
            Params::Performance => Self::Performance,
            Params::Mixed => Self::Mixed,
        }
    }
}

impl From<WeightsStatus> for WireStatus {
    fn from(s: WeightsStatus) -> Self {
        match s {
            WeightsStatus::Optimal => Self::Optimal,
            WeightsStatus::Degraded => Self::Degraded,
            WeightsStatus::Stale => Self::Stale,
        }
    }
}

/// Decodes the `policy` field (`field` names it in the error); unspecified is `None`.
///
/// # Errors
/// A number no [`LoadBalancing`] variant has.
pub fn policy(field: &'static str, v: i32) -> Result<Option<Policy>, UnknownEnumValue> {
    match LoadBalancing::try_from(v) {
        Ok(LoadBalancing::Unspecified) => Ok(None),
        Ok(LoadBalancing::RoundRobin) => Ok(Some(Policy::RoundRobin)),
        Ok(LoadBalancing::WeightedRoundRobin) => Ok(Some(Policy::WeightedRoundRobin)),
        Ok(LoadBalancing::Optimized) => Ok(Some(Policy::Optimized)),
        Err(_) => Err(UnknownEnumValue { field, value: v }),
    }
}

/// Decodes the `params` field; unspecified is `None`.
///
/// # Errors
/// A number no [`OptimizedParams`] variant has.
pub fn params(field: &'static str, v: i32) -> Result<Option<Params>, UnknownEnumValue> {
    match OptimizedParams::try_from(v) {
        Ok(OptimizedParams::Unspecified) => Ok(None),
        Ok(OptimizedParams::Cost) => Ok(Some(Params::Cost)),
        Ok(OptimizedParams::Performance) => Ok(Some(Params::Performance)),
        Ok(OptimizedParams::Mixed) => Ok(Some(Params::Mixed)),
        Err(_) => Err(UnknownEnumValue { field, value: v }),
    }
}

/// Decodes the `status` field; unspecified is `None`.
///
/// # Errors
/// A number no [`WireStatus`] variant has.
pub fn status(field: &'static str, v: i32) -> Result<Option<WeightsStatus>, UnknownEnumValue> {
    match WireStatus::try_from(v) {
        Ok(WireStatus::Unspecified) => Ok(None),
        Ok(WireStatus::Optimal) => Ok(Some(WeightsStatus::Optimal)),
        Ok(WireStatus::Degraded) => Ok(Some(WeightsStatus::Degraded)),
        Ok(WireStatus::Stale) => Ok(Some(WeightsStatus::Stale)),
        Err(_) => Err(UnknownEnumValue { field, value: v }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_value_survives_the_wire_and_unknown_numbers_name_the_field() {
        for p in Policy::ALL {
            assert_eq!(
                policy("policy", LoadBalancing::from(*p).into()),
                Ok(Some(*p))
            );
        }
        for p in Params::ALL {
            assert_eq!(
                params("params", OptimizedParams::from(*p).into()),
                Ok(Some(*p))
            );
        }
        for s in WeightsStatus::ALL {
            assert_eq!(status("status", WireStatus::from(*s).into()), Ok(Some(*s)));
        }
        assert_eq!(policy("policy", 0), Ok(None));
        assert_eq!(
            params("params", 42).unwrap_err().to_string(),
            "params: unknown value 42"
        );
    }
}
