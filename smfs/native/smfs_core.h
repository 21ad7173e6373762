/* smfs_core: the Maelstrom gateway's per-packet core in C.
 *
 * A byte-for-byte equivalent of the Python executable specification:
 *   - the layered-interleaving XOR FEC encoder and decoder  (smfs/fec.py)
 *   - tunnel sealing/unsealing and the replay window          (smfs/tunnel.py)
 *   - the per-flow safe-offset tracker of network-sync        (smfs/callbacks.py)
 *
 * Pure: no I/O, no threads, time passed in (seconds, any monotonic origin). Every object is
 * owned by its caller (new/free), is not thread-safe, and is driven by calls that answer
 * through callbacks invoked synchronously, in the order the Python implementation returns its
 * list. Memory handed to a callback belongs to the object and is valid only during the call;
 * a callback must not call back into the object that invoked it.
 *
 * Errors: functions return a negative errno (-EINVAL bad argument, -ENOMEM, -ENOSPC output
 * buffer too small) and leave the object unchanged; smfs_unseal returns a negative
 * SMFS_TE_* reason instead. The one exception: a decoder that cannot get memory for a rebuilt
 * packet or a pending repair mid-operation drops it and counts it (stats.nomem). Every
 * function checks the lengths it is given against the bytes it reads, whatever the input;
 * arrays passed by pointer with a count (repair seqs, lengths, xor) must hold that count.
 */
#ifndef SMFS_CORE_H
#define SMFS_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMFS_MAX_R 64            /* packets per repair (one byte on the wire) */
#define SMFS_MAX_LAYERS 8        /* layers (one bit each in the flow tracker) */
#define SMFS_MAX_PACKET 65535    /* bytes: an IPv4 packet's total length is 16-bit */
#define SMFS_CREDIT_EARN 5       /* fec.py CREDIT_EARN: a budgeted encoder's credit per packet, x c */
#define SMFS_CREDIT_COST 4       /* fec.py CREDIT_COST: per repair, x r */
#define SMFS_MAX_INTERLEAVE 2048 /* C-only bound (Python: none) */
#define SMFS_MAX_WINDOW (1u << 18) /* decoder window, packets (C-only bound) */

/* ---- FEC (smfs/fec.py) ------------------------------------------------------------------ */

struct smfs_fec_params {
    uint32_t r;                                 /* data packets per repair, 1..64 */
    uint32_t c;                                 /* layers, 0..8 (0: no FEC, no repair ever) */
    uint32_t interleaves[SMFS_MAX_LAYERS];      /* the first c: strictly increasing, >= 1 */
    double flush_ms;                            /* (0, 1000] ms */
};

/* A repair: the XOR of packets seqs[0..n) (strictly increasing) of one bin of `layer`,
 * lengths[i] the length of packet seqs[i] (1..65535), xor zero-padded to the longest. */
struct smfs_repair {
    uint32_t layer;
    uint32_t n;
    const uint64_t *seqs;
    const uint16_t *lengths;
    const uint8_t *xor;
    uint32_t xor_len;
};

typedef void (*smfs_repair_fn)(void *ctx, const struct smfs_repair *rep);
typedef void (*smfs_packet_fn)(void *ctx, uint64_t seq, const uint8_t *packet, size_t len);

struct smfs_encoder_stats {
    uint64_t packets, bytes, repairs, flushed, held;
};

struct smfs_decoder_stats {
    uint64_t received, duplicates, late, rebuilt, lost, skipped;
    uint64_t repairs, repairs_useless, repairs_stale, repairs_duplicate;
    uint64_t repairs_inconsistent, repairs_expired;
    uint64_t nomem; /* C only: rebuilds or repairs dropped for want of memory */
};

/* 0 when valid, else -EINVAL. */
int smfs_fec_params_check(const struct smfs_fec_params *p);
/* FecParams.span: r * max(interleaves), the seq span of a full bin of the widest layer; 0 when
 * c = 0 (no bins). */
static inline uint64_t smfs_fec_span(const struct smfs_fec_params *p)
{
    return p->c ? (uint64_t)p->r * p->interleaves[p->c - 1] : 0;
}
/* 0 when `rep` is well formed (as Repair.__post_init__ checks), else -EINVAL. */
int smfs_repair_check(const struct smfs_repair *rep);

struct smfs_encoder;
/* NULL with errno EINVAL or ENOMEM. */
struct smfs_encoder *smfs_encoder_new(const struct smfs_fec_params *p);
void smfs_encoder_free(struct smfs_encoder *enc);
/* Encoder.add: packet `seq` (> every previous seq) sent at `now`; emits the repairs it
 * completes. Number of repairs emitted, or -EINVAL (seq not increasing, len not 1..65535),
 * -ENOMEM; then nothing changed. */
