/* otel-kzt: the counting shared by every datapath mode (the mode's entry file includes it).
 *
 * What lives here: the maps (flows4/6, overflow, stats, progs, meta, dying4/6, the evictor's command),
 * key building (only the listening side's port; ephemeral ports never enter a key; the origin and the
 * source before NAT when the entry file knows them, `struct kzt_pkt`), counting with the
 * overflow bucket when the map is full, the dying entries of flows being evicted, and the evictor's body.
 * Nothing here knows where the packet was seen: the entry file fills a `struct kzt_pkt` and defines
 *
 *   KZT_LOAD(p, off, dst, size)   copy `size` bytes of the packet at `off` from its network header;
 *                                  < 0 on failure (netfilter: a kernel probe read; tc: bpf_skb_load_bytes)
 *
 * before including this file. Every kernel offset comes from the running kernel's BTF as -D flags
 * (KZT_OFF_*); configuration too (KZT_MAP_SIZE, KZT_EPH_MIN/MAX, KZT_EVICT_BATCH, KZT_DYING_SIZE,
 * KZT_PIN_DIR when pinning).
 *
 * Eviction: the agent lists flows in evict_keys4/6 and test-runs the evictor, which marks them dead.
 * Packets that still reach a dead (or just deleted) flow go to its dying4/6 entry; the agent reads the
 * final value after one RCU grace period, deletes the flow, and adds the dying entry after a second
 * one: no packet lost, none counted twice.
 *
 * Write-combining (KZT_WC: where every run stays on its CPU and the agent can run a program on a chosen
 * CPU, probe.py; else each packet goes to the map as below): each CPU keeps its last
 * flow's counts in a per-CPU slot (slot4/6) and adds them to the flow map, with the usual lookup and two
 * atomic adds, only when a packet of another flow comes, or when the agent runs kzt_flush on that CPU
 * (before every read and in every eviction, flowtables.py). A packet of the slot's flow takes the slot
 * with one exchange on a word only its CPU touches and adds with two plain adds: no hash lookup (netfilter
 * UDP: ~33 ns over an empty program instead of ~62, bench/datapath.md). A run that interrupts or preempts
 * another inside the slot (a softirq over a process-context hook, the agent's flush as an IPI) finds it
 * busy and counts in the map itself, and kzt_flush reports busy to be retried: the map only
 * ever grows by what was counted, so a read never counts a packet twice, totals never go back, and after
 * the flushes a read holds every packet counted before them. The evictor's protocol is unchanged: a
 * flushed slot of a dead flow goes to its dying entry, as a late packet does.
 *
 * Wire-exact (kzt_wire): a packet counts as what leaves for it. A GSO packet is its segments (gso_segs,
 * or its payload over gso_size where the stack left the count unset, SKB_GSO_DODGY), its bytes its
 * length plus the headers every further segment repeats: IP (IPv4 options, IPv6 extension headers) and
 * TCP with options or UDP (UDP GSO); for tunnel GSO everything up to the inner L4 header. A packet the
 * stack fragments after the hook (netfilter: larger than the output device's MTU, or reassembled by
 * conntrack and cut again at its original fragment size) is its fragments, each with its own IP header
 * (IPv6: the unfragmentable part and a fragment header). The entry file says what it knows in
 * `struct kzt_pkt`; what a mode cannot know is left 0 there (see each entry file).
 *
 * Limits: IPv6 walks at most KZT_MAX_EXT extension headers; ports are read only from the linear part of
 * the packet, else the flow is keyed without a port.
 */
#ifndef KZT_COUNT_H
#define KZT_COUNT_H

#include "flow.h"

#ifndef KZT_LOAD
#error "define KZT_LOAD(p, off, dst, size) before including count.h"
#endif

#define KZT_HDR_READ 64
#define KZT_MAX_EXT 6

