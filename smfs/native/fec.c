/* Layered interleaving XOR FEC: the Encoder and Decoder of smfs/fec.py, same semantics.
 *
 * Encoder: packet s goes to bin s mod I_k of every layer k; a bin keeps the running XOR of
 * its packets (padded to the longest), their seqs and lengths, and emits its repair when it
 * holds r packets or when handle_timer finds its deadline (first packet + flush) passed.
 * Open bins are kept in a list in the order they opened, as the Python dict.
 *
 * Decoder: the packets held are always within [low, high] (at most `window` seqs), so they
 * live in a ring indexed by seq. Pending repairs (missing two or more packets) live in a pool,
 * in insertion order, found by their key (layer, seqs) through a hash chain; each missing seq
 * of a pending repair is a node in a per-seq waiting list (a hash chain over nodes kept in
 * insertion order), so the cascade visits them in the order Python's lists do.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "smfs_core.h"
#include "smfs_internal.h"

/* ---- Encoder ----------------------------------------------------------------------------- */

struct bin {
    uint8_t *buf;     /* running XOR, maxlen bytes valid */
    uint32_t cap;
    uint32_t maxlen;
    uint32_t count;
    uint32_t layer;
    uint32_t prev, next; /* open list */
    double deadline;
    bool lazy; /* every packet in it is lazy (fec.py _Bin.lazy) */
};

struct smfs_encoder {
    struct smfs_fec_params p;
    double flush_s;
    uint32_t nbins;
    uint32_t base[SMFS_MAX_LAYERS];
    struct bin *bins;
    uint64_t *seqs;    /* nbins * r */
    uint16_t *lengths; /* nbins * r */
    uint32_t open_head, open_tail;
    size_t open_count;
    bool started;
    uint64_t last_seq;
    bool budgeted;
    int64_t credit, earn, cost, credit_cap; /* fec.py Encoder.credit and its rule */
    struct smfs_encoder_stats stats;
};

struct smfs_encoder *smfs_encoder_new(const struct smfs_fec_params *p)
{
    if (smfs_fec_params_check(p) != 0) {
        errno = EINVAL;
        return NULL;
    }
    struct smfs_encoder *enc = calloc(1, sizeof(*enc));
    if (!enc)
        return NULL;
    enc->p = *p;
    enc->flush_s = p->flush_ms / 1000.0;
    for (uint32_t k = 0; k < p->c; k++) {
        enc->base[k] = enc->nbins;
        enc->nbins += p->interleaves[k];
    }
    enc->earn = SMFS_CREDIT_EARN * (int64_t)p->c;
    enc->cost = SMFS_CREDIT_COST * (int64_t)p->r;
    enc->credit_cap = enc->cost * (int64_t)enc->nbins;
    size_t nb = enc->nbins ? enc->nbins : 1; /* c = 0: no bins (calloc(0) may answer NULL) */
    enc->bins = calloc(nb, sizeof(*enc->bins));
    enc->seqs = calloc(nb * p->r, sizeof(*enc->seqs));
    enc->lengths = calloc(nb * p->r, sizeof(*enc->lengths));
    if (!enc->bins || !enc->seqs || !enc->lengths) {
        smfs_encoder_free(enc);
        errno = ENOMEM;
        return NULL;
    }
    for (uint32_t k = 0; k < p->c; k++)
        for (uint32_t i = 0; i < p->interleaves[k]; i++)
            enc->bins[enc->base[k] + i].layer = k;
    enc->open_head = enc->open_tail = SMFS_NONE;
    return enc;
}

void smfs_encoder_free(struct smfs_encoder *enc)
{
    if (!enc)
        return;
    if (enc->bins)
        for (uint32_t b = 0; b < enc->nbins; b++)
            free(enc->bins[b].buf);
    free(enc->bins);
    free(enc->seqs);
    free(enc->lengths);
    free(enc);
}

