/* TUN offloads (IFF_VNET_HDR): the packets a TUN without offloads would have handed the gateway.
 *
 * With TUN_F_TSO4 the kernel's TCP hands the TUN one packet of up to 64 KiB per write (the guest's
 * stack skips segmenting, and the gateway reads once where it read up to 45 times: under TCG each
 * packet through the kernel costs tens of microseconds). The gateway cuts it here into the segments
 * the kernel's own software GSO would have made (tcp_gso_segment: gso_size payload bytes each, IP
 * id + i, sequence number + offset, FIN and PSH on the last only, CWR on the first only, both
 * checksums complete), so everything after (numbering, FEC, flow tracking, the wire) sees the same
 * packets as without offloads; tests/unit/test_native_offload.py holds it to scapy's segments. */
#include <errno.h>
#include <string.h>

#include "smfs_core.h"

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t acc)
{
    uint64_t s = acc;
    for (; n >= 2; p += 2, n -= 2)
        s += (uint32_t)p[0] << 8 | p[1];
    if (n)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

static void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* The device's part of a checksum left to it (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field holds the
 * pseudo-header's sum; the ones'-complement sum from csum_start to the end goes there. */
static int finish_csum(uint8_t *pkt, size_t len, size_t start, size_t off)
{
    if (start >= len || off > len - start || len - start - off < 2)
        return -EINVAL;
    uint32_t s = sum16(pkt + start, len - start, 0);
    uint32_t v = ~s & 0xffff;
    if (!v && len >= 20 && (pkt[0] >> 4) == 4 && pkt[9] == 17)
        v = 0xffff; /* UDP: 0 means "no checksum" */
    put16(pkt + start + off, v);
    return 0;
}

long smfs_vnet_segment(const uint8_t *hdr, const uint8_t *pkt, size_t len, uint8_t *out, size_t stride,
                       size_t max, uint32_t *lens)
{
    if (!hdr || !pkt || !out || !lens || !max || !len || len > SMFS_MAX_PACKET)
        return -EINVAL;
    uint8_t flags = hdr[0], gso = hdr[1] & 0x7f; /* 0x80: ECN, CWR handled below either way */
    uint16_t mss = le16(hdr + 4), cstart = le16(hdr + 6), coff = le16(hdr + 8);
    if (gso == SMFS_VNET_GSO_NONE) {
        if (len > stride)
            return -ENOSPC;
        if (out != pkt)
            memcpy(out, pkt, len);
        if (flags & SMFS_VNET_F_NEEDS_CSUM) {
            int rc = finish_csum(out, len, cstart, coff);
            if (rc < 0)
                return rc;
        }
        lens[0] = (uint32_t)len;
        return 1;
    }
    if (gso != SMFS_VNET_GSO_TCPV4 || out == pkt)
        return -EINVAL;
    if (len < 40 || (pkt[0] >> 4) != 4 || pkt[9] != 6)
        return -EINVAL;
    size_t iphl = (size_t)(pkt[0] & 15) * 4;
    if (iphl < 20 || len < iphl + 20 || (get16(pkt + 6) & 0x3fff)) /* MF or an offset: a fragment */
        return -EINVAL;
    size_t thl = (size_t)(pkt[iphl + 12] >> 4) * 4, hl = iphl + thl;
    if (thl < 20 || hl > len || get16(pkt + 2) != len || !mss)
        return -EINVAL;
    size_t payload = len - hl;
    size_t n = payload ? (payload + mss - 1) / mss : 1;
    if (n > max || hl + (payload < mss ? payload : mss) > stride)
        return -ENOSPC;
    uint32_t id = get16(pkt + 4);
    uint32_t seq = (uint32_t)pkt[iphl + 4] << 24 | (uint32_t)pkt[iphl + 5] << 16 | (uint32_t)pkt[iphl + 6] << 8 |
                   pkt[iphl + 7];
    uint8_t tflags = pkt[iphl + 13];
    for (size_t i = 0; i < n; i++) {
        size_t from = i * mss, seg = payload - from < mss ? payload - from : mss;
        uint8_t *o = out + i * stride;
        memcpy(o, pkt, hl);
        memcpy(o + hl, pkt + hl + from, seg);
        put16(o + 2, (uint32_t)(hl + seg));
        put16(o + 4, (id + (uint32_t)i) & 0xffff);
        put16(o + 10, 0);
        put16(o + 10, ~sum16(o, iphl, 0) & 0xffff);
        uint8_t *t = o + iphl;
        uint32_t s = seq + (uint32_t)from;
        t[4] = (uint8_t)(s >> 24), t[5] = (uint8_t)(s >> 16), t[6] = (uint8_t)(s >> 8), t[7] = (uint8_t)s;
        uint8_t f = tflags;
        if (i + 1 < n)
            f &= (uint8_t)~0x09; /* FIN, PSH: the last segment's */
        if (i)
            f &= (uint8_t)~0x80; /* CWR: the first segment's */
        t[13] = f;
        put16(t + 16, 0);
        uint32_t ph = sum16(o + 12, 8, 0); /* source and destination */
        ph = sum16((const uint8_t[]){0, 6, (uint8_t)((thl + seg) >> 8), (uint8_t)(thl + seg)}, 4, ph);
        put16(t + 16, ~sum16(t, thl + seg, ph) & 0xffff);
        lens[i] = (uint32_t)(hl + seg);
    }
    return (long)n;
}
