//! The broker addresses an agent may use (`--broker`) and the order it tries them in.
//!
//! Decisions:
//!
//! - **Every URL is checked before anything starts** ([`parse_list`]): `https://host[:port]`,
//!   each once; repeated flags and comma-separated lists are the same list.
//! - **A host name is resolved on every reconnect** ([`resolve`]), and every address it
//!   resolves to is a replica of its own ([`Target`]): a headless Service's name gives one
//!   target per broker pod. The addresses are sorted so the order survives a resolver that
//!   shuffles them. TLS still verifies the broker's certificate against the name (or
//!   `server_name`), never the IP. A name that does not resolve stays as it is (the
//!   connection attempt then reports why).
//! - **Round-robin only on failure** ([`next_after`]): the session stays on its replica while
//!   it is healthy; when the replica is lost it moves to the target after it in the current
//!   list.
//! - **Agents spread over the replicas** ([`spread_seed`]): the first target an agent tries is
//!   chosen by a stable hash of its cluster and node name, so a fleet given the same list (or
//!   one headless Service name) is spread evenly over the replicas instead of all sessions
//!   landing on the first address; the same agent picks the same replica after a restart.

use std::net::IpAddr;

use tonic::transport::Uri;

/// A `--broker` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("no broker address given")]
    Empty,
    #[error("{0:?} is not a URL: {1}")]
    NotAUrl(String, String),
    #[error("{0:?} must be https://host:port (mutual TLS)")]
    NotHttps(String),
    #[error("{0:?} is listed twice")]
    Twice(String),
}

/// Parses `--broker` values (each may be a comma-separated list) into checked URLs, in order.
///
/// # Errors
/// The first value that is not an `https://host[:port]` URL, a repeated one, or no value.
pub fn parse_list<S: AsRef<str>>(values: &[S]) -> Result<Vec<Uri>, AddressError> {
    let mut out: Vec<Uri> = Vec::new();
    for v in values
        .iter()
        .flat_map(|v| v.as_ref().split(','))
        .map(str::trim)
    {
        if v.is_empty() {
            continue;
        }
        let uri = v
            .parse::<Uri>()
            .map_err(|e| AddressError::NotAUrl(v.to_owned(), e.to_string()))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
            return Err(AddressError::NotHttps(v.to_owned()));
        }
        if out.iter().any(|u| u == &uri) {
            return Err(AddressError::Twice(v.to_owned()));
        }
        out.push(uri);
    }
    if out.is_empty() {
        return Err(AddressError::Empty);
    }
    Ok(out)
}

/// One broker replica to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL dialed (an IP for a resolved name); also the `address` label of
    /// `ballast_agent_broker_replica`.
    pub uri: String,
    /// The name the broker's certificate is verified against.
    pub domain: String,
}

/// The host of `uri` without IPv6 brackets.
fn host(uri: &Uri) -> String {
    uri.host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned()
}

/// The IP literal `uri` names, if its host is one.
fn ip_host(uri: &Uri) -> Option<IpAddr> {
    host(uri).parse().ok()
}

/// The targets of `uri` when its host name resolved to `ips` (none: the URL as it is).
pub fn expand(uri: &Uri, ips: &[IpAddr]) -> Vec<Target> {
    let domain = host(uri);
    if ips.is_empty() || ip_host(uri).is_some() {
        return vec![Target {
            uri: uri.to_string().trim_end_matches('/').to_owned(),
            domain,
        }];
    }
    let mut ips = ips.to_vec();
    ips.sort();
    ips.dedup();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    let path = if path == "/" { "" } else { path };
    ips.into_iter()
        .map(|ip| {
            let authority = match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            };
            Target {
                uri: format!("https://{authority}{path}"),
                domain: domain.clone(),
            }
        })
        .collect()
}

/// Resolves every URL of `endpoints` now (names through the system resolver) into the
/// targets to try, in order; a target appears once.
pub async fn resolve(endpoints: &[Uri]) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for uri in endpoints {
        let ips: Vec<IpAddr> = if ip_host(uri).is_some() {
            Vec::new()
        } else {
            let port = uri.port_u16().unwrap_or(443);
            match tokio::net::lookup_host((host(uri).as_str(), port)).await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(e) => {
                    tracing::warn!(broker = %uri, error = %e, "cannot resolve the broker's name");
                    Vec::new()
                }
            }
        };
        for t in expand(uri, &ips) {
            if !out.iter().any(|o| o.uri == t.uri) {
                out.push(t);
            }
        }
    }
    out
}

/// The index of the target to use in `targets` (not empty): `current`'s when `stay`, else the
/// one after it (round-robin); when `current` is not (or no longer) listed, the one `seed`
/// picks ([`spread_seed`]: agents spread over the replicas).
pub fn next_after(targets: &[Target], current: Option<&str>, stay: bool, seed: u64) -> usize {
    if targets.is_empty() {
        return 0;
    }
    match current.and_then(|c| targets.iter().position(|t| t.uri == c)) {
        Some(i) if stay => i,
        Some(i) => (i + 1) % targets.len(),
        None => usize::try_from(seed % targets.len() as u64).unwrap_or(0),
    }
}

