/* Network-level callbacks: the FlowTracker of smfs/callbacks.py, same semantics.
 *
 * Flows live in a pool of max_flows + 1 slots, found by 4-tuple through a hash chain and kept
 * in least-recently-active order (the OrderedDict). A flow's state has a generation number,
 * new at every SYN that (re)starts it: a carried entry names (slot, generation), which is
 * Python's `flows.get(flow) is st`. The tunnel packets waiting for their repairs ("carried")
 * live in a pool of max_pending + 1 records in insertion order, found by tunnel seq.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "smfs_core.h"
#include "smfs_internal.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define MAX_HOLES 4096 /* C-only bound on a flow's safe ranges beyond its contiguous offset */

struct hole {
    int64_t start, end;
};

struct fstate {
    struct smfs_flow key;
    uint64_t gen;
    uint32_t isn;
    int64_t ref, safe_end, reported, fin_at;
    bool has_fin, rst, used;
    struct hole *holes;
    uint32_t nholes, holes_cap;
    uint32_t lru_prev, lru_next, hnext;
    uint32_t adv_idx, close_idx; /* index in the advanced / closing list, or SMFS_NONE */
};

struct entry {
    uint64_t gen;
    int64_t start, end;
    double sent, held; /* held: ft->held at the send (callbacks.py held_latencies) */
    uint32_t slot, next;
};

struct carried {
    uint64_t tseq;
    uint64_t done; /* bit k: a repair of layer k was sent */
    uint32_t head, tail; /* entries */
    uint32_t prev, next, hnext;
};

struct smfs_flow_tracker {
    uint64_t full;
    uint32_t max_flows, max_pending;
    bool safe_at_send;
    struct fstate *flows;
    uint32_t nslots, nflows, free_slot, lru_head, lru_tail;
    uint32_t *fbuckets;
    uint64_t fmask, next_gen;
    uint32_t *advanced, nadvanced;
    uint32_t *closing, nclosing;
    struct carried *carr;
    uint32_t ncarr_slots, ncarried, free_carr, order_head, order_tail;
    uint32_t *cbuckets;
    uint64_t cmask;
    struct entry *entries;
    uint32_t nentries, free_entry;
    double *lat, *lat_held; /* latencies and their pacer-held parts, one ring */
    uint32_t lat_cap, lat_count, lat_head;
    double held;
    uint64_t ignored, dropped;
};

void smfs_ft_free(struct smfs_flow_tracker *ft)
{
    if (!ft)
        return;
    if (ft->flows)
        for (uint32_t i = 0; i < ft->nslots; i++)
            free(ft->flows[i].holes);
    free(ft->flows);
    free(ft->fbuckets);
    free(ft->advanced);
    free(ft->closing);
    free(ft->carr);
    free(ft->cbuckets);
    free(ft->entries);
    free(ft->lat);
    free(ft->lat_held);
    free(ft);
}

