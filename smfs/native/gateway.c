/* smfs-gateway: the Maelstrom gateway's event loop in C, a drop-in for `python -m smfs.gateway`.
 *
 * smfs/gateway.py is the executable specification; this file follows it step by step. Python
 * parses the arguments, opens and configures the TUN, then execs this program with the TUN's fd
 * (`--engine c`); the sockets are bound here. Egress: TUN read in batches, numbering, sealing,
 * FEC encode, pacing (smfs/pacer.py's token bucket), sendmmsg on an IP_RECVERR socket; a failed
 * data send is not tracked, a failed repair waits in a bounded backlog. Ingress: recvmmsg,
 * unseal, replay window, decode and rebuild, TUN write. Control: subscriptions and callbacks
 * with the Announcer's re-announce rule (smfs/callbacks.py). The statistics JSON has the
 * Python gateway's keys; it is written every second, on SIGUSR1 and on exit (SIGTERM, SIGINT).
 *
 * One thread, epoll, a timerfd for every deadline, a signalfd. No allocation per packet: the
 * buffers are sized at start; only a repair whose send fails is copied to the heap.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/errqueue.h>
#include <linux/if_tun.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "smfs_core.h"

#define TUN_BATCH 64               /* packets read from the TUN before they are sent */
#define TUN_ROUNDS (256 / TUN_BATCH)
#define TSO_SEGS 64                /* most segments one TSO read may give (the TUN's gso_max_segs) */
#define WAN_BATCH 64               /* datagrams per recvmmsg */
#define WAN_ROUNDS (256 / WAN_BATCH)
#define RBUF 65536                 /* bytes per read buffer (TUN packet or WAN datagram) */
#define OUTQ_MAX 1024              /* datagrams queued for one sendmmsg flush */
#define ARENA (4u << 20)           /* bytes of sealed datagrams queued */
#define REPAIR_BACKLOG 4096
#define RETRY_MIN_S 0.001
#define RETRY_MAX_S 0.05
#define PAUSE_MIN_S 0.0005
#define PACER_BURST_DATAGRAMS 16
#define WIRE_OVERHEAD (20 + 8 + 14)
#define HEADROOM 0.95
#define ERRQUEUE_BATCH 1024
#define REANNOUNCE_S 0.05
#define LINGER_S 1.0
#define ANN_MAX 4096
#define ANN_HASH 8192
#define MAX_REASONS 128
#define NONE UINT32_MAX