static void open_append(struct smfs_encoder *enc, uint32_t b)
{
    struct bin *bin = &enc->bins[b];
    bin->prev = enc->open_tail;
    bin->next = SMFS_NONE;
    if (enc->open_tail != SMFS_NONE)
        enc->bins[enc->open_tail].next = b;
    else
        enc->open_head = b;
    enc->open_tail = b;
    enc->open_count++;
}

static void open_remove(struct smfs_encoder *enc, uint32_t b)
{
    struct bin *bin = &enc->bins[b];
    if (bin->prev != SMFS_NONE)
        enc->bins[bin->prev].next = bin->next;
    else
        enc->open_head = bin->next;
    if (bin->next != SMFS_NONE)
        enc->bins[bin->next].prev = bin->prev;
    else
        enc->open_tail = bin->prev;
    enc->open_count--;
}

/* Emit bin b's repair and empty it. */
static void emit_bin(struct smfs_encoder *enc, uint32_t b, smfs_repair_fn emit, void *ctx)
{
    struct bin *bin = &enc->bins[b];
    enc->stats.repairs++;
    enc->credit -= enc->cost;
    if (emit) {
        struct smfs_repair rep = {
            .layer = bin->layer,
            .n = bin->count,
            .seqs = &enc->seqs[(size_t)b * enc->p.r],
            .lengths = &enc->lengths[(size_t)b * enc->p.r],
            .xor = bin->buf,
            .xor_len = bin->maxlen,
        };
        emit(ctx, &rep);
    }
    bin->count = 0;
    bin->maxlen = 0;
}

int smfs_encoder_add(struct smfs_encoder *enc, uint64_t seq, const uint8_t *packet, size_t len,
                     double now, smfs_repair_fn emit, void *ctx)
{
    return smfs_encoder_add_ex(enc, seq, packet, len, now, 0, emit, ctx);
}

int smfs_encoder_add_ex(struct smfs_encoder *enc, uint64_t seq, const uint8_t *packet, size_t len,
                        double now, int lazy, smfs_repair_fn emit, void *ctx)
{
    if (!enc || (enc->started && seq <= enc->last_seq) || len < 1 || len > SMFS_MAX_PACKET || !packet)
        return -EINVAL;
    const uint32_t c = enc->p.c, r = enc->p.r;
    uint32_t target[SMFS_MAX_LAYERS];
    for (uint32_t k = 0; k < c; k++) {
        target[k] = enc->base[k] + (uint32_t)(seq % enc->p.interleaves[k]);
        struct bin *bin = &enc->bins[target[k]];
        if (grow_buf(&bin->buf, &bin->cap, len) != 0)
            return -ENOMEM;
    }
    enc->started = true;
    enc->last_seq = seq;
    enc->stats.packets++;
    enc->stats.bytes += len;
    enc->credit = enc->credit + enc->earn < enc->credit_cap ? enc->credit + enc->earn : enc->credit_cap;
    uint32_t full[SMFS_MAX_LAYERS];
    uint32_t nfull = 0;
    for (uint32_t k = 0; k < c; k++) {
        uint32_t b = target[k];
        struct bin *bin = &enc->bins[b];
        if (bin->count == 0) {
            bin->deadline = now + enc->flush_s;
            bin->lazy = lazy != 0;
            open_append(enc, b);
            memcpy(bin->buf, packet, len);
            bin->maxlen = (uint32_t)len;
        } else {
            bin->lazy = bin->lazy && lazy;
            size_t common = len < bin->maxlen ? len : bin->maxlen;
            smfs_xor_into(bin->buf, packet, common);
            if (len > bin->maxlen) {
                memcpy(bin->buf + bin->maxlen, packet + bin->maxlen, len - bin->maxlen);
                bin->maxlen = (uint32_t)len;
            }
        }
        size_t at = (size_t)b * r + bin->count;
        enc->seqs[at] = seq;
        enc->lengths[at] = (uint16_t)len;
        if (++bin->count == r) {
            open_remove(enc, b);
            full[nfull++] = b;
        }
    }
    for (uint32_t i = 0; i < nfull; i++)
        emit_bin(enc, full[i], emit, ctx);
    return (int)nfull;
}

