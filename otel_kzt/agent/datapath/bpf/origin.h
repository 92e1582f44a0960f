/* otel-kzt `netfilter` mode: who sent a packet, by its path (DESIGN §3), for the flow key.
 *
 * The hook runs at POSTROUTING just after source NAT (NF_IP_PRI_NAT_SRC + 1), so it knows whether this
 * node's NAT rewrote a packet both ways, and takes the source as it was before NAT from conntrack:
 *
 *   origin    local when not forwarded (ip_forward() sets IPSKB_FORWARDED in IPCB, skb->cb; IPv6 sets
 *             its flag only for multicast, so there: a packet that came in on a device, IP6CB's iif,
 *             without a socket) and the packet has a socket (every packet the node's stack sends,
 *             kernel replies included, carries one). Forwarded, or neither (bridged through
 *             br_netfilter, a REJECT): 0, the agent decides by the addresses, as in the other modes.
 *   rewritten forwarded with a source neither the sender's (conntrack's tuple) nor this node's NAT's:
 *             IPVS's un-NAT of a reply to its VIP before POSTROUTING, a stateless rewrite. Not counted
 *             here: the backend's node counted it at its source.
 *   SNAT hop  forwarded, original direction, and conntrack says this node rewrote both the destination
 *             and the source address (IPS_DST_NAT and IPS_SRC_NAT, the source now not the one conntrack
 *             recorded): kube-proxy's NodePort / LoadBalancer hop with externalTrafficPolicy Cluster. The
 *             key keeps the source after SNAT (this node's address): the hop is the node's, and every
 *             outside client of one backend is one flow. IPS_SRC_NAT with the sender's own address is
 *             conntrack's clash resolution, not a masquerade: a pod's DNATed connection whose reply tuple
 *             an earlier connection still holds (the pod's direct connection to the same backend port from
 *             the same port, in TIME_WAIT) gets another source port. That is the pod's: pre-NAT below.
 *   pre-NAT   otherwise, when this node's NAT rewrote the source (SNAT in the original direction, the
 *             un-DNAT of a reply), the key gets the source (address and port) it had before: the original
 *             direction's tuple source, or the reply tuple's. A masqueraded pod stays the pod.
 *
 * ICMP errors (conntrack's RELATED) keep the source they carry. No conntrack, or an untracked packet: no
 * NAT happened here, the source is the packet's. Offsets from BTF (KZT_OFF_*); the IPSKB_* bits are
 * #defines of the kernel, stable since 2.6.
 */
#ifndef KZT_ORIGIN_H
#define KZT_ORIGIN_H

#include "flow.h"

#define KZT_IPSKB_FORWARDED 1   /* include/net/ip.h: BIT(0) */
#define KZT_IP6SKB_FORWARDED 2  /* include/linux/ipv6.h */
#define KZT_NFCT_INFOMASK 7UL
#define KZT_CT_RELATED 1
#define KZT_CT_IS_REPLY 3
#define KZT_CT_RELATED_REPLY 4
#define KZT_CT_UNTRACKED 7

/* Whether the packet's source address (now, after this node's SNAT; from the header prefix netfilter.c
 * read) is not the one the conntrack tuple at `recorded` holds (0 when that cannot be read: the source is
 * then taken as it is). */
static __always_inline int kzt_source_differs(const char *recorded, const struct kzt_pkt *p, int v6)
{
    u8 was[16] __attribute__((aligned(8)));
#ifdef KZT_BTF_NF_CONN
    ((u64 *)was)[0] = *(const u64 *)recorded;
    ((u64 *)was)[1] = *(const u64 *)(recorded + 8);
#else
    if (kzt_read_kernel(was, sizeof(was), recorded) < 0)
        return 0;
#endif
    const u8 *now = p->hdr + kzt_opaque(v6 ? 8 : 12);
    int differs = 0;
#pragma unroll
    for (int i = 0; i < 16; i++)
        if ((i < 4 || v6) && was[i] != now[i])
            differs = 1;
    return differs;
}

