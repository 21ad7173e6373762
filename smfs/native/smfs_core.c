/* smfs_core: what the codec, the tunnel and the flow tracker share: the XOR kernel, the
 * validation of FEC parameters and repairs, the names of the tunnel's rejection reasons. */
#include "smfs_core.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#include "smfs_internal.h"

typedef uint64_t v4u64 __attribute__((vector_size(32)));

/* 64 bytes per round in 32-byte vectors (AVX2 when the CPU has it, else pairs of SSE2
 * registers), then 8-byte words, then bytes. */
__attribute__((target_clones("avx2", "default")))
void smfs_xor_into(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        v4u64 a0, a1, b0, b1;
        memcpy(&a0, dst + i, 32);
        memcpy(&a1, dst + i + 32, 32);
        memcpy(&b0, src + i, 32);
        memcpy(&b1, src + i + 32, 32);
        a0 ^= b0;
        a1 ^= b1;
        memcpy(dst + i, &a0, 32);
        memcpy(dst + i + 32, &a1, 32);
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a ^= b;
        memcpy(dst + i, &a, 8);
    }
    for (; i < n; i++)
        dst[i] ^= src[i];
}

int smfs_fec_params_check(const struct smfs_fec_params *p)
{
    if (!p || p->r < 1 || p->r > SMFS_MAX_R || p->c > SMFS_MAX_LAYERS) /* c = 0: no FEC */
        return -EINVAL;
    for (uint32_t k = 0; k < p->c; k++) {
        uint32_t iv = p->interleaves[k];
        if (iv < 1 || iv > SMFS_MAX_INTERLEAVE || (k > 0 && iv <= p->interleaves[k - 1]))
            return -EINVAL;
    }
    if (!isfinite(p->flush_ms) || !(p->flush_ms > 0.0) || p->flush_ms > 1000.0)
        return -EINVAL;
    return 0;
}

int smfs_repair_check(const struct smfs_repair *rep)
{
    if (!rep || rep->n < 1 || rep->n > SMFS_MAX_R || !rep->seqs || !rep->lengths || !rep->xor)
        return -EINVAL;
    uint32_t longest = 0;
    for (uint32_t i = 0; i < rep->n; i++) {
        if (rep->lengths[i] < 1)
            return -EINVAL;
        if (rep->lengths[i] > longest)
            longest = rep->lengths[i];
        if (i > 0 && rep->seqs[i] <= rep->seqs[i - 1])
            return -EINVAL;
    }
    return rep->xor_len == longest ? 0 : -EINVAL;
}

const char *smfs_tunnel_reason(int code)
{
    switch (code < 0 ? -code : code) {
    case SMFS_TE_SHORT: return "short";
    case SMFS_TE_OVERSIZE: return "oversize";
    case SMFS_TE_BAD_MAGIC: return "bad magic";
    case SMFS_TE_BAD_VERSION: return "bad version";
    case SMFS_TE_BAD_MAC: return "bad mac";
    case SMFS_TE_FOREIGN_SITE: return "foreign site";
    case SMFS_TE_BAD_KIND: return "bad kind";
    case SMFS_TE_MALFORMED: return "malformed lengths";
    case SMFS_TE_INTERNAL: return "internal";
    default: return "unknown";
    }
}
