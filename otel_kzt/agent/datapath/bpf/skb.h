/* otel-kzt: reading packets through `struct __sk_buff`, for the modes whose programs get one (`tc`,
 * `cgroup`); included by their entry files before count.h.
 *
 * Reads are relative to the network header (bpf_skb_load_bytes_relative, BPF_HDR_START_NET), so the
 * same code serves devices with and without a link header, and socket egress where the packet starts at
 * its IP header. `base` moves the start to a tunnel's inner IP header. They copy from the linear part of
 * the skb only (where the stack keeps the headers); where that holds less than the 64-byte header
 * prefix, exactly what it holds is read; a read that still fails is counted in the overflow bucket.
 * Where the entry file defines KZT_SKB_DATA_AT_NET (cgroup: skb->data is the network header) the header
 * prefix is read directly from the packet instead, ~15 ns less than the helper call per packet. With
 * KZT_SKB_ETHER (tc) it is read directly from behind the 14-byte Ethernet header where the packet's
 * device is an Ethernet device (`ether`: the agent's flags for the device, tc.c's tcdev) and the frame
 * bears that out (kzt_skb_ether), ~30 ns less per packet on the 2-core VM (bench/datapath.md); other
 * devices and frames go through the helper.
 */
#ifndef KZT_SKB_H
#define KZT_SKB_H

#define KZT_HDR_START_NET 1  /* BPF_HDR_START_NET */

/* What KZT_LOAD needs: the context and where the IP header to parse starts. */
struct kzt_skb_ref {
    struct __sk_buff *skb;
    u32 base;  /* bytes from the network header to the IP header parsed (a tunnel's inner packet) */
    u32 ether; /* KZT_SKB_ETHER: the device frames its packets in Ethernet (else 0: no link header known) */
};

static __always_inline long kzt_skb_read(struct kzt_skb_ref *ref, u32 off, void *dst, u32 size)
{
    return bpf_skb_load_bytes_relative(ref->skb, ref->base + off, dst, size, KZT_HDR_START_NET);
}

#ifdef KZT_SKB_ETHER
#define KZT_SKB_ETH_HLEN 14
/* The 64-byte header prefix copied from the packet behind its Ethernet header, when the frame shows that
 * is where its network header is: its EtherType is the skb's protocol and the IP header's length
 * accounts for the rest of the packet exactly (so not a frame with a tag between the link and the IP
 * header, nor a padded one, nor BIG TCP's length 0: those, a tunnel's inner packet (`base`), a device
 * without Ethernet headers (`ether` 0: a WireGuard or IP tunnel device's packet starts at its IP header)
 * and a linear part shorter than 78 bytes go through the helper). < 0 when not copied. */
static __always_inline long kzt_skb_ether(struct kzt_skb_ref *ref, u8 *dst)
{
    struct __sk_buff *skb = ref->skb;
    const u8 *data = (const u8 *)(long)skb->data;
    const u64 *ip = (const u64 *)(data + KZT_SKB_ETH_HLEN);
    if (!ref->ether || ref->base || (const void *)(ip + 8) > (const void *)(long)skb->data_end)
        return -1;
    if (*(const u16 *)(data + 12) != (u16)skb->protocol)
        return -1;
    u64 *out = (u64 *)dst;
#pragma unroll
    for (int i = 0; i < 8; i++)
        out[i] = ip[i];
    u32 rest = skb->len - KZT_SKB_ETH_HLEN, version = dst[0] >> 4;
    u32 l3len = ((u32)dst[2] << 8) | dst[3];
    if (version == 6)
        l3len = 40 + (((u32)dst[4] << 8) | dst[5]);
    else if (version != 4)
        return -1;
    return l3len == rest ? 0 : -1;
}
#endif

/* The 64-byte header prefix from `base`, all of it in the linear part, or < 0. */
static __always_inline long kzt_skb_prefix(struct kzt_skb_ref *ref, u8 *dst)
{
#ifdef KZT_SKB_ETHER
    if (kzt_skb_ether(ref, dst) == 0)
        return 0;
#endif
    return kzt_skb_read(ref, 0, dst, 64);
}

/* The header prefix of a packet whose linear part holds less than 64 bytes from `base` (a short packet,
 * or a GSO packet from a local socket, whose linear part is its headers): exactly what it holds. The
 * link header's length is what the skb holds beyond the outer IP packet's own length. */
static __always_inline long kzt_skb_short(struct kzt_skb_ref *ref, u8 *dst)
{
    struct __sk_buff *skb = ref->skb;
    u8 outer[6];
    if (bpf_skb_load_bytes_relative(skb, 0, outer, sizeof(outer), KZT_HDR_START_NET) < 0)
        return -1;
    u8 version = outer[0] >> 4;
    u32 l3len = 0;
    if (version == 4)
        l3len = ((u32)outer[2] << 8) | outer[3];
    else if (version == 6)
        l3len = 40 + (((u32)outer[4] << 8) | outer[5]);
    else
        return 0; /* not IP: count.h says so (KZT_STAT_NOT_IP) */
    if (l3len == 0 || l3len > skb->len)
        return -1; /* BIG TCP: no length to go by */
    long linear = (long)skb->data_end - (long)skb->data - (long)(skb->len - l3len) - (long)ref->base;
    if (linear < 20 || linear >= 64)
        return -1;
    return kzt_skb_read(ref, 0, dst, (u32)linear);
}

/* KZT_LOAD for count.h. Only its first read, the 64-byte prefix at offset 0, can meet a linear part
 * shorter than itself; every other read stays unread (< 0) beyond the linear part. */
static __always_inline long kzt_skb_load(void *ctx, u32 off, u8 *dst, u32 size)
{
    struct kzt_skb_ref *ref = ctx;
#ifdef KZT_SKB_DATA_AT_NET
    /* The entry file says skb->data is the network header and the packet has no link header (cgroup
     * socket egress): the header prefix is copied straight from the linear part, 8 bytes at a time,
     * without a helper call; a shorter linear part (a TCP ACK, a GSO packet's headers) in one read. */
    if (off == 0 && size == 64) {
        const u64 *data = (const u64 *)(long)ref->skb->data;
        const void *end = (const void *)(long)ref->skb->data_end;
        if ((const void *)(data + 8) <= end) {
            u64 *out = (u64 *)dst;
#pragma unroll
            for (int i = 0; i < 8; i++)
                out[i] = data[i];
            return 0;
        }
        long linear = (long)end - (long)data;
        if (linear >= 20 && linear < 64)
            return kzt_skb_read(ref, 0, dst, (u32)linear);
    }
#endif
    if (off != 0 || size != 64)
        return kzt_skb_read(ref, off, dst, size);
    if (kzt_skb_prefix(ref, dst) == 0)
        return 0;
    return kzt_skb_short(ref, dst);
}

#define KZT_LOAD(p, off, dst, size) kzt_skb_load((p)->ctx, (off), (u8 *)(dst), (size))

#endif