/* One packet as the entry file sees it. */
struct kzt_pkt {
    void *ctx;                 /* the program's context, for KZT_LOAD */
    const unsigned char *l3;   /* the network header, where the mode reads kernel memory (else 0) */
    const u8 *hdr;             /* its KZT_HDR_READ-byte prefix, when the entry file read it already (else 0) */
    u32 linear;                /* bytes after the network header in the linear area */
    u32 len;                   /* the packet's length from its network header (BIG TCP, jumbograms) */
    u8 origin;                 /* KZT_ORIGIN_*: how the packet came here (0: this mode cannot tell) */
    u8 has_nat_src;            /* nat_src/nat_sport hold the source as it was before this node's NAT */
    u16 nat_sport;             /* host order; taken only for protocols with ports */
    u8 nat_src[16];
    /* What leaves for it (kzt_wire); 0 where the mode does not know. */
    u32 gso_size;              /* payload bytes per segment; 0: not a GSO packet */
    u32 gso_segs;              /* segments; 0 where the stack left it unset (SKB_GSO_DODGY) */
    u32 gso_type;              /* SKB_GSO_* bits (KZT_GSO_KNOWN set when the mode read them) */
    u32 inner_l4;              /* tunnel GSO: bytes from the network header to the inner L4 header */
    u32 mtu;                   /* netfilter: the output device's MTU (fragmentation after the hook) */
    u32 frag_max;              /* netfilter: conntrack's reassembly recorded the largest fragment */
};

/* SKB_GSO_* bits from the kernel's BTF (-D flags); KZT_GSO_KNOWN marks gso_type as read. */
#define KZT_GSO_KNOWN (1u << 31)
#define KZT_GSO_TUNNEL (KZT_GSO_GRE | KZT_GSO_GRE_CSUM | KZT_GSO_IPXIP4 | KZT_GSO_IPXIP6 | \
                        KZT_GSO_UDP_TUNNEL | KZT_GSO_UDP_TUNNEL_CSUM)
#define KZT_VXLAN_IANA 4789
#define KZT_VXLAN_LINUX 8472

#ifdef KZT_PIN_DIR
#define KZT_TABLE(type, k, v, name, n) BPF_TABLE_PINNED(type, k, v, name, n, KZT_PIN_DIR "/" #name)
#else
#define KZT_TABLE(type, k, v, name, n) BPF_TABLE(type, k, v, name, n)
#endif

KZT_TABLE("hash", struct flow_key4, struct flow_value4, flows4, KZT_MAP_SIZE);
KZT_TABLE("hash", struct flow_key6, struct flow_value6, flows6, KZT_MAP_SIZE);
KZT_TABLE("percpu_array", u32, struct overflow_value, overflow, 1);
KZT_TABLE("percpu_array", u32, u64, stats, KZT_STAT_MAX);
KZT_TABLE("prog", u32, u32, progs, 1);
KZT_TABLE("array", u32, u64, meta, 8);  /* the loader's records (loader.py META_*) */
/* Private to one agent process: the evictor's command. */
/* Packets of flows being evicted (marked dead, or already deleted while a program still held them):
 * the agent adds them to the flow's final value after a second grace period. */
KZT_TABLE("hash", struct flow_key4, struct overflow_value, dying4, KZT_DYING_SIZE);
KZT_TABLE("hash", struct flow_key6, struct overflow_value, dying6, KZT_DYING_SIZE);
/* Each CPU's write-combining slot (always made and pinned, so that a build with KZT_WC and one without
 * share one layout; used with KZT_WC only). */
KZT_TABLE("percpu_array", u32, struct kzt_slot4, slot4, 1);
KZT_TABLE("percpu_array", u32, struct kzt_slot6, slot6, 1);
BPF_ARRAY(evict_keys4, struct flow_key4, KZT_EVICT_BATCH);
BPF_ARRAY(evict_keys6, struct flow_key6, KZT_EVICT_BATCH);
BPF_ARRAY(evict_count, u32, 3);  /* [0] IPv4 keys listed, [1] IPv6 keys listed (in); [2] marked (out) */

