//! Names: one rule for a cluster id, one for a service name, used by the broker (wire
//! validation, certificates), the agent (configuration, discovery) and the lab.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest service name (`namespace/name`) accepted anywhere.
pub const MAX_SERVICE_NAME_LEN: usize = 253;

/// A name that breaks its rule; the message says which part and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

/// Checks an RFC 1123 DNS label: 1–63 characters of `a-z0-9-`, not starting or ending
/// with `-`. `what` names the value in the message.
fn check_dns_label(what: &str, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > 63 {
        return Err(InvalidName(format!(
            "{what} {s:?} must be 1 to 63 characters"
        )));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(InvalidName(format!(
            "{what} {s:?} may hold only a-z, 0-9 and '-'"
        )));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(InvalidName(format!(
            "{what} {s:?} must not start or end with '-'"
        )));
    }
    Ok(())
}

/// A cluster identity, e.g. `east`: a DNS label (1–63 of `a-z0-9-`, no leading or trailing
/// `-`). The same rule names a cluster in a certificate, a gRPC message, the agent's
/// configuration and the lab.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    /// Checks `s` against the cluster-id rule without allocating.
    ///
    /// # Errors
    /// Why `s` is not a cluster id.
    pub fn validate(s: &str) -> Result<(), InvalidName> {
        check_dns_label("cluster id", s)
    }

    /// A cluster id from `s`.
    ///
    /// # Errors
    /// Why `s` is not a cluster id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
        let s = s.into();
        Self::validate(&s)?;
        Ok(Self(s))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClusterId {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, InvalidName> {
        Self::new(s)
    }
}

impl From<ClusterId> for String {
    fn from(c: ClusterId) -> String {
        c.0
    }
}

impl FromStr for ClusterId {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::new(s)
    }
}

impl Deref for ClusterId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ClusterId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ClusterId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service, `namespace/name` (both DNS labels): the key of a ServiceImport.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    /// Parses `namespace/name`, both parts DNS labels.
    ///
    /// # Errors
    /// Which part is wrong and why.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let (ns, name) = s.split_once('/').ok_or_else(|| {
            InvalidName(format!(
                "service name {s:?} is not of the form namespace/name"
            ))
        })?;
        check_dns_label("namespace", ns)
            .map_err(|e| InvalidName(format!("namespace of {s:?}: {e}")))?;
        check_dns_label("name", name).map_err(|e| InvalidName(format!("name of {s:?}: {e}")))?;
        Ok(Self {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl FromStr for ServiceName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::parse(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cluster_ids_follow_the_dns_label_rule() {
        for ok in ["c1", "east", "us-east-1", "a", &"a".repeat(63)] {
            assert!(ClusterId::validate(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-c1", "c1-", "C1", "c_1", "c 1", "é", &"a".repeat(64)] {
            assert!(ClusterId::validate(bad).is_err(), "{bad:?} accepted");
        }
        let e = ClusterId::new("-c1").unwrap_err().to_string();
        assert!(e.contains("start or end"), "{e}");
    }

    #[test]
    fn cluster_id_serde_refuses_an_invalid_id() {
        let c: ClusterId = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(c.as_str(), "c1");
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"c1\"");
        assert!(serde_json::from_str::<ClusterId>("\"-c1\"").is_err());
    }

    #[test]
    fn service_name_parses_and_rejects() {
        let n = ServiceName::parse("shop/web").unwrap();
        assert_eq!(n.to_string(), "shop/web");
        for bad in ["web", "Shop/web", "shop/-web", "shop/", "/web", "a/b/c"] {
            assert!(ServiceName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn a_valid_cluster_id_round_trips(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let c = ClusterId::new(s.clone()).unwrap();
            prop_assert_eq!(c.to_string(), s);
        }
    }
}
