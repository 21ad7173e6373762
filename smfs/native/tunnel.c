/* The UDP tunnel's wire format (smfs/tunnel.py): sealing and unsealing DATA and REPAIR
 * datagrams with HMAC-SHA-256 (libcrypto) truncated to 16 bytes, and the replay window.
 *
 * The HMAC is computed as tunnel.py does: the SHA-256 states after the inner and the outer key
 * blocks are computed once per key (smfs_tunnel_new) and copied per datagram.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "smfs_core.h"
#include "smfs_internal.h"

#define HEAD_LEN 4
#define DATA_OFF (HEAD_LEN + 8)
#define REPAIR_HEAD_LEN 10
#define MIN_LEN (HEAD_LEN + SMFS_MAC_LEN)
#define BLOCK 64

struct smfs_tunnel {
    EVP_MD_CTX *inner; /* after the key block ^ 0x36 */
    EVP_MD_CTX *outer; /* after the key block ^ 0x5c */
    EVP_MD_CTX *work;
};

void smfs_tunnel_free(struct smfs_tunnel *t)
{
    if (!t)
        return;
    EVP_MD_CTX_free(t->inner);
    EVP_MD_CTX_free(t->outer);
    EVP_MD_CTX_free(t->work);
    free(t);
}

struct smfs_tunnel *smfs_tunnel_new(const uint8_t *key, size_t key_len)
{
    if (!key || key_len < SMFS_MIN_KEY) {
        errno = EINVAL;
        return NULL;
    }
    struct smfs_tunnel *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->inner = EVP_MD_CTX_new();
    t->outer = EVP_MD_CTX_new();
    t->work = EVP_MD_CTX_new();
    uint8_t block[BLOCK] = {0}, pad[BLOCK];
    bool ok = t->inner && t->outer && t->work;
    if (ok && key_len > BLOCK) {
        unsigned int n = 0;
        ok = EVP_Digest(key, key_len, block, &n, EVP_sha256(), NULL) == 1;
    } else if (ok) {
        memcpy(block, key, key_len);
    }
    for (int i = 0; i < BLOCK; i++)
        pad[i] = block[i] ^ 0x36;
    ok = ok && EVP_DigestInit_ex(t->inner, EVP_sha256(), NULL) == 1 &&
         EVP_DigestUpdate(t->inner, pad, BLOCK) == 1;
    for (int i = 0; i < BLOCK; i++)
        pad[i] = block[i] ^ 0x5c;
    ok = ok && EVP_DigestInit_ex(t->outer, EVP_sha256(), NULL) == 1 &&
         EVP_DigestUpdate(t->outer, pad, BLOCK) == 1;
    OPENSSL_cleanse(block, sizeof(block));
    OPENSSL_cleanse(pad, sizeof(pad));
    if (!ok) {
        smfs_tunnel_free(t);
        errno = ENOMEM;
        return NULL;
    }
    return t;
}

/* HMAC-SHA-256 of data[0..len) under t's key, truncated to 16 bytes: 0 or -1. */
static int mac(struct smfs_tunnel *t, const uint8_t *data, size_t len, uint8_t out[SMFS_MAC_LEN])
{
    uint8_t digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_MD_CTX_copy_ex(t->work, t->inner) != 1 || EVP_DigestUpdate(t->work, data, len) != 1 ||
        EVP_DigestFinal_ex(t->work, digest, &n) != 1 || EVP_MD_CTX_copy_ex(t->work, t->outer) != 1 ||
        EVP_DigestUpdate(t->work, digest, n) != 1 || EVP_DigestFinal_ex(t->work, digest, &n) != 1)
        return -1;
    memcpy(out, digest, SMFS_MAC_LEN);
    return 0;
}

int smfs_tunnel_mac(struct smfs_tunnel *t, const uint8_t *data, size_t len, uint8_t out[SMFS_MAC_LEN])
{
    if (!t || (!data && len) || !out)
        return -EINVAL;
    return mac(t, data, len, out) == 0 ? 0 : -EIO;
}