/// A stable hash of an agent's identity (FNV-1a over `cluster/node`), the same in every
/// process and release (unlike std's randomly keyed hasher).
#[must_use]
pub fn spread_seed(cluster: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(node.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().expect("uri")
    }

    #[test]
    fn lists_are_repeated_or_comma_separated_and_each_checked() {
        let l = parse_list(&["https://a:7443,https://b:7443", " https://10.0.0.3:7443 "])
            .expect("valid");
        assert_eq!(
            l.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "https://a:7443/",
                "https://b:7443/",
                "https://10.0.0.3:7443/"
            ]
        );
        assert_eq!(parse_list::<&str>(&[]), Err(AddressError::Empty));
        assert_eq!(parse_list(&[" , "]), Err(AddressError::Empty));
        assert!(matches!(
            parse_list(&["https://a:7443,http://b:7443"]),
            Err(AddressError::NotHttps(s)) if s == "http://b:7443"
        ));
        assert!(matches!(
            parse_list(&["https://a:7443", "https://a b:1"]),
            Err(AddressError::NotAUrl(s, _)) if s == "https://a b:1"
        ));
        assert!(matches!(
            parse_list(&["https://a:7443", "https://a:7443"]),
            Err(AddressError::Twice(_))
        ));
        assert!(matches!(
            parse_list(&["broker:7443"]),
            Err(AddressError::NotHttps(_))
        ));
    }

    #[test]
    fn a_name_becomes_one_target_per_address_verified_against_the_name() {
        let ips: Vec<IpAddr> = ["10.0.0.9", "10.0.0.2", "fd00::1", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        let t = expand(&uri("https://broker-headless.ballast.svc:7443"), &ips);
        assert_eq!(
            t.iter().map(|t| t.uri.as_str()).collect::<Vec<_>>(),
            [
                "https://10.0.0.2:7443",
                "https://10.0.0.9:7443",
                "https://[fd00::1]:7443"
            ],
            "sorted, once each"
        );
        assert!(t.iter().all(|t| t.domain == "broker-headless.ballast.svc"));
        // an IP literal, or a name that did not resolve, stays as it is
        let t = expand(&uri("https://10.1.2.3:7443"), &ips);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].uri, "https://10.1.2.3:7443");
        assert_eq!(t[0].domain, "10.1.2.3");
        let t = expand(&uri("https://[::1]:7443"), &[]);
        assert_eq!(
            (t[0].uri.as_str(), t[0].domain.as_str()),
            ("https://[::1]:7443", "::1")
        );
        let t = expand(&uri("https://nowhere:7443"), &[]);
        assert_eq!(t[0].uri, "https://nowhere:7443");
        // no port: 443
        let t = expand(&uri("https://b"), &ips[..1]);
        assert_eq!(t[0].uri, "https://10.0.0.9:443");
    }

    #[tokio::test]
    async fn names_are_resolved_and_literals_are_not() {
        let t = resolve(&[uri("https://localhost:7443"), uri("https://127.0.0.9:1")]).await;
        assert!(
            t.iter()
                .any(|t| t.uri == "https://127.0.0.1:7443" && t.domain == "localhost"),
            "{t:?}"
        );
        assert!(t.iter().all(|t| !t.uri.contains("localhost")), "{t:?}");
        assert_eq!(
            t.last().map(|t| t.uri.as_str()),
            Some("https://127.0.0.9:1")
        );
    }

    #[test]
    fn round_robin_moves_only_when_asked() {
        let t: Vec<Target> = ["https://a:1", "https://b:1", "https://c:1"]
            .iter()
            .map(|u| Target {
                uri: (*u).into(),
                domain: "x".into(),
            })
            .collect();
        assert_eq!(next_after(&t, None, false, 0), 0);
        assert_eq!(
            next_after(&t, None, false, 4),
            1,
            "the seed picks the first"
        );
        assert_eq!(
            next_after(&t, Some("https://b:1"), true, 0),
            1,
            "healthy: stays"
        );
        assert_eq!(next_after(&t, Some("https://b:1"), false, 0), 2);
        assert_eq!(next_after(&t, Some("https://c:1"), false, 0), 0, "wraps");
        assert_eq!(next_after(&t, Some("https://gone:1"), false, 2), 2);
        assert_eq!(next_after(&[], Some("https://a:1"), false, 0), 0);
    }

    #[test]
    fn a_fleet_is_spread_evenly_over_the_replicas() {
        let mut per_replica = [0usize; 3];
        for c in 0..100 {
            for n in 0..10 {
                let seed = spread_seed(&format!("c{c}"), &format!("c{c}-n{n}"));
                per_replica[usize::try_from(seed % 3).unwrap_or(0)] += 1;
            }
        }
        // 1,000 agents over 3 replicas: each within 10 % of a third
        for k in per_replica {
            assert!((300..=367).contains(&k), "{per_replica:?}");
        }
        assert_eq!(spread_seed("c1", "n1"), spread_seed("c1", "n1"), "stable");
        assert_ne!(spread_seed("c1", "n1"), spread_seed("c1", "n2"));
    }
}
