/* otel-kzt `cgroup` mode: exact per-flow counters at socket egress of a cgroup v2 subtree.
 *
 * Requires: cgroup v2 (on hybrid hosts at /sys/fs/cgroup/unified), BPF_LINK_CREATE for cgroup programs
 * (Linux >= 5.7). Every socket below the cgroup root (pods' and the host's) passes here once per packet
 * it sends, before the packet meets netfilter's NAT of the node or a CNI's eBPF routing: the source is
 * the sender's own address whatever happens afterwards. Destinations are what the socket addressed (a
 * Service VIP unless the CNI balances at the socket). Packets without a full socket (forwarded hops,
 * kernel RSTs and SYN-cookie answers, request-socket SYN-ACKs before Linux 6.6) never pass here.
 *
 * Programs (one bcc module; the counting itself is count.h, shared by every mode):
 *   kzt_dispatch  attached by the cgroup link; tail-calls progs[0] and always allows the packet.
 *   kzt_count     the counter; loopback (ifindex 1 in every network namespace) is skipped: app ->
 *                 sidecar -> backend is one flow on the wire.
 *   kzt_evict     run by the agent through BPF_PROG_TEST_RUN: kzt_evict_listed.
 *
 * Wire-exact: GSO packets (TCP, UDP_SEGMENT) are counted as their segments, from __sk_buff's gso_size
 * and gso_segs (count.h's kzt_wire). Not here: a datagram larger than the path MTU, which the stack
 * fragments after this hook, is one packet (the program cannot read the route's MTU).
 *
 * Overhead: the 64-byte header copied directly from the packet (skb->data is the network header here:
 * no helper call), the flow's count (count.h: a packet of the CPU's last flow is two plain adds to its
 * slot, another one hash lookup and two atomic adds), one tail call per packet sent.
 */
#define KZT_CG_ALLOW 1
#define KZT_LOOPBACK_IFINDEX 1

#define KZT_SKB_DATA_AT_NET 1 /* the kernel pushes skb->data to the network header for us */
#include "skb.h"
#include "count.h"

int kzt_count(struct __sk_buff *skb)
{
    if (skb->ifindex == KZT_LOOPBACK_IFINDEX)
        return KZT_CG_ALLOW;
    struct kzt_skb_ref ref = {skb, 0};
    struct kzt_pkt p = {};
    p.ctx = &ref;
    p.linear = 0xFFFF; /* kzt_skb_load reads only from the linear part itself */
    p.len = skb->len;  /* the packet starts at its IP header here */
    p.gso_size = skb->gso_size; /* a socket's GSO packet: counted as its segments (count.h) */
    p.gso_segs = skb->gso_segs;
    kzt_count_packet(&p);
    return KZT_CG_ALLOW;
}

int kzt_dispatch(struct __sk_buff *skb)
{
    progs.call(skb, 0);
    return KZT_CG_ALLOW; /* never drop */
}

int kzt_evict(struct __sk_buff *skb)
{
    kzt_evict_listed();
    return KZT_CG_ALLOW;
}
