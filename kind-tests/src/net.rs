//! The lab's network: namespaces, the veth pair of each cluster, addresses, routes and the
//! policy rules that send cluster traffic through the WAN emulator.
//!
//! Decision: this is done with `ip` (iproute2), not with netlink from Rust (`rtnetlink`).
//! Weighed for issue 8 and kept, because rtnetlink would not be simpler here:
//! - every operation but one targets a *named* namespace (`ip -n NS`); a netlink socket acts in
//!   the namespace it was opened in, so each call would need a thread that `setns`es into the
//!   namespace and a tokio runtime on it (rtnetlink is async), where `ip -n` does that itself;
//! - `ip netns add` (unshare, bind mount under /run/netns) and the sysctls (`ip netns exec`,
//!   because /proc/sys/net follows the opener's namespace) stay shell-outs in any case;
//! - each command is idempotent as written (`replace`, or checked before `add`) and its error
//!   carries the exact command line and iproute2's message, which is what a reader needs
//!   when `up` fails on a half-made lab; rtnetlink's builders (veth peer in another
//!   namespace, an `unreachable` route with a metric in table 100, `iif` rules) would replace
//!   ~15 one-line commands with about ten times as much code;
//! - rtnetlink 0.24 is not in the lock: it brings a second `netlink-packet-route` (0.34 beside
//!   0.33) and `nix`, on a machine where every build competes for two cores.
//!
//! What is read, not changed, is read without `ip` where the kernel offers it: the namespaces
//! under /run/netns (`sys::list_netns`).

use crate::config::{self, BROKER_ADDR, CLUSTER_IF, LAB_SUBNET, TUN_IN, TUN_OUT};
use crate::error::Result;
use crate::lab::ClusterState;
use crate::sys;

/// `ip ARGS...`
fn ip(args: &[&str]) -> Result<String> {
    sys::run("ip", args)
}

/// `ip -n NETNS ARGS...`
fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    sys::run("ip", &all)
}

/// Sets a sysctl inside a namespace (`ip netns exec` is fine here: /proc/sys/net follows
/// the opener's namespace).
fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let kv = format!("{key}={value}");
    sys::run("ip", &["netns", "exec", netns, "sysctl", "-qw", &kv]).map(|_| ())
}

/// Creates the namespace if missing (idempotent).
pub fn ensure_netns(name: &str) -> Result<()> {
    if !sys::netns_exists(name) {
        ip(&["netns", "add", name])?;
    }
    Ok(())
}

/// Deletes a namespace (its veth ends and TUNs go with it).
pub fn delete_netns(name: &str) -> Result<()> {
    ip(&["netns", "del", name]).map(|_| ())
}

/// Whether a link exists inside a namespace.
fn link_exists(netns: &str, dev: &str) -> bool {
    ip_in(netns, &["link", "show", "dev", dev]).is_ok()
}

/// The wan namespace: forwarding, no reverse-path filter, the broker's address on `lo`.
pub fn setup_wan(wan_ns: &str) -> Result<()> {
    ensure_netns(wan_ns)?;
    ip_in(wan_ns, &["link", "set", "lo", "up"])?;
    let broker = format!("{BROKER_ADDR}/32");
    ip_in(wan_ns, &["addr", "replace", &broker, "dev", "lo"])?;
    sysctl_in(wan_ns, "net.ipv4.ip_forward", "1")?;
    sysctl_in(wan_ns, "net.ipv4.conf.all.rp_filter", "0")?;
    sysctl_in(wan_ns, "net.ipv4.conf.default.rp_filter", "0")
}

/// One cluster's namespace and its veth pair to the wan namespace, addressed, up, and a
/// route to the lab's subnet only.
pub fn setup_cluster(wan_ns: &str, c: &ClusterState) -> Result<()> {
    let wan_if = config::wan_if(&c.id);
    ensure_netns(&c.netns)?;
    ip_in(&c.netns, &["link", "set", "lo", "up"])?;
    if !link_exists(&c.netns, CLUSTER_IF) {
        // A half-made pair from a crash: its wan end blocks the name.
        if link_exists(wan_ns, &wan_if) {
            ip_in(wan_ns, &["link", "del", &wan_if])?;
        }
        ip(&[
            "link", "add", CLUSTER_IF, "netns", &c.netns, "type", "veth", "peer", "name", &wan_if,
            "netns", wan_ns,
        ])?;
    }
    sysctl_in(wan_ns, &format!("net.ipv4.conf.{wan_if}.rp_filter"), "0")?;
    let caddr = format!("{}/24", c.address);
    let waddr = format!("{}/24", c.wan_address);
    ip_in(&c.netns, &["addr", "replace", &caddr, "dev", CLUSTER_IF])?;
    ip_in(&c.netns, &["link", "set", CLUSTER_IF, "up"])?;
    ip_in(wan_ns, &["addr", "replace", &waddr, "dev", &wan_if])?;
    ip_in(wan_ns, &["link", "set", &wan_if, "up"])?;
    // Only the lab's subnet: no default route, nothing off this machine is reachable.
    let via = c.wan_address.to_string();
    ip_in(
        &c.netns,
        &[
            "route", "replace", LAB_SUBNET, "via", &via, "dev", CLUSTER_IF,
        ],
    )?;
    Ok(())
}

/// Sends what arrives from the clusters through the emulator's TUN devices (which the
/// forwarder has made): packets from each cluster's veth look up table `WAN_TABLE`, whose
/// route to the lab's subnet is `wan-in`; what the forwarder writes to `wan-out` is routed
/// by the main table.
pub fn route_through_emulator(wan_ns: &str, clusters: &[ClusterState]) -> Result<()> {
    sysctl_in(wan_ns, &format!("net.ipv4.conf.{TUN_OUT}.rp_filter"), "0")?;
    sysctl_in(wan_ns, &format!("net.ipv4.conf.{TUN_IN}.rp_filter"), "0")?;
    ip_in(wan_ns, &["link", "set", TUN_IN, "up"])?;
    ip_in(wan_ns, &["link", "set", TUN_OUT, "up"])?;
    // Fail closed: without the forwarder (its TUN gone, and with it the route below)
    // cluster traffic must not bypass the emulator through the main table.
    ip_in(
        wan_ns,
        &[
            "route",
            "replace",
            "unreachable",
            LAB_SUBNET,
            "table",
            config::WAN_TABLE,
            "metric",
            "4096",
        ],
    )?;
    // Only lab destinations go through the emulator; anything else has no route.
    ip_in(
        wan_ns,
        &[
            "route",
            "replace",
            LAB_SUBNET,
            "dev",
            TUN_IN,
            "table",
            config::WAN_TABLE,
        ],
    )?;
    let rules = ip_in(wan_ns, &["rule", "show"])?;
    for c in clusters {
        let wan_if = config::wan_if(&c.id);
        let want = format!("iif {wan_if} lookup {}", config::WAN_TABLE);
        if !rules.lines().any(|l| l.contains(&want)) {
            ip_in(
                wan_ns,
                &[
                    "rule",
                    "add",
                    "iif",
                    &wan_if,
                    "lookup",
                    config::WAN_TABLE,
                    "pref",
                    "100",
                ],
            )?;
        }
    }
    Ok(())
}