struct smfs_flow_tracker *smfs_ft_new(uint32_t c, uint32_t max_flows, uint32_t max_pending,
                                      uint32_t max_latencies, int safe_at_send)
{
    if (c > SMFS_MAX_LAYERS || max_flows < 1 || max_flows > (1u << 20) ||
        max_pending > (1u << 22) || max_latencies > (1u << 24)) {
        errno = EINVAL;
        return NULL;
    }
    struct smfs_flow_tracker *ft = calloc(1, sizeof(*ft));
    if (!ft)
        return NULL;
    ft->full = (1ull << c) - 1; /* 0 when c = 0: no FEC */
    ft->max_flows = max_flows;
    ft->max_pending = max_pending;
    ft->safe_at_send = safe_at_send != 0;
    ft->nslots = max_flows + 1;
    ft->flows = calloc(ft->nslots, sizeof(*ft->flows));
    size_t fb = pow2_at_least(2 * (size_t)ft->nslots);
    ft->fbuckets = malloc(fb * sizeof(*ft->fbuckets));
    ft->fmask = fb - 1;
    ft->advanced = malloc(ft->nslots * sizeof(*ft->advanced));
    ft->closing = malloc(ft->nslots * sizeof(*ft->closing));
    ft->ncarr_slots = max_pending + 1;
    ft->carr = calloc(ft->ncarr_slots, sizeof(*ft->carr));
    size_t cb = pow2_at_least(2 * (size_t)ft->ncarr_slots);
    ft->cbuckets = malloc(cb * sizeof(*ft->cbuckets));
    ft->cmask = cb - 1;
    ft->nentries = 2 * ft->ncarr_slots;
    ft->entries = calloc(ft->nentries, sizeof(*ft->entries));
    ft->lat_cap = max_latencies;
    ft->lat = calloc(max_latencies ? max_latencies : 1, sizeof(*ft->lat));
    ft->lat_held = calloc(max_latencies ? max_latencies : 1, sizeof(*ft->lat_held));
    if (!ft->flows || !ft->fbuckets || !ft->advanced || !ft->closing || !ft->carr ||
        !ft->cbuckets || !ft->entries || !ft->lat || !ft->lat_held) {
        smfs_ft_free(ft);
        errno = ENOMEM;
        return NULL;
    }
    for (size_t i = 0; i < fb; i++)
        ft->fbuckets[i] = SMFS_NONE;
    for (size_t i = 0; i < cb; i++)
        ft->cbuckets[i] = SMFS_NONE;
    ft->free_slot = SMFS_NONE;
    for (uint32_t i = ft->nslots; i-- > 0;) {
        ft->flows[i].lru_next = ft->free_slot;
        ft->free_slot = i;
    }
    ft->free_carr = SMFS_NONE;
    for (uint32_t i = ft->ncarr_slots; i-- > 0;) {
        ft->carr[i].next = ft->free_carr;
        ft->free_carr = i;
    }
    ft->free_entry = SMFS_NONE;
    for (uint32_t i = ft->nentries; i-- > 0;) {
        ft->entries[i].next = ft->free_entry;
        ft->free_entry = i;
    }
    ft->lru_head = ft->lru_tail = ft->order_head = ft->order_tail = SMFS_NONE;
    return ft;
}

/* ---- flows: lookup, LRU, the advanced and closing lists ---------------------------------- */

static uint64_t flow_hash(const struct smfs_flow *f)
{
    uint64_t a = ld32(f->src), b = ld32(f->dst);
    return mix64((a << 32 | b) ^ mix64((uint64_t)f->sport << 16 | f->dport));
}

static bool flow_eq(const struct smfs_flow *a, const struct smfs_flow *b)
{
    return memcmp(a->src, b->src, 4) == 0 && memcmp(a->dst, b->dst, 4) == 0 &&
           a->sport == b->sport && a->dport == b->dport;
}

static uint32_t flow_find(const struct smfs_flow_tracker *ft, const struct smfs_flow *f)
{
    for (uint32_t i = ft->fbuckets[flow_hash(f) & ft->fmask]; i != SMFS_NONE; i = ft->flows[i].hnext)
        if (flow_eq(&ft->flows[i].key, f))
            return i;
    return SMFS_NONE;
}

static void lru_unlink(struct smfs_flow_tracker *ft, uint32_t i)
{
    struct fstate *st = &ft->flows[i];
    if (st->lru_prev != SMFS_NONE)
        ft->flows[st->lru_prev].lru_next = st->lru_next;
    else
        ft->lru_head = st->lru_next;
    if (st->lru_next != SMFS_NONE)
        ft->flows[st->lru_next].lru_prev = st->lru_prev;
    else
        ft->lru_tail = st->lru_prev;
}

static void lru_append(struct smfs_flow_tracker *ft, uint32_t i)
{
    struct fstate *st = &ft->flows[i];
    st->lru_prev = ft->lru_tail;
    st->lru_next = SMFS_NONE;
    if (ft->lru_tail != SMFS_NONE)
        ft->flows[ft->lru_tail].lru_next = i;
    else
        ft->lru_head = i;
    ft->lru_tail = i;
}

static void list_add(uint32_t *list, uint32_t *n, uint32_t *idx, uint32_t slot)
{
    if (*idx == SMFS_NONE) {
        *idx = *n;
        list[(*n)++] = slot;
    }
}

