//! `#[repr(C)]` mirrors of `c/ballast.h`. The test `layout_matches_btf` compares every size and
//! field offset here with the BTF of the compiled object, so C/Rust drift fails a test.
#![allow(unsafe_code)]

/// Slot table size: weights are exact to 1/`SLOTS`.
pub const SLOTS: usize = 4096;
/// Most backends a service may have (the binary search table and the slot index width).
pub const MAX_BACKENDS: usize = 1024;
/// Longest service name in bytes (the C buffer keeps a NUL).
pub const NAME_LEN: usize = 128;
/// Longest cluster name in bytes (the C buffer keeps a NUL).
pub const CLUSTER_NAME_LEN: usize = 64;

pub const MODE_SLOTS: u8 = 0;
pub const MODE_BSEARCH: u8 = 1;
pub const F_ALL_DOWN: u8 = 1;
pub const F_CANARY: u8 = 2;
pub const BE_HEALTHY: u8 = 1;

/// Key of `blst_svc`: address (v4-mapped for IPv4) and port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcState {
    pub gen: u32,
    pub count: u32,
    pub total: u32,
    pub canary_id: u32,
    pub canary_pct: u32,
    pub mode: u8,
    pub flags: u8,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelKey {
    pub id: u32,
    pub parity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SelTable {
    pub slots: [u16; SLOTS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CumTable {
    pub cum: [u32; MAX_BACKENDS],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendKey {
    pub id: u32,
    pub parity: u32,
    pub idx: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub flags: u8,
    pub pad: u8,
    pub cluster: u32,
    pub weight: u32,
    pub gen: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SvcMeta {
    pub name: [u8; NAME_LEN],
    pub key: SvcKey,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClusterName {
    pub name: [u8; CLUSTER_NAME_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub id: u32,
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u16; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevValue {
    pub addr: [u32; 4],
    pub port: u16,
    /// Service the backend was picked for; 0 in a record written by an older program.
    pub svc_id: u16,
}

/// Value of `blst_conn` (key: socket cookie of a connected, steered socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    pub backend: [u32; 4],
    pub backend_port: u16,
    /// Service the backend was picked for (ids are <= 65535); 0 = unknown (a record written by
    /// an older program, which had padding here): its bytes are not counted.
    pub svc_id: u16,
    pub vip: [u32; 4],
    pub vip_port: u16,
    pub pad2: u16,
}

/// Value of `blst_bytes` (per-CPU; key: [`CounterKey`]): transport payload bytes of the steered
/// sockets of one (service, backend), as the `cgroup_skb` programs count them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteCount {
    pub sent: u64,
    pub received: u64,
}

// SAFETY: plain #[repr(C)] data with explicit padding fields, valid for any bit pattern.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcState {}
unsafe impl aya::Pod for SelKey {}
unsafe impl aya::Pod for SelTable {}
unsafe impl aya::Pod for CumTable {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for SvcMeta {}
unsafe impl aya::Pod for ClusterName {}
unsafe impl aya::Pod for CounterKey {}
unsafe impl aya::Pod for RevKey {}
unsafe impl aya::Pod for RevValue {}
unsafe impl aya::Pod for SockRev {}
unsafe impl aya::Pod for ByteCount {}

/// C struct name, size, and `(field, offset)` pairs of one mirror.
pub type Mirror = (&'static str, usize, Vec<(&'static str, usize)>);

/// Every mirrored struct, for the BTF check.
#[must_use]
pub fn mirrors() -> Vec<Mirror> {
    use std::mem::{offset_of, size_of};
    macro_rules! m {
        ($c:literal, $t:ty, [$($f:ident),*]) => {
            ($c, size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),*])
        };
    }
    vec![
        m!("svc_key", SvcKey, [addr, port, proto, pad]),
        m!(
            "svc_state",
            SvcState,
            [gen, count, total, canary_id, canary_pct, mode, flags, proto, pad]
        ),
        m!("sel_key", SelKey, [id, parity]),
        m!("sel_table", SelTable, [slots]),
        m!("cum_table", CumTable, [cum]),
        m!("backend_key", BackendKey, [id, parity, idx]),
        m!(
            "backend",
            Backend,
            [addr, port, flags, pad, cluster, weight, gen]
        ),
        m!("svc_meta", SvcMeta, [name, key]),
        m!("cluster_name", ClusterName, [name]),
        m!("counter_key", CounterKey, [id, addr, port, pad]),
        m!("rev_key", RevKey, [cookie, addr, port, pad]),
        m!("rev_value", RevValue, [addr, port, svc_id]),
        m!(
            "sock_rev",
            SockRev,
            [backend, backend_port, svc_id, vip, vip_port, pad2]
        ),
        m!("byte_count", ByteCount, [sent, received]),
    ]
}