int smfs_encoder_add_batch(struct smfs_encoder *enc, uint64_t first_seq, const uint8_t *buf,
                           size_t buf_len, const uint32_t *offsets, const uint32_t *lens,
                           const uint8_t *lazy, size_t count, double now, smfs_repair_fn emit, void *ctx)
{
    if (!enc || (count && (!buf || !offsets || !lens)) || (count && first_seq + (count - 1) < first_seq))
        return -EINVAL;
    int total = 0;
    for (size_t i = 0; i < count; i++) {
        if ((size_t)offsets[i] > buf_len || (size_t)lens[i] > buf_len - offsets[i])
            return -EINVAL;
        int n = smfs_encoder_add_ex(enc, first_seq + i, buf + offsets[i], lens[i], now, lazy ? lazy[i] : 0,
                                    emit, ctx);
        if (n < 0)
            return n;
        total += n;
    }
    return total;
}

int smfs_encoder_get_timer(const struct smfs_encoder *enc, double *deadline)
{
    if (!enc)
        return 0;
    bool free_flush = !enc->budgeted || enc->credit >= enc->cost;
    for (uint32_t b = enc->open_head; b != SMFS_NONE; b = enc->bins[b].next) {
        if (free_flush || !enc->bins[b].lazy) { /* fec.py get_timer: the first bin that may flush */
            if (deadline)
                *deadline = enc->bins[b].deadline;
            return 1;
        }
    }
    return 0;
}

int smfs_encoder_handle_timer(struct smfs_encoder *enc, double now, smfs_repair_fn emit, void *ctx)
{
    if (!enc)
        return -EINVAL;
    int n = 0;
    for (uint32_t b = enc->open_head; b != SMFS_NONE;) {
        uint32_t next = enc->bins[b].next;
        if (enc->bins[b].deadline > now)
            break;
        if (enc->budgeted && enc->bins[b].lazy && enc->credit < enc->cost) {
            enc->stats.held++; /* fec.py: a due lazy bin left open for want of credit */
        } else {
            open_remove(enc, b);
            emit_bin(enc, b, emit, ctx);
            n++;
        }
        b = next;
    }
    enc->stats.flushed += (uint64_t)n;
    return n;
}

int smfs_encoder_flush(struct smfs_encoder *enc, smfs_repair_fn emit, void *ctx)
{
    if (!enc)
        return -EINVAL;
    int n = 0;
    while (enc->open_head != SMFS_NONE) {
        uint32_t b = enc->open_head;
        open_remove(enc, b);
        emit_bin(enc, b, emit, ctx);
        n++;
    }
    enc->stats.flushed += (uint64_t)n;
    return n;
}

size_t smfs_encoder_open_bins(const struct smfs_encoder *enc) { return enc ? enc->open_count : 0; }

void smfs_encoder_set_budgeted(struct smfs_encoder *enc, int budgeted)
{
    if (enc)
        enc->budgeted = budgeted != 0;
}

int64_t smfs_encoder_credit(const struct smfs_encoder *enc) { return enc ? enc->credit : 0; }

void smfs_encoder_stats(const struct smfs_encoder *enc, struct smfs_encoder_stats *out)
{
    if (enc && out)
        *out = enc->stats;
}

/* ---- Decoder ----------------------------------------------------------------------------- */

struct slot {
    uint64_t seq;
    uint8_t *buf;
    uint32_t cap;
    uint32_t len;
    bool held;
};

struct link {
    uint32_t prev, next; /* node ids (pending * 64 + index) in a waiting chain */
};

