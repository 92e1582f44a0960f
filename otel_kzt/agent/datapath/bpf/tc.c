/* otel-kzt `tc` mode: exact per-flow counters at the egress of the devices traffic leaves the node by.
 *
 * Requires: a kernel with clsact and BPF classifiers (any supported one); tcx links (Linux >= 6.6) let
 * the dispatcher run first, ahead of a CNI's programs, else it is a classic clsact filter. Runs after
 * netfilter (source NAT included) and after a CNI's eBPF routing hands the packet to the device, so it sees
 * what leaves the node whatever moved it there; same-node traffic never reaches these devices.
 *
 * Programs (one bcc module; the counting itself is count.h, shared by every mode):
 *   kzt_dispatch  attached to every hooked device. It only tail-calls progs[0] (an upgrade swaps the
 *                 counter atomically) and returns TC_ACT_UNSPEC, which tcx reads as TCX_NEXT: the
 *                 verdict stays with whatever runs after it (a CNI's program, the qdisc).
 *   kzt_count     the counter. On a device flagged KZT_DEV_INNER (no overlay device hooked) a VXLAN packet
 *                 to 4789 or 8472 is counted as its inner packet, the one with the pods' addresses,
 *                 behind up to two VLAN tags in the inner frame (802.1Q, QinQ: count.h's kzt_vxlan_ip);
 *                 one whose inner frame is not IP (the overlay's ARP; three tags) is not IP traffic.
 *   kzt_evict     run by the agent through BPF_PROG_TEST_RUN: kzt_evict_listed.
 *
 * One build serves every device: what differs between devices is read per packet from tcdev, the flags
 * the agent writes for a device before it hooks it (tc.py DeviceConfig): KZT_DEV_ETHER (the device frames
 * its packets in Ethernet: the fast path and the direct header copy may read behind 14 bytes) and
 * KZT_DEV_INNER (count VXLAN as its inner packets). A device with no flags (none written) takes the
 * helper's reads, right on any device, and counts VXLAN as it is. So a device of any kind is hooked while
 * the agent runs without compiling again (tcwatch.py).
 *
 * Overhead: the device's flags (one inlined array lookup: tcdev's slot of the ifindex). The common packet
 * (on an Ethernet device: IPv4 without options or IPv6 without extension headers, TCP or UDP, not GSO
 * unless TCP's) takes kzt_fast4 or kzt_fast6, which read the few fields of the key straight from the
 * packet, no copy of the header prefix and no helper, and add to the CPU's slot (bench/datapath.md,
 * sessions 26 and 28; -DKZT_TC_NO_FAST leaves them out, for the test). Every other packet: the 64-byte header
 * prefix, copied from the packet behind its Ethernet header where the device is an Ethernet device and
 * the frame bears it out (skb.h's kzt_skb_ether), else one skb load (two more for a packet shorter than
 * that), the flow's count (count.h: the CPU's slot, or one hash lookup and two atomic adds), one tail
 * call; with KZT_DEV_INNER the same load serves the VXLAN check (a VXLAN packet: a 10-byte load of its
 * inner EtherType and tags, and the inner packet's 64 bytes). Measured by bench/datapath_overhead.py.
 * Wire-exact: GSO packets are counted as their segments (count.h's kzt_wire, from __sk_buff's gso_size
 * and gso_segs; the GSO type is not readable here, so a tunnel's GSO is recognised by its VXLAN port);
 * fragments are made before this hook, so they are counted as they are.
 * Limits: p.len is the skb's length less the device's link header (14 bytes on an Ethernet device, else
 * none); count.h only falls back to it where the IP header gives no length (BIG TCP, which only Ethernet
 * devices do) and for an unreadable packet.
 */
#define KZT_TC_NEXT -1 /* TC_ACT_UNSPEC == TCX_NEXT: never a verdict of ours */
#define KZT_ETH_HLEN 14
#define KZT_ETH_P_IP 0x0800
#define KZT_ETH_P_IPV6 0x86DD

#define KZT_SKB_ETHER /* skb.h: the header prefix may be copied from behind an Ethernet header (ref.ether) */
#include "skb.h"
#include "count.h"

/* A hooked device's flags (tc.py DEV_*), by ifindex: in the array's slot ifindex % KZT_DEV_SLOTS when that
 * slot is the device's (`ifindex` says whose it is), else in tcdev_more (two hooked devices sharing a
 * slot). Pinned with the other maps: a counter adopted unchanged, or a new one, reads what the agent
 * wrote. */
#define KZT_DEV_ETHER 1
#define KZT_DEV_INNER 2
#define KZT_DEV_SLOTS 256
struct kzt_dev {
    u32 ifindex;
    u32 flags;
};
KZT_TABLE("array", u32, struct kzt_dev, tcdev, KZT_DEV_SLOTS);
KZT_TABLE("hash", u32, u32, tcdev_more, KZT_DEV_SLOTS);

