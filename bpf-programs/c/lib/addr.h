/* SPDX-License-Identifier: Apache-2.0 */
/* IPv4 <-> v4-mapped IPv6 helpers (addresses in network order). */
#ifndef BALLAST_LIB_ADDR_H
#define BALLAST_LIB_ADDR_H

#include <bpf/bpf_endian.h>

static __always_inline void ballast_map4(__u32 addr[4], __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0xffff);
	addr[3] = ip4;
}

static __always_inline int ballast_is_mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

#endif