/* ---- small helpers ------------------------------------------------------------------------ */

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void logmsg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logmsg(const char *level, const char *fmt, ...)
{
    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    fprintf(stderr, "%s,%03ld smfs.gateway %s ", when, ts.tv_nsec / 1000000, level);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* A float as Python's repr prints it: the shortest digits that round-trip, in fixed notation
 * (".0" when integral) for a decimal exponent in [-4, 16), else in scientific (1e+16, 1.5e-05). */
static void pyfloat(char *out, size_t cap, double v)
{
    if (!isfinite(v)) {
        snprintf(out, cap, "null");
        return;
    }
    int prec = 1;
    for (; prec < 17; prec++) {
        snprintf(out, cap, "%.*e", prec - 1, v);
        if (strtod(out, NULL) == v)
            break;
    }
    snprintf(out, cap, "%.*e", prec - 1, v);
    int exp = atoi(strchr(out, 'e') + 1);
    if (exp < -4 || exp >= 16)
        return;
    snprintf(out, cap, "%.*f", prec - 1 - exp > 0 ? prec - 1 - exp : 0, v);
    if (!strchr(out, '.'))
        strncat(out, ".0", cap - strlen(out) - 1);
}

static double round_to(double v, double scale) { return nearbyint(v * scale) / scale; }

/* ---- pacer (smfs/pacer.py) ---------------------------------------------------------------- */

struct pacer {
    double bytes_per_s, burst, tokens, t, paused_s;
    uint64_t pauses;
};

static void pacer_refill(struct pacer *p, double now)
{
    if (now > p->t) {
        p->tokens = fmin(p->burst, p->tokens + (now - p->t) * p->bytes_per_s);
        p->t = now;
    }
}

static void pacer_spend(struct pacer *p, size_t bytes, double now)
{
    pacer_refill(p, now);
    p->tokens -= (double)(bytes + WIRE_OVERHEAD);
}

static long pacer_room(struct pacer *p, size_t bytes, double now)
{
    pacer_refill(p, now);
    long n = (long)floor(p->tokens / (double)(bytes + WIRE_OVERHEAD)) + (p->tokens > 0);
    return n > 0 ? n : 0;
}

static double pacer_wait(struct pacer *p, double now)
{
    pacer_refill(p, now);
    if (p->tokens >= 0)
        return 0.0;
    double delay = -p->tokens / p->bytes_per_s;
    p->paused_s += delay;
    p->pauses++;
    return delay;
}

/* ---- announcer (smfs/callbacks.py Announcer) ---------------------------------------------- */

#define SUB_NONCE 8                             /* callbacks.py NONCE_LEN */
#define SUBSCRIBE_BODY (4 + 12 + SUB_NONCE + 8)     /* _SUBSCRIBE.size */
#define SUBSCRIBE_LEN (SUBSCRIBE_BODY + SMFS_MAC_LEN)
#define CALLBACK_BODY (4 + 12 + 8 + SUB_NONCE)  /* _CALLBACK.size */
#define CALLBACK_LEN (CALLBACK_BODY + SMFS_MAC_LEN)

struct sub {
    struct smfs_flow flow;
    uint64_t offset;
    uint8_t nonce[SUB_NONCE]; /* the subscription's, echoed in each callback */
    uint64_t want;            /* the lowest offset the subscriber wants to hear of (0: every advance) */
    struct sockaddr_in dest;
    int has_dest;
    double changed;
    double announced; /* callbacks.py _Subscription.announced: the last callback sent at once */
    uint32_t prev, next, hnext; /* LRU list (oldest first), hash chain */
    uint32_t active;            /* index in ann.active, or NONE */
};

struct announcer {
    struct sub subs[ANN_MAX];
    uint32_t heads[ANN_HASH];
    uint32_t active[ANN_MAX];
    uint32_t n_active, count, free_head, lru_head, lru_tail;
    int has_next;
    double next, since; /* the next tick; the last one (flows changed after it are not due) */
};

static uint32_t flow_hash(const struct smfs_flow *f)
{
    uint32_t a, b;
    memcpy(&a, f->src, 4);
    memcpy(&b, f->dst, 4);
    uint64_t x = ((uint64_t)a << 32 | b) ^ ((uint64_t)f->sport << 16 | f->dport) * 0x9e3779b97f4a7c15ULL;
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ULL;
    return (uint32_t)(x >> 40) & (ANN_HASH - 1);
}

static int flow_eq(const struct smfs_flow *a, const struct smfs_flow *b)
{
    return !memcmp(a->src, b->src, 4) && !memcmp(a->dst, b->dst, 4) && a->sport == b->sport &&
           a->dport == b->dport;
}

static void ann_init(struct announcer *a)
{
    memset(a, 0, sizeof *a);
    for (uint32_t i = 0; i < ANN_HASH; i++)
        a->heads[i] = NONE;
    for (uint32_t i = 0; i < ANN_MAX; i++)
        a->subs[i].next = i + 1 < ANN_MAX ? i + 1 : NONE;
    a->free_head = 0;
    a->lru_head = a->lru_tail = NONE;
}

static struct sub *ann_find(struct announcer *a, const struct smfs_flow *f)
{
    for (uint32_t i = a->heads[flow_hash(f)]; i != NONE; i = a->subs[i].hnext)
        if (flow_eq(&a->subs[i].flow, f))
            return &a->subs[i];
    return NULL;
}

static void lru_unlink(struct announcer *a, uint32_t i)
{
    struct sub *s = &a->subs[i];
    if (s->prev != NONE)
        a->subs[s->prev].next = s->next;
    else
        a->lru_head = s->next;
    if (s->next != NONE)
        a->subs[s->next].prev = s->prev;
    else
        a->lru_tail = s->prev;
}

static void lru_append(struct announcer *a, uint32_t i)
{
    struct sub *s = &a->subs[i];
    s->prev = a->lru_tail;
    s->next = NONE;
    if (a->lru_tail != NONE)
        a->subs[a->lru_tail].next = i;
    else
        a->lru_head = i;
    a->lru_tail = i;
}

static void ann_deactivate(struct announcer *a, uint32_t i)
{
    uint32_t pos = a->subs[i].active;
    if (pos == NONE)
        return;
    uint32_t last = a->active[--a->n_active];
    a->active[pos] = last;
    a->subs[last].active = pos;
    a->subs[i].active = NONE;
}

static void ann_evict_oldest(struct announcer *a)
{
    uint32_t i = a->lru_head;
    struct sub *s = &a->subs[i];
    ann_deactivate(a, i);
    lru_unlink(a, i);
    uint32_t *pp = &a->heads[flow_hash(&s->flow)];
    while (*pp != i)
        pp = &a->subs[*pp].hnext;
    *pp = s->hnext;
    s->next = a->free_head;
    a->free_head = i;
    a->count--;
}

static struct sub *ann_touch(struct announcer *a, const struct smfs_flow *f, double now)
{
    struct sub *s = ann_find(a, f);
    if (s) {
        uint32_t i = (uint32_t)(s - a->subs);
        lru_unlink(a, i);
        lru_append(a, i);
    } else {
        if (a->count >= ANN_MAX)
            ann_evict_oldest(a);
        uint32_t i = a->free_head;
        s = &a->subs[i];
        a->free_head = s->next;
        memset(s, 0, sizeof *s);
        s->flow = *f;
        s->active = NONE;
        uint32_t h = flow_hash(f);
        s->hnext = a->heads[h];
        a->heads[h] = i;
        lru_append(a, i);
        a->count++;
    }
    s->changed = now;
    return s;
}

/* ---- the gateway -------------------------------------------------------------------------- */

enum { K_DATA = 1, K_REPAIR = 2 };

struct outmsg {
    uint8_t kind, group_end;
    uint32_t off, len;
    uint64_t seq;     /* DATA */
    uint32_t layer, n; /* REPAIR */
    uint64_t seqs[SMFS_MAX_R];
};

struct deferred {
    uint8_t *dgram;
    uint32_t len, layer, n;
    uint64_t seqs[SMFS_MAX_R];
};

struct reason {
    char name[112];
    uint64_t count;
};

enum stat_id {
    S_TUN_IN, S_DATA_OUT, S_REPAIRS_OUT, S_DEFERRED, S_RETRIED, S_RETRY_FAIL, S_ABANDONED, S_WAN_IN,
    S_TUN_OUT, S_REJECTED, S_REPLAYED, S_LATE, S_SEND_ERR, S_DATA_SEND_ERR, S_REPAIR_SEND_ERR,
    S_WAN_ERRORS, S_WAN_RECV_ERR, S_CB_SENT, S_CB_RESENT, S_CB_SEND_ERR, S_TUN_WRITE_ERR, S_N
};

struct config {
    const char *site_name, *tun_name, *stats, *ready, *key_file;
    struct sockaddr_in local, peer, control;
    char local_s[64], peer_s[64];
    int tun_fd, site, peer_site, wan_mtu, safe_at_send, vnet_hdr;
    long long wan_rate_bps;
    struct smfs_fec_params params;
};

struct gw {
    struct config cfg;
    int tun, wan, ctl, ep, tfd, sfd;
    struct smfs_tunnel *tunnel;
    struct smfs_encoder *enc;
    struct smfs_decoder *dec;
    struct smfs_replay *replay;
    struct smfs_flow_tracker *ft;
    struct announcer *ann;
    uint64_t seq, peer_window;
    uint64_t stats[S_N];
    struct reason reasons[MAX_REASONS];
    size_t n_reasons;
    /* egress */
    uint8_t *rbuf;        /* (TUN_BATCH + TSO_SEGS) * RBUF */
    uint8_t *gbuf;        /* one TSO read (RBUF), before it is cut into rbuf's slots */
    uint64_t tun_reads, tso_reads;
    uint8_t *arena;
    uint32_t arena_used;
    struct outmsg *outq;
    struct mmsghdr *omm;
    struct iovec *oiov;
    uint32_t q_n;
    double q_now;
    struct deferred *backlog[REPAIR_BACKLOG];
    uint32_t bl_head, bl_n;
    int has_retry;
    double retry_at, retry_delay;
    int paced, tun_paused, backlogged;
    double held_s, held_from; /* gateway.py _held_clock: seconds the pacer kept the TUN unread (paused) */
    double resume_at;
    struct pacer pacer;
    /* ingress */
    uint8_t *wbuf; /* WAN_BATCH * RBUF */
    struct mmsghdr *imm;
    struct iovec *iiov;
    uint32_t rebuilt_out;
    /* timers */
    double armed, next_stats;
    int stop;
};

static void reason_add(struct gw *g, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reason_add(struct gw *g, const char *fmt, ...)
{
    char name[112];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (size_t i = 0; i < g->n_reasons; i++)
        if (!strcmp(g->reasons[i].name, name)) {
            g->reasons[i].count++;
            return;
        }
    if (g->n_reasons == MAX_REASONS - 1) /* the last slot gathers the overflow */
        snprintf(name, sizeof name, "other reasons");
    for (size_t i = 0; i < g->n_reasons; i++)
        if (!strcmp(g->reasons[i].name, name)) {
            g->reasons[i].count++;
            return;
        }
    snprintf(g->reasons[g->n_reasons].name, sizeof g->reasons[0].name, "%s", name);
    g->reasons[g->n_reasons++].count = 1;
}

static int queue_full(int err) { return err == EAGAIN || err == ENOBUFS; }

/* -- error queue -- */

static void describe_wan_error(struct msghdr *msg, char *out, size_t cap)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_RECVERR &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct sock_extended_err))) {
            struct sock_extended_err ee;
            memcpy(&ee, CMSG_DATA(c), sizeof ee);
            if (ee.ee_origin == SO_EE_ORIGIN_ICMP)
                snprintf(out, cap, "%s (ICMP %u/%u)", strerror((int)ee.ee_errno), ee.ee_type, ee.ee_code);
            else if (ee.ee_origin == SO_EE_ORIGIN_LOCAL)
                snprintf(out, cap, "%s (local)", strerror((int)ee.ee_errno));
            else
                snprintf(out, cap, "%s (origin %u)", strerror((int)ee.ee_errno), ee.ee_origin);
            return;
        }
    }
    snprintf(out, cap, "no extended error");
}

