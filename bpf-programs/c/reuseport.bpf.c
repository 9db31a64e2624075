/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Hot standby on one host: the broker's listening sockets share a port (SO_REUSEPORT), and
 * this program picks which socket of the group gets a new connection.
 *
 *   slot 0 of blst_reuse = the active broker's listener (it holds the database lock)
 *   slot 1 of blst_reuse = the standby's listener (bound, not accepting until it takes over)
 *
 * The kernel empties a slot when its socket closes (process death included), so "slot 0,
 * else slot 1" sends every new connection to the primary while it lives and to the standby
 * after. With neither slot filled, SK_PASS without a selection lets the kernel pick by hash.
 *
 * Section sk_reuseport/migrate = attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (kernel
 * >= 5.14): the program also runs when a listener closes, once for each request in its accept
 * queue and each handshake still in flight (ctx->migrating_sk set), and the same choice moves
 * them to the standby instead of resetting them. With this attach type the kernel migrates
 * whatever the sysctl net.ipv4.tcp_migrate_req says (the sysctl only matters with no program
 * or a plain sk_reuseport one).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_reuse SEC(".maps");

/* Selections by outcome, for tests and `bpftool map dump`: 0 primary, 1 standby, 2 kernel
 * hash (no slot filled); +3 for the same outcome while migrating a closed listener's
 * requests. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 6);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_reuse_stats SEC(".maps");

static __always_inline void count(__u32 outcome, int migrating)
{
	__u32 k = outcome + (migrating ? 3 : 0);
	__u64 *v = bpf_map_lookup_elem(&blst_reuse_stats, &k);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("sk_reuseport/migrate")
int blst_reuseport(struct sk_reuseport_md *ctx)
{
	int migrating = ctx->migrating_sk != 0;
	__u32 primary = 0, standby = 1;

	if (bpf_sk_select_reuseport(ctx, &blst_reuse, &primary, 0) == 0) {
		count(0, migrating);
		return SK_PASS;
	}
	if (bpf_sk_select_reuseport(ctx, &blst_reuse, &standby, 0) == 0) {
		count(1, migrating);
		return SK_PASS;
	}
	count(2, migrating);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