static void advanced_add(struct smfs_flow_tracker *ft, uint32_t i)
{
    list_add(ft->advanced, &ft->nadvanced, &ft->flows[i].adv_idx, i);
}

static void closing_add(struct smfs_flow_tracker *ft, uint32_t i)
{
    list_add(ft->closing, &ft->nclosing, &ft->flows[i].close_idx, i);
}

static void advanced_remove(struct smfs_flow_tracker *ft, uint32_t i)
{
    uint32_t k = ft->flows[i].adv_idx;
    if (k == SMFS_NONE)
        return;
    uint32_t last = ft->advanced[--ft->nadvanced];
    ft->advanced[k] = last;
    ft->flows[last].adv_idx = k;
    ft->flows[i].adv_idx = SMFS_NONE;
}

static void closing_remove(struct smfs_flow_tracker *ft, uint32_t i)
{
    uint32_t k = ft->flows[i].close_idx;
    if (k == SMFS_NONE)
        return;
    uint32_t last = ft->closing[--ft->nclosing];
    ft->closing[k] = last;
    ft->flows[last].close_idx = k;
    ft->flows[i].close_idx = SMFS_NONE;
}

static void state_reset(struct smfs_flow_tracker *ft, uint32_t i, uint32_t isn)
{
    struct fstate *st = &ft->flows[i];
    st->gen = ++ft->next_gen;
    st->isn = isn;
    st->ref = st->safe_end = st->reported = st->fin_at = 0;
    st->has_fin = st->rst = false;
    st->nholes = 0;
}

static void flow_delete(struct smfs_flow_tracker *ft, uint32_t i)
{
    struct fstate *st = &ft->flows[i];
    uint32_t *at = &ft->fbuckets[flow_hash(&st->key) & ft->fmask];
    while (*at != i)
        at = &ft->flows[*at].hnext;
    *at = st->hnext;
    lru_unlink(ft, i);
    advanced_remove(ft, i);
    closing_remove(ft, i);
    st->used = false;
    st->gen = ++ft->next_gen; /* no carried entry matches it any more */
    st->lru_next = ft->free_slot;
    ft->free_slot = i;
    ft->nflows--;
}

/* FlowTracker._new_flow: the flow (re)started at `isn`; `i` its slot when tracked. */
static uint32_t new_flow(struct smfs_flow_tracker *ft, const struct smfs_flow *f, uint32_t isn, uint32_t i)
{
    if (i != SMFS_NONE) { /* replaced in place: keeps its place in the LRU order */
        state_reset(ft, i, isn);
        advanced_remove(ft, i); /* a fresh state has nothing to report until it advances */
        closing_remove(ft, i);
        return i;
    }
    i = ft->free_slot; /* never empty: at most max_flows slots are in use here */
    struct fstate *st = &ft->flows[i];
    ft->free_slot = st->lru_next;
    st->key = *f;
    st->used = true;
    st->adv_idx = st->close_idx = SMFS_NONE;
    state_reset(ft, i, isn);
    uint32_t *bucket = &ft->fbuckets[flow_hash(f) & ft->fmask];
    st->hnext = *bucket;
    *bucket = i;
    lru_append(ft, i);
    ft->nflows++;
    while (ft->nflows > ft->max_flows)
        flow_delete(ft, ft->lru_head);
    return i;
}

/* ---- offsets ------------------------------------------------------------------------------ */

/* unwrap32: the 64-bit number closest to ref whose low 32 bits are value. */
static int64_t unwrap32(uint32_t value, int64_t ref)
{
    uint32_t d = value - (uint32_t)(uint64_t)ref;
    int64_t delta = d >= 0x80000000u ? (int64_t)d - 0x100000000LL : (int64_t)d;
    return (int64_t)((uint64_t)ref + (uint64_t)delta);
}