static int drain_wan_errors(struct gw *g)
{
    int n = 0;
    while (n < ERRQUEUE_BATCH) {
        uint8_t data[64];
        union {
            char buf[512];
            struct cmsghdr align;
        } ctl;
        struct sockaddr_in from;
        struct iovec iov = {data, sizeof data};
        struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov,
                             .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
        if (recvmsg(g->wan, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
            if (errno != EAGAIN && errno != EINTR)
                reason_add(g, "wan error queue: %s", strerror(errno));
            break;
        }
        n++;
        char desc[80];
        describe_wan_error(&msg, desc, sizeof desc);
        reason_add(g, "wan error: %s", desc);
    }
    g->stats[S_WAN_ERRORS] += (uint64_t)n;
    return n;
}

/* -- callbacks (control channel) -- */

static void flow_str(const struct smfs_flow *f, char *out, size_t cap)
{
    char s[16], d[16];
    inet_ntop(AF_INET, f->src, s, sizeof s);
    inet_ntop(AF_INET, f->dst, d, sizeof d);
    snprintf(out, cap, "Flow(src='%s', sport=%u, dst='%s', dport=%u)", s, f->sport, d, f->dport);
}

/* Send one callback (callbacks.py encode_callback: the flow, its offset, the subscription's nonce,
 * the MAC under the tunnel key); 1 when sent. */
static int send_callback(struct gw *g, const struct sub *s)
{
    uint8_t m[CALLBACK_LEN];
    memcpy(m, "SMCB", 4);
    memcpy(m + 4, s->flow.src, 4);
    m[8] = (uint8_t)(s->flow.sport >> 8);
    m[9] = (uint8_t)s->flow.sport;
    memcpy(m + 10, s->flow.dst, 4);
    m[14] = (uint8_t)(s->flow.dport >> 8);
    m[15] = (uint8_t)s->flow.dport;
    for (int i = 0; i < 8; i++)
        m[16 + i] = (uint8_t)(s->offset >> (56 - 8 * i));
    memcpy(m + 24, s->nonce, SUB_NONCE);
    if (smfs_tunnel_mac(g->tunnel, m, CALLBACK_BODY, m + CALLBACK_BODY) != 0) {
        g->stats[S_CB_SEND_ERR]++;
        reason_add(g, "callback: %s", "mac failed");
        return 0;
    }
    if (sendto(g->ctl, m, sizeof m, 0, (const struct sockaddr *)&s->dest, sizeof s->dest) < 0) {
        g->stats[S_CB_SEND_ERR]++;
        reason_add(g, "callback: %s", strerror(errno));
        return 0;
    }
    g->stats[S_CB_SENT]++;
    return 1;
}

/* Announcer._announce: the callback to send now, if any. */
static void ann_announce(struct gw *g, struct sub *s, double now)
{
    struct announcer *a = g->ann;
    if (!s->has_dest || !s->offset || s->offset < s->want)
        return;
    if (s->active == NONE) {
        s->active = a->n_active;
        a->active[a->n_active++] = (uint32_t)(s - a->subs);
    }
    s->announced = now;
    if (!a->has_next) {
        a->has_next = 1;
        a->next = now + REANNOUNCE_S;
        a->since = now;
    }
    send_callback(g, s);
}

static void on_safe(void *ctx, const struct smfs_flow *flow, int64_t offset)
{
    struct gw *g = ctx;
    double now = mono();
    struct sub *s = ann_touch(g->ann, flow, now);
    if ((uint64_t)offset == s->offset)
        return;
    s->offset = (uint64_t)offset;
    ann_announce(g, s, now);
}

static void push_callbacks(struct gw *g) { smfs_ft_safe_offsets(g->ft, on_safe, g); }

static void ann_timer(struct gw *g, double now)
{
    struct announcer *a = g->ann;
    if (!a->has_next || now < a->next)
        return;
    for (uint32_t k = 0; k < a->n_active;) {
        uint32_t i = a->active[k];
        struct sub *s = &a->subs[i];
        if (now - s->changed > LINGER_S) {
            ann_deactivate(a, i); /* moves the last one to k */
            continue;
        }
        if (s->announced <= a->since && s->offset >= s->want) /* callbacks.py: one announced since the last tick had a fresh one */
            g->stats[S_CB_RESENT] += (uint64_t)send_callback(g, s);
        k++;
    }
    a->has_next = a->n_active > 0;
    a->next = now + REANNOUNCE_S;
    a->since = now;
}

static void on_control(struct gw *g)
{
    for (;;) {
        uint8_t m[512];
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(g->ctl, m, sizeof m, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (n != SUBSCRIBE_LEN) {
            reason_add(g, "control: subscribe must be %d bytes, got %zd", SUBSCRIBE_LEN, n);
            continue;
        }
        if (memcmp(m, "SMSB", 4)) {
            reason_add(g, "control: not a subscribe message");
            continue;
        }
        /* callbacks.py decode_subscribe: the MAC covers the message and its sender's address */
        uint8_t signed_[SUBSCRIBE_BODY + 6], want[SMFS_MAC_LEN];
        memcpy(signed_, m, SUBSCRIBE_BODY);
        memcpy(signed_ + SUBSCRIBE_BODY, &from.sin_addr.s_addr, 4);
        memcpy(signed_ + SUBSCRIBE_BODY + 4, &from.sin_port, 2);
        if (fl != sizeof from || from.sin_family != AF_INET ||
            smfs_tunnel_mac(g->tunnel, signed_, sizeof signed_, want) != 0 ||
            CRYPTO_memcmp(want, m + SUBSCRIBE_BODY, SMFS_MAC_LEN) != 0) {
            reason_add(g, "control: bad mac");
            continue;
        }
        struct smfs_flow f;
        memcpy(f.src, m + 4, 4);
        f.sport = (uint16_t)(m[8] << 8 | m[9]);
        memcpy(f.dst, m + 10, 4);
        f.dport = (uint16_t)(m[14] << 8 | m[15]);
        double now = mono();
        struct sub *s = ann_touch(g->ann, &f, now);
        if (!s->has_dest || s->dest.sin_addr.s_addr != from.sin_addr.s_addr || s->dest.sin_port != from.sin_port) {
            char fs[96], a[16];
            flow_str(&f, fs, sizeof fs);
            inet_ntop(AF_INET, &from.sin_addr, a, sizeof a);
            logmsg("INFO", "callbacks for %s -> ('%s', %u)", fs, a, ntohs(from.sin_port));
        }
        s->dest = from;
        s->has_dest = 1;
        memcpy(s->nonce, m + 16, SUB_NONCE);
        s->want = 0;
        for (int k = 0; k < 8; k++)
            s->want = s->want << 8 | m[16 + SUB_NONCE + k];
        smfs_encoder_set_budgeted(g->enc, 0); /* gateway.py: a callback waits from now on */
        ann_announce(g, s, now);
    }
}

/* -- egress -- */

static void send_failed(struct gw *g, int err, int kind)
{
    g->stats[S_SEND_ERR]++;
    g->stats[kind == K_DATA ? S_DATA_SEND_ERR : S_REPAIR_SEND_ERR]++;
    reason_add(g, "send: %s", strerror(err));
    if (!queue_full(err))
        drain_wan_errors(g);
}

static void abandon(struct gw *g, const char *why)
{
    g->stats[S_ABANDONED]++;
    reason_add(g, "repair abandoned: %s", why);
}

static void bl_pop(struct gw *g)
{
    struct deferred *d = g->backlog[g->bl_head];
    free(d->dgram);
    free(d);
    g->bl_head = (g->bl_head + 1) % REPAIR_BACKLOG;
    g->bl_n--;
}

static void defer_repair(struct gw *g, const struct outmsg *m, int err, double now)
{
    if (err == EMSGSIZE) {
        abandon(g, "too large");
        return;
    }
    struct deferred *d = malloc(sizeof *d);
    uint8_t *copy = malloc(m->len);
    if (!d || !copy) {
        free(d);
        free(copy);
        abandon(g, "out of memory");
        return;
    }
    if (g->bl_n >= REPAIR_BACKLOG) {
        bl_pop(g);
        abandon(g, "backlog full");
    }
    memcpy(copy, g->arena + m->off, m->len);
    d->dgram = copy;
    d->len = m->len;
    d->layer = m->layer;
    d->n = m->n;
    memcpy(d->seqs, m->seqs, sizeof(uint64_t) * m->n);
    g->backlog[(g->bl_head + g->bl_n) % REPAIR_BACKLOG] = d;
    g->bl_n++;
    g->stats[S_DEFERRED]++;
    if (!g->has_retry) {
        g->has_retry = 1;
        g->retry_at = now + g->retry_delay;
    }
}

/* gateway.py _held_clock: the running total of seconds the pacer kept the TUN unread (its pauses). */
static double held_clock(const struct gw *g, double now)
{
    return g->held_s + (g->tun_paused ? now - g->held_from : 0.0);
}

static void track_repair(struct gw *g, uint32_t layer, uint32_t n, const uint64_t *seqs, double now)
{
    struct smfs_repair rep = {.layer = layer, .n = n, .seqs = seqs};
    smfs_ft_set_held(g->ft, held_clock(g, now));
    smfs_ft_on_repair_sent(g->ft, &rep, now);
}

static void resend_backlog(struct gw *g, double now)
{
    uint64_t oldest = g->seq > g->peer_window ? g->seq - g->peer_window : 0;
    uint32_t sent = 0;
    while (g->bl_n) {
        struct deferred *d = g->backlog[g->bl_head];
        if (d->seqs[0] < oldest) {
            bl_pop(g);
            abandon(g, "stale");
            continue;
        }
        if (sendto(g->wan, d->dgram, d->len, 0, (const struct sockaddr *)&g->cfg.peer, sizeof g->cfg.peer) < 0) {
            int err = errno;
            if (err == EMSGSIZE) {
                bl_pop(g);
                abandon(g, "too large");
                continue;
            }
            g->stats[S_RETRY_FAIL]++;
            if (!queue_full(err))
                drain_wan_errors(g);
            g->retry_delay = fmin(2 * g->retry_delay, RETRY_MAX_S);
            break;
        }
        if (g->paced)
            pacer_spend(&g->pacer, d->len, mono());
        track_repair(g, d->layer, d->n, d->seqs, now);
        bl_pop(g);
        sent++;
    }
    if (g->bl_n) {
        g->has_retry = 1;
        g->retry_at = now + g->retry_delay;
    } else {
        g->has_retry = 0;
        g->retry_delay = RETRY_MIN_S;
    }
    if (sent) {
        g->stats[S_RETRIED] += sent;
        g->stats[S_REPAIRS_OUT] += sent;
        push_callbacks(g);
    }
}

/* Send what is queued, in order, then account for each datagram as the Python gateway does
 * after each sendto: data tracked once sent, repairs tracked once sent or deferred. */
static void flush_out(struct gw *g)
{
    uint32_t i = 0;
    while (i < g->q_n) {
        int r = sendmmsg(g->wan, g->omm + i, g->q_n - i, MSG_DONTWAIT);
        int err = r < 0 ? errno : 0;
        if (r < 0 && err == EINTR)
            continue;
        double t = mono();
        uint32_t end = r > 0 ? i + (uint32_t)r : i + 1;
        for (; i < end; i++) {
            struct outmsg *m = &g->outq[i];
            if (r > 0) {
                if (g->paced)
                    pacer_spend(&g->pacer, m->len, m->kind == K_DATA ? g->q_now : t);
                if (m->kind == K_DATA) {
                    g->stats[S_DATA_OUT]++;
                    smfs_ft_set_held(g->ft, held_clock(g, g->q_now));
                    smfs_ft_on_packet_sent(g->ft, m->seq, g->arena + m->off + 12, m->len - SMFS_DATA_OVERHEAD,
                                           g->q_now);
                } else {
                    g->stats[S_REPAIRS_OUT]++;
                    track_repair(g, m->layer, m->n, m->seqs, t);
                }
            } else {
                send_failed(g, err, m->kind);
                if (m->kind == K_REPAIR)
                    defer_repair(g, m, err, t);
            }
            if (m->group_end)
                push_callbacks(g);
        }
    }
    g->q_n = 0;
    g->arena_used = 0;
}

static struct outmsg *queue_slot(struct gw *g, size_t need)
{
    if (g->q_n == OUTQ_MAX || ARENA - g->arena_used < need)
        flush_out(g);
    struct outmsg *m = &g->outq[g->q_n];
    m->off = g->arena_used;
    m->group_end = 0;
    return m;
}

static void queue_commit(struct gw *g, struct outmsg *m, uint32_t len)
{
    m->len = len;
    g->arena_used += (len + 63u) & ~63u;
    g->oiov[g->q_n].iov_base = g->arena + m->off;
    g->oiov[g->q_n].iov_len = len;
    g->q_n++;
}

static void queue_repair(void *ctx, const struct smfs_repair *rep)
{
    struct gw *g = ctx;
    size_t need = 4 + 10 + 6u * rep->n + rep->xor_len + SMFS_MAC_LEN;
    struct outmsg *m = queue_slot(g, need);
    long len = smfs_seal_repair(g->tunnel, g->cfg.site, rep, g->arena + m->off, ARENA - m->off);
    if (len < 0) {
        reason_add(g, "seal repair: %s", strerror((int)-len));
        return;
    }
    m->kind = K_REPAIR;
    m->layer = rep->layer;
    m->n = rep->n;
    memcpy(m->seqs, rep->seqs, sizeof(uint64_t) * rep->n);
    queue_commit(g, m, (uint32_t)len);
}

static void pause_tun(struct gw *g, double seconds, double now)
{
    g->backlogged = 1;
    if (!g->tun_paused) {
        g->tun_paused = 1;
        g->held_from = now;
        struct epoll_event ev = {.events = 0, .data.fd = g->tun};
        epoll_ctl(g->ep, EPOLL_CTL_MOD, g->tun, &ev);
        g->resume_at = now + fmax(seconds, PAUSE_MIN_S);
    }
}

/* One TUN read into slot `at` of rbuf: the number of packets it gave (a TSO read: its segments, in
 * slots at, at + 1, ...; their lengths in lens), 0 for an empty or refused read, -1 with errno. */
static ssize_t tun_read(struct gw *g, long at, uint32_t *lens)
{
    uint8_t *slot = g->rbuf + (size_t)at * RBUF;
    if (!g->cfg.vnet_hdr) {
        ssize_t n = read(g->tun, slot, RBUF);
        if (n > 0)
            lens[at] = (uint32_t)n;
        g->tun_reads += n > 0;
        return n > 0 ? 1 : n;
    }
    uint8_t hdr[SMFS_VNET_HDR_LEN];
    struct iovec iov[2] = {{hdr, sizeof hdr}, {slot, RBUF}};
    ssize_t n = readv(g->tun, iov, 2);
    if (n < 0)
        return n;
    if (n <= (ssize_t)sizeof hdr)
        return 0;
    g->tun_reads++;
    size_t len = (size_t)n - sizeof hdr;
    const uint8_t *src = slot;
    if (hdr[1] != SMFS_VNET_GSO_NONE) { /* cut from a copy: segment 0 lands where the read did */
        memcpy(g->gbuf, slot, len);
        src = g->gbuf;
        g->tso_reads++;
    }
    long k = smfs_vnet_segment(hdr, src, len, slot, RBUF, TSO_SEGS, lens + at);
    if (k < 0) {
        reason_add(g, "tun read: offloaded packet refused (%s)", strerror((int)-k));
        return 0;
    }
    return k;
}

static void on_tun(struct gw *g)
{
    double now = mono();
    if (g->bl_n)
        resend_backlog(g, now);
    g->q_now = now;
    for (int round = 0; round < TUN_ROUNDS; round++) {
        long batch = TUN_BATCH;
        if (g->paced) {
            double wait = pacer_wait(&g->pacer, now);
            if (wait > 0) {
                pause_tun(g, wait, now);
                break;
            }
            long room = pacer_room(&g->pacer, (size_t)g->cfg.wan_mtu, now);
            if (room < batch)
                batch = room;
        }
        long got = 0;
        uint32_t lens[TUN_BATCH + TSO_SEGS];
        while (got < batch) {
            ssize_t n = tun_read(g, got, lens);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN)
                    g->backlogged = 0;
                else
                    reason_add(g, "tun read: %s", strerror(errno));
                break;
            }
            if (n == 0) {
                reason_add(g, "tun read: empty packet");
                continue;
            }
            got += n;
        }
        if (!got)
            break;
        g->stats[S_TUN_IN] += (uint64_t)got;
        for (long i = 0; i < got; i++) {
            const uint8_t *pkt = g->rbuf + (size_t)i * RBUF;
            uint64_t seq = g->seq++;
            struct outmsg *m = queue_slot(g, lens[i] + SMFS_DATA_OVERHEAD);
            long len = smfs_seal_data(g->tunnel, g->cfg.site, seq, pkt, lens[i], g->arena + m->off, ARENA - m->off);
            if (len < 0) {
                reason_add(g, "seal data: %s", strerror((int)-len));
                continue;
            }
            m->kind = K_DATA;
            m->seq = seq;
            queue_commit(g, m, (uint32_t)len);
            int rc = smfs_encoder_add_ex(g->enc, seq, pkt, lens[i], now, smfs_is_pure_ack(pkt, lens[i]), queue_repair, g);
            if (rc < 0)
                reason_add(g, "encoder: %s", strerror(-rc));
            if (g->q_n) /* the last datagram queued is this packet's (a flush leaves its repairs) */
                g->outq[g->q_n - 1].group_end = 1;
        }
        flush_out(g);
        if (got < batch)
            break;
    }
}