static __always_inline void kzt_stat(u32 index)
{
    u64 *n = stats.lookup(&index);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* Atomic even per CPU: a softirq may interrupt a process-context hook on the same CPU. */
static __always_inline void kzt_overflow(u64 bytes, u64 packets, u32 why)
{
    u32 zero = 0;
    struct overflow_value *o = overflow.lookup(&zero);
    if (o) {
        __sync_fetch_and_add(&o->bytes, bytes);
        __sync_fetch_and_add(&o->packets, packets);
    }
    kzt_stat(why);
}

/* A value clang cannot see through (an empty asm), for offsets into stack buffers: clang may otherwise
 * fold them into forms the verifier refuses, an OR on a pointer whose alignment it knows, or drop a
 * mask it proves redundant after a range check (the verifier may not follow that check through a
 * register copy, and then sees a read of unbounded stack). */
static __always_inline u32 kzt_opaque(u32 value)
{
    asm volatile("" : "+r"(value));
    return value;
}

/* An offset into the header prefix whose bound the verifier sees. */
static __always_inline u32 kzt_hdr_index(u32 off)
{
    return kzt_opaque(off) & (KZT_HDR_READ - 1);
}

static __always_inline int kzt_is_ephemeral(u16 port)
{
    return port >= KZT_EPH_MIN && port <= KZT_EPH_MAX;
}

/* Keep the listening side's port: the one outside the ephemeral range. When both are outside it,
 * keep the lower one (on a tie, the destination's); when both are ephemeral, or 0, keep none. */
static __always_inline void kzt_set_port(u8 *side, u16 *port, u16 sport, u16 dport)
{
    int s_listen = sport && !kzt_is_ephemeral(sport);
    int d_listen = dport && !kzt_is_ephemeral(dport);
    if (s_listen && (!d_listen || sport < dport)) {
        *side = KZT_PORT_SRC;
        *port = sport;
    } else if (d_listen) {
        *side = KZT_PORT_DST;
        *port = dport;
    }
}

static __always_inline int kzt_has_ports(u8 proto)
{
    return proto == 6 /* TCP */ || proto == 17 /* UDP */ || proto == 132 /* SCTP */ || proto == 136 /* UDP-Lite */;
}

static __always_inline int kzt_eq4(const struct flow_key4 *a, const struct flow_key4 *b)
{
    const u32 *x = (const u32 *)a, *y = (const u32 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

static __always_inline int kzt_eq6(const struct flow_key6 *a, const struct flow_key6 *b)
{
    const u32 *x = (const u32 *)a, *y = (const u32 *)b;
#pragma unroll
    for (int i = 0; i < 9; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

/* Add to a live element. False when it is being evicted, or when the element was deleted and reused
 * for another key between our lookup and now (hash elements are recycled at once). */
#define KZT_ACCOUNT(v, key, eq, bytes, packets)                          \
    ((*(volatile u32 *)&(v)->dead || !eq(&(v)->key, key)) ? 0 :          \
     (__sync_fetch_and_add(&(v)->bytes, bytes), __sync_fetch_and_add(&(v)->packets, packets), 1))

/* A packet of a flow being evicted goes to its dying entry (the overflow bucket if that map is full).
 * (bcc allows no map calls inside macros: one function per family.) */
static __always_inline void kzt_dying_add(struct overflow_value *d, u64 bytes, u64 packets)
{
    __sync_fetch_and_add(&d->bytes, bytes);
    __sync_fetch_and_add(&d->packets, packets);
    kzt_stat(KZT_STAT_EVICT_RACE);
}

static __always_inline void kzt_dying4(struct flow_key4 *key, u64 bytes, u64 packets)
{
    struct overflow_value first = {bytes, packets};
    struct overflow_value *d = dying4.lookup(key);
    if (d) {
        kzt_dying_add(d, bytes, packets);
    } else if (dying4.insert(key, &first) == 0) {
        kzt_stat(KZT_STAT_EVICT_RACE);
    } else if ((d = dying4.lookup(key))) {
        kzt_dying_add(d, bytes, packets);
    } else {
        kzt_overflow(bytes, packets, KZT_STAT_EVICT_RACE);
    }
}

static __always_inline void kzt_dying6(struct flow_key6 *key, u64 bytes, u64 packets)
{
    struct overflow_value first = {bytes, packets};
    struct overflow_value *d = dying6.lookup(key);
    if (d) {
        kzt_dying_add(d, bytes, packets);
    } else if (dying6.insert(key, &first) == 0) {
        kzt_stat(KZT_STAT_EVICT_RACE);
    } else if ((d = dying6.lookup(key))) {
        kzt_dying_add(d, bytes, packets);
    } else {
        kzt_overflow(bytes, packets, KZT_STAT_EVICT_RACE);
    }
}

#define KZT_EEXIST 17

static __always_inline void kzt_count4(struct flow_key4 *key, u64 bytes, u64 packets)
{
    struct flow_value4 *v = flows4.lookup(key);
    if (!v) {
        struct flow_value4 init = {};
        init.bytes = bytes;
        init.packets = packets;
        init.first_seen_ns = bpf_ktime_get_boot_ns();
        init.key = *key;
        int err = flows4.insert(key, &init);  /* BPF_NOEXIST: fails when full or another CPU won */
        if (err == 0)
            return;
        v = flows4.lookup(key);
        if (!v) {
            /* Full; or it existed a moment ago and was just deleted: an eviction in progress. */
            if (err == -KZT_EEXIST)
                kzt_dying4(key, bytes, packets);
            else
                kzt_overflow(bytes, packets, KZT_STAT_INSERT_FAILED);
            return;
        }
    }
    if (!KZT_ACCOUNT(v, key, kzt_eq4, bytes, packets))
        kzt_dying4(key, bytes, packets);
}

static __always_inline void kzt_count6(struct flow_key6 *key, u64 bytes, u64 packets)
{
    struct flow_value6 *v = flows6.lookup(key);
    if (!v) {
        struct flow_value6 init = {};
        init.bytes = bytes;
        init.packets = packets;
        init.first_seen_ns = bpf_ktime_get_boot_ns();
        init.key = *key;
        int err = flows6.insert(key, &init);
        if (err == 0)
            return;
        v = flows6.lookup(key);
        if (!v) {
            if (err == -KZT_EEXIST)
                kzt_dying6(key, bytes, packets);
            else
                kzt_overflow(bytes, packets, KZT_STAT_INSERT_FAILED);
            return;
        }
    }
    if (!KZT_ACCOUNT(v, key, kzt_eq6, bytes, packets))
        kzt_dying6(key, bytes, packets);
}

/* Take a CPU's slot: one exchange, so that a run that interrupts or preempts another between its test
 * and its set cannot share the slot with it. False: another run on this CPU holds it. */
static __always_inline int kzt_slot_enter(u64 *busy)
{
    return __sync_lock_test_and_set(busy, 1) == 0;
}

/* Give the slot back; the empty asm keeps the compiler from moving the slot's updates past it. Only
 * this CPU's runs touch its slot (programs run pinned to a CPU, and the agent's kzt_flush runs on it),
 * and a CPU sees its own stores in order. */
static __always_inline void kzt_slot_leave(u64 *busy)
{
    asm volatile("" ::: "memory");
    *(volatile u64 *)busy = 0;
}

/* The slot's flow continues: two plain adds. Another flow: the slot's counts go to the map first. A run
 * that finds the slot busy interrupted or preempted another on this CPU: it counts in the map itself. (One function
 * per family: bcc allows no map calls inside macros.) */
static __always_inline void kzt_combine4(struct flow_key4 *key, u64 bytes, u64 packets)
{
    u32 zero = 0;
    struct kzt_slot4 *s = slot4.lookup(&zero);
    if (!s || !kzt_slot_enter(&s->busy)) {
        kzt_count4(key, bytes, packets);
        return;
    }
    if (s->packets && kzt_eq4(&s->key, key)) {
        s->bytes += bytes;
        s->packets += packets;
    } else {
        if (s->packets)
            kzt_count4(&s->key, s->bytes, s->packets);
        s->key = *key;
        s->bytes = bytes;
        s->packets = packets;
    }
    kzt_slot_leave(&s->busy);
}

static __always_inline void kzt_combine6(struct flow_key6 *key, u64 bytes, u64 packets)
{
    u32 zero = 0;
    struct kzt_slot6 *s = slot6.lookup(&zero);
    if (!s || !kzt_slot_enter(&s->busy)) {
        kzt_count6(key, bytes, packets);
        return;
    }
    if (s->packets && kzt_eq6(&s->key, key)) {
        s->bytes += bytes;
        s->packets += packets;
    } else {
        if (s->packets)
            kzt_count6(&s->key, s->bytes, s->packets);
        s->key = *key;
        s->bytes = bytes;
        s->packets = packets;
    }
    kzt_slot_leave(&s->busy);
}

/* Empty this CPU's slots into the maps; 1 when a slot was busy (the agent runs it again). */
static __always_inline int kzt_flush_slot4(void)
{
    u32 zero = 0;
    struct kzt_slot4 *s = slot4.lookup(&zero);
    if (!s)
        return 0;
    if (!kzt_slot_enter(&s->busy))
        return 1;
    if (s->packets) {
        kzt_count4(&s->key, s->bytes, s->packets);
        s->bytes = 0;
        s->packets = 0;
    }
    kzt_slot_leave(&s->busy);
    return 0;
}

static __always_inline int kzt_flush_slot6(void)
{
    u32 zero = 0;
    struct kzt_slot6 *s = slot6.lookup(&zero);
    if (!s)
        return 0;
    if (!kzt_slot_enter(&s->busy))
        return 1;
    if (s->packets) {
        kzt_count6(&s->key, s->bytes, s->packets);
        s->bytes = 0;
        s->packets = 0;
    }
    kzt_slot_leave(&s->busy);
    return 0;
}

#ifdef KZT_WC
#define KZT_ADD4 kzt_combine4
#define KZT_ADD6 kzt_combine6
#else
#define KZT_ADD4 kzt_count4
#define KZT_ADD6 kzt_count6
#endif

/* Walks IPv6 extension headers from byte 40; returns the L4 offset, sets *proto and *later, and *unfrag
 * to the end of the part a fragmenting stack repeats in every fragment (hop-by-hop, routing headers). */
static __always_inline u32 kzt_walk_v6(const struct kzt_pkt *p, u8 *proto, int *later, u32 *unfrag)
{
    u32 off = 40;
#pragma unroll
    for (int i = 0; i < KZT_MAX_EXT; i++) {
        u8 nexthdr = *proto;
        if (nexthdr != 0 && nexthdr != 43 && nexthdr != 60 && nexthdr != 44 && nexthdr != 51)
            break;
        u8 eh[4];
        if (KZT_LOAD(p, off, eh, sizeof(eh)) < 0)
            break;
        *proto = eh[0];
        if (nexthdr == 44) {  /* fragment: fixed 8 bytes, offset in the upper 13 bits of bytes 2-3 */
            if (((eh[2] << 8) | eh[3]) & 0xFFF8)
                *later = 1;
            off += 8;
        } else if (nexthdr == 51) {  /* AH: length in 4-byte units, minus 2 */
            off += ((u32)eh[1] + 2) * 4;
        } else {
            off += ((u32)eh[1] + 1) * 8;
            if (nexthdr != 60)
                *unfrag = off;
        }
    }
    return off;
}

/* The length of the L4 header every segment repeats: TCP's data offset (options included), UDP's 8;
 * 0 when not known. From the header prefix when it holds it (a GSO packet's headers are always in its
 * linear part), else one read of its own. */
static __always_inline u32 kzt_l4_len(const struct kzt_pkt *p, const u8 *hdr, u32 l4off, u8 proto)
{
    if (proto == 17 || proto == 136)
        return 8;
    if (proto != 6)
        return 0;
    u8 doff;
    if (l4off + 12 < KZT_HDR_READ)
        doff = hdr[kzt_hdr_index(l4off + 12)];
    else if (KZT_LOAD(p, l4off + 12, &doff, 1) < 0)
        return 0;
    return (u32)(doff >> 4) * 4;
}

/* A VXLAN payload's Ethernet header at `eth`: the offset of the inner IP header after it and up to two
 * VLAN tags (802.1Q 0x8100; QinQ: an 802.1ad 0x88A8 or 802.1Q outer tag before a 802.1Q one); 0 where
 * the frame carries something else (ARP, a third tag, MPLS). */
static __always_inline u32 kzt_vxlan_ip(const struct kzt_pkt *p, u32 eth)
{
    u8 t[10]; /* EtherType, then (tagged) TCI and EtherType twice */
    if (KZT_LOAD(p, eth + 12, t, sizeof(t)) < 0)
        return 0;
    u16 type = ((u16)t[0] << 8) | t[1];
    u32 off = eth + 14;
    if (type == 0x8100 || type == 0x88A8) {
        type = ((u16)t[4] << 8) | t[5];
        off += 4;
        if (type == 0x8100) {
            type = ((u16)t[8] << 8) | t[9];
            off += 4;
        }
    }
    return (type == 0x0800 || type == 0x86DD) ? off : 0;
}

/* Where the mode cannot read the GSO type (tc, cgroup): a GSO packet to a VXLAN port is a tunnel's;
 * returns the inner L4 header's offset (0: not VXLAN) and sets *proto to the inner protocol. */
static __always_inline u32 kzt_vxlan_l4(const struct kzt_pkt *p, u32 l4off, u8 *proto)
{
    u8 udp[4];
    if (KZT_LOAD(p, l4off, udp, sizeof(udp)) < 0)
        return 0;
    u16 dport = ((u16)udp[2] << 8) | udp[3];
    if (dport != KZT_VXLAN_IANA && dport != KZT_VXLAN_LINUX)
        return 0;
    u32 inner = kzt_vxlan_ip(p, l4off + 8 + 8); /* UDP, VXLAN, inner Ethernet (and tags) */
    if (inner == 0)
        return 0;
    u8 ip[10];
    if (KZT_LOAD(p, inner, ip, sizeof(ip)) < 0)
        return 0;
    if ((ip[0] >> 4) == 4) {
        *proto = ip[9];
        return inner + (ip[0] & 0x0F) * 4;
    }
    *proto = ip[6];
    return inner + 40;
}

/* A GSO packet's segments, and its bytes on the wire (in *bytes: its IP length on entry): each segment
 * repeats the `hlen` bytes of headers. `segs` 0 (unset by the stack) is derived from the payload over
 * `gso_size`. The one statement of the rule, for kzt_wire and tc's fast paths. */
static __always_inline u64 kzt_gso_wire(u64 *bytes, u32 hlen, u32 gso_size, u64 segs)
{
    if (segs == 0)
        segs = *bytes <= hlen ? 1 : (*bytes - hlen + gso_size - 1) / gso_size;
    if (segs <= 1)
        return 1;
    *bytes += (segs - 1) * hlen;
    return segs;
}

/* How many packets leave for this one, and its bytes on the wire (in *bytes: its IP length on entry).
 * `l4off`/`proto` are the parsed L4 header and protocol, `unfrag` the header length a fragment repeats. */
static __always_inline u64 kzt_wire(const struct kzt_pkt *p, const u8 *hdr, u32 l4off, u8 proto, u32 unfrag,
                                    int v6, u64 *bytes)
{
    if (p->gso_size) {
        u32 type = p->gso_type;
        u32 inner = 0;
        if ((type & KZT_GSO_KNOWN) && (type & KZT_GSO_TUNNEL)) {
            inner = p->inner_l4;
            proto = (type & (KZT_GSO_TCPV4 | KZT_GSO_TCPV6)) ? 6 : 17;
        } else if (!(type & KZT_GSO_KNOWN) && proto == 17) {
            inner = kzt_vxlan_l4(p, l4off, &proto);
        }
        if (inner)
            l4off = inner;
        u32 hlen = l4off + kzt_l4_len(p, hdr, l4off, proto);
        /* a count the stack marked untrusted (a VM's or a packet socket's) is derived, as an unset one */
        u64 segs = (type & KZT_GSO_KNOWN && type & KZT_GSO_DODGY) ? 0 : p->gso_segs;
        return kzt_gso_wire(bytes, hlen, p->gso_size, segs);
    }
    u32 mtu = p->mtu;
    if (p->frag_max && (mtu == 0 || p->frag_max < mtu))
        mtu = p->frag_max;
    if (mtu == 0 || *bytes <= mtu)
        return 1;
    /* Fragmented after the hook: every fragment but the last carries `chunk` bytes (a multiple of 8),
     * the last at most `room`. IPv4 repeats its header, IPv6 its unfragmentable part and a fragment
     * header. */
    u32 rep = v6 ? unfrag + 8 : l4off;
    if (mtu <= rep + 8)
        return 1;
    u64 room = mtu - rep;
    u64 chunk = room & ~7ULL;
    u64 payload = *bytes - (v6 ? unfrag : l4off); /* > room, as *bytes > mtu */
    u64 n = 1 + (payload - room + chunk - 1) / chunk;
    *bytes = payload + n * rep;
    return n;
}

/* The ports at l4off (from the header prefix when it holds them, else one more read). `p->linear` is
 * how many bytes of the packet follow the network header in the skb's linear area: ports beyond it stay
 * unknown rather than being read from whatever memory follows. */
static __always_inline void kzt_ports(const struct kzt_pkt *p, const u8 *hdr, u32 l4off, u8 *side, u16 *port)
{
    u8 ports[4];
    if (l4off + 4 > p->linear)
        return;
    if (l4off <= KZT_HDR_READ - 4) {
        __builtin_memcpy(ports, hdr + kzt_hdr_index(l4off), 4);
    } else if (KZT_LOAD(p, l4off, ports, sizeof(ports)) < 0) {
        return;
    }
    u16 sport = p->has_nat_src ? p->nat_sport : ((u16)ports[0] << 8) | ports[1];
    kzt_set_port(side, port, sport, ((u16)ports[2] << 8) | ports[3]);
}

/* Count one packet: parse its IP header (one read of the header prefix), build the key (only the
 * listening side's port; ephemeral ports never enter a key), add to its flow (or the overflow bucket). */
static __always_inline void kzt_count_packet(const struct kzt_pkt *p)
{
    u8 buf[KZT_HDR_READ] __attribute__((aligned(8)));
    const u8 *hdr = p->hdr;
    u64 bytes;

    if (!hdr) {
        if (KZT_LOAD(p, 0, buf, sizeof(buf)) < 0) {
            kzt_overflow(p->len, 1, KZT_STAT_READ_FAILED);
            return;
        }
        hdr = buf;
    }
    u8 version = hdr[0] >> 4;
    if (version == 4) {
        struct flow_key4 key = {};
        key.proto = hdr[9];
        __builtin_memcpy(key.src, hdr + 12, 4);
        __builtin_memcpy(key.dst, hdr + 16, 4);
        bytes = ((u32)hdr[2] << 8) | hdr[3];  /* 0 with BIG TCP: the skb has the length */
        if (bytes == 0)
            bytes = p->len;
        int later = (((hdr[6] & 0x1F) << 8) | hdr[7]) != 0;
        u32 l4off = (hdr[0] & 0x0F) * 4;
        if (!later && kzt_has_ports(key.proto))
            kzt_ports(p, hdr, l4off, &key.port_side, &key.port);
        if (p->has_nat_src)
            __builtin_memcpy(key.src, p->nat_src, 4);
        key.port_side |= (p->origin & 3) << KZT_ORIGIN_SHIFT;
        u64 packets = kzt_wire(p, hdr, l4off, key.proto, l4off, 0, &bytes);
        KZT_ADD4(&key, bytes, packets);
    } else if (version == 6) {
        struct flow_key6 key = {};
        int later = 0;
        u32 l4off = 40, unfrag = 40;
        key.proto = hdr[6];
        __builtin_memcpy(key.src, hdr + 8, 16);
        __builtin_memcpy(key.dst, hdr + 24, 16);
        bytes = ((u32)hdr[4] << 8) | hdr[5];  /* 0 for a jumbogram: the skb has the length */
        bytes = bytes ? bytes + 40 : p->len;
        if (key.proto == 0 || key.proto == 43 || key.proto == 60 || key.proto == 44 || key.proto == 51)
            l4off = kzt_walk_v6(p, &key.proto, &later, &unfrag);
        if (!later && kzt_has_ports(key.proto))
            kzt_ports(p, hdr, l4off, &key.port_side, &key.port);
        if (p->has_nat_src)
            __builtin_memcpy(key.src, p->nat_src, 16);
        key.port_side |= (p->origin & 3) << KZT_ORIGIN_SHIFT;
        u64 packets = kzt_wire(p, hdr, l4off, key.proto, unfrag, 1, &bytes);
        KZT_ADD6(&key, bytes, packets);
    } else {
        kzt_stat(KZT_STAT_NOT_IP);
    }
}

/* The evictor's body: marks the flows listed in evict_keys4/6 dead; stores how many it found in
 * evict_count[2]. Each entry file wraps it in a program the agent runs with BPF_PROG_TEST_RUN. */
static __always_inline void kzt_evict_listed(void)
{
    u32 zero = 0, one = 1, two = 2, marked = 0;
    u32 *count4 = evict_count.lookup(&zero);
    u32 *count6 = evict_count.lookup(&one);
    if (!count4 || !count6)
        return;
    u32 n4 = *count4, n6 = *count6;
    for (u32 i = 0; i < KZT_EVICT_BATCH && i < n4; i++) {
        u32 index = i;
        struct flow_key4 *key = evict_keys4.lookup(&index);
        struct flow_value4 *v = key ? flows4.lookup(key) : 0;
        if (v) {
            *(volatile u32 *)&v->dead = 1;  /* ordered before the deletes by the agent's RCU wait */
            marked++;
        }
    }
    for (u32 i = 0; i < KZT_EVICT_BATCH && i < n6; i++) {
        u32 index = i;
        struct flow_key6 *key = evict_keys6.lookup(&index);
        struct flow_value6 *v = key ? flows6.lookup(key) : 0;
        if (v) {
            *(volatile u32 *)&v->dead = 1;
            marked++;
        }
    }
    u32 *result = evict_count.lookup(&two);
    if (result)
        *result = marked;
}

/* The flusher: the agent test-runs it on every CPU (a raw tracepoint program, BPF_F_TEST_RUN_ON_CPU)
 * before it reads the maps and while it evicts; returns 1 when a slot was busy. Shared by every mode: it
 * needs no packet. */
int kzt_flush(void *ctx)
{
    return kzt_flush_slot4() | kzt_flush_slot6();
}

#endif
