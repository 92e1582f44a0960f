/* otel-kzt flow map layout, shared by every mode's programs and mirrored by otel_kzt/agent/datapath/flowmap.py.
 * Change one, change both: the source hash then differs and a restarted agent replaces the pinned
 * counter; a layout change also recreates the pinned maps (their key/value sizes no longer match).
 *
 * IPv4 and IPv6 flows live in two maps: a 12-byte IPv4 key hashes and compares in about a third of
 * the time of a 40-byte one, and the common case on most clusters is IPv4.
 */
#ifndef KZT_FLOW_H
#define KZT_FLOW_H

/* port_side, bits 0-1: which end the kept port belongs to (the listening side). */
#define KZT_PORT_NONE 0
#define KZT_PORT_SRC 1
#define KZT_PORT_DST 2
/* port_side, bits 2-3: the packet's origin, how it came to the hook (DESIGN §3: the source is decided by
 * the path). 0 keeps a pod's forwarded flow the same key in every mode (a mode switch continues it). */
#define KZT_ORIGIN_SHIFT 2
#define KZT_ORIGIN_UNKNOWN 0    /* forwarded with the sender's source, or the mode cannot tell: by address */
#define KZT_ORIGIN_LOCAL 1      /* sent by this node's own stack: the node's, whatever its source address */
#define KZT_ORIGIN_REWRITTEN 2  /* routed through with a source conntrack did not record (IPVS's un-NAT of a
                                   reply to its VIP, a stateless rewrite): not the sender's, never ours */
#define KZT_ORIGIN_SNAT 3       /* routed through and rewritten both ways by this node's NAT (DNAT + SNAT:
                                   the NodePort / LoadBalancer hop): the key holds the source after SNAT */

struct flow_key4 {
    u8 proto;       /* IANA protocol number */
    u8 port_side;   /* KZT_PORT_* | KZT_ORIGIN_* << KZT_ORIGIN_SHIFT */
    u16 port;       /* host order; 0 unless port_side != NONE */
    u8 src[4];
    u8 dst[4];
} __attribute__((aligned(4)));

struct flow_key6 {
    u8 proto;
    u8 port_side;
    u16 port;
    u8 src[16];
    u8 dst[16];
} __attribute__((aligned(4)));

/* Common head of both values; `dead` is set by the evictor: the element is about to be deleted. */
#define KZT_VALUE_HEAD \
    u64 bytes;         /* cumulative, atomically added */ \
    u64 packets; \
    u64 first_seen_ns; /* CLOCK_BOOTTIME ns at insert: survives agent restarts */ \
    u32 dead; \
    u32 pad

/* The key is repeated in the value as an identity check: hash elements are reused at once after a
 * delete, so a program still holding a pointer must see that the element now belongs to another flow. */
struct flow_value4 {
    KZT_VALUE_HEAD;
    struct flow_key4 key;
    u32 pad2;
};

struct flow_value6 {
    KZT_VALUE_HEAD;
    struct flow_key6 key;
    u32 pad2;
};

/* The bucket for what cannot be attributed to a flow of its own (map full, flow being evicted). */
struct overflow_value {
    u64 bytes;
    u64 packets;
};

/* A CPU's write-combining slot (count.h, KZT_WC): the flow its last packets belonged to and their counts,
 * not yet in the flow map. `busy`: a run on this CPU is inside the slot (a nested run goes to the map). */
struct kzt_slot4 {
    u64 busy;     /* 64 bits: bcc's clang exchanges no narrower word */
    struct flow_key4 key;
    u64 bytes;
    u64 packets;  /* 0: the slot is empty */
};

struct kzt_slot6 {
    u64 busy;
    struct flow_key6 key;
    u64 bytes;
    u64 packets;
};

/* Per-CPU event counters (index into the stats array). */
#define KZT_STAT_INSERT_FAILED 0  /* flow map full: counted in the overflow bucket */
#define KZT_STAT_EVICT_RACE 1     /* packet of a flow being evicted: kept in its dying entry */
#define KZT_STAT_NOT_IP 2         /* neither IPv4 nor IPv6 at the network header: not counted */
#define KZT_STAT_READ_FAILED 3    /* header read failed: counted in the overflow bucket */
#define KZT_STAT_MAX 4

#endif
