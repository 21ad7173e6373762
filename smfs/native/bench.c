/* Throughput of the C codec and tunnel on one core, measured in C (no ctypes per packet), for
 * smfs/bench_native.py. Allocation happens before the clock starts. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "smfs_core.h"

static double clock_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t next_rand(uint64_t *s) /* xorshift64* */
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

struct stored { /* the repairs of one encoding pass, copied */
    uint64_t *seqs;
    uint16_t *lengths;
    uint8_t *xor;
    struct smfs_repair *reps;
    size_t count, cap, r, size;
    uint64_t *after; /* after[i]: repairs emitted up to and including data packet i */
};

static void sink(void *ctx, const struct smfs_repair *rep)
{
    uint64_t *bytes = ctx;
    *bytes += rep->xor_len;
}

static void store(void *ctx, const struct smfs_repair *rep)
{
    struct stored *st = ctx;
    if (st->count == st->cap || rep->xor_len > st->size)
        return;
    size_t i = st->count++;
    memcpy(&st->seqs[i * st->r], rep->seqs, rep->n * sizeof(uint64_t));
    memcpy(&st->lengths[i * st->r], rep->lengths, rep->n * sizeof(uint16_t));
    memcpy(&st->xor[i * st->size], rep->xor, rep->xor_len);
    st->reps[i] = (struct smfs_repair){rep->layer, rep->n, &st->seqs[i * st->r],
                                       &st->lengths[i * st->r], &st->xor[i * st->size], rep->xor_len};
}

static void count_rebuilt(void *ctx, uint64_t seq, const uint8_t *p, size_t len)
{
    (void)seq;
    (void)p;
    (void)len;
    ++*(uint64_t *)ctx;
}

