/* Private helpers shared by the smfs_core sources: big-endian loads and stores, hashing,
 * buffers that grow. Not part of the API. */
#ifndef SMFS_INTERNAL_H
#define SMFS_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SMFS_NONE UINT32_MAX /* "no index" in intrusive lists */

static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t ld32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t ld64(const uint8_t *p) { return ((uint64_t)ld32(p) << 32) | ld32(p + 4); }
static inline void st16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void st64(uint8_t *p, uint64_t v) { st32(p, (uint32_t)(v >> 32)); st32(p + 4, (uint32_t)v); }

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline size_t pow2_at_least(size_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* Make *buf hold at least `need` bytes (capacity classes: 2048, then 65536): 0 or -1. */
static inline int grow_buf(uint8_t **buf, uint32_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t want = need <= 2048 ? 2048 : 65536;
    if (want < need)
        want = need;
    uint8_t *p = realloc(*buf, want);
    if (!p)
        return -1;
    *buf = p;
    *cap = (uint32_t)want;
    return 0;
}

#endif