/* The encoder's due repairs (handle_timer), sent as one group. */
static void encoder_timer(struct gw *g, double now)
{
    g->q_now = now;
    int rc = smfs_encoder_handle_timer(g->enc, now, queue_repair, g);
    if (rc < 0)
        reason_add(g, "encoder: %s", strerror(-rc));
    flush_out(g);
    push_callbacks(g);
}

/* -- ingress -- */

static void tun_write(struct gw *g, const uint8_t *p, size_t len)
{
    static const uint8_t none[SMFS_VNET_HDR_LEN]; /* no offload: the checksums are the packet's own */
    struct iovec iov[2] = {{(void *)none, sizeof none}, {(void *)p, len}};
    if ((g->cfg.vnet_hdr ? writev(g->tun, iov, 2) : write(g->tun, p, len)) < 0) {
        g->stats[S_TUN_WRITE_ERR]++;
        reason_add(g, "tun: %s", strerror(errno));
    } else {
        g->stats[S_TUN_OUT]++;
    }
}

static void on_rebuilt(void *ctx, uint64_t seq, const uint8_t *packet, size_t len)
{
    struct gw *g = ctx;
    smfs_replay_mark_rebuilt(g->replay, seq);
    tun_write(g, packet, len);
}

static void on_datagram(struct gw *g, const uint8_t *d, size_t len, double now)
{
    struct smfs_msg msg;
    int rc = smfs_unseal(g->tunnel, d, len, g->cfg.peer_site, &msg);
    if (rc < 0) {
        g->stats[S_REJECTED]++;
        reason_add(g, "rejected: %s", smfs_tunnel_reason(rc));
        return;
    }
    if (msg.kind == SMFS_KIND_DATA) {
        if (!smfs_replay_check_and_update(g->replay, msg.seq)) {
            g->stats[smfs_replay_late_after_rebuild(g->replay, msg.seq) ? S_LATE : S_REPLAYED]++;
            return;
        }
        if (smfs_decoder_has(g->dec, msg.seq)) {
            g->stats[S_LATE]++;
            return;
        }
        tun_write(g, msg.packet, msg.packet_len);
        rc = smfs_decoder_on_data(g->dec, msg.seq, msg.packet, msg.packet_len, now, on_rebuilt, g);
    } else {
        rc = smfs_decoder_on_repair(g->dec, &msg.repair, now, on_rebuilt, g);
    }
    if (rc < 0)
        reason_add(g, "decoder: %s", strerror(-rc));
}