int smfs_bench_codec(const struct smfs_fec_params *p, const uint8_t *pkts, size_t size, size_t n,
                     double loss, uint64_t seed, double min_s, double *encode_bps,
                     double *decode_bps, uint64_t *rebuilt, uint64_t *lost)
{
    if (smfs_fec_params_check(p) || !pkts || size < 1 || size > SMFS_MAX_PACKET || n < 1 ||
        !(loss >= 0 && loss < 1))
        return -EINVAL;
    int rc = -ENOMEM;
    struct smfs_encoder *enc = NULL;
    struct smfs_decoder *dec = NULL;
    struct stored st = {0};
    uint8_t *keep = NULL;
    uint64_t *shifted = NULL;
    uint64_t window = 2048, span = 2 * smfs_fec_span(p); /* 0 when c = 0 */
    if (window < span)
        window = span;

    /* encode: the same n packets again and again, seqs increasing */
    enc = smfs_encoder_new(p);
    if (!enc)
        goto out;
    uint64_t seq = 0, xored = 0, bytes = 0;
    double t0 = clock_s(), el;
    do {
        for (size_t i = 0; i < n; i++, seq++)
            smfs_encoder_add(enc, seq, pkts + i * size, size, 0.0, sink, &xored);
        bytes += n * size;
    } while ((el = clock_s() - t0) < min_s);
    *encode_bps = (double)bytes / el;
    smfs_encoder_free(enc);

    /* one stream: each data packet followed by the repairs it completes, then the flush */
    enc = smfs_encoder_new(p);
    st.r = p->r;
    st.size = size;
    st.cap = n * p->c + 64 * (size_t)p->c * (p->c ? p->interleaves[p->c - 1] : 0) + 1; /* >= 1: malloc(0) */
    st.seqs = malloc(st.cap * p->r * sizeof(uint64_t));
    st.lengths = malloc(st.cap * p->r * sizeof(uint16_t));
    st.xor = malloc(st.cap * size);
    st.reps = malloc(st.cap * sizeof(*st.reps));
    st.after = malloc((n + 1) * sizeof(uint64_t));
    keep = malloc(n + st.cap);
    shifted = malloc(p->r * sizeof(uint64_t));
    if (!enc || !st.seqs || !st.lengths || !st.xor || !st.reps || !st.after || !keep || !shifted)
        goto out;
    for (size_t i = 0; i < n; i++) {
        smfs_encoder_add(enc, i, pkts + i * size, size, 0.0, store, &st);
        st.after[i] = st.count;
    }
    smfs_encoder_flush(enc, store, &st);
    st.after[n] = st.count;
    uint64_t rng = seed | 1;
    for (size_t i = 0; i < n + st.count; i++)
        keep[i] = (double)(next_rand(&rng) >> 11) * 0x1.0p-53 >= loss;

    /* decode: the stream again and again, each pass 2 windows above the last (a long run) */
    dec = smfs_decoder_new(p, window);
    if (!dec)
        goto out;
    uint64_t delivered = 0, base = 0, pass_rebuilt = 0;
    int passes = 0;
    struct smfs_decoder_stats before, after;
    bytes = 0;
    t0 = clock_s();
    do {
        uint64_t got = 0;
        smfs_decoder_stats(dec, &before);
        size_t r = 0;
        for (size_t i = 0; i < n; i++) {
            if (keep[i]) {
                smfs_decoder_on_data(dec, base + i, pkts + i * size, size, 0.0, count_rebuilt, &got);
                got++;
            }
            for (; r < st.after[i]; r++) {
                if (!keep[n + r])
                    continue;
                struct smfs_repair rep = st.reps[r];
                for (uint32_t k = 0; k < rep.n; k++)
                    shifted[k] = rep.seqs[k] + base;
                rep.seqs = shifted;
                smfs_decoder_on_repair(dec, &rep, 0.0, count_rebuilt, &got);
            }
        }
        for (; r < st.after[n]; r++) {
            if (!keep[n + r])
                continue;
            struct smfs_repair rep = st.reps[r];
            for (uint32_t k = 0; k < rep.n; k++)
                shifted[k] = rep.seqs[k] + base;
            rep.seqs = shifted;
            smfs_decoder_on_repair(dec, &rep, 0.0, count_rebuilt, &got);
        }
        smfs_decoder_stats(dec, &after);
        pass_rebuilt = after.rebuilt - before.rebuilt;
        delivered += got;
        base += n + 2 * window;
        passes++;
    } while ((el = clock_s() - t0) < min_s);
    *decode_bps = (double)(delivered * size) / el;
    *rebuilt = pass_rebuilt;
    uint64_t kept_data = 0;
    for (size_t i = 0; i < n; i++)
        kept_data += keep[i];
    *lost = n - kept_data - pass_rebuilt;
    rc = passes > 0 ? 0 : -EINVAL;
out:
    smfs_encoder_free(enc);
    smfs_decoder_free(dec);
    free(st.seqs);
    free(st.lengths);
    free(st.xor);
    free(st.reps);
    free(st.after);
    free(keep);
    free(shifted);
    return rc;
}

int smfs_bench_tunnel(const uint8_t *key, size_t key_len, size_t size, double min_s,
                      double *seal_pps, double *unseal_pps)
{
    if (size < 1 || size > SMFS_MAX_DATA_PACKET)
        return -EINVAL;
    struct smfs_tunnel *t = smfs_tunnel_new(key, key_len);
    uint8_t *pkt = calloc(1, size), *dg = malloc(size + SMFS_DATA_OVERHEAD);
    int rc = -ENOMEM;
    if (!t || !pkt || !dg)
        goto out;
    for (size_t i = 0; i < size; i++)
        pkt[i] = (uint8_t)(i * 7);
    uint64_t count = 0;
    long len = 0;
    double t0 = clock_s(), el;
    do {
        for (int k = 0; k < 1000; k++, count++)
            len = smfs_seal_data(t, 1, count, pkt, size, dg, size + SMFS_DATA_OVERHEAD);
    } while ((el = clock_s() - t0) < min_s);
    *seal_pps = (double)count / el;
    struct smfs_msg msg;
    count = 0;
    int bad = 0;
    t0 = clock_s();
    do {
        for (int k = 0; k < 1000; k++, count++)
            bad |= smfs_unseal(t, dg, (size_t)len, 1, &msg);
    } while ((el = clock_s() - t0) < min_s);
    *unseal_pps = (double)count / el;
    rc = bad ? -EIO : 0;
out:
    smfs_tunnel_free(t);
    free(pkt);
    free(dg);
    return rc;
}
