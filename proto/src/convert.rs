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
            Policy::LocalFirstRoundRobin => Self::LocalFirstRoundRobin,
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

/// Decodes wire enum number `v` of `field`: `Ok(None)` for unspecified (`of` answers
/// `None`), an error for a number the wire enum `W` does not have.
fn decode<W: TryFrom<i32>, T>(
    field: &'static str,
    v: i32,
    of: impl FnOnce(W) -> Option<T>,
) -> Result<Option<T>, UnknownEnumValue> {
    W::try_from(v)
        .map(of)
        .map_err(|_| UnknownEnumValue { field, value: v })
}

/// Decodes the `policy` field (`field` names it in the error); unspecified is `None`.
///
/// # Errors
/// A number no [`LoadBalancing`] variant has.
pub fn policy(field: &'static str, v: i32) -> Result<Option<Policy>, UnknownEnumValue> {
    decode(field, v, |w| match w {
        LoadBalancing::Unspecified => None,
        LoadBalancing::RoundRobin => Some(Policy::RoundRobin),
        LoadBalancing::LocalFirstRoundRobin => Some(Policy::LocalFirstRoundRobin),
        LoadBalancing::WeightedRoundRobin => Some(Policy::WeightedRoundRobin),
        LoadBalancing::Optimized => Some(Policy::Optimized),
    })
}

/// Decodes the `params` field; unspecified is `None`.
///
/// # Errors
/// A number no [`OptimizedParams`] variant has.
pub fn params(field: &'static str, v: i32) -> Result<Option<Params>, UnknownEnumValue> {
    decode(field, v, |w| match w {
        OptimizedParams::Unspecified => None,
        OptimizedParams::Cost => Some(Params::Cost),
        OptimizedParams::Performance => Some(Params::Performance),
        OptimizedParams::Mixed => Some(Params::Mixed),
    })
}

/// Decodes the `status` field; unspecified is `None`.
///
/// # Errors
/// A number no [`WireStatus`] variant has.
pub fn status(field: &'static str, v: i32) -> Result<Option<WeightsStatus>, UnknownEnumValue> {
    decode(field, v, |w| match w {
        WireStatus::Unspecified => None,
        WireStatus::Optimal => Some(WeightsStatus::Optimal),
        WireStatus::Degraded => Some(WeightsStatus::Degraded),
        WireStatus::Stale => Some(WeightsStatus::Stale),
    })
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