/* Insert [start, end) into the sorted disjoint holes, merging overlapping or touching ones. */
static void holes_insert(struct smfs_flow_tracker *ft, struct fstate *st, int64_t start, int64_t end)
{
    uint32_t n = st->nholes, i = 0;
    while (i < n && st->holes[i].start < start)
        i++;
    if (i > 0 && st->holes[i - 1].end >= start) {
        i--;
        start = st->holes[i].start;
        end = end > st->holes[i].end ? end : st->holes[i].end;
    }
    uint32_t j = i;
    while (j < n && st->holes[j].start <= end) {
        end = end > st->holes[j].end ? end : st->holes[j].end;
        j++;
    }
    if (j == i) { /* one more hole */
        if (n >= MAX_HOLES) {
            ft->dropped++;
            return;
        }
        if (n == st->holes_cap) {
            uint32_t cap = st->holes_cap ? 2 * st->holes_cap : 8;
            struct hole *h = realloc(st->holes, cap * sizeof(*h));
            if (!h) {
                ft->dropped++;
                return;
            }
            st->holes = h;
            st->holes_cap = cap;
        }
        memmove(&st->holes[i + 1], &st->holes[i], (n - i) * sizeof(*st->holes));
        st->nholes = n + 1;
    } else if (j > i + 1) {
        memmove(&st->holes[i + 1], &st->holes[j], (n - j) * sizeof(*st->holes));
        st->nholes = n - (j - i - 1);
    }
    st->holes[i] = (struct hole){start, end};
}

/* _FlowState.mark_safe: [start, end) is safe; true when safe_end advanced. */
static bool mark_safe(struct smfs_flow_tracker *ft, struct fstate *st, int64_t start, int64_t end)
{
    if (end <= st->safe_end)
        return false;
    if (start > st->safe_end) {
        holes_insert(ft, st, start, end);
        return false;
    }
    st->safe_end = end;
    uint32_t k = 0;
    while (k < st->nholes && st->holes[k].start <= st->safe_end) {
        if (st->holes[k].end > st->safe_end)
            st->safe_end = st->holes[k].end;
        k++;
    }
    if (k) {
        memmove(st->holes, st->holes + k, (st->nholes - k) * sizeof(*st->holes));
        st->nholes -= k;
    }
    return true;
}

/* ---- carried tunnel packets --------------------------------------------------------------- */

static uint32_t carr_find(const struct smfs_flow_tracker *ft, uint64_t tseq)
{
    for (uint32_t i = ft->cbuckets[mix64(tseq) & ft->cmask]; i != SMFS_NONE; i = ft->carr[i].hnext)
        if (ft->carr[i].tseq == tseq)
            return i;
    return SMFS_NONE;
}

static void carr_remove(struct smfs_flow_tracker *ft, uint32_t i)
{
    struct carried *c = &ft->carr[i];
    uint32_t *at = &ft->cbuckets[mix64(c->tseq) & ft->cmask];
    while (*at != i)
        at = &ft->carr[*at].hnext;
    *at = c->hnext;
    if (c->prev != SMFS_NONE)
        ft->carr[c->prev].next = c->next;
    else
        ft->order_head = c->next;
    if (c->next != SMFS_NONE)
        ft->carr[c->next].prev = c->prev;
    else
        ft->order_tail = c->prev;
    c->next = ft->free_carr;
    ft->free_carr = i;
    ft->ncarried--;
}

static void entries_free(struct smfs_flow_tracker *ft, uint32_t e)
{
    while (e != SMFS_NONE) {
        uint32_t next = ft->entries[e].next;
        ft->entries[e].next = ft->free_entry;
        ft->free_entry = e;
        e = next;
    }
}

static void carry(struct smfs_flow_tracker *ft, uint64_t tseq, uint32_t slot, int64_t start,
                  int64_t end, double now)
{
    uint32_t e = ft->free_entry;
    if (e == SMFS_NONE) { /* only when tunnel seqs are reported more than once */
        ft->dropped++;
        return;
    }
    ft->free_entry = ft->entries[e].next;
    ft->entries[e] = (struct entry){ft->flows[slot].gen, start, end, now, ft->held, slot, SMFS_NONE};
    uint32_t i = carr_find(ft, tseq);
    if (i != SMFS_NONE) {
        ft->entries[ft->carr[i].tail].next = e;
        ft->carr[i].tail = e;
        return;
    }
    i = ft->free_carr; /* never empty: at most max_pending records are in use here */
    struct carried *c = &ft->carr[i];
    ft->free_carr = c->next;
    c->tseq = tseq;
    c->done = 0;
    c->head = c->tail = e;
    uint32_t *bucket = &ft->cbuckets[mix64(tseq) & ft->cmask];
    c->hnext = *bucket;
    *bucket = i;
    c->prev = ft->order_tail;
    c->next = SMFS_NONE;
    if (ft->order_tail != SMFS_NONE)
        ft->carr[ft->order_tail].next = i;
    else
        ft->order_head = i;
    ft->order_tail = i;
    ft->ncarried++;
    while (ft->ncarried > ft->max_pending) {
        uint32_t old = ft->order_head;
        uint32_t head = ft->carr[old].head;
        carr_remove(ft, old);
        entries_free(ft, head);
    }
}

