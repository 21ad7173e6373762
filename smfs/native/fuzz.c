/* Datagram fuzz of the C ingress path: random and mutated datagrams (most re-signed, so they
 * pass the MAC and reach the parser) through smfs_unseal, the replay window, the decoder, and
 * the flow tracker, as the gateway chains them. Built with AddressSanitizer and UBSan by
 * `make check-asan`; a crash or a sanitizer report is the failure.
 *
 * usage: fuzz [datagrams [seed]]   (default 1000000, 1)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "smfs_core.h"

static const uint8_t KEY[32] = "fuzz-key-fuzz-key-fuzz-key-fuzz";

static uint64_t rng;
static uint64_t rnd(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static void sign(uint8_t *d, size_t len)
{
    if (len < 20)
        return;
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    HMAC(EVP_sha256(), KEY, sizeof(KEY), d, len - 16, md, &n);
    memcpy(d + len - 16, md, 16);
}

#define POOL 512
static uint8_t *pool[POOL];
static size_t pool_len[POOL];
static size_t npool;

struct ctx {
    struct smfs_tunnel *t;
};

static void keep(void *vctx, const struct smfs_repair *rep)
{
    struct ctx *c = vctx;
    uint8_t *buf = malloc(SMFS_MAX_DATAGRAM);
    long n = buf ? smfs_seal_repair(c->t, 1, rep, buf, SMFS_MAX_DATAGRAM) : -1;
    if (n > 0 && npool < POOL) {
        pool[npool] = buf;
        pool_len[npool++] = (size_t)n;
    } else {
        free(buf);
    }
}

struct ingress {
    struct smfs_replay *rw;
    struct smfs_flow_tracker *ft;
    uint64_t rebuilt;
};

static void on_rebuilt(void *vctx, uint64_t seq, const uint8_t *p, size_t len)
{
    struct ingress *in = vctx;
    smfs_replay_mark_rebuilt(in->rw, seq);
    smfs_ft_on_packet_sent(in->ft, seq, p, len, 0.0);
    in->rebuilt++;
}

static void mutate(uint8_t *d, size_t *len, size_t cap)
{
    switch (below(8)) {
    case 0: /* flip bits */
        for (int k = 0, n = 1 + (int)below(8); k < n && *len; k++)
            d[below(*len)] ^= (uint8_t)(1u << below(8));
        break;
    case 1: /* truncate */
        *len = below(*len + 1);
        break;
    case 2: /* extend */
    {
        size_t add = below(64);
        if (*len + add <= cap) {
            for (size_t k = 0; k < add; k++)
                d[*len + k] = (uint8_t)rnd();
            *len += add;
        }
        break;
    }
    case 3: /* repair count, layer */
        if (*len > 5) {
            d[5] = (uint8_t)below(4) ? (uint8_t)below(70) : (uint8_t)rnd();
            d[4] = (uint8_t)rnd();
        }
        break;
    case 4: /* a length field */
        if (*len > 40) {
            size_t at = 14 + below(*len - 16);
            d[at] = (uint8_t)rnd();
            d[at + 1] = (uint8_t)rnd();
        }
        break;
    case 5: /* seq / first */
        if (*len > 14) /* mostly a small move; a jump anywhere now and then */
            for (int k = below(64) ? 12 : 4; k < 14; k++)
                d[k] = (uint8_t)rnd();
        break;
    case 6: /* kind, site, magic, version */
        if (*len > 4)
            d[below(4)] = (uint8_t)below(4);
        break;
    default: /* a delta */
        if (*len > 20) {
            size_t at = 14 + 4 * below(8);
            if (at + 4 <= *len)
                for (int k = 0; k < 4; k++)
                    d[at + k] = (uint8_t)rnd();
        }
    }
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 1000000; /* datagrams fed */
    rng = argc > 2 ? strtoull(argv[2], NULL, 10) | 1 : 1;
    struct smfs_fec_params p = {.r = 8, .c = 3, .interleaves = {1, 11, 19}, .flush_ms = 5.0};
    struct smfs_tunnel *t = smfs_tunnel_new(KEY, sizeof(KEY));
    struct smfs_encoder *enc = smfs_encoder_new(&p);
    struct smfs_decoder *dec = smfs_decoder_new(&p, 2 * 8 * 19);
    struct ingress in = {smfs_replay_new(2 * 8 * 19), smfs_ft_new(3, 64, 256, 64, 0), 0};
    uint8_t *dg = malloc(SMFS_MAX_DATAGRAM + 64);
    if (!t || !enc || !dec || !in.rw || !in.ft || !dg)
        return 2;
    struct ctx c = {t};
    /* a pool of genuine datagrams: data of a TCP-looking stream and its repairs */
    for (uint64_t s = 0; npool < POOL - 8 && s < 4096; s++) {
        uint8_t pkt[1500];
        size_t len = 40 + below(1400);
        for (size_t k = 0; k < len; k++)
            pkt[k] = (uint8_t)rnd();
        pkt[0] = 0x45, pkt[2] = (uint8_t)(len >> 8), pkt[3] = (uint8_t)len, pkt[6] = 0, pkt[9] = 6;
        pkt[32] = 0x50;
        uint8_t *buf = malloc(SMFS_MAX_DATAGRAM);
        long n = buf ? smfs_seal_data(t, 1, s, pkt, len, buf, SMFS_MAX_DATAGRAM) : -1;
        if (n > 0) {
            pool[npool] = buf;
            pool_len[npool++] = (size_t)n;
        } else {
            free(buf);
        }
        smfs_encoder_add(enc, s, pkt, len, 0.0, keep, &c);
    }
    long fed = 0, ok = 0, rejected = 0, passes = 0;
    size_t cursor = 0, deferred = SIZE_MAX;
    uint64_t base = 0;
    struct smfs_decoder_stats ds, total = {0};
    for (long it = 0; fed < iterations; it++) {
        size_t len;
        uint64_t kind = below(20);
        if (cursor == npool) { /* a new stream: fresh ingress state, another seq base */
            smfs_decoder_stats(dec, &ds);
            total.received += ds.received, total.rebuilt += ds.rebuilt;
            total.repairs_inconsistent += ds.repairs_inconsistent, total.repairs_stale += ds.repairs_stale;
            smfs_decoder_free(dec);
            smfs_replay_free(in.rw);
            smfs_ft_free(in.ft);
            /* the ingress's code: c = 3 as the stream's, or fewer layers (c = 0: no FEC), which
             * still gets the stream's repairs (a peer configured otherwise, or hostile) */
            struct smfs_fec_params q = p;
            q.c = (uint32_t)below(4);
            dec = smfs_decoder_new(&q, 2 * 8 * 19);
            in.rw = smfs_replay_new(2 * 8 * 19);
            in.ft = smfs_ft_new(q.c, 64, 256, 64, 0);
            if (!dec || !in.rw || !in.ft)
                return 2;
            cursor = 0;
            deferred = SIZE_MAX;
            passes++;
            static const uint64_t bases[] = {0, 1ull << 32, UINT64_MAX - 4096, 1000};
            base = bases[below(4)];
        }
        if (kind == 0) { /* random bytes, sometimes huge */
            len = below(5) ? below(2000) : below(SMFS_MAX_DATAGRAM + 64);
            for (size_t k = 0; k < len; k++)
                dg[k] = (uint8_t)rnd();
            if (below(2) && len > 4)
                dg[0] = SMFS_MAGIC, dg[1] = SMFS_VERSION, dg[2] = (uint8_t)(1 + below(2)), dg[3] = 1;
            if (below(8) && len > 14) /* a seq or first near the stream's, mostly */
                for (int k = 4; k < 12; k++)
                    dg[k] = 0;
            if (below(2))
                sign(dg, len);
        } else {
            /* mostly the stream in order (5 % lost, 10 % swapped with the next), else any */
            size_t i;
            if (kind >= 16) { /* near the cursor, mostly: far ahead only moves the windows */
                i = cursor + below(64);
                i = below(8) ? (i < 32 ? 0 : i - 32 >= npool ? npool - 1 : i - 32) : below(npool);
            } else if (deferred != SIZE_MAX) {
                i = deferred;
                deferred = SIZE_MAX;
            } else {
                i = cursor++;
                if (below(20) == 0)
                    continue;
                if (below(10) == 0 && cursor < npool) {
                    deferred = i;
                    i = cursor++;
                }
            }
            len = pool_len[i];
            memcpy(dg, pool[i], len);
            if (base && len >= 20) { /* seq (DATA) or first (REPAIR) += base */
                size_t off = dg[2] == SMFS_KIND_REPAIR ? 6 : 4;
                uint64_t v = 0;
                for (int k = 0; k < 8; k++)
                    v = v << 8 | dg[off + k];
                v += base;
                for (int k = 7; k >= 0; k--, v >>= 8)
                    dg[off + k] = (uint8_t)v;
                sign(dg, len);
            }
            if (kind >= 16 || below(50) == 0) {
                uint8_t seq[8];
                memcpy(seq, dg + 4, 8);
                mutate(dg, &len, SMFS_MAX_DATAGRAM + 64);
                if (below(32) && len >= 12 && dg[2] == SMFS_KIND_DATA) /* keep the replay window */
                    memcpy(dg + 4, seq, 8);
                if (below(4))
                    sign(dg, len);
            }
        }
        struct smfs_msg m;
        fed++;
        int rc = smfs_unseal(t, dg, len, below(16) ? 1 : -1, &m);
        if (rc < 0) {
            rejected++;
            continue;
        }
        ok++;
        if (m.kind == SMFS_KIND_DATA) {
            if (!smfs_replay_check_and_update(in.rw, m.seq)) {
                smfs_replay_late_after_rebuild(in.rw, m.seq);
                continue;
            }
            if (smfs_decoder_has(dec, m.seq))
                continue;
            smfs_decoder_on_data(dec, m.seq, m.packet, m.packet_len, 0.0, on_rebuilt, &in);
            smfs_ft_on_packet_sent(in.ft, m.seq, m.packet, m.packet_len, (double)it);
        } else {
            smfs_decoder_on_repair(dec, &m.repair, 0.0, on_rebuilt, &in);
            smfs_ft_on_repair_sent(in.ft, &m.repair, (double)it);
        }
        if (below(64) == 0)
            smfs_ft_safe_offsets(in.ft, NULL, NULL);
    }
    smfs_decoder_stats(dec, &ds);
    total.received += ds.received, total.rebuilt += ds.rebuilt;
    total.repairs_inconsistent += ds.repairs_inconsistent, total.repairs_stale += ds.repairs_stale;
    /* TUN reads with offloads (offload.c): TSO packets, genuine then mutated, random headers; the
     * output buffer is exactly stride * max bytes, so AddressSanitizer sees any overrun. */
    long tun_ok = 0, tun_refused = 0, tun_n = iterations / 8;
    enum { STRIDE = 1500, MAXSEG = 64 };
    uint8_t *big = malloc(SMFS_MAX_PACKET), *segs = malloc((size_t)STRIDE * MAXSEG);
    uint32_t lens[MAXSEG];
    if (!big || !segs)
        return 2;
    for (long it = 0; it < tun_n; it++) {
        size_t len = 40 + below(SMFS_MAX_PACKET - 40);
        if (below(2))
            len = 40 + below(4000);
        for (size_t k = 0; k < len; k++)
            big[k] = (uint8_t)rnd();
        if (below(8)) { /* a well-formed TCP/IPv4 header most of the time */
            big[0] = 0x45, big[2] = (uint8_t)(len >> 8), big[3] = (uint8_t)len, big[6] = 0x40, big[7] = 0;
            big[9] = 6, big[32] = (uint8_t)((5 + below(11)) << 4);
        }
        uint8_t hdr[SMFS_VNET_HDR_LEN];
        for (size_t k = 0; k < sizeof hdr; k++)
            hdr[k] = (uint8_t)rnd();
        if (below(4)) {
            hdr[0] = (uint8_t)below(4), hdr[1] = (uint8_t)(below(3) ? 1 : below(256));
            uint16_t mss = (uint16_t)(below(4) ? 1 + below(1460) : below(65536));
            hdr[4] = (uint8_t)mss, hdr[5] = (uint8_t)(mss >> 8);
        }
        long n = smfs_vnet_segment(hdr, big, len, segs, STRIDE, MAXSEG, lens);
        if (n > 0) {
            tun_ok++;
            for (long i = 0; i < n; i++)
                if (lens[i] > STRIDE)
                    return 3;
        } else {
            tun_refused++;
        }
    }
    free(big);
    free(segs);
    printf("fuzz: %ld TUN reads with offloads, %ld cut, %ld refused\n", tun_n, tun_ok, tun_refused);
    printf("fuzz: %ld datagrams, %ld accepted, %ld rejected, %ld streams; decoder received %llu "
           "rebuilt %llu inconsistent %llu stale %llu\n",
           fed, ok, rejected, passes, (unsigned long long)total.received,
           (unsigned long long)total.rebuilt, (unsigned long long)total.repairs_inconsistent,
           (unsigned long long)total.repairs_stale);
    for (size_t i = 0; i < npool; i++)
        free(pool[i]);
    free(dg);
    smfs_tunnel_free(t);
    smfs_encoder_free(enc);
    smfs_decoder_free(dec);
    smfs_replay_free(in.rw);
    smfs_ft_free(in.ft);
    return 0;
}
