/* SPDX-License-Identifier: Apache-2.0 */
/* Map definitions. Every map is pinned by name under the loader's pin directory. */
#ifndef BALLAST_LIB_MAPS_H
#define BALLAST_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../ballast.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BALLAST_MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BALLAST_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * BALLAST_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sel_key);
	__type(value, struct sel_table);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_sel SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * BALLAST_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sel_key);
	__type(value, struct cum_table);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_cum SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, struct backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BALLAST_MAX_SERVICES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct svc_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct cluster_name);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_clusters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 18);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct counter_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1 << 18);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct counter_key);
	__type(value, struct byte_count);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_bytes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rev_key);
	__type(value, struct rev_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, struct sock_rev);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} blst_conn SEC(".maps");

#endif