static void on_wan(struct gw *g)
{
    double now = mono();
    uint64_t n_in = 0;
    for (int round = 0; round < WAN_ROUNDS; round++) {
        int r = recvmmsg(g->wan, g->imm, WAN_BATCH, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                if (!n_in)
                    drain_wan_errors(g);
                break;
            }
            g->stats[S_WAN_RECV_ERR]++;
            reason_add(g, "wan recv: %s", strerror(errno));
            drain_wan_errors(g);
            continue;
        }
        for (int i = 0; i < r; i++) /* RBUF holds any UDP datagram: none is truncated */
            on_datagram(g, g->wbuf + (size_t)i * RBUF, g->imm[i].msg_len, now);
        n_in += (uint64_t)r;
        if (r < WAN_BATCH)
            break;
    }
    g->stats[S_WAN_IN] += n_in;
}

/* -- timers -- */

/* _arm_timer's deadline: the encoder's (unless the TUN is backlogged), the announcer's, the
 * backlog's retry; 0 and *at when one is set. */
static int fec_deadline(const struct gw *g, double *at)
{
    int set = 0;
    double t;
    if (!g->backlogged && smfs_encoder_get_timer(g->enc, &t)) {
        *at = t;
        set = 1;
    }
    if (g->ann->has_next && (!set || g->ann->next < *at)) {
        *at = g->ann->next;
        set = 1;
    }
    if (g->has_retry && (!set || g->retry_at < *at)) {
        *at = g->retry_at;
        set = 1;
    }
    return set;
}