int smfs_encoder_add(struct smfs_encoder *enc, uint64_t seq, const uint8_t *packet, size_t len,
                     double now, smfs_repair_fn emit, void *ctx);
/* Encoder.add(..., lazy=): the same, the packet marked lazy (a pure TCP ACK: see fec.py). */
int smfs_encoder_add_ex(struct smfs_encoder *enc, uint64_t seq, const uint8_t *packet, size_t len,
                        double now, int lazy, smfs_repair_fn emit, void *ctx);
/* Encoder.add_many: packets first_seq, first_seq + 1, ... at offsets[i], lens[i] of buf, lazy[i]
 * (NULL: none lazy). Number of repairs, or a negative errno at the first packet refused (earlier
 * ones added). */
int smfs_encoder_add_batch(struct smfs_encoder *enc, uint64_t first_seq, const uint8_t *buf,
                           size_t buf_len, const uint32_t *offsets, const uint32_t *lens,
                           const uint8_t *lazy, size_t count, double now, smfs_repair_fn emit, void *ctx);
/* Encoder.get_timer: 1 and *deadline (s) when a bin is open that may flush, else 0. */
int smfs_encoder_get_timer(const struct smfs_encoder *enc, double *deadline);
/* Encoder.handle_timer / Encoder.flush: number of repairs emitted. */
int smfs_encoder_handle_timer(struct smfs_encoder *enc, double now, smfs_repair_fn emit, void *ctx);
int smfs_encoder_flush(struct smfs_encoder *enc, smfs_repair_fn emit, void *ctx);
size_t smfs_encoder_open_bins(const struct smfs_encoder *enc);
void smfs_encoder_stats(const struct smfs_encoder *enc, struct smfs_encoder_stats *out);
/* Encoder.budgeted (fec.py): due lazy bins flush only on credit (5 c per packet, 4 r per repair). */
void smfs_encoder_set_budgeted(struct smfs_encoder *enc, int budgeted);
int64_t smfs_encoder_credit(const struct smfs_encoder *enc);

struct smfs_decoder;
/* window: packets, max(1, 2 * smfs_fec_span(p)) .. SMFS_MAX_WINDOW. NULL with errno. With c = 0
 * no repair is kept pending: one that arrives anyway rebuilds only a packet it alone misses. */
struct smfs_decoder *smfs_decoder_new(const struct smfs_fec_params *p, uint64_t window);
void smfs_decoder_free(struct smfs_decoder *dec);
/* Decoder.on_data / Decoder.on_repair: emit each packet rebuilt (with cascades), in order.
 * Number rebuilt, or -EINVAL (packet over 65535 bytes, malformed repair) / -ENOMEM, with
 * nothing changed. */
int smfs_decoder_on_data(struct smfs_decoder *dec, uint64_t seq, const uint8_t *packet, size_t len,
                         double now, smfs_packet_fn rebuilt, void *ctx);
int smfs_decoder_on_repair(struct smfs_decoder *dec, const struct smfs_repair *rep, double now,
                           smfs_packet_fn rebuilt, void *ctx);
int smfs_decoder_has(const struct smfs_decoder *dec, uint64_t seq);
/* The packet held for `seq` (valid until the next call on dec), or NULL. */
const uint8_t *smfs_decoder_get(const struct smfs_decoder *dec, uint64_t seq, size_t *len);
uint64_t smfs_decoder_low(const struct smfs_decoder *dec);
uint64_t smfs_decoder_window(const struct smfs_decoder *dec);
uint64_t smfs_decoder_missing_in_window(const struct smfs_decoder *dec);
void smfs_decoder_stats(const struct smfs_decoder *dec, struct smfs_decoder_stats *out);

/* dst[i] ^= src[i] for i < n (the codec's kernel). */
void smfs_xor_into(uint8_t *dst, const uint8_t *src, size_t n);

/* ---- Tunnel (smfs/tunnel.py) ------------------------------------------------------------ */

#define SMFS_MAGIC 0xA7
#define SMFS_VERSION 1
#define SMFS_KIND_DATA 1
#define SMFS_KIND_REPAIR 2
#define SMFS_MAC_LEN 16
#define SMFS_MIN_KEY 16
#define SMFS_MAX_DATAGRAM 65507
#define SMFS_DATA_OVERHEAD (4 + 8 + SMFS_MAC_LEN)
#define SMFS_MAX_DATA_PACKET (SMFS_MAX_DATAGRAM - SMFS_DATA_OVERHEAD)

