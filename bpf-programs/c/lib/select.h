/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Backend selection. A service's state names its generation; its tables live under the
 * generation's parity. Writers fill the other parity, then replace the state element (the
 * flip). A reader checks that the backend record carries the generation of the state it read
 * and retries once when a writer overtook it, so it never mixes two tables.
 */
#ifndef BALLAST_LIB_SELECT_H
#define BALLAST_LIB_SELECT_H

#include "maps.h"

#define BALLAST_PICK_OK 0
#define BALLAST_PICK_PASS 1 /* not ours / inconsistent: leave the address alone */
#define BALLAST_PICK_FAIL 2 /* every backend down: fail the call */

static __always_inline int ballast_index_slots(__u32 id, __u32 parity, __u32 *idx)
{
	struct sel_key k = { .id = id, .parity = parity };
	struct sel_table *t = bpf_map_lookup_elem(&blst_sel, &k);
	if (!t)
		return -1;
	__u32 s = bpf_get_prandom_u32() & (BALLAST_SLOTS - 1);
	*idx = t->slots[s];
	return 0;
}

/*
 * First i with cum[i] > r, as 10 fixed halving steps without branches: userspace fills
 * cum[count..] with 0xffffffff, and "cum <= r" is computed arithmetically, so the verifier
 * sees one straight path instead of 2^10.
 */
static __always_inline __u32 ballast_bsearch(const struct cum_table *t, __u32 r)
{
	__u32 pos = 0;
#pragma unroll
	for (__u32 step = BALLAST_MAX_BACKENDS / 2; step > 0; step >>= 1) {
		__u64 c = t->cum[(pos + step - 1) & (BALLAST_MAX_BACKENDS - 1)];
		__u64 le = 1 - (((__u64)r - c) >> 63); /* 1 when c <= r */
		pos += step * (__u32)le;
	}
	return pos;
}

static __always_inline int ballast_index_bsearch(const struct svc_state *st, __u32 id,
						 __u32 parity, __u32 *idx)
{
	struct sel_key k = { .id = id, .parity = parity };
	struct cum_table *t = bpf_map_lookup_elem(&blst_cum, &k);
	if (!t || st->total == 0)
		return -1;
	*idx = ballast_bsearch(t, bpf_get_prandom_u32() % st->total);
	return 0;
}

/* Picks a backend of service `id` from its current generation (`st`, already looked up, or
 * NULL); on OK *out holds a copy. Retries once with a fresh state if a writer overtook us. */
static __always_inline int ballast_pick_one(__u32 id, struct svc_state *st, struct backend *out)
{
	for (int attempt = 0; attempt < 2; attempt++) {
		if (!st || attempt > 0)
			st = bpf_map_lookup_elem(&blst_state, &id);
		if (!st)
			return BALLAST_PICK_PASS;
		__u32 gen = st->gen;
		if (st->flags & BALLAST_F_ALL_DOWN)
			return BALLAST_PICK_FAIL;
		__u32 parity = gen & 1;
		__u32 idx = 0;
		int err = st->mode == BALLAST_MODE_BSEARCH
				  ? ballast_index_bsearch(st, id, parity, &idx)
				  : ballast_index_slots(id, parity, &idx);
		if (err)
			continue;
		struct backend_key bk = { .id = id, .parity = parity, .idx = idx };
		struct backend *be = bpf_map_lookup_elem(&blst_backends, &bk);
		if (!be || be->gen != gen)
			continue;
		__builtin_memcpy(out, be, sizeof(*out));
		return BALLAST_PICK_OK;
	}
	return BALLAST_PICK_PASS;
}

/* Canary first (a separate lookup of the target service, with its own state, backend count
 * and table), else the service itself. On OK, *out_id is the service the backend belongs to. */
