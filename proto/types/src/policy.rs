//! The Submariner-style settings and the state of a published weight.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A value that is not one of an enum's spellings; names what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {expected}")]
pub struct UnknownValue {
    pub value: String,
    pub expected: &'static str,
}

/// Declares a fieldless enum with one kebab-case spelling per variant, used by `Display`,
/// `FromStr`, serde and (feature `clap`) clap's `ValueEnum`.
macro_rules! spelled_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] #[cfg_attr(feature = "clap", value(name = $text))] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// The spellings, for error messages and schemas.
            pub const SPELLINGS: &'static str = concat!($($text, " "),+);

            /// The one spelling (store, CLI, CRD, JSON).
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownValue {
                        value: other.to_owned(),
                        expected: Self::SPELLINGS.trim_ascii_end(),
                    }),
                }
            }
        }
    };
}

spelled_enum! {
    /// Submariner-style `serviceDiscoveryLoadBalancing`. `local-first-round-robin` is
    /// Submariner Lighthouse's behaviour: the source's own cluster when it serves, else an
    /// equal split; `round-robin` keeps the equal split over every serving cluster.
    Policy {
        RoundRobin = "round-robin",
        LocalFirstRoundRobin = "local-first-round-robin",
        WeightedRoundRobin = "weighted-round-robin",
        Optimized = "optimized",
    }
}

spelled_enum! {
    /// Submariner-style `optimizedLoadBalancingParams`: chooses (a, b) in
    /// cost = a·RTT + b·price.
    Params {
        Cost = "cost",
        Performance = "performance",
        Mixed = "mixed",
    }
}

spelled_enum! {
    /// How one (service, source)'s published weights were obtained: `optimal` as the policy
    /// specifies, `degraded` by a stated fallback, `stale` kept from before because an input
    /// is too old.
    WeightsStatus {
        Optimal = "optimal",
        Degraded = "degraded",
        Stale = "stale",
    }
}

spelled_enum! {
    /// The unit a service's demand and capacity are counted in (see the proto's `LoadUnit`):
    /// `connections` by default (what connect-time steering places and counts), `requests`
    /// where the operator declares one request per connection, `bytes` (payload, both ways).
    #[derive(Default)]
    LoadUnit {
        #[default]
        Connections = "connections",
        Requests = "requests",
        Bytes = "bytes",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_spelling_round_trips_through_text_and_serde() {
        for p in Policy::ALL {
            assert_eq!(p.to_string().parse::<Policy>().unwrap(), *p);
            let json = serde_json::to_string(p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), *p);
        }
        for p in Params::ALL {
            assert_eq!(p.to_string().parse::<Params>().unwrap(), *p);
            assert_eq!(serde_json::to_string(p).unwrap(), format!("\"{p}\""));
        }
        for s in WeightsStatus::ALL {
            assert_eq!(s.to_string().parse::<WeightsStatus>().unwrap(), *s);
        }
        assert_eq!(Policy::WeightedRoundRobin.as_str(), "weighted-round-robin");
        assert_eq!(
            "local-first-round-robin".parse::<Policy>().unwrap(),
            Policy::LocalFirstRoundRobin
        );
    }

    #[test]
    fn an_unknown_spelling_names_the_accepted_ones() {
        let e = "fastest".parse::<Policy>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"fastest\" is not one of round-robin local-first-round-robin weighted-round-robin optimized"
        );
        assert!(
            "Optimized".parse::<Policy>().is_err(),
            "spellings are exact"
        );
        assert!("".parse::<Params>().is_err());
    }
}
