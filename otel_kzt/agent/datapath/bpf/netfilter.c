/* otel-kzt `netfilter` mode: exact per-flow counters at netfilter POSTROUTING (IPv4 and IPv6).
 *
 * Requires: Linux >= 6.4 for netfilter BPF links (program type 32, attach type 45), >= 6.6 for
 * BPF_PROG_TEST_RUN of netfilter programs (the evictor), kernel BTF for the struct offsets. The hook
 * runs just after source NAT and names the source as it was before (origin.h): a pod's packets are
 * counted under the pod's own address, the NodePort hop this node's NAT made is the node's.
 *
 * Programs (one bcc module; the counting itself is count.h, shared by every mode):
 *   kzt_dispatch  attached by the two links (v4, v6). It only tail-calls progs[0], so an agent
 *                 upgrade swaps the counter with one atomic map update: no packet counted twice, none
 *                 missed.
 *   kzt_count     the counter: finds the skb's network header and hands it to kzt_count_packet.
 *   kzt_evict     run by the agent through BPF_PROG_TEST_RUN: kzt_evict_listed.
 *
 * Overhead: one 64-byte probe read, one hash lookup (12-byte key for IPv4, 36 for IPv6), two atomic
 * adds per packet, one tail call; no clock read except when a flow is inserted (the agent derives
 * idleness from unchanged counters). Measured by bench/datapath.py.
 */
#ifndef KZT_OFF_CTX_SKB
#error "KZT_OFF_* flags missing: this file is compiled by otel_kzt.agent.datapath"
#endif

#define KZT_NF_ACCEPT 1

/* bpf_probe_read_kernel() by its helper number. bcc turns every call spelled bpf_probe_read_kernel into
 * bpf_probe_read (which netfilter programs may not call) unless /proc/kallsyms shows it real addresses,
 * i.e. unless the loader holds CAP_SYSLOG and kernel.kptr_restrict < 2. Declaring the helper the way
 * bcc's own helpers.h does, under another name, escapes that rewrite: the agent needs no CAP_SYSLOG. */
static long (*kzt_read_kernel)(void *dst, u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_kernel;

#define KZT_LOAD(p, off, dst, size) kzt_read_kernel((dst), (size), (p)->l3 + (off))

#include "count.h"
#include "origin.h"

struct kzt_nf_ctx;  /* struct bpf_nf_ctx: only its skb pointer is read, at KZT_OFF_CTX_SKB */

int kzt_count(struct kzt_nf_ctx *ctx)
{
    char *skb = *(char **)((char *)ctx + KZT_OFF_CTX_SKB);
    u16 nh = *(u16 *)(skb + KZT_OFF_SKB_NH);
    struct kzt_pkt p = {};
    p.ctx = ctx;
    p.l3 = *(unsigned char **)(skb + KZT_OFF_SKB_HEAD) + nh;
    p.linear = *(u32 *)(skb + KZT_OFF_SKB_TAIL) - nh;  /* tail is an offset from head on 64-bit */
    p.len = *(u32 *)(skb + KZT_OFF_SKB_LEN);
    kzt_nf_origin(skb, &p);
    kzt_count_packet(&p);
    return KZT_NF_ACCEPT;
}

int kzt_dispatch(struct kzt_nf_ctx *ctx)
{
    progs.call(ctx, 0);
    return KZT_NF_ACCEPT;  /* no counter installed yet: accept, never drop */
}

/* A netfilter program must return a verdict, so the evictor's result travels through evict_count. */
int kzt_evict(struct kzt_nf_ctx *ctx)
{
    kzt_evict_listed();
    return KZT_NF_ACCEPT;
}