static __always_inline int ballast_pick(__u32 id, struct backend *out, __u32 *out_id)
{
	struct svc_state *st = bpf_map_lookup_elem(&blst_state, &id);
	if (!st)
		return BALLAST_PICK_PASS;
	if ((st->flags & BALLAST_F_CANARY) &&
	    bpf_get_prandom_u32() % 10000 < st->canary_pct) {
		__u32 cid = st->canary_id;
		if (ballast_pick_one(cid, 0, out) == BALLAST_PICK_OK) {
			*out_id = cid;
			return BALLAST_PICK_OK;
		}
		/* canary target missing or down: the primary service serves */
		st = 0;
	}
	*out_id = id;
	return ballast_pick_one(id, st, out);
}

static __always_inline void ballast_count(__u32 id, const struct backend *be)
{
	struct counter_key ck = { .id = id, .port = be->port };
	__builtin_memcpy(ck.addr, be->addr, sizeof(ck.addr));
	__u64 *c = bpf_map_lookup_elem(&blst_counters, &ck);
	if (c) {
		*c += 1; /* per-CPU: no atomics needed */
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(&blst_counters, &ck, &one, BPF_NOEXIST)) {
		c = bpf_map_lookup_elem(&blst_counters, &ck);
		if (c)
			*c += 1;
	}
}

/* connect(): remember backend -> VIP under the socket cookie (sock_release deletes it). A
 * preallocated hash entry costs far less here than socket storage (an allocation per socket)
 * or an LRU entry (eviction once full). */
static __always_inline void ballast_remember_conn(__u64 cookie, __u32 sid, const struct backend *be,
						  const struct svc_key *vip)
{
	struct sock_rev sr = { .backend_port = be->port, .svc_id = (__u16)sid, .vip_port = vip->port };
	__builtin_memcpy(sr.backend, be->addr, sizeof(sr.backend));
	__builtin_memcpy(sr.vip, vip->addr, sizeof(sr.vip));
	bpf_map_update_elem(&blst_conn, &cookie, &sr, BPF_ANY);
}

/* sendmsg() on an unconnected socket: one socket, many peers, so an LRU entry per peer */
static __always_inline void ballast_remember(__u64 cookie, __u32 sid, const struct backend *be,
					     const struct svc_key *vip)
{
	struct rev_key rk = { .cookie = cookie, .port = be->port };
	__builtin_memcpy(rk.addr, be->addr, sizeof(rk.addr));
	struct rev_value rv = { .port = vip->port, .svc_id = (__u16)sid };
	__builtin_memcpy(rv.addr, vip->addr, sizeof(rv.addr));
	bpf_map_update_elem(&blst_rev, &rk, &rv, BPF_ANY);
}

/* getpeername()/recvmsg(): the VIP this socket was steered from to backend addr:port (network
 * order), from its connected record (ballast_remember_conn) or else its per-peer entry
 * (ballast_remember). Returns 1 and fills vip/vip_port, or 0 if the socket was not steered. */
static __always_inline int ballast_recall(__u64 cookie, const __u32 addr[4], __u16 port,
					  __u32 vip[4], __u16 *vip_port)
{
	struct sock_rev *sr = bpf_map_lookup_elem(&blst_conn, &cookie);
	if (sr && sr->backend_port == port && sr->backend[0] == addr[0] &&
	    sr->backend[1] == addr[1] && sr->backend[2] == addr[2] && sr->backend[3] == addr[3]) {
		__builtin_memcpy(vip, sr->vip, sizeof(sr->vip));
		*vip_port = sr->vip_port;
		return 1;
	}
	struct rev_key rk = { .cookie = cookie, .port = port };
	__builtin_memcpy(rk.addr, addr, sizeof(rk.addr));
	struct rev_value *rv = bpf_map_lookup_elem(&blst_rev, &rk);
	if (!rv)
		return 0;
	__builtin_memcpy(vip, rv->addr, sizeof(rv->addr));
	*vip_port = rv->port;
	return 1;
}

#endif
