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
 * Overhead: the 64-byte header prefix (read here once; origin.h and count.h parse it), the GSO fields
 * and, for a tracked forwarded packet, conntrack's status and tuple. What BTF lets the verifier check
 * (sk_buff's fields, skb->cb, the hook state) is read directly. The rest lies behind a number for the
 * verifier of older kernels (skb->head, skb->_nfct) and is read with plain loads where the kernel takes
 * them, else with probe reads (~10 ns each): KZT_DIRECT_MEM (Linux >= 6.17: skb->head is memory the
 * verifier lets us load from, fault-safe) for the header and skb_shared_info, KZT_KFUNC_RDONLY_CAST
 * (the kfunc bpf_rdonly_cast, Linux >= 6.2, which the verifier turns into a move) for conntrack's entry;
 * the loader probes both (netfilter.py). The flow's count (count.h: a packet of the CPU's last flow is
 * two plain adds to its slot on Linux >= 6.17, else one hash lookup, 12-byte key for IPv4, 36 for IPv6,
 * and two atomic adds), one tail call; no clock read except when a flow is inserted (the agent derives
 * idleness from unchanged counters). Measured by bench/datapath_overhead.py against an empty program at
 * the same hook (bench/datapath.md).
 */
#ifndef KZT_OFF_CTX_SKB
#error "KZT_OFF_* flags missing: this file is compiled by otel_kzt.agent.datapath"
#endif

#define KZT_NF_ACCEPT 1
#define KZT_NFPROTO_IPV6 10

/* bpf_probe_read_kernel() by its helper number. bcc turns every call spelled bpf_probe_read_kernel into
 * bpf_probe_read (which netfilter programs may not call) unless /proc/kallsyms shows it real addresses,
 * i.e. unless the loader holds CAP_SYSLOG and kernel.kptr_restrict < 2. Declaring the helper the way
 * bcc's own helpers.h does, under another name, escapes that rewrite: the agent needs no CAP_SYSLOG. */
static long (*kzt_read_kernel)(void *dst, u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_kernel;

#ifdef KZT_BTF_NF_CONN
/* bpf_rdonly_cast(obj, btf_id): `obj` as an untrusted pointer to the BTF type (conntrack's struct
 * nf_conn), whose fields are then plain fault-safe loads. bcc cannot call kfuncs: this is a helper call
 * to a placeholder number, which the loader rewrites into the kfunc call (kfunc.py). */
static const char *(*kzt_rdonly_cast)(const void *obj, u32 btf_id) = (void *)KZT_KFUNC_RDONLY_CAST;
#endif

#define KZT_LOAD(p, off, dst, size) kzt_read_kernel((dst), (size), (p)->l3 + (off))

#include "count.h"
#include "origin.h"

struct kzt_nf_ctx;  /* struct bpf_nf_ctx: its state and skb pointers are read (KZT_OFF_CTX_*) */

/* What count.h's kzt_wire needs to know what leaves: the output device's MTU (the stack fragments a
 * larger packet after this hook), skb_shared_info's GSO fields (read for every packet: a GSO packet may
 * be all linear, as a VM's through a tap is), and for a packet with more than its linear part
 * (reassembled by conntrack, a large local datagram) the size of the largest fragment conntrack's
 * reassembly recorded (IPCB/IP6CB frag_max_size in skb->cb). Offsets from BTF. */
static __always_inline void kzt_wire_info(struct kzt_nf_ctx *ctx, char *skb, u16 nh, struct kzt_pkt *p)
{
    char *state = *(char **)((char *)ctx + KZT_OFF_CTX_STATE);
    char *out = *(char **)(state + KZT_OFF_STATE_OUT);
    if (out)
        p->mtu = *(u32 *)(out + KZT_OFF_DEV_MTU);
    u32 end = *(u32 *)(skb + KZT_OFF_SKB_END); /* an offset from head on 64-bit */
    const unsigned char *shinfo = *(unsigned char **)(skb + KZT_OFF_SKB_HEAD) + end;
    u32 gso_size, segs = 0, type = 0;
#ifdef KZT_DIRECT_MEM
    gso_size = *(const u16 *)(shinfo + KZT_OFF_SHINFO_GSO_SIZE);
    if (gso_size) {
        segs = *(const u16 *)(shinfo + KZT_OFF_SHINFO_GSO_SIZE + 2);
        type = *(const u32 *)(shinfo + KZT_OFF_SHINFO_GSO_TYPE) | KZT_GSO_KNOWN;
    }
#else
    u16 gso[2]; /* gso_size, gso_segs: adjacent (checked against BTF) */
    if (kzt_read_kernel(gso, sizeof(gso), shinfo + KZT_OFF_SHINFO_GSO_SIZE) < 0)
        return;
    gso_size = gso[0];
    segs = gso[1];
    if (gso_size && kzt_read_kernel(&type, sizeof(type), shinfo + KZT_OFF_SHINFO_GSO_TYPE) == 0)
        type |= KZT_GSO_KNOWN;
#endif
    if (gso_size) {
        p->gso_size = gso_size;
        p->gso_segs = segs;
        p->gso_type = type;
        if (type & KZT_GSO_TUNNEL)
            p->inner_l4 = (u32)(*(u16 *)(skb + KZT_OFF_SKB_INNER_TH)) - nh;
        return;
    }
    if (p->len <= p->linear) /* reassembled packets and large local datagrams have a frag_list */
        return;
    if (*(u8 *)(state + KZT_OFF_STATE_PF) == KZT_NFPROTO_IPV6)
        p->frag_max = *(u16 *)(skb + KZT_OFF_SKB_CB + KZT_OFF_IP6CB_FRAG_MAX);
    else
        p->frag_max = *(u16 *)(skb + KZT_OFF_SKB_CB + KZT_OFF_IPCB_FRAG_MAX);
}

int kzt_count(struct kzt_nf_ctx *ctx)
{
    char *skb = *(char **)((char *)ctx + KZT_OFF_CTX_SKB);
    u16 nh = *(u16 *)(skb + KZT_OFF_SKB_NH);
    struct kzt_pkt p = {};
    p.ctx = ctx;
    p.l3 = *(unsigned char **)(skb + KZT_OFF_SKB_HEAD) + nh;
    p.linear = *(u32 *)(skb + KZT_OFF_SKB_TAIL) - nh;  /* tail is an offset from head on 64-bit */
    p.len = *(u32 *)(skb + KZT_OFF_SKB_LEN);
    u8 hdr[KZT_HDR_READ] __attribute__((aligned(8))); /* read once here: origin.h and count.h both parse it */
#ifdef KZT_DIRECT_MEM
    {
        /* Within the head buffer even for a shorter linear part: skb_shared_info follows `end` there. */
        const u64 *src = (const u64 *)p.l3;
        u64 *dst = (u64 *)hdr;
#pragma unroll
        for (int i = 0; i < 8; i++)
            dst[i] = src[i];
    }
#else
    if (kzt_read_kernel(hdr, sizeof(hdr), p.l3) < 0) {
        kzt_overflow(p.len, 1, KZT_STAT_READ_FAILED);
        return KZT_NF_ACCEPT;
    }
#endif
    p.hdr = hdr;
    kzt_nf_origin(skb, &p);
    kzt_wire_info(ctx, skb, nh, &p);
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