/* Rejection reasons of smfs_unseal (returned negated), as TunnelError.reason. */
enum smfs_tunnel_reason {
    SMFS_TE_SHORT = 1,
    SMFS_TE_OVERSIZE,
    SMFS_TE_BAD_MAGIC,
    SMFS_TE_BAD_VERSION,
    SMFS_TE_BAD_MAC,
    SMFS_TE_FOREIGN_SITE,
    SMFS_TE_BAD_KIND,
    SMFS_TE_MALFORMED,
    SMFS_TE_INTERNAL, /* C only: libcrypto failed */
};

/* One decoded datagram. For DATA, packet points into the datagram; for REPAIR, repair.seqs
 * and repair.lengths point into this struct and repair.xor into the datagram. */
struct smfs_msg {
    int kind;
    uint32_t site;
    uint64_t seq;
    const uint8_t *packet;
    size_t packet_len;
    struct smfs_repair repair;
    uint64_t seqs[SMFS_MAX_R];
    uint16_t lengths[SMFS_MAX_R];
};

struct smfs_tunnel;
/* HMAC-SHA-256 states keyed once (the _mac_states of tunnel.py). NULL with errno EINVAL
 * (key shorter than 16 bytes) or ENOMEM. */
struct smfs_tunnel *smfs_tunnel_new(const uint8_t *key, size_t key_len);
void smfs_tunnel_free(struct smfs_tunnel *t);
/* HMAC-SHA-256 of data[0..len) under t's key, truncated to SMFS_MAC_LEN bytes (tunnel.py's _mac):
 * 0, -EINVAL or -EIO (libcrypto failed). The control channel's messages use it (callbacks.py). */
int smfs_tunnel_mac(struct smfs_tunnel *t, const uint8_t *data, size_t len, uint8_t out[SMFS_MAC_LEN]);
/* encode_data / encode_repair into out[0..cap): bytes written, or -EINVAL (as the Python
 * ValueError), -ENOSPC, -EIO (libcrypto failed). */
long smfs_seal_data(struct smfs_tunnel *t, int site, uint64_t seq, const uint8_t *packet,
                    size_t len, uint8_t *out, size_t cap);
long smfs_seal_repair(struct smfs_tunnel *t, int site, const struct smfs_repair *rep, uint8_t *out,
                      size_t cap);
/* decode_raw: 0 and *msg, or -SMFS_TE_*. expect_site < 0: any site. */
int smfs_unseal(struct smfs_tunnel *t, const uint8_t *datagram, size_t len, int expect_site,
                struct smfs_msg *msg);
/* TunnelError.reason of a (negated or not) SMFS_TE_* code. */
const char *smfs_tunnel_reason(int code);

struct smfs_replay;
/* ReplayWindow(size): size 64 .. 2**24 seqs. NULL with errno. */
struct smfs_replay *smfs_replay_new(uint64_t size);
void smfs_replay_free(struct smfs_replay *rw);
int smfs_replay_check(const struct smfs_replay *rw, uint64_t seq);
void smfs_replay_update(struct smfs_replay *rw, uint64_t seq);
int smfs_replay_check_and_update(struct smfs_replay *rw, uint64_t seq);
void smfs_replay_mark_rebuilt(struct smfs_replay *rw, uint64_t seq);
int smfs_replay_late_after_rebuild(struct smfs_replay *rw, uint64_t seq);
/* 1 and *top when a seq was recorded, else 0 (Python: top == -1). */
int smfs_replay_top(const struct smfs_replay *rw, uint64_t *top);
/* Rebuilt seqs remembered (len(ReplayWindow._rebuilt)). */
size_t smfs_replay_rebuilt_count(const struct smfs_replay *rw);

/* ---- Flow tracking (smfs/callbacks.py) -------------------------------------------------- */

/* One direction of a TCP connection; addresses as on the wire (network byte order). */
struct smfs_flow {
    uint8_t src[4];
    uint8_t dst[4];
    uint16_t sport;
    uint16_t dport;
};

typedef void (*smfs_safe_fn)(void *ctx, const struct smfs_flow *flow, int64_t offset);

struct smfs_flow_tracker;
/* FlowTracker(c, max_flows, max_pending, max_latencies, safe_at_send), c 0..8 (0: a packet's
 * bytes are safe once it is sent, latency 0). NULL with errno. */
struct smfs_flow_tracker *smfs_ft_new(uint32_t c, uint32_t max_flows, uint32_t max_pending,
                                      uint32_t max_latencies, int safe_at_send);
