/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one header shared by the BPF programs and userspace (crate ballast-bpf mirrors every
 * struct below with #[repr(C)]; a test compares sizes and field offsets with this object's BTF).
 *
 * Addresses are 16 bytes in network order; IPv4 is stored v4-mapped (::ffff:a.b.c.d), so one
 * service map serves connect4 and connect6. Ports are network order.
 */
#ifndef BALLAST_H
#define BALLAST_H

#include <linux/types.h>

#define BALLAST_SLOTS 4096          /* slot table size: weights are exact to 1/4096 */
#define BALLAST_MAX_BACKENDS 1024   /* per service */
#define BALLAST_MAX_SERVICES 65536
#define BALLAST_NAME_LEN 128
#define BALLAST_CLUSTER_NAME_LEN 64

/* svc_state.mode: how a backend is picked */
#define BALLAST_MODE_SLOTS 0   /* O(1): slots[rand % BALLAST_SLOTS] */
#define BALLAST_MODE_BSEARCH 1 /* O(log n): binary search over cumulative weights (the seed's) */

/* svc_state.flags */
#define BALLAST_F_ALL_DOWN 1 /* no healthy backend with weight > 0: fail connect() at once */
#define BALLAST_F_CANARY 2   /* canary_pct basis points of new connects go to canary_id */

/* backend.flags */
#define BALLAST_BE_HEALTHY 1

/* key of blst_svc: what the application connects to */
struct svc_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/* value of blst_state (key: service id). Replaced as one element on every change: the flip. */
struct svc_state {
	__u32 gen;        /* generation; tables of this generation live under parity gen & 1 */
	__u32 count;      /* backends in this generation */
	__u32 total;      /* sum of effective weights (healthy backends) */
	__u32 canary_id;  /* target service id when BALLAST_F_CANARY */
	__u32 canary_pct; /* basis points (0..=10000) */
	__u8 mode;
	__u8 flags;
	__u8 proto;
	__u8 pad;
};

/* key of blst_sel, blst_cum */
struct sel_key {
	__u32 id;
	__u32 parity;
};

/* value of blst_sel: backend index per slot, filled in proportion to the weights */
struct sel_table {
	__u16 slots[BALLAST_SLOTS];
};

/* value of blst_cum: cum[i] = sum of effective weights of backends 0..=i */
struct cum_table {
	__u32 cum[BALLAST_MAX_BACKENDS];
};

/* key of blst_backends (the Data Map) */
struct backend_key {
	__u32 id;
	__u32 parity;
	__u32 idx;
};

struct backend {
	__u32 addr[4];
	__u16 port;
	__u8 flags;
	__u8 pad;
	__u32 cluster; /* cluster id (FNV-1a 32 of the cluster name, see the crate docs) */
	__u32 weight;  /* configured weight */
	__u32 gen;     /* generation this record was written for (readers check it) */
};

/* value of blst_meta (key: service id) */
struct svc_meta {
	char name[BALLAST_NAME_LEN];
	struct svc_key key;
};

/* value of blst_clusters (key: cluster id) */
struct cluster_name {
	char name[BALLAST_CLUSTER_NAME_LEN];
};

/* key of blst_counters (per-CPU u64 connects) */
struct counter_key {
	__u32 id;
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

/* key/value of blst_rev: per socket, backend -> VIP, for getpeername and recvmsg */
struct rev_key {
	__u64 cookie;
	__u32 addr[4];
	__u16 port;
	__u16 pad[3];
};

struct rev_value {
	__u32 addr[4];
	__u16 port;
	__u16 svc_id; /* service the backend was picked for (0: written by an older program) */
};

/* value of blst_conn (key: socket cookie): the VIP a connected socket dialled and the backend
 * it was steered to. Written by connect, deleted by cgroup/sock_release. */
struct sock_rev {
	__u32 backend[4];
	__u16 backend_port;
	__u16 svc_id; /* service the backend was picked for (ids <= 65535); 0 = unknown (a record
		       * written by an older program, which had padding here): not counted */
	__u32 vip[4];
	__u16 vip_port;
	__u16 pad2;
};

/* value of blst_bytes (per-CPU; key: struct counter_key): transport payload bytes of the
 * steered sockets, as the cgroup_skb programs see them (see the crate README for the rule) */
struct byte_count {
	__u64 sent;     /* egress */
	__u64 received; /* ingress */
};

#endif