static __always_inline void kzt_nf_origin(char *skb, struct kzt_pkt *p)
{
    int v6 = (p->hdr[0] >> 4) == 6;
    int forwarded = 0;
    if (v6) {
        /* ip6_forward() sets no flag for unicast: a packet without a socket that came in on a device
         * (IP6CB's iif, 0 for what the stack builds) is routed through. */
        int iif = *(int *)(skb + KZT_OFF_SKB_CB + KZT_OFF_IP6CB_IIF);
        u16 flags = *(u16 *)(skb + KZT_OFF_SKB_CB + KZT_OFF_IP6CB_FLAGS);
        forwarded = (flags & KZT_IP6SKB_FORWARDED) || (iif && !*(u64 *)(skb + KZT_OFF_SKB_SK));
    } else {
        u16 flags = *(u16 *)(skb + KZT_OFF_SKB_CB + KZT_OFF_IPCB_FLAGS);
        forwarded = (flags & KZT_IPSKB_FORWARDED) != 0;
    }
    if (!forwarded && *(u64 *)(skb + KZT_OFF_SKB_SK))
        p->origin = KZT_ORIGIN_LOCAL;
#ifdef KZT_OFF_CT_STATUS
    u64 nfct = *(u64 *)(skb + KZT_OFF_SKB_NFCT);
    const char *ct = (const char *)(nfct & ~KZT_NFCT_INFOMASK);
    u32 info = nfct & KZT_NFCT_INFOMASK;
    if (!ct || info == KZT_CT_UNTRACKED || info == KZT_CT_RELATED || info == KZT_CT_RELATED_REPLY)
        return;
#ifdef KZT_BTF_NF_CONN
    ct = kzt_rdonly_cast(ct, KZT_BTF_NF_CONN);
    u64 status = *(const u64 *)(ct + KZT_OFF_CT_STATUS);
#else
    u64 status = 0;
    if (kzt_read_kernel(&status, sizeof(status), ct + KZT_OFF_CT_STATUS) < 0)
        return;
#endif
    int reply = info >= KZT_CT_IS_REPLY;
    u32 tuple = KZT_OFF_CT_TUPLE_SRC + (reply ? KZT_CT_TUPLEHASH_SIZE : 0);
    if (!reply && forwarded && (status & KZT_IPS_SRC_NAT) && (status & KZT_IPS_DST_NAT) &&
        kzt_source_differs(ct + tuple, p, v6)) {
        p->origin = KZT_ORIGIN_SNAT;
        return;
    }
    if (status & (reply ? KZT_IPS_DST_NAT : KZT_IPS_SRC_NAT)) {
#ifdef KZT_BTF_NF_CONN
        u64 addr[2] = {*(const u64 *)(ct + tuple), *(const u64 *)(ct + tuple + 8)};
        __builtin_memcpy(p->nat_src, addr, 16);
        u16 port = *(const u16 *)(ct + tuple + KZT_OFF_CT_MAN_PORT);
        p->nat_sport = bpf_ntohs(port);
        p->has_nat_src = 1;
#else
        u8 port[2];  /* nf_conntrack_man: the address (16 bytes), then the port (network order) */
        if (kzt_read_kernel(p->nat_src, sizeof(p->nat_src), ct + tuple) == 0 &&
            kzt_read_kernel(port, sizeof(port), ct + tuple + KZT_OFF_CT_MAN_PORT) == 0) {
            p->nat_sport = ((u16)port[0] << 8) | port[1];
            p->has_nat_src = 1;
        }
#endif
        return;
    }
    if (!forwarded)
        return;
    /* Forwarded, its source untouched by this node's NAT: one conntrack did not record was written by
     * something else (IPVS un-NATs a reply to its VIP before POSTROUTING): not the sender's address. */
    if (kzt_source_differs(ct + tuple, p, v6))
        p->origin = KZT_ORIGIN_REWRITTEN;
#endif
}

#endif