static void put_head(uint8_t *out, int kind, int site)
{
    out[0] = SMFS_MAGIC;
    out[1] = SMFS_VERSION;
    out[2] = (uint8_t)kind;
    out[3] = (uint8_t)site;
}

long smfs_seal_data(struct smfs_tunnel *t, int site, uint64_t seq, const uint8_t *packet,
                    size_t len, uint8_t *out, size_t cap)
{
    if (!t || site < 0 || site > 255 || !packet || len < 1 || len > SMFS_MAX_DATA_PACKET || !out)
        return -EINVAL;
    size_t total = len + SMFS_DATA_OVERHEAD;
    if (cap < total)
        return -ENOSPC;
    memmove(out + DATA_OFF, packet, len); /* packet may already sit at out + 12 */
    put_head(out, SMFS_KIND_DATA, site);
    st64(out + HEAD_LEN, seq);
    if (mac(t, out, DATA_OFF + len, out + DATA_OFF + len) != 0)
        return -EIO;
    return (long)total;
}

long smfs_seal_repair(struct smfs_tunnel *t, int site, const struct smfs_repair *rep, uint8_t *out,
                      size_t cap)
{
    if (!t || site < 0 || site > 255 || !out || smfs_repair_check(rep) != 0 || rep->layer > 255)
        return -EINVAL;
    const uint32_t n = rep->n;
    const uint64_t first = rep->seqs[0];
    if (rep->seqs[n - 1] - first >= (1ull << 32))
        return -EINVAL;
    size_t body = HEAD_LEN + REPAIR_HEAD_LEN + 4 * (size_t)(n - 1) + 2 * (size_t)n + rep->xor_len;
    if (body + SMFS_MAC_LEN > SMFS_MAX_DATAGRAM)
        return -EINVAL;
    if (cap < body + SMFS_MAC_LEN)
        return -ENOSPC;
    put_head(out, SMFS_KIND_REPAIR, site);
    uint8_t *p = out + HEAD_LEN;
    p[0] = (uint8_t)rep->layer;
    p[1] = (uint8_t)n;
    st64(p + 2, first);
    p += REPAIR_HEAD_LEN;
    for (uint32_t i = 1; i < n; i++, p += 4)
        st32(p, (uint32_t)(rep->seqs[i] - first));
    for (uint32_t i = 0; i < n; i++, p += 2)
        st16(p, rep->lengths[i]);
    memmove(p, rep->xor, rep->xor_len);
    if (mac(t, out, body, out + body) != 0)
        return -EIO;
    return (long)(body + SMFS_MAC_LEN);
}

/* tunnel._decode_repair over body[0..end): fills msg's repair. */
static int parse_repair(const uint8_t *body, size_t end, struct smfs_msg *msg)
{
    size_t off = HEAD_LEN;
    if (end < off + REPAIR_HEAD_LEN)
        return -SMFS_TE_MALFORMED;
    uint32_t layer = body[off], n = body[off + 1];
    uint64_t first = ld64(body + off + 2);
    off += REPAIR_HEAD_LEN;
    if (n < 1 || n > SMFS_MAX_R)
        return -SMFS_TE_MALFORMED;
    size_t table = 4 * (size_t)(n - 1) + 2 * (size_t)n;
    if (end < off + table)
        return -SMFS_TE_MALFORMED;
    uint32_t prev = 0;
    msg->seqs[0] = first;
    for (uint32_t i = 1; i < n; i++) {
        uint32_t delta = ld32(body + off + 4 * (i - 1));
        if (delta <= prev) /* the first delta must be > 0, then strictly increasing */
            return -SMFS_TE_MALFORMED;
        prev = delta;
    }
    if (first > UINT64_MAX - prev)
        return -SMFS_TE_MALFORMED;
    for (uint32_t i = 1; i < n; i++)
        msg->seqs[i] = first + ld32(body + off + 4 * (i - 1));
    off += 4 * (size_t)(n - 1);
    uint32_t longest = 0, shortest = UINT32_MAX;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t l = ld16(body + off + 2 * i);
        msg->lengths[i] = l;
        longest = l > longest ? l : longest;
        shortest = l < shortest ? l : shortest;
    }
    off += 2 * (size_t)n;
    if (shortest < 1 || end - off != longest || longest > SMFS_MAX_PACKET)
        return -SMFS_TE_MALFORMED;
    msg->repair = (struct smfs_repair){
        .layer = layer,
        .n = n,
        .seqs = msg->seqs,
        .lengths = msg->lengths,
        .xor = body + off,
        .xor_len = longest,
    };
    return 0;
}