static __always_inline u32 kzt_dev_flags(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex, slot = ifindex & (KZT_DEV_SLOTS - 1);
    struct kzt_dev *dev = tcdev.lookup(&slot);
    if (__builtin_expect(dev && dev->ifindex == ifindex, 1))
        return dev->flags;
    u32 *more = tcdev_more.lookup(&ifindex);
    return more ? *more : 0;
}

/* VXLAN, from the outer header prefix: outer IP, UDP (8) to one of the ports; returns the offset of the
 * VXLAN payload's Ethernet header (after the 8-byte VXLAN header) or 0. */
static __always_inline u32 kzt_vxlan_eth(const u8 *o)
{
    u32 l4 = 0;
    if ((o[0] >> 4) == 4 && o[9] == 17)
        l4 = (o[0] & 0x0F) * 4;
    else if ((o[0] >> 4) == 6 && o[6] == 17)
        l4 = 40;
    if (l4 == 0 || l4 > 40)
        return 0;
    u16 dport = ((u16)o[(l4 + 2) & 63] << 8) | o[(l4 + 3) & 63];
    if (dport != KZT_VXLAN_IANA && dport != KZT_VXLAN_LINUX)
        return 0;
    return l4 + 8 + 8;
}

#ifndef KZT_TC_NO_FAST
#define KZT_TC_FAST
/* The common case, read straight from the packet with no copy of the header prefix: an IPv4 packet
 * without options in an Ethernet frame whose EtherType and IP length bear out that its network header is
 * 14 bytes in (as skb.h's kzt_skb_ether), not a later fragment, TCP or UDP with its ports in the linear
 * part, not a GSO packet unless TCP's (its header length in the linear part too), and (KZT_DEV_INNER) not
 * to a VXLAN port. It builds the key, bytes and packets count.h's kzt_count_packet would (no origin, no
 * source before NAT in tc; kzt_wire's TCP GSO rule) and adds them the same way. 0: not such a packet,
 * nothing counted; the full path takes it. Only for a device flagged KZT_DEV_ETHER. */
static __always_inline int kzt_fast4(struct __sk_buff *skb, u32 dev)
{
    const u8 *data = (const u8 *)(long)skb->data;
    const u8 *ip = data + KZT_ETH_HLEN;
    if ((const void *)(ip + 24) > (const void *)(long)skb->data_end)
        return 0;
    if (*(const u16 *)(data + 12) != bpf_htons(KZT_ETH_P_IP) || ip[0] != 0x45)
        return 0;
    u32 l3len = ((u32)ip[2] << 8) | ip[3];
    u8 proto = ip[9];
    if (l3len != skb->len - KZT_ETH_HLEN || ((ip[6] & 0x1F) | ip[7]) || (proto != 6 && proto != 17))
        return 0;
    u32 ports = *(const u32 *)(ip + 20); /* network order: the verifier lets x86 load unaligned */
    u16 sport = bpf_ntohs((u16)ports), dport = bpf_ntohs((u16)(ports >> 16));
    if (proto == 17 && (dev & KZT_DEV_INNER) && (dport == KZT_VXLAN_IANA || dport == KZT_VXLAN_LINUX))
        return 0;
    u64 bytes = l3len, packets = 1;
    u32 gso_size = skb->gso_size;
    if (__builtin_expect(gso_size != 0, 0)) {
        if (proto != 6 || (const void *)(ip + 33) > (const void *)(long)skb->data_end)
            return 0;
        packets = kzt_gso_wire(&bytes, 20 + (u32)(ip[32] >> 4) * 4, gso_size, skb->gso_segs);
    }
    struct flow_key4 key = {};
    key.proto = proto;
    *(u32 *)key.src = *(const u32 *)(ip + 12);
    *(u32 *)key.dst = *(const u32 *)(ip + 16);
    kzt_set_port(&key.port_side, &key.port, sport, dport);
    KZT_ADD4(&key, bytes, packets);
    return 1;
}

/* kzt_fast4's IPv6 twin: a 40-byte IPv6 header with no extension header (next header TCP or UDP) in an
 * Ethernet frame whose EtherType and payload length bear out that its network header is 14 bytes in (a
 * jumbogram's length 0 does not), the ports in the linear part, not a GSO packet unless TCP's, and
 * (KZT_DEV_INNER) not to a VXLAN port. The key, bytes and packets count.h's kzt_count_packet would build
 * (kzt_wire's TCP GSO rule: hlen = 40 + doff * 4), added the same way. 0: the full path takes it. */