struct pend {
    uint64_t seqs[SMFS_MAX_R];
    uint16_t lengths[SMFS_MAX_R];
    struct link link[SMFS_MAX_R];
    uint64_t missing; /* bit i: seqs[i] still missing (the Python set _Pending.missing) */
    uint64_t linked;  /* bit i: node i is in the waiting chain of seqs[i] */
    uint64_t hash;
    uint8_t *xor;
    uint32_t xor_cap, xor_len;
    uint32_t layer, n;
    uint32_t prev, next; /* insertion order; next: free list when not live */
    uint32_t hnext;      /* key chain */
    bool live;
};

struct chain {
    uint32_t head, tail;
};

struct smfs_decoder {
    uint64_t window, max_repairs;
    struct slot *ring;
    uint64_t ring_mask;
    bool started;
    uint64_t high, low, floor;
    struct pend *pend;
    uint32_t pend_cap, pend_limit, pend_free, npend;
    uint32_t order_head, order_tail;
    uint32_t *keys; /* key-hash buckets -> pending chain */
    uint64_t keys_mask;
    struct chain *wait; /* seq-hash buckets -> node chain, insertion order */
    uint64_t wait_mask;
    uint32_t *scratch; /* pend_limit ids: one waiting list being visited */
    uint64_t *work;    /* window + 1 seqs: the cascade's stack */
    struct smfs_decoder_stats stats;
};

static inline struct slot *slot_of(const struct smfs_decoder *d, uint64_t seq)
{
    return &d->ring[seq & d->ring_mask];
}

static inline bool has(const struct smfs_decoder *d, uint64_t seq)
{
    const struct slot *s = slot_of(d, seq);
    return s->held && s->seq == seq;
}

struct smfs_decoder *smfs_decoder_new(const struct smfs_fec_params *p, uint64_t window)
{
    if (smfs_fec_params_check(p) != 0 || window > SMFS_MAX_WINDOW || window < 1 ||
        window < 2 * smfs_fec_span(p)) {
        errno = EINVAL;
        return NULL;
    }
    struct smfs_decoder *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->window = window;
    d->max_repairs = (uint64_t)p->c * window;
    d->pend_limit = (uint32_t)d->max_repairs + 1;
    size_t ring = pow2_at_least(window);
    d->ring = calloc(ring, sizeof(*d->ring));
    d->ring_mask = ring - 1;
    size_t keys = pow2_at_least(d->pend_limit < (1u << 16) ? 2 * (size_t)d->pend_limit : (1u << 17));
    d->keys = malloc(keys * sizeof(*d->keys));
    d->keys_mask = keys - 1;
    size_t wait = pow2_at_least(2 * window);
    d->wait = malloc(wait * sizeof(*d->wait));
    d->wait_mask = wait - 1;
    d->scratch = malloc((size_t)d->pend_limit * sizeof(*d->scratch));
    d->work = malloc((window + 1) * sizeof(*d->work));
    if (!d->ring || !d->keys || !d->wait || !d->scratch || !d->work) {
        smfs_decoder_free(d);
        errno = ENOMEM;
        return NULL;
    }
    for (size_t i = 0; i < keys; i++)
        d->keys[i] = SMFS_NONE;
    for (size_t i = 0; i < wait; i++)
        d->wait[i].head = d->wait[i].tail = SMFS_NONE;
    d->pend_free = d->order_head = d->order_tail = SMFS_NONE;
    return d;
}

void smfs_decoder_free(struct smfs_decoder *d)
{
    if (!d)
        return;
    if (d->ring)
        for (uint64_t i = 0; i <= d->ring_mask; i++)
            free(d->ring[i].buf);
    for (uint32_t i = 0; i < d->pend_cap; i++)
        free(d->pend[i].xor);
    free(d->ring);
    free(d->pend);
    free(d->keys);
    free(d->wait);
    free(d->scratch);
    free(d->work);
    free(d);
}