/* _on_timer */
static void on_timer(struct gw *g, double now)
{
    if (g->bl_n && g->has_retry && now >= g->retry_at)
        resend_backlog(g, now);
    if (!g->backlogged)
        encoder_timer(g, now);
    ann_timer(g, now);
}

static void arm(struct gw *g, double at)
{
    if (at == g->armed)
        return;
    g->armed = at;
    struct itimerspec its = {0};
    double sec = floor(at);
    its.it_value.tv_sec = (time_t)sec;
    its.it_value.tv_nsec = (long)((at - sec) * 1e9);
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    timerfd_settime(g->tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* -- statistics -- */

static long long tun_tx_dropped(const char *name, int *ok)
{
    char path[128];
    snprintf(path, sizeof path, "/sys/class/net/%s/statistics/tx_dropped", name);
    FILE *f = fopen(path, "r");
    long long v = 0;
    *ok = f && fscanf(f, "%lld", &v) == 1;
    if (f)
        fclose(f);
    return v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* numpy.percentile's default (linear) of sorted v[0..n). */
static double percentile(const double *v, size_t n, double q)
{
    double pos = (double)(n - 1) * q / 100.0;
    size_t lo = (size_t)floor(pos), hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (pos - (double)lo);
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void write_stats(struct gw *g)
{
    static double lat[10000], held[10000], own[10000];
    const struct config *c = &g->cfg;
    const uint64_t *s = g->stats;
    struct smfs_decoder_stats d;
    smfs_decoder_stats(g->dec, &d);
    uint64_t lost_on_wan = d.rebuilt + d.lost + smfs_decoder_missing_in_window(g->dec);
    char path[4096], tmp[4104], num[64];
    snprintf(path, sizeof path, "%s", c->stats);
    /* Path.with_suffix(".tmp") */
    char *slash = strrchr(path, '/'), *dot = strrchr(path, '.');
    if (dot && (!slash || dot > slash + 1))
        *dot = 0;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        logmsg("ERROR", "stats %s: %s", tmp, strerror(errno));
        return;
    }
    fprintf(f, "{\n \"site\": ");
    json_str(f, c->site_name);
    fprintf(f, ",\n \"params\": {\"r\": %u, \"c\": %u, \"interleaves\": [", c->params.r, c->params.c);
    for (uint32_t k = 0; k < c->params.c; k++)
        fprintf(f, "%s%u", k ? ", " : "", c->params.interleaves[k]);
    pyfloat(num, sizeof num, c->params.flush_ms);
    fprintf(f, "], \"flush_ms\": %s},\n", num);
#define KV(name, v) fprintf(f, " \"%s\": %" PRIu64 ",\n", name, (uint64_t)(v))
    KV("packets_in", s[S_TUN_IN]);
    KV("packets_out", s[S_DATA_OUT]);
    KV("repairs_sent", s[S_REPAIRS_OUT]);
    KV("repairs_deferred", s[S_DEFERRED]);
    KV("repairs_retried", s[S_RETRIED]);
    KV("repair_retry_failures", s[S_RETRY_FAIL]);
    KV("repairs_abandoned", s[S_ABANDONED]);
    KV("repair_backlog", g->bl_n);
    KV("wan_datagrams_in", s[S_WAN_IN]);
    KV("received", d.received);
    KV("lost_on_wan", lost_on_wan);
    KV("rebuilt", d.rebuilt);
    KV("lost_for_good", lost_on_wan - d.rebuilt);
    KV("jumped_over", d.skipped); /* gateway.py: a window jump's gap, not in lost_on_wan */
    if (lost_on_wan) {
        pyfloat(num, sizeof num, round_to((double)d.rebuilt / (double)lost_on_wan, 1e4));
        fprintf(f, " \"rebuilt_fraction\": %s,\n", num);
    } else {
        fprintf(f, " \"rebuilt_fraction\": null,\n");
    }
    KV("rejected", s[S_REJECTED]);
    KV("replayed", s[S_REPLAYED]);
    KV("late_after_rebuild", s[S_LATE]);
    KV("send_errors", s[S_SEND_ERR]);
    KV("data_send_errors", s[S_DATA_SEND_ERR]);
    KV("repair_send_errors", s[S_REPAIR_SEND_ERR]);
    KV("wan_errors", s[S_WAN_ERRORS]);
    KV("wan_recv_errors", s[S_WAN_RECV_ERR]);
    KV("callbacks_sent", s[S_CB_SENT]);
    KV("callbacks_resent", s[S_CB_RESENT]);
    KV("callback_send_errors", s[S_CB_SEND_ERR]);
#undef KV
    size_t n = smfs_ft_latencies(g->ft, lat, sizeof lat / sizeof lat[0]);
    smfs_ft_held_latencies(g->ft, held, sizeof held / sizeof held[0]);
    if (n > sizeof lat / sizeof lat[0])
        n = sizeof lat / sizeof lat[0];
    if (n) {
        /* gateway.py snapshot: the latency, its pacer-held part and the rest (the gateway's own) */
        for (size_t i = 0; i < n; i++) {
            own[i] = (lat[i] - held[i]) * 1000.0;
            lat[i] *= 1000.0;
            held[i] *= 1000.0;
        }
        qsort(lat, n, sizeof lat[0], cmp_double);
        qsort(held, n, sizeof held[0], cmp_double);
        qsort(own, n, sizeof own[0], cmp_double);
        fprintf(f, " \"callback_latency_ms\": {");
        const double *arrays[3] = {lat, held, own};
        const char *prefix[3] = {"", "held_", "own_"};
        for (int a = 0; a < 3; a++) {
            char p50[64], p99[64];
            pyfloat(p50, sizeof p50, round_to(percentile(arrays[a], n, 50), 1e3));
            pyfloat(p99, sizeof p99, round_to(percentile(arrays[a], n, 99), 1e3));
            fprintf(f, "\"%sp50\": %s, \"%sp99\": %s, ", prefix[a], p50, prefix[a], p99);
        }
        fprintf(f, "\"n\": %zu},\n", n);
    } else {
        fprintf(f, " \"callback_latency_ms\": null,\n");
    }
    if (g->paced) {
        pyfloat(num, sizeof num, round_to(g->pacer.paused_s, 1e3));
        fprintf(f, " \"paced\": {\"rate_bps\": %lld, \"pauses\": %" PRIu64 ", \"paused_s\": %s},\n",
                c->wan_rate_bps, g->pacer.pauses, num);
    } else {
        fprintf(f, " \"paced\": null,\n");
    }
    int ok;
    long long drops = tun_tx_dropped(c->tun_name, &ok);
    if (ok)
        fprintf(f, " \"edge_drops\": %lld,\n", drops);
    else
        fprintf(f, " \"edge_drops\": null,\n");
    if (c->vnet_hdr) /* TSO from the TUN: reads, and those that were one TSO packet cut into segments */
        fprintf(f, " \"tun_offload\": {\"reads\": %" PRIu64 ", \"tso_reads\": %" PRIu64 "},\n", g->tun_reads,
                g->tso_reads);
    else
        fprintf(f, " \"tun_offload\": null,\n");
    struct timespec cpu_ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu_ts);
    double cpu = (double)cpu_ts.tv_sec + (double)cpu_ts.tv_nsec * 1e-9;
    uint64_t handled = s[S_TUN_IN] + s[S_WAN_IN];
    pyfloat(num, sizeof num, round_to(cpu, 1e3));
    fprintf(f, " \"cpu_s\": %s,\n", num);
    struct rusage ru;  /* the kernel's share (TUN, sockets, the network stack on its behalf) */
    getrusage(RUSAGE_SELF, &ru);
    pyfloat(num, sizeof num, round_to((double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6, 1e3));
    fprintf(f, " \"cpu_sys_s\": %s,\n", num);
    if (handled) {
        pyfloat(num, sizeof num, round_to(cpu * 1e6 / (double)handled, 1e2));
        fprintf(f, " \"cpu_us_per_packet\": %s,\n", num);
    } else {
        fprintf(f, " \"cpu_us_per_packet\": null,\n");
    }
    fprintf(f, " \"reasons\": {");
    for (size_t i = 0; i < g->n_reasons; i++) {
        fprintf(f, "%s\n  ", i ? "," : "");
        json_str(f, g->reasons[i].name);
        fprintf(f, ": %" PRIu64, g->reasons[i].count);
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    pyfloat(num, sizeof num, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    fprintf(f, "%s},\n \"t\": %s\n}", g->n_reasons ? "\n " : "", num);
    if (fclose(f) != 0 || rename(tmp, c->stats) != 0)
        logmsg("ERROR", "stats %s: %s", c->stats, strerror(errno));
}

/* -- set-up -- */

static int parse_addr(const char *text, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host)
        return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (*end || port < 0 || port > 65535 || inet_pton(AF_INET, host, &out->sin_addr) != 1)
        return -1;
    return 0;
}

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int die(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    logmsg("ERROR", "gateway failed: %s", msg);
    exit(2);
}

static long long num_arg(const char *name, const char *v, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || *end || !*v || x < lo || x > hi)
        die("%s: %s is not an integer in %lld..%lld", name, v, lo, hi);
    return x;
}

static void parse_args(int argc, char **argv, struct config *c)
{
    memset(c, 0, sizeof *c);
    c->tun_fd = -1;
    c->wan_mtu = 1500;
    c->params = (struct smfs_fec_params){.r = 8, .c = 3, .interleaves = {1, 11, 19}, .flush_ms = 5.0};
    const char *local = NULL, *peer = NULL, *control = "127.0.0.1:7790";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--safe-at-send")) {
            c->safe_at_send = 1;
            continue;
        }
        if (!strcmp(a, "--vnet-hdr")) { /* the TUN was opened with IFF_VNET_HDR: offer it TSO */
            c->vnet_hdr = 1;
            continue;
        }
        if (i + 1 >= argc)
            die("%s needs a value (smfs-gateway is started by python -m smfs.gateway --engine c)", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--tun-fd"))
            c->tun_fd = (int)num_arg(a, v, 0, 1 << 20);
        else if (!strcmp(a, "--tun"))
            c->tun_name = v;
        else if (!strcmp(a, "--site"))
            c->site_name = v;
        else if (!strcmp(a, "--local"))
            local = v;
        else if (!strcmp(a, "--peer"))
            peer = v;
        else if (!strcmp(a, "--control"))
            control = v;
        else if (!strcmp(a, "--key-file"))
            c->key_file = v;
        else if (!strcmp(a, "--stats"))
            c->stats = v;
        else if (!strcmp(a, "--ready"))
            c->ready = v;
        else if (!strcmp(a, "--r"))
            c->params.r = (uint32_t)num_arg(a, v, 1, SMFS_MAX_R);
        else if (!strcmp(a, "--wan-mtu"))
            c->wan_mtu = (int)num_arg(a, v, 576, 65535);
        else if (!strcmp(a, "--wan-rate-bps"))
            c->wan_rate_bps = num_arg(a, v, 0, (long long)1 << 50);
        else if (!strcmp(a, "--flush-ms")) {
            char *end;
            c->params.flush_ms = strtod(v, &end);
            if (*end || !*v)
                die("--flush-ms: %s is not a number", v);
        } else if (!strcmp(a, "--interleaves")) { /* comma-separated; "" is c = 0 (no FEC) */
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            c->params.c = 0;
            memset(c->params.interleaves, 0, sizeof c->params.interleaves);
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (c->params.c == SMFS_MAX_LAYERS)
                    die("--interleaves: more than %d layers", SMFS_MAX_LAYERS);
                c->params.interleaves[c->params.c++] = (uint32_t)num_arg(a, tok, 1, SMFS_MAX_INTERLEAVE);
            }
            if (*v && !c->params.c)
                die("--interleaves: %s names no layer (c = 0 is the empty string)", v);
        } else
            die("unknown argument %s", a);
    }
    if (c->tun_fd < 0 || !c->tun_name || !c->site_name || !local || !peer || !c->key_file || !c->stats || !c->ready)
        die("missing argument: need --tun-fd --tun --site --local --peer --key-file --stats --ready");
    if (!strcmp(c->site_name, "primary"))
        c->site = 1, c->peer_site = 2;
    else if (!strcmp(c->site_name, "mirror"))
        c->site = 2, c->peer_site = 1;
    else
        die("--site: %s is neither primary nor mirror", c->site_name);
    if (parse_addr(local, &c->local) || parse_addr(peer, &c->peer) || parse_addr(control, &c->control))
        die("--local, --peer and --control take IPv4:PORT, got %s, %s, %s", local, peer, control);
    snprintf(c->local_s, sizeof c->local_s, "%s", local);
    snprintf(c->peer_s, sizeof c->peer_s, "%s", peer);
    if (smfs_fec_params_check(&c->params))
        die("invalid FEC parameters (r, interleaves, flush-ms)");
}

static size_t read_key(const char *path, uint8_t *key, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f)
        die("%s: %s", path, strerror(errno));
    char text[1024];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    size_t k = 0;
    char *p = text;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    for (; p[0] && p[0] != '\n' && p[0] != ' ' && p[0] != '\r'; p += 2) {
        unsigned v;
        if (!p[1] || k == cap || sscanf(p, "%2x", &v) != 1 || !strchr("0123456789abcdefABCDEF", p[1]))
            die("%s: not a hex key", path);
        key[k++] = (uint8_t)v;
    }
    return k;
}

