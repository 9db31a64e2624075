/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Byte counting per (service, backend) for the cgroup_skb programs: which steered socket a
 * packet belongs to, and its transport payload.
 *
 * The rule (also in the crate README): payload = skb->len - IP header - TCP header (doff * 4)
 * or UDP header (8). skb->len is the whole packet from the network header, as the cgroup skb
 * hooks see it: a GSO super-packet on egress (counted once, with one header) and a GRO'd one
 * on ingress. TCP retransmissions pass the hook again and are counted again. IPv6 extension
 * headers are not walked: a packet whose next header is neither TCP nor UDP is not counted.
 */
#ifndef BALLAST_LIB_BYTES_H
#define BALLAST_LIB_BYTES_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "addr.h"
#include "maps.h"

/* The socket's peer as the packet says: daddr/dport on egress, saddr/sport on ingress. The
 * ports are only read for UDP (unconnected sockets), the TCP header only for its length. */
struct ballast_pkt {
	__u32 peer[4];
	__u16 peer_port;
	__u32 payload;
};

/* Parses the IP and transport header of `skb` (data starts at the network header). Returns 0
 * and fills *p, or -1 when the packet is not counted (unknown protocol, no payload). */
static __always_inline int ballast_parse(struct __sk_buff *skb, int egress, __u32 want_ports,
					 struct ballast_pkt *p)
{
	__u32 l4off;
	__u8 l4proto;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return -1;
		l4off = ip.ihl * 4;
		l4proto = ip.protocol;
		ballast_map4(p->peer, egress ? ip.daddr : ip.saddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return -1;
		l4off = sizeof(ip6);
		l4proto = ip6.nexthdr;
		__builtin_memcpy(p->peer, egress ? ip6.daddr.in6_u.u6_addr32 : ip6.saddr.in6_u.u6_addr32,
				 sizeof(p->peer));
	} else {
		return -1;
	}
	__u32 hdr;
	if (l4proto == IPPROTO_TCP) {
		__u8 doff;
		if (bpf_skb_load_bytes(skb, l4off + 12, &doff, 1))
			return -1;
		hdr = l4off + (doff >> 4) * 4;
	} else if (l4proto == IPPROTO_UDP) {
		hdr = l4off + 8;
		if (want_ports) {
			__u16 ports[2]; /* source, dest */
			if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)))
				return -1;
			p->peer_port = egress ? ports[1] : ports[0];
		}
	} else {
		return -1;
	}
	__u32 len = skb->len;
	if (len <= hdr)
		return -1; /* pure ACK, empty datagram: nothing to count */
	p->payload = len - hdr;
	return 0;
}

static __always_inline void ballast_add_bytes(struct counter_key *ck, int egress, __u64 n)
{
	struct byte_count *bc = bpf_map_lookup_elem(&blst_bytes, ck);
	if (!bc) {
		struct byte_count zero = {};
		/* first packet of this (service, backend) on any CPU; EEXIST if another won */
		bpf_map_update_elem(&blst_bytes, ck, &zero, BPF_NOEXIST);
		bc = bpf_map_lookup_elem(&blst_bytes, ck);
		if (!bc)
			return;
	}
	/* per-CPU, but a softirq may interrupt a process-context update of the same key (two
	 * sockets of one backend): an atomic add keeps the sum exact */
	if (egress)
		__sync_fetch_and_add(&bc->sent, n);
	else
		__sync_fetch_and_add(&bc->received, n);
}

/* Counts one packet of a socket of the attached cgroup, if the socket was steered. */
static __always_inline void ballast_count_skb(struct __sk_buff *skb, int egress)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return; /* request or time-wait socket: never a steered client's data */
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct sock_rev *sr = bpf_map_lookup_elem(&blst_conn, &cookie);
	__u32 udp = sk->protocol == IPPROTO_UDP;
	if (!sr && !udp)
		return; /* the common miss: a TCP socket that was not steered */
	struct ballast_pkt p = {};
	if (ballast_parse(skb, egress, udp, &p))
		return;
	struct counter_key ck = {};
	if (sr && !(udp && (p.peer_port != sr->backend_port || p.peer[0] != sr->backend[0] ||
			    p.peer[1] != sr->backend[1] || p.peer[2] != sr->backend[2] ||
			    p.peer[3] != sr->backend[3]))) {
		/* connected (a connected UDP socket may still sendto() elsewhere: checked above) */
		if (!sr->svc_id)
			return; /* record of an older program: service unknown */
		ck.id = sr->svc_id;
		__builtin_memcpy(ck.addr, sr->backend, sizeof(ck.addr));
		ck.port = sr->backend_port;
	} else {
		if (!udp)
			return;
		/* unconnected UDP: the per-peer record sendmsg wrote */
		struct rev_key rk = { .cookie = cookie, .port = p.peer_port };
		__builtin_memcpy(rk.addr, p.peer, sizeof(rk.addr));
		struct rev_value *rv = bpf_map_lookup_elem(&blst_rev, &rk);
		if (!rv)
			return;
		__u32 id = rv->svc_id;
		if (!id) {
			/* record of an older program: the service of the VIP it remembers */
			struct svc_key sk_ = { .port = rv->port, .proto = IPPROTO_UDP };
			__builtin_memcpy(sk_.addr, rv->addr, sizeof(sk_.addr));
			__u32 *sid = bpf_map_lookup_elem(&blst_svc, &sk_);
			if (!sid)
				return;
			id = *sid;
		}
		ck.id = id;
		__builtin_memcpy(ck.addr, p.peer, sizeof(ck.addr));
		ck.port = p.peer_port;
	}
	ballast_add_bytes(&ck, egress, p.payload);
}

#endif