/* -- waiting lists: node id = pending * 64 + index; its seq is that pending's seqs[index] -- */

static inline struct link *node(struct smfs_decoder *d, uint32_t id)
{
    return &d->pend[id / SMFS_MAX_R].link[id % SMFS_MAX_R];
}

static inline uint64_t node_seq(const struct smfs_decoder *d, uint32_t id)
{
    return d->pend[id / SMFS_MAX_R].seqs[id % SMFS_MAX_R];
}

static inline struct chain *wait_chain(struct smfs_decoder *d, uint64_t seq)
{
    return &d->wait[mix64(seq) & d->wait_mask];
}

static void node_link(struct smfs_decoder *d, uint32_t pi, uint32_t i)
{
    uint32_t id = pi * SMFS_MAX_R + i;
    struct chain *ch = wait_chain(d, d->pend[pi].seqs[i]);
    struct link *l = node(d, id);
    l->prev = ch->tail;
    l->next = SMFS_NONE;
    if (ch->tail != SMFS_NONE)
        node(d, ch->tail)->next = id;
    else
        ch->head = id;
    ch->tail = id;
    d->pend[pi].linked |= 1ull << i;
}

static void node_unlink(struct smfs_decoder *d, uint32_t pi, uint32_t i)
{
    uint32_t id = pi * SMFS_MAX_R + i;
    struct chain *ch = wait_chain(d, d->pend[pi].seqs[i]);
    struct link *l = node(d, id);
    if (l->prev != SMFS_NONE)
        node(d, l->prev)->next = l->next;
    else
        ch->head = l->next;
    if (l->next != SMFS_NONE)
        node(d, l->next)->prev = l->prev;
    else
        ch->tail = l->prev;
    d->pend[pi].linked &= ~(1ull << i);
}

/* _waiting.pop(seq): the pending repairs waiting for seq, in order, into scratch; their nodes
 * for seq leave the chain. */
static uint32_t wait_pop(struct smfs_decoder *d, uint64_t seq)
{
    uint32_t n = 0;
    uint32_t id = wait_chain(d, seq)->head;
    while (id != SMFS_NONE) {
        uint32_t next = node(d, id)->next;
        if (node_seq(d, id) == seq) {
            uint32_t pi = id / SMFS_MAX_R;
            node_unlink(d, pi, id % SMFS_MAX_R);
            if (n < d->pend_limit)
                d->scratch[n++] = pi;
        }
        id = next;
    }
    return n;
}

/* -- pending repairs ------------------------------------------------------------------- */

static uint64_t key_hash(uint32_t layer, uint32_t n, const uint64_t *seqs)
{
    uint64_t h = mix64(((uint64_t)layer << 32) | n);
    for (uint32_t i = 0; i < n; i++)
        h = mix64(h ^ seqs[i]);
    return h;
}

static uint32_t key_find(const struct smfs_decoder *d, uint64_t h, const struct smfs_repair *rep)
{
    for (uint32_t pi = d->keys[h & d->keys_mask]; pi != SMFS_NONE; pi = d->pend[pi].hnext) {
        const struct pend *p = &d->pend[pi];
        if (p->hash == h && p->layer == rep->layer && p->n == rep->n &&
            memcmp(p->seqs, rep->seqs, rep->n * sizeof(uint64_t)) == 0)
            return pi;
    }
    return SMFS_NONE;
}

/* A free pending entry (the pool grows up to pend_limit), or SMFS_NONE. */
static uint32_t pend_alloc(struct smfs_decoder *d)
{
    if (d->pend_free == SMFS_NONE) {
        if (d->pend_cap >= d->pend_limit)
            return SMFS_NONE;
        uint32_t cap = d->pend_cap ? 2 * d->pend_cap : 16;
        if (cap > d->pend_limit)
            cap = d->pend_limit;
        struct pend *np = realloc(d->pend, (size_t)cap * sizeof(*np));
        if (!np)
            return SMFS_NONE;
        memset(np + d->pend_cap, 0, (size_t)(cap - d->pend_cap) * sizeof(*np));
        for (uint32_t i = cap; i-- > d->pend_cap;) {
            np[i].next = d->pend_free;
            d->pend_free = i;
        }
        d->pend = np;
        d->pend_cap = cap;
    }
    uint32_t pi = d->pend_free;
    d->pend_free = d->pend[pi].next;
    return pi;
}

