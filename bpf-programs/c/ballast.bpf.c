/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ballast: connect-time steering of service VIPs to weighted backends.
 *
 * connect4/6 and sendmsg4/6 rewrite a known (vip, port, proto) to a picked backend and remember
 * backend -> VIP per socket; getpeername4/6 and recvmsg4/6 show the VIP to the application.
 * Anything else passes untouched. sock_release forgets a connected socket's record.
 * cgroup_skb egress/ingress count the payload bytes of steered sockets per (service, backend).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "ballast.h"
#include "lib/addr.h"
#include "lib/maps.h"
#include "lib/select.h"
#include "lib/bytes.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Steers one address. Returns the hook's verdict: 1 proceed, 0 fail with EPERM. */
static __always_inline int steer(struct bpf_sock_addr *ctx, struct svc_key *key,
				 struct backend *be, int connected)
{
	__u32 *id = bpf_map_lookup_elem(&blst_svc, key);
	if (!id)
		return 2;
	__u32 sid = 0;
	int r = ballast_pick(*id, be, &sid);
	if (r == BALLAST_PICK_FAIL)
		return 0;
	if (r != BALLAST_PICK_OK)
		return 2;
	ballast_count(sid, be);
	if (connected)
		ballast_remember_conn(bpf_get_socket_cookie(ctx), sid, be, key);
	else
		ballast_remember(bpf_get_socket_cookie(ctx), sid, be, key);
	return 1;
}

static __always_inline int steer4(struct bpf_sock_addr *ctx, int connected)
{
	__u32 proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	struct svc_key key = { .port = (__u16)ctx->user_port, .proto = (__u8)proto };
	ballast_map4(key.addr, ctx->user_ip4);
	struct backend be;
	int v = steer(ctx, &key, &be, connected);
	if (v != 1)
		return v == 0 ? 0 : 1;
	if (!ballast_is_mapped(be.addr))
		return 1; /* IPv6 backend cannot serve an IPv4 socket: leave it alone */
	ctx->user_ip4 = be.addr[3];
	ctx->user_port = be.port;
	return 1;
}

SEC("cgroup/connect4")
int blst_connect4(struct bpf_sock_addr *ctx)
{
	return steer4(ctx, 1);
}

SEC("cgroup/sendmsg4")
int blst_sendmsg4(struct bpf_sock_addr *ctx)
{
	return steer4(ctx, 0);
}

static __always_inline int steer6(struct bpf_sock_addr *ctx, int connected)
{
	__u32 proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	struct svc_key key = { .port = (__u16)ctx->user_port, .proto = (__u8)proto };
	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	struct backend be;
	int v = steer(ctx, &key, &be, connected);
	if (v != 1)
		return v == 0 ? 0 : 1;
	ctx->user_ip6[0] = be.addr[0];
	ctx->user_ip6[1] = be.addr[1];
	ctx->user_ip6[2] = be.addr[2];
	ctx->user_ip6[3] = be.addr[3];
	ctx->user_port = be.port;
	return 1;
}

SEC("cgroup/connect6")
int blst_connect6(struct bpf_sock_addr *ctx)
{
	return steer6(ctx, 1);
}

SEC("cgroup/sendmsg6")
int blst_sendmsg6(struct bpf_sock_addr *ctx)
{
	return steer6(ctx, 0);
}

/* backend -> VIP for this socket, if it was steered */
static __always_inline int unsteer4(struct bpf_sock_addr *ctx)
{
	__u32 a[4], vip[4];
	__u16 port;
	ballast_map4(a, ctx->user_ip4);
	if (ballast_recall(bpf_get_socket_cookie(ctx), a, (__u16)ctx->user_port, vip, &port)) {
		ctx->user_ip4 = vip[3];
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/getpeername4")
int blst_getpeername4(struct bpf_sock_addr *ctx)
{
	return unsteer4(ctx);
}

SEC("cgroup/recvmsg4")
int blst_recvmsg4(struct bpf_sock_addr *ctx)
{
	return unsteer4(ctx);
}

/* backend -> VIP for this socket, if it was steered */
static __always_inline int unsteer6(struct bpf_sock_addr *ctx)
{
	__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	__u32 vip[4];
	__u16 port;
	if (ballast_recall(bpf_get_socket_cookie(ctx), a, (__u16)ctx->user_port, vip, &port)) {
		ctx->user_ip6[0] = vip[0];
		ctx->user_ip6[1] = vip[1];
		ctx->user_ip6[2] = vip[2];
		ctx->user_ip6[3] = vip[3];
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/getpeername6")
int blst_getpeername6(struct bpf_sock_addr *ctx)
{
	return unsteer6(ctx);
}

SEC("cgroup/recvmsg6")
int blst_recvmsg6(struct bpf_sock_addr *ctx)
{
	return unsteer6(ctx);
}

SEC("cgroup/sock_release")
int blst_sock_release(struct bpf_sock *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_delete_elem(&blst_conn, &cookie);
	return 1;
}

/* Bytes per (service, backend). These run for every packet of every socket of the attached
 * cgroups (a steered one or not) and never drop: always 1. */
SEC("cgroup_skb/egress")
int blst_skb_egress(struct __sk_buff *skb)
{
	ballast_count_skb(skb, 1);
	return 1;
}

SEC("cgroup_skb/ingress")
int blst_skb_ingress(struct __sk_buff *skb)
{
	ballast_count_skb(skb, 0);
	return 1;
}
