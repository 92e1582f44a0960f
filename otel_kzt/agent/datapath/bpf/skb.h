/* otel-kzt: reading packets through `struct __sk_buff`, for the modes whose programs get one (`tc`,
 * `cgroup`); included by their entry files before count.h.
 *
 * Reads are relative to the network header (bpf_skb_load_bytes_relative, BPF_HDR_START_NET), so the
 * same code serves devices with and without a link header, and socket egress where the packet starts at
 * its IP header. `base` moves the start to a tunnel's inner IP header. They copy from the linear part of
 * the skb only (where the stack keeps the headers): a packet shorter than the 64-byte header prefix is
 * read for exactly its IP length; a read that still fails is counted in the overflow bucket.
 */
#ifndef KZT_SKB_H
#define KZT_SKB_H

#define KZT_HDR_START_NET 1  /* BPF_HDR_START_NET */

/* What KZT_LOAD needs: the context and where the IP header to parse starts. */
struct kzt_skb_ref {
    struct __sk_buff *skb;
    u32 base;  /* bytes from the network header to the IP header parsed (a tunnel's inner packet) */
};

static __always_inline long kzt_skb_read(struct kzt_skb_ref *ref, u32 off, void *dst, u32 size)
{
    return bpf_skb_load_bytes_relative(ref->skb, ref->base + off, dst, size, KZT_HDR_START_NET);
}

/* KZT_LOAD for count.h. Only the first read (the 64-byte prefix at offset 0) can meet a packet shorter
 * than itself: it then reads the IP length the header states, bounded for the verifier. */
static __always_inline long kzt_skb_load(void *ctx, u32 off, u8 *dst, u32 size)
{
    struct kzt_skb_ref *ref = ctx;
    long err = kzt_skb_read(ref, off, dst, size);
    if (err == 0 || off != 0 || size != 64)
        return err;
    if (kzt_skb_read(ref, 0, dst, 20) < 0)
        return err;
    u32 n = (dst[0] >> 4) == 6 ? 40 + (((u32)dst[4] << 8) | dst[5]) : (((u32)dst[2] << 8) | dst[3]);
    if (n < 20 || n > 64)
        return err;  /* longer than the prefix yet not readable: not in the linear part */
    return kzt_skb_read(ref, 0, dst, n);
}

#define KZT_LOAD(p, off, dst, size) kzt_skb_load((p)->ctx, (off), (u8 *)(dst), (size))

#endif