static void drop_pending(struct smfs_decoder *d, uint32_t pi)
{
    struct pend *p = &d->pend[pi];
    if (!p->live)
        return;
    uint32_t *at = &d->keys[p->hash & d->keys_mask];
    while (*at != pi)
        at = &d->pend[*at].hnext;
    *at = p->hnext;
    if (p->prev != SMFS_NONE)
        d->pend[p->prev].next = p->next;
    else
        d->order_head = p->next;
    if (p->next != SMFS_NONE)
        d->pend[p->next].prev = p->prev;
    else
        d->order_tail = p->prev;
    for (uint64_t bits = p->linked; bits; bits &= bits - 1)
        node_unlink(d, pi, (uint32_t)__builtin_ctzll(bits));
    p->live = false;
    p->next = d->pend_free;
    d->pend_free = pi;
    d->npend--;
}

static void expire_repairs(struct smfs_decoder *d)
{
    while (d->order_head != SMFS_NONE) {
        uint32_t pi = d->order_head;
        if (d->pend[pi].seqs[0] >= d->low)
            break;
        d->stats.repairs_expired++;
        drop_pending(d, pi);
    }
}

/* -- window -------------------------------------------------------------------------------- */

static void raise_low(struct smfs_decoder *d, uint64_t new_low, uint64_t prev_high)
{
    if (new_low <= d->low)
        return;
    uint64_t old = d->low;
    d->low = new_low;
    uint64_t end = new_low < prev_high + 1 ? new_low : prev_high + 1;
    uint64_t held = 0;
    for (uint64_t s = old; s < end; s++) { /* every packet held is in [old, prev_high] */
        struct slot *sl = slot_of(d, s);
        if (sl->held && sl->seq == s) {
            sl->held = false;
            if (s >= d->floor)
                held++;
        }
    }
    uint64_t start = old > d->floor ? old : d->floor;
    if (end > start)
        d->stats.lost += (end - start) - held;
    if (d->npend)
        expire_repairs(d);
}

static void advance(struct smfs_decoder *d, uint64_t seq)
{
    const uint64_t w1 = d->window - 1;
    if (!d->started) {
        d->started = true;
        d->floor = seq;
        d->low = seq >= w1 ? seq - w1 : 0;
        d->high = seq;
        return;
    }
    if (seq <= d->high)
        return;
    if (seq - d->high >= d->window) {
        d->stats.skipped += seq - d->high - 1;
        d->floor = seq;
    }
    uint64_t prev = d->high;
    d->high = seq;
    if (seq >= w1)
        raise_low(d, seq - w1, prev);
}

/* -- rebuilding ------------------------------------------------------------------------ */

/* Decoder._xor: packet seqs[mi] from the repair and its other packets, written into its
 * slot (not yet held); false when they are not all held with their lengths. */
static bool xor_rebuild(struct smfs_decoder *d, const uint64_t *seqs, const uint16_t *lengths,
                        uint32_t n, const uint8_t *xor, uint32_t mi)
{
    if (seqs[0] < d->low)
        return false;
    for (uint32_t i = 0; i < n; i++) {
        if (i == mi)
            continue;
        const struct slot *o = slot_of(d, seqs[i]);
        if (!(o->held && o->seq == seqs[i]) || o->len != lengths[i]) {
            d->stats.repairs_inconsistent++;
            return false;
        }
    }
    uint32_t length = lengths[mi];
    struct slot *dst = slot_of(d, seqs[mi]);
    if (grow_buf(&dst->buf, &dst->cap, length) != 0) {
        d->stats.nomem++;
        return false;
    }
    memcpy(dst->buf, xor, length);
    for (uint32_t i = 0; i < n; i++) {
        if (i == mi)
            continue;
        const struct slot *o = slot_of(d, seqs[i]);
        smfs_xor_into(dst->buf, o->buf, o->len < length ? o->len : length);
    }
    return true;
}