int smfs_unseal(struct smfs_tunnel *t, const uint8_t *d, size_t len, int expect_site,
                struct smfs_msg *msg)
{
    if (!t || !msg || (!d && len))
        return -SMFS_TE_INTERNAL;
    if (len < MIN_LEN)
        return -SMFS_TE_SHORT;
    if (len > SMFS_MAX_DATAGRAM)
        return -SMFS_TE_OVERSIZE;
    if (d[0] != SMFS_MAGIC)
        return -SMFS_TE_BAD_MAGIC;
    if (d[1] != SMFS_VERSION)
        return -SMFS_TE_BAD_VERSION;
    size_t end = len - SMFS_MAC_LEN;
    uint8_t want[SMFS_MAC_LEN];
    if (mac(t, d, end, want) != 0)
        return -SMFS_TE_INTERNAL;
    if (CRYPTO_memcmp(want, d + end, SMFS_MAC_LEN) != 0)
        return -SMFS_TE_BAD_MAC;
    if (expect_site >= 0 && d[3] != expect_site)
        return -SMFS_TE_FOREIGN_SITE;
    msg->kind = d[2];
    msg->site = d[3];
    if (d[2] == SMFS_KIND_DATA) {
        if (end <= DATA_OFF)
            return -SMFS_TE_MALFORMED;
        msg->seq = ld64(d + HEAD_LEN);
        msg->packet = d + DATA_OFF;
        msg->packet_len = end - DATA_OFF;
        return 0;
    }
    if (d[2] == SMFS_KIND_REPAIR) {
        msg->seq = 0;
        msg->packet = NULL;
        msg->packet_len = 0;
        return parse_repair(d, end, msg);
    }
    return -SMFS_TE_BAD_KIND;
}

/* ---- ReplayWindow -------------------------------------------------------------------------- */

struct seqset { /* open addressing, linear probing, backward-shift deletion */
    uint64_t *keys;
    uint8_t *used;
    size_t mask, count;
};

struct smfs_replay {
    uint64_t size;
    uint64_t nbits; /* power of two >= size: bit (seq & (nbits - 1)) is seq's */
    uint64_t *bits;
    bool started;
    uint64_t top;
    struct seqset rebuilt, spare; /* spare: the prune's destination, swapped in */
};

static int set_init(struct seqset *s, size_t cap)
{
    s->keys = calloc(cap, sizeof(*s->keys));
    s->used = calloc(cap, 1);
    s->mask = cap - 1;
    s->count = 0;
    return s->keys && s->used ? 0 : -1;
}

static size_t set_find(const struct seqset *s, uint64_t k, bool *found)
{
    size_t i = mix64(k) & s->mask;
    while (s->used[i] && s->keys[i] != k)
        i = (i + 1) & s->mask;
    *found = s->used[i];
    return i;
}

static void set_add(struct seqset *s, uint64_t k)
{
    bool found;
    size_t i = set_find(s, k, &found);
    if (!found) {
        s->used[i] = 1;
        s->keys[i] = k;
        s->count++;
    }
}

static bool set_discard(struct seqset *s, uint64_t k)
{
    bool found;
    size_t i = set_find(s, k, &found);
    if (!found)
        return false;
    s->used[i] = 0;
    s->count--;
    for (size_t j = (i + 1) & s->mask; s->used[j]; j = (j + 1) & s->mask) {
        size_t home = mix64(s->keys[j]) & s->mask;
        /* move j back to i when i lies cyclically in [home, j) */
        if (((j - home) & s->mask) >= ((j - i) & s->mask)) {
            s->keys[i] = s->keys[j];
            s->used[i] = 1;
            s->used[j] = 0;
            i = j;
        }
    }
    return true;
}