static void latency(struct smfs_flow_tracker *ft, double v, double held)
{
    if (!ft->lat_cap)
        return;
    uint32_t at;
    if (ft->lat_count < ft->lat_cap) {
        at = (ft->lat_head + ft->lat_count++) % ft->lat_cap;
    } else {
        at = ft->lat_head;
        ft->lat_head = (ft->lat_head + 1) % ft->lat_cap;
    }
    ft->lat[at] = v;
    ft->lat_held[at] = held;
}

/* ---- API ------------------------------------------------------------------------------------ */

void smfs_ft_on_packet_sent(struct smfs_flow_tracker *ft, uint64_t tunnel_seq, const uint8_t *ip,
                            size_t len, double now)
{
    if (!ft || !ip || len < 40)
        return;
    uint32_t vihl = ip[0], total = ld16(ip + 2), frag = ld16(ip + 6), proto = ip[9];
    uint32_t ihl = (vihl & 0x0F) * 4;
    if (vihl >> 4 != 4 || ihl < 20 || proto != 6 || (frag & 0x3FFF) || total > len || total < ihl + 20)
        return;
    const uint8_t *tcp = ip + ihl;
    uint32_t seq = ld32(tcp + 4), off_flags = ld16(tcp + 12);
    uint32_t doff = (off_flags >> 12) * 4;
    if (doff < 20 || ihl + doff > total)
        return;
    uint32_t payload = total - ihl - doff;
    struct smfs_flow f;
    memcpy(f.src, ip + 12, 4);
    memcpy(f.dst, ip + 16, 4);
    f.sport = ld16(tcp);
    f.dport = ld16(tcp + 2);
    uint32_t i = flow_find(ft, &f);
    int64_t start;
    if (off_flags & TCP_SYN) {
        if (i == SMFS_NONE || ft->flows[i].isn != seq)
            i = new_flow(ft, &f, seq, i);
        start = 0;
    } else if (i == SMFS_NONE) {
        if (payload)
            ft->ignored++;
        return;
    } else {
        struct fstate *st = &ft->flows[i];
        start = unwrap32(seq - st->isn - 1, st->ref);
    }
    struct fstate *st = &ft->flows[i];
    lru_unlink(ft, i);
    lru_append(ft, i);
    int64_t end = (int64_t)((uint64_t)start + payload);
    if (off_flags & TCP_RST) {
        st->rst = true;
        closing_add(ft, i);
        return;
    }
    if (off_flags & TCP_FIN) {
        st->fin_at = end;
        st->has_fin = true;
        closing_add(ft, i);
    }
    if (!payload || end <= st->safe_end)
        return;
    if (end > st->ref)
        st->ref = end;
    if (!ft->full) { /* c = 0, no FEC: no repair to wait for, safe once on the wire */
        if (!isnan(now))
            latency(ft, 0.0, 0.0);
        if (mark_safe(ft, st, start, end))
            advanced_add(ft, i);
        return;
    }
    if (ft->safe_at_send) { /* seeded defect: safe before a single repair covering it is out */
        if (mark_safe(ft, st, start, end))
            advanced_add(ft, i);
        return;
    }
    carry(ft, tunnel_seq, i, start, end, now);
}