static void hold(struct smfs_decoder *d, uint64_t seq, uint32_t len)
{
    struct slot *s = slot_of(d, seq);
    s->seq = seq;
    s->len = len;
    s->held = true;
}

static void report(struct smfs_decoder *d, uint64_t seq, smfs_packet_fn cb, void *ctx)
{
    if (cb) {
        const struct slot *s = slot_of(d, seq);
        cb(ctx, seq, s->buf, s->len);
    }
}

/* Decoder._store after the packet is held: cascade through the repairs waiting for it. */
static int cascade(struct smfs_decoder *d, uint64_t seq, smfs_packet_fn cb, void *ctx)
{
    int rebuilt = 0;
    uint64_t top = 0;
    d->work[top++] = seq;
    while (top) {
        uint64_t s = d->work[--top];
        uint32_t k = wait_pop(d, s);
        for (uint32_t j = 0; j < k; j++) {
            uint32_t pi = d->scratch[j];
            struct pend *p = &d->pend[pi];
            if (!p->live)
                continue;
            for (uint64_t bits = p->missing; bits; bits &= bits - 1) {
                uint32_t i = (uint32_t)__builtin_ctzll(bits);
                if (has(d, p->seqs[i]))
                    p->missing &= ~(1ull << i);
            }
            int left = __builtin_popcountll(p->missing);
            if (left == 1) {
                uint32_t mi = (uint32_t)__builtin_ctzll(p->missing);
                uint64_t m = p->seqs[mi];
                uint32_t length = p->lengths[mi];
                bool ok = xor_rebuild(d, p->seqs, p->lengths, p->n, p->xor, mi);
                drop_pending(d, pi);
                if (ok) {
                    hold(d, m, length);
                    d->stats.rebuilt++;
                    rebuilt++;
                    report(d, m, cb, ctx);
                    if (top <= d->window)
                        d->work[top++] = m;
                }
            } else if (left == 0) {
                drop_pending(d, pi);
            }
        }
    }
    return rebuilt;
}

int smfs_decoder_on_data(struct smfs_decoder *d, uint64_t seq, const uint8_t *packet, size_t len,
                         double now, smfs_packet_fn cb, void *ctx)
{
    (void)now; /* state expires by sequence number and count, not by time */
    if (!d || len > SMFS_MAX_PACKET || (len && !packet))
        return -EINVAL;
    struct slot *sl = slot_of(d, seq);
    if (grow_buf(&sl->buf, &sl->cap, len) != 0)
        return -ENOMEM;
    advance(d, seq);
    if (seq < d->low) {
        d->stats.late++;
        return 0;
    }
    if (has(d, seq)) {
        d->stats.duplicates++;
        return 0;
    }
    d->stats.received++;
    if (len)
        memcpy(sl->buf, packet, len);
    hold(d, seq, (uint32_t)len);
    return cascade(d, seq, cb, ctx);
}