static int udp_socket(const struct sockaddr_in *addr, int wan)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    if (wan) {
        int buf = 4 << 20, on = 1;
        /* gateway.py wan_socket: the FORCE options (root) get the 4 MiB past net.core.[rw]mem_max
         * (212992 by default: a receive buffer of ~150 datagrams, which a gateway slower than the
         * WAN's bursts overflows, after the WAN, in runs FEC cannot repair); else what the limit allows. */
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) < 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
        if (setsockopt(fd, IPPROTO_IP, IP_RECVERR, &on, sizeof on) < 0)
            die("IP_RECVERR: %s", strerror(errno));
    }
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        char a[16];
        inet_ntop(AF_INET, &addr->sin_addr, a, sizeof a);
        die("bind %s:%u: %s", a, ntohs(addr->sin_port), strerror(errno));
    }
    return fd;
}

static void *alloc_or_die(size_t n)
{
    void *p = calloc(1, n);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void setup(struct gw *g)
{
    struct config *c = &g->cfg;
    uint8_t key[512];
    size_t key_len = read_key(c->key_file, key, sizeof key);
    g->tunnel = smfs_tunnel_new(key, key_len);
    memset(key, 0, sizeof key);
    if (!g->tunnel)
        die("tunnel key: %s", errno == EINVAL ? "shorter than 16 bytes" : strerror(errno));
    uint64_t span = smfs_fec_span(&c->params); /* 0 when c = 0 (no FEC) */
    uint64_t window = 2 * span > 4096 ? 2 * span : 4096;
    g->enc = smfs_encoder_new(&c->params);
    g->dec = smfs_decoder_new(&c->params, window);
    g->replay = smfs_replay_new(window);
    g->ft = smfs_ft_new(c->params.c, 4096, 65536, 10000, c->safe_at_send);
    g->ann = alloc_or_die(sizeof *g->ann);
    if (!g->enc || !g->dec || !g->replay || !g->ft)
        die("FEC state: %s", strerror(errno));
    smfs_encoder_set_budgeted(g->enc, 1); /* gateway.py: the repair budget until a subscription */
    ann_init(g->ann);
    g->peer_window = window;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    g->seq = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec; /* time.time_ns(), as gateway.py */
    const char *first = getenv("SMFS_GATEWAY_FIRST_SEQ"); /* tests only: pinned, as gateway.py */
    if (first && *first)
        g->seq = (uint64_t)num_arg("SMFS_GATEWAY_FIRST_SEQ", first, 0, INT64_MAX);
    g->retry_delay = RETRY_MIN_S;
    if (c->wan_rate_bps) {
        g->paced = 1;
        g->pacer.bytes_per_s = (double)c->wan_rate_bps / 8 * HEADROOM;
        g->pacer.burst = (double)PACER_BURST_DATAGRAMS * c->wan_mtu;
        g->pacer.tokens = g->pacer.burst;
        g->pacer.t = mono();
    }
    g->rbuf = alloc_or_die((size_t)(TUN_BATCH + TSO_SEGS) * RBUF);
    g->gbuf = alloc_or_die(RBUF);
    g->arena = alloc_or_die(ARENA);
    g->outq = alloc_or_die(sizeof *g->outq * OUTQ_MAX);
    g->omm = alloc_or_die(sizeof *g->omm * OUTQ_MAX);
    g->oiov = alloc_or_die(sizeof *g->oiov * OUTQ_MAX);
    for (int i = 0; i < OUTQ_MAX; i++) {
        g->omm[i].msg_hdr.msg_name = &c->peer;
        g->omm[i].msg_hdr.msg_namelen = sizeof c->peer;
        g->omm[i].msg_hdr.msg_iov = &g->oiov[i];
        g->omm[i].msg_hdr.msg_iovlen = 1;
    }
    g->wbuf = alloc_or_die((size_t)WAN_BATCH * RBUF);
    g->imm = alloc_or_die(sizeof *g->imm * WAN_BATCH);
    g->iiov = alloc_or_die(sizeof *g->iiov * WAN_BATCH);
    for (int i = 0; i < WAN_BATCH; i++) {
        g->iiov[i].iov_base = g->wbuf + (size_t)i * RBUF;
        g->iiov[i].iov_len = RBUF;
        g->imm[i].msg_hdr.msg_iov = &g->iiov[i];
        g->imm[i].msg_hdr.msg_iovlen = 1;
    }

    g->tun = c->tun_fd;
    int fl = fcntl(g->tun, F_GETFL);
    if (fl < 0 || fcntl(g->tun, F_SETFL, fl | O_NONBLOCK) < 0)
        die("TUN fd %d: %s", g->tun, strerror(errno));
    fcntl(g->tun, F_SETFD, FD_CLOEXEC);
    if (c->vnet_hdr && ioctl(g->tun, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN) < 0)
        die("TUNSETOFFLOAD on %s: %s", c->tun_name, strerror(errno));
    g->wan = udp_socket(&c->local, 1);
    g->ctl = udp_socket(&c->control, 0);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    g->sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    g->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    g->ep = epoll_create1(EPOLL_CLOEXEC);
    if (g->sfd < 0 || g->tfd < 0 || g->ep < 0)
        die("signalfd/timerfd/epoll: %s", strerror(errno));
    int fds[] = {g->tun, g->wan, g->ctl, g->tfd, g->sfd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(g->ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
            die("epoll_ctl: %s", strerror(errno));
    }
}

static void on_signals(struct gw *g)
{
    struct signalfd_siginfo si;
    while (read(g->sfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGUSR1)
            write_stats(g);
        else
            g->stop = 1;
    }
}

static void run(struct gw *g)
{
    g->next_stats = mono();
    while (!g->stop) {
        double now = mono();
        if (g->tun_paused && now >= g->resume_at) { /* _resume_tun */
            g->held_s += now - g->held_from;
            g->tun_paused = 0;
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = g->tun};
            epoll_ctl(g->ep, EPOLL_CTL_MOD, g->tun, &ev);
            on_tun(g);
        }
        double at;
        if (fec_deadline(g, &at) && mono() >= at) {
            on_timer(g, mono());
            continue;
        }
        if (now >= g->next_stats) {
            write_stats(g);
            g->next_stats = now + 1.0;
        }
        double next = g->next_stats;
        if (fec_deadline(g, &at) && at < next)
            next = at;
        if (g->tun_paused && g->resume_at < next)
            next = g->resume_at;
        arm(g, next);

        struct epoll_event evs[8];
        int n = epoll_wait(g->ep, evs, 8, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == g->wan)
                on_wan(g);
            else if (fd == g->tun) {
                if (!g->tun_paused)
                    on_tun(g);
            } else if (fd == g->ctl)
                on_control(g);
            else if (fd == g->sfd)
                on_signals(g);
            else if (fd == g->tfd) {
                uint64_t ticks;
                if (read(g->tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
                    die("timerfd: %s", strerror(errno));
                g->armed = -1; /* fired: arm again whatever the deadline */
            }
        }
    }
}

int main(int argc, char **argv)
{
    static struct gw g;
    parse_args(argc, argv, &g.cfg);
    setup(&g);
    FILE *r = fopen(g.cfg.ready, "w");
    if (!r || fputs("ready\n", r) < 0 || fclose(r) != 0)
        die("%s: %s", g.cfg.ready, strerror(errno));
    char ivs[96] = "(";
    for (uint32_t k = 0; k < g.cfg.params.c; k++)
        snprintf(ivs + strlen(ivs), sizeof ivs - strlen(ivs), "%s%u", k ? ", " : "", g.cfg.params.interleaves[k]);
    strncat(ivs, g.cfg.params.c == 1 ? ",)" : ")", sizeof ivs - strlen(ivs) - 1);
    logmsg("INFO", "gateway %s up (C engine): tun %s, %s <-> %s, r=%u interleaves=%s", g.cfg.site_name,
           g.cfg.tun_name, g.cfg.local_s, g.cfg.peer_s, g.cfg.params.r, ivs);
    run(&g);
    write_stats(&g);
    return 0;
}