struct smfs_replay *smfs_replay_new(uint64_t size)
{
    if (size < 64 || size > (1u << 24)) {
        errno = EINVAL;
        return NULL;
    }
    struct smfs_replay *rw = calloc(1, sizeof(*rw));
    if (!rw)
        return NULL;
    rw->size = size;
    rw->nbits = pow2_at_least(size);
    rw->bits = calloc(rw->nbits / 64, sizeof(uint64_t));
    size_t cap = pow2_at_least(4 * size + 4); /* holds 2 * size + 1 at load <= 1/2 */
    if (!rw->bits || set_init(&rw->rebuilt, cap) || set_init(&rw->spare, cap)) {
        smfs_replay_free(rw);
        errno = ENOMEM;
        return NULL;
    }
    return rw;
}

void smfs_replay_free(struct smfs_replay *rw)
{
    if (!rw)
        return;
    free(rw->bits);
    free(rw->rebuilt.keys);
    free(rw->rebuilt.used);
    free(rw->spare.keys);
    free(rw->spare.used);
    free(rw);
}

static inline bool bit_get(const struct smfs_replay *rw, uint64_t seq)
{
    uint64_t pos = seq & (rw->nbits - 1);
    return (rw->bits[pos / 64] >> (pos % 64)) & 1;
}

static inline void bit_put(struct smfs_replay *rw, uint64_t seq, bool on)
{
    uint64_t pos = seq & (rw->nbits - 1);
    if (on)
        rw->bits[pos / 64] |= 1ull << (pos % 64);
    else
        rw->bits[pos / 64] &= ~(1ull << (pos % 64));
}

int smfs_replay_check(const struct smfs_replay *rw, uint64_t seq)
{
    if (!rw->started || seq > rw->top)
        return 1;
    return rw->top - seq < rw->size && !bit_get(rw, seq);
}

void smfs_replay_update(struct smfs_replay *rw, uint64_t seq)
{
    if (!rw->started || seq > rw->top) {
        uint64_t shift = rw->started ? seq - rw->top : UINT64_MAX;
        if (shift >= rw->nbits)
            memset(rw->bits, 0, rw->nbits / 8);
        else
            for (uint64_t s = rw->top + 1; s != seq; s++)
                bit_put(rw, s, false);
        bit_put(rw, seq, true);
        rw->top = seq;
        rw->started = true;
    } else if (rw->top - seq < rw->size) {
        bit_put(rw, seq, true);
    }
}

int smfs_replay_check_and_update(struct smfs_replay *rw, uint64_t seq)
{
    if (!smfs_replay_check(rw, seq))
        return 0;
    smfs_replay_update(rw, seq);
    return 1;
}

void smfs_replay_mark_rebuilt(struct smfs_replay *rw, uint64_t seq)
{
    smfs_replay_update(rw, seq);
    set_add(&rw->rebuilt, seq);
    if (rw->rebuilt.count > 2 * rw->size && rw->top >= rw->size) {
        uint64_t low = rw->top - rw->size; /* keep s > low (below 0: keep all) */
        struct seqset *from = &rw->rebuilt, *to = &rw->spare;
        memset(to->used, 0, to->mask + 1);
        to->count = 0;
        for (size_t i = 0; i <= from->mask; i++)
            if (from->used[i] && from->keys[i] > low)
                set_add(to, from->keys[i]);
        struct seqset tmp = *from;
        *from = *to;
        *to = tmp;
    }
}

int smfs_replay_late_after_rebuild(struct smfs_replay *rw, uint64_t seq)
{
    return set_discard(&rw->rebuilt, seq);
}

int smfs_replay_top(const struct smfs_replay *rw, uint64_t *top)
{
    if (!rw->started)
        return 0;
    if (top)
        *top = rw->top;
    return 1;
}

size_t smfs_replay_rebuilt_count(const struct smfs_replay *rw) { return rw->rebuilt.count; }