void smfs_ft_free(struct smfs_flow_tracker *ft);
/* on_packet_sent: now (s), NaN for None. */
void smfs_ft_on_packet_sent(struct smfs_flow_tracker *ft, uint64_t tunnel_seq, const uint8_t *ip,
                            size_t len, double now);
/* on_repairs_sent for one repair (only layer, n and seqs are read); NaN now for None. */
void smfs_ft_on_repair_sent(struct smfs_flow_tracker *ft, const struct smfs_repair *rep, double now);
/* safe_offsets: emit each flow whose safe offset advanced (order: first advance first; the
 * Python set's order is arbitrary); number emitted. */
int smfs_ft_safe_offsets(struct smfs_flow_tracker *ft, smfs_safe_fn cb, void *ctx);
/* safe_offset: 1 and *offset when the flow is tracked, else 0. */
int smfs_ft_safe_offset(const struct smfs_flow_tracker *ft, const struct smfs_flow *flow,
                        int64_t *offset);
size_t smfs_ft_flows(const struct smfs_flow_tracker *ft);
size_t smfs_ft_pending(const struct smfs_flow_tracker *ft);
uint64_t smfs_ft_ignored(const struct smfs_flow_tracker *ft);
/* C only: segments not tracked for want of room (more than 4096 holes in one flow, or one
 * tunnel seq reported more than once with the entry pool full): never reported safe. */
uint64_t smfs_ft_dropped(const struct smfs_flow_tracker *ft);
/* The latencies kept (s), oldest first, at most cap copied; the number kept. */
size_t smfs_ft_latencies(const struct smfs_flow_tracker *ft, double *out, size_t cap);
/* FlowTracker.held_latencies: the pacer-held part of each latency above, same order. */
size_t smfs_ft_held_latencies(const struct smfs_flow_tracker *ft, double *out, size_t cap);
/* callbacks.py is_pure_ack: 1 for a TCP segment without payload, SYN, FIN or RST (IPv4, not a
 * fragment), the encoder's lazy packets (fec.py), else 0. */
int smfs_is_pure_ack(const uint8_t *ip, size_t len);
/* FlowTracker.held = held: the gateway's running total of seconds held back by its pacer. */
void smfs_ft_set_held(struct smfs_flow_tracker *ft, double held);

/* ---- TUN offloads (offload.c) ------------------------------------------------------------ */

#define SMFS_VNET_HDR_LEN 10         /* struct virtio_net_hdr, little-endian */
#define SMFS_VNET_F_NEEDS_CSUM 1
#define SMFS_VNET_GSO_NONE 0
#define SMFS_VNET_GSO_TCPV4 1

/* One read from a TUN with IFF_VNET_HDR (the 10-byte header `hdr`, then `len` bytes of packet) as
 * the packets a TUN without offloads would have given: a TCP/IPv4 GSO packet cut into segments of
 * gso_size payload bytes as the kernel's software GSO cuts it (IP id + i, sequence + offset, FIN and
 * PSH on the last, CWR on the first, both checksums complete); any other packet as it is, its
 * checksum finished if it was left to the device. Segment i goes to out + i * stride, its length to
 * lens[i]; returns the number of segments (>= 1), -EINVAL for what the kernel never hands a TUN
 * offered only TUN_F_CSUM and TUN_F_TSO4 (another GSO type, headers that do not fit, a fragment, a
 * checksum offset outside the packet), -ENOSPC for more than `max` segments or one longer than
 * `stride`. out may be pkt for a packet that is not GSO (its checksum finished in place). */
long smfs_vnet_segment(const uint8_t *hdr, const uint8_t *pkt, size_t len, uint8_t *out, size_t stride,
                       size_t max, uint32_t *lens);

/* ---- Benchmarks (bench.c): one core, in C, no ctypes per packet -------------------------- */

/* Encode `n` packets of `size` bytes from pkts (n * size bytes) repeatedly for >= min_s; then
 * decode the stream (data then repairs, in encoder order) with `loss` (0..1) of data and
 * repairs dropped (seeded), repeatedly for >= min_s. Bytes of data packets per second
 * (decode: delivered = received + rebuilt); *rebuilt / *lost of one decoding pass. */
int smfs_bench_codec(const struct smfs_fec_params *p, const uint8_t *pkts, size_t size, size_t n,
                     double loss, uint64_t seed, double min_s, double *encode_bps,
                     double *decode_bps, uint64_t *rebuilt, uint64_t *lost);
/* Seal then unseal DATA datagrams of `size` bytes: packets per second of each. */
int smfs_bench_tunnel(const uint8_t *key, size_t key_len, size_t size, double min_s,
                      double *seal_pps, double *unseal_pps);

#ifdef __cplusplus
}
#endif
#endif