static __always_inline int kzt_fast6(struct __sk_buff *skb, u32 dev)
{
    const u8 *data = (const u8 *)(long)skb->data;
    const u8 *ip = data + KZT_ETH_HLEN;
    if ((const void *)(ip + 44) > (const void *)(long)skb->data_end)
        return 0;
    if (*(const u16 *)(data + 12) != bpf_htons(KZT_ETH_P_IPV6) || (ip[0] >> 4) != 6)
        return 0;
    u32 l3len = 40 + (((u32)ip[4] << 8) | ip[5]);
    u8 proto = ip[6];
    if (l3len != skb->len - KZT_ETH_HLEN || (proto != 6 && proto != 17))
        return 0;
    u32 ports = *(const u32 *)(ip + 40);
    u16 sport = bpf_ntohs((u16)ports), dport = bpf_ntohs((u16)(ports >> 16));
    if (proto == 17 && (dev & KZT_DEV_INNER) && (dport == KZT_VXLAN_IANA || dport == KZT_VXLAN_LINUX))
        return 0;
    u64 bytes = l3len, packets = 1;
    u32 gso_size = skb->gso_size;
    if (__builtin_expect(gso_size != 0, 0)) {
        if (proto != 6 || (const void *)(ip + 53) > (const void *)(long)skb->data_end)
            return 0;
        packets = kzt_gso_wire(&bytes, 40 + (u32)(ip[52] >> 4) * 4, gso_size, skb->gso_segs);
    }
    struct flow_key6 key = {};
    key.proto = proto;
    const u32 *addr = (const u32 *)(ip + 8); /* source, then destination: 8 words */
    u32 *src = (u32 *)key.src, *dst = (u32 *)key.dst;
    src[0] = addr[0], src[1] = addr[1], src[2] = addr[2], src[3] = addr[3];
    dst[0] = addr[4], dst[1] = addr[5], dst[2] = addr[6], dst[3] = addr[7];
    kzt_set_port(&key.port_side, &key.port, sport, dport);
    KZT_ADD6(&key, bytes, packets);
    return 1;
}
#endif

int kzt_count(struct __sk_buff *skb)
{
    u32 dev = kzt_dev_flags(skb);
#ifdef KZT_TC_FAST
    if (dev & KZT_DEV_ETHER) {
        if (skb->protocol == bpf_htons(KZT_ETH_P_IP)) {
            if (kzt_fast4(skb, dev))
                return KZT_TC_NEXT;
        } else if (skb->protocol == bpf_htons(KZT_ETH_P_IPV6) && kzt_fast6(skb, dev)) {
            return KZT_TC_NEXT;
        }
    }
#endif
    if (skb->protocol != bpf_htons(KZT_ETH_P_IP) && skb->protocol != bpf_htons(KZT_ETH_P_IPV6)) {
        kzt_stat(KZT_STAT_NOT_IP); /* ARP, LLDP ...: not IP traffic */
        return KZT_TC_NEXT;
    }
    struct kzt_skb_ref ref = {skb, 0, dev & KZT_DEV_ETHER};
    struct kzt_pkt p = {};
    p.ctx = &ref;
    p.linear = 0xFFFF; /* kzt_skb_load reads only from the linear part itself */
    u32 link = (dev & KZT_DEV_ETHER) ? KZT_ETH_HLEN : 0; /* the link header skb->len holds */
    p.len = skb->len > link ? skb->len - link : skb->len;
    p.gso_size = skb->gso_size; /* egress runs before the stack segments: count the segments (count.h) */
    p.gso_segs = skb->gso_segs;
    /* KZT_DEV_INNER: one read of the header prefix serves both the VXLAN check and the count (count.h's
     * p.hdr). A VXLAN packet's headers to its inner IP header are more than 64 bytes, in the linear
     * part: one whose prefix cannot be read whole is no VXLAN packet count.h could parse inside. */
    u8 hdr[KZT_HDR_READ] __attribute__((aligned(8)));
    if ((dev & KZT_DEV_INNER) && kzt_skb_prefix(&ref, hdr) == 0) {
        p.hdr = hdr;
        u32 eth = kzt_vxlan_eth(hdr);
        if (eth) {
            u32 inner = kzt_vxlan_ip(&p, eth);
            if (inner == 0) {
                kzt_stat(KZT_STAT_NOT_IP); /* the overlay's own ARP: no pod's IP traffic */
                return KZT_TC_NEXT;
            }
            ref.base = inner;
            p.hdr = 0;
            p.len = p.len > inner ? p.len - inner : 0;
        }
    }
    kzt_count_packet(&p);
    return KZT_TC_NEXT;
}

int kzt_dispatch(struct __sk_buff *skb)
{
    progs.call(skb, 0);
    return KZT_TC_NEXT; /* no counter installed yet: the packet goes on untouched */
}

int kzt_evict(struct __sk_buff *skb)
{
    kzt_evict_listed();
    return KZT_TC_NEXT;
}