int smfs_decoder_on_repair(struct smfs_decoder *d, const struct smfs_repair *rep, double now,
                           smfs_packet_fn cb, void *ctx)
{
    (void)now;
    if (!d || smfs_repair_check(rep) != 0)
        return -EINVAL;
    d->stats.repairs++;
    const uint64_t first = rep->seqs[0], last = rep->seqs[rep->n - 1];
    if (last - first >= d->window) {
        d->stats.repairs_stale++;
        return 0;
    }
    advance(d, last);
    if (first < d->low) {
        d->stats.repairs_stale++;
        return 0;
    }
    uint64_t h = key_hash(rep->layer, rep->n, rep->seqs);
    if (key_find(d, h, rep) != SMFS_NONE) {
        d->stats.repairs_duplicate++;
        return 0;
    }
    uint64_t missing = 0;
    for (uint32_t i = 0; i < rep->n; i++)
        if (!has(d, rep->seqs[i]))
            missing |= 1ull << i;
    int count = __builtin_popcountll(missing);
    if (count == 0) {
        d->stats.repairs_useless++;
        return 0;
    }
    if (count == 1) {
        uint32_t mi = (uint32_t)__builtin_ctzll(missing);
        if (!xor_rebuild(d, rep->seqs, rep->lengths, rep->n, rep->xor, mi))
            return 0;
        uint64_t m = rep->seqs[mi];
        hold(d, m, rep->lengths[mi]);
        d->stats.rebuilt++;
        report(d, m, cb, ctx);
        return 1 + cascade(d, m, cb, ctx);
    }
    uint32_t pi = pend_alloc(d);
    if (pi == SMFS_NONE || grow_buf(&d->pend[pi].xor, &d->pend[pi].xor_cap, rep->xor_len) != 0) {
        if (pi != SMFS_NONE) {
            d->pend[pi].next = d->pend_free;
            d->pend_free = pi;
        }
        d->stats.nomem++;
        return 0;
    }
    struct pend *p = &d->pend[pi];
    memcpy(p->seqs, rep->seqs, rep->n * sizeof(uint64_t));
    memcpy(p->lengths, rep->lengths, rep->n * sizeof(uint16_t));
    memcpy(p->xor, rep->xor, rep->xor_len);
    p->xor_len = rep->xor_len;
    p->layer = rep->layer;
    p->n = rep->n;
    p->missing = missing;
    p->linked = 0;
    p->hash = h;
    p->live = true;
    p->hnext = d->keys[h & d->keys_mask];
    d->keys[h & d->keys_mask] = pi;
    p->prev = d->order_tail;
    p->next = SMFS_NONE;
    if (d->order_tail != SMFS_NONE)
        d->pend[d->order_tail].next = pi;
    else
        d->order_head = pi;
    d->order_tail = pi;
    d->npend++;
    for (uint64_t bits = missing; bits; bits &= bits - 1)
        node_link(d, pi, (uint32_t)__builtin_ctzll(bits));
    while (d->npend > d->max_repairs) {
        d->stats.repairs_expired++;
        drop_pending(d, d->order_head);
    }
    return 0;
}

int smfs_decoder_has(const struct smfs_decoder *d, uint64_t seq) { return d && has(d, seq); }

const uint8_t *smfs_decoder_get(const struct smfs_decoder *d, uint64_t seq, size_t *len)
{
    if (!d || !has(d, seq))
        return NULL;
    const struct slot *s = slot_of(d, seq);
    if (len)
        *len = s->len;
    static const uint8_t empty[1];
    return s->buf ? s->buf : empty;
}

uint64_t smfs_decoder_low(const struct smfs_decoder *d) { return d ? d->low : 0; }

uint64_t smfs_decoder_window(const struct smfs_decoder *d) { return d ? d->window : 0; }

uint64_t smfs_decoder_missing_in_window(const struct smfs_decoder *d)
{
    if (!d || !d->started)
        return 0;
    uint64_t lo = d->low > d->floor ? d->low : d->floor;
    if (d->high < lo)
        return 0;
    uint64_t held = 0;
    for (uint64_t s = lo;; s++) {
        held += has(d, s);
        if (s == d->high)
            break;
    }
    return (d->high - lo + 1) - held;
}

void smfs_decoder_stats(const struct smfs_decoder *d, struct smfs_decoder_stats *out)
{
    if (d && out)
        *out = d->stats;
}
