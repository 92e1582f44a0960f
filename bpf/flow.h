/* otel-kzt flow map layout, shared by the BPF programs and mirrored by otel_kzt/agent/datapath.py
 * (ctypes) and otel_kzt/agent/flows.py (typed values). Change one, change all: the source hash
 * then differs and a restarted agent replaces the pinned program; a layout change also recreates
 * the pinned maps (their key/value sizes no longer match).
 */
#ifndef KZT_FLOW_H
#define KZT_FLOW_H

#define KZT_NF_ACCEPT 1

/* flow_key.port_side: which end the kept port belongs to (the listening side). */
#define KZT_PORT_NONE 0
#define KZT_PORT_SRC 1
#define KZT_PORT_DST 2

struct flow_key {
    u8 family;      /* 4 or 6 */
    u8 proto;       /* IANA protocol number */
    u8 port_side;   /* KZT_PORT_* */
    u8 pad0;
    u16 port;       /* host order; 0 unless port_side != NONE */
    u16 pad1;
    u8 src[16];     /* IPv4 in the first 4 bytes, rest zero */
    u8 dst[16];
};

struct flow_value {
    u64 bytes;          /* cumulative, atomically added */
    u64 packets;
    u64 first_seen_ns;  /* CLOCK_BOOTTIME ns at insert: survives agent restarts */
    u32 dead;           /* set by the evictor: the element is about to be deleted */
    u32 pad;
    struct flow_key key; /* identity check: hash elements are reused at once after a delete */
};

/* The bucket for what cannot be attributed to a flow of its own (map full, flow being evicted). */
struct overflow_value {
    u64 bytes;
    u64 packets;
};

/* Per-CPU event counters (index into the stats array). */
#define KZT_STAT_INSERT_FAILED 0  /* flow map full: counted in the overflow bucket */
#define KZT_STAT_EVICT_RACE 1     /* packet of a flow being evicted: counted in the overflow bucket */
#define KZT_STAT_NOT_IP 2         /* neither IPv4 nor IPv6 at the network header: not counted */
#define KZT_STAT_READ_FAILED 3    /* header read failed: counted in the overflow bucket */
#define KZT_STAT_MAX 4

#endif