void smfs_ft_on_repair_sent(struct smfs_flow_tracker *ft, const struct smfs_repair *rep, double now)
{
    if (!ft || !rep || (rep->n && !rep->seqs))
        return;
    uint64_t bit = rep->layer < 63 ? 1ull << rep->layer : 1ull << 63;
    for (uint32_t k = 0; k < rep->n; k++) {
        uint32_t i = carr_find(ft, rep->seqs[k]);
        if (i == SMFS_NONE)
            continue;
        uint64_t done = ft->carr[i].done | bit;
        if (done != ft->full) {
            ft->carr[i].done = done;
            continue;
        }
        uint32_t e = ft->carr[i].head;
        carr_remove(ft, i);
        for (uint32_t x = e; x != SMFS_NONE; x = ft->entries[x].next) {
            const struct entry *en = &ft->entries[x];
            if (!isnan(now) && !isnan(en->sent))
                latency(ft, now - en->sent, ft->held - en->held);
            struct fstate *st = &ft->flows[en->slot];
            if (st->used && st->gen == en->gen && mark_safe(ft, st, en->start, en->end))
                advanced_add(ft, en->slot);
        }
        entries_free(ft, e);
    }
}

int smfs_ft_safe_offsets(struct smfs_flow_tracker *ft, smfs_safe_fn cb, void *ctx)
{
    if (!ft)
        return -EINVAL;
    int out = 0;
    for (uint32_t k = 0; k < ft->nadvanced; k++) {
        struct fstate *st = &ft->flows[ft->advanced[k]];
        st->adv_idx = SMFS_NONE;
        if (st->safe_end > st->reported) {
            st->reported = st->safe_end;
            if (cb)
                cb(ctx, &st->key, st->safe_end);
            out++;
        }
    }
    ft->nadvanced = 0;
    for (uint32_t k = ft->nclosing; k-- > 0;) {
        uint32_t i = ft->closing[k];
        const struct fstate *st = &ft->flows[i];
        if (st->rst || (st->has_fin && st->safe_end >= st->fin_at))
            flow_delete(ft, i);
    }
    return out;
}

int smfs_ft_safe_offset(const struct smfs_flow_tracker *ft, const struct smfs_flow *flow, int64_t *offset)
{
    if (!ft || !flow)
        return 0;
    uint32_t i = flow_find(ft, flow);
    if (i == SMFS_NONE)
        return 0;
    if (offset)
        *offset = ft->flows[i].safe_end;
    return 1;
}

size_t smfs_ft_flows(const struct smfs_flow_tracker *ft) { return ft ? ft->nflows : 0; }
size_t smfs_ft_pending(const struct smfs_flow_tracker *ft) { return ft ? ft->ncarried : 0; }
uint64_t smfs_ft_ignored(const struct smfs_flow_tracker *ft) { return ft ? ft->ignored : 0; }
uint64_t smfs_ft_dropped(const struct smfs_flow_tracker *ft) { return ft ? ft->dropped : 0; }

size_t smfs_ft_latencies(const struct smfs_flow_tracker *ft, double *out, size_t cap)
{
    if (!ft)
        return 0;
    for (size_t k = 0; out && k < cap && k < ft->lat_count; k++)
        out[k] = ft->lat[(ft->lat_head + k) % ft->lat_cap];
    return ft->lat_count;
}

size_t smfs_ft_held_latencies(const struct smfs_flow_tracker *ft, double *out, size_t cap)
{
    if (!ft)
        return 0;
    for (size_t k = 0; out && k < cap && k < ft->lat_count; k++)
        out[k] = ft->lat_held[(ft->lat_head + k) % ft->lat_cap];
    return ft->lat_count;
}

void smfs_ft_set_held(struct smfs_flow_tracker *ft, double held)
{
    if (ft)
        ft->held = held;
}

int smfs_is_pure_ack(const uint8_t *p, size_t len)
{
    if (!p || len < 40 || p[0] >> 4 != 4 || p[9] != 6)
        return 0;
    size_t ihl = (size_t)(p[0] & 0x0F) * 4, total = (size_t)p[2] << 8 | p[3];
    if (ihl < 20 || ((p[6] << 8 | p[7]) & 0x3FFF) || total > len || total < ihl + 20)
        return 0;
    size_t doff = (size_t)(p[ihl + 12] >> 4) * 4;
    return doff >= 20 && ihl + doff == total && !(p[ihl + 13] & 0x07);
}
