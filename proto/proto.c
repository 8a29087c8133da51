/*
 * Frame header, msgpack encoders (msgpack-c's packer writing into proto_buf)
 * and the decoder. The decoder is a cursor over the body bytes rather than
 * msgpack-c's unpacker: every count a header claims is checked against the
 * bytes that remain before anything trusts it, and nothing is allocated, so a
 * hostile frame costs at most one pass over bytes the agent already holds.
 */
#include "trackd_proto.h"

#include <errno.h>
#include <limits.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

const char *proto_strerror(int code)
{
    switch (code) {
    case 0: return "success";
    case PROTO_EBADMAGIC: return "bad frame magic (not a trackd client?)";
    case PROTO_EVERSION: return "unsupported protocol version";
    case PROTO_ETOOBIG: return "frame body exceeds the size limit";
    case PROTO_EKIND: return "unknown message kind";
    case PROTO_EMSGPACK: return "malformed or truncated msgpack body";
    case PROTO_ESHAPE: return "message fields have the wrong count or type";
    case PROTO_EDEPTH: return "msgpack nesting too deep";
    case PROTO_ENOMEM: return "out of buffer space";
    case PROTO_ETRAILING: return "bytes left after the message body";
    default: return "unknown error";
    }
}

const char *proto_kind_name(int kind)
{
    static const char *const names[] = {
        [PROTO_HELLO] = "hello",
        [PROTO_WELCOME] = "welcome",
        [PROTO_EXPERIMENT] = "experiment",
        [PROTO_START_RUN] = "start_run",
        [PROTO_METRIC] = "metric",
        [PROTO_METRICS] = "metrics",
        [PROTO_PARAMS] = "params",
        [PROTO_TAGS] = "tags",
        [PROTO_END_RUN] = "end_run",
        [PROTO_FLUSH] = "flush",
        [PROTO_FLUSHED] = "flushed",
        [PROTO_ERROR] = "error",
        [PROTO_STATS] = "stats",
        [PROTO_STATS_REPLY] = "stats_reply",
        [PROTO_DELETE_TAG] = "delete_tag",
        [PROTO_UPDATE_RUN] = "update_run",
        [PROTO_ACK] = "ack",
        [PROTO_ARTIFACT] = "artifact",
    };
    if (kind < 1 || kind > PROTO_KIND_MAX)
        return "unknown";
    return names[kind];
}

/* ---- header ------------------------------------------------------------ */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p)
{
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

void proto_header_encode(uint8_t out[PROTO_HEADER_LEN], const struct proto_header *h)
{
    out[0] = PROTO_MAGIC0;
    out[1] = PROTO_MAGIC1;
    out[2] = h->version;
    out[3] = h->kind;
    put_be32(out + 4, h->body_len);
    put_be32(out + 8, (uint32_t)(h->seq >> 32));
    put_be32(out + 12, (uint32_t)h->seq);
}

int proto_header_decode(const uint8_t in[PROTO_HEADER_LEN], uint32_t max_body,
                        struct proto_header *h)
{
    if (in[0] != PROTO_MAGIC0 || in[1] != PROTO_MAGIC1)
        return PROTO_EBADMAGIC;
    h->version = in[2];
    h->kind = in[3];
    h->body_len = get_be32(in + 4);
    h->seq = get_be64(in + 8);
    if (h->version != PROTO_VERSION)
        return PROTO_EVERSION;
    if (h->kind < 1 || h->kind > PROTO_KIND_MAX)
        return PROTO_EKIND;
    if (h->body_len > max_body || h->body_len > PROTO_MAX_BODY_HARD)
        return PROTO_ETOOBIG;
    return 0;
}

/* ---- buffer ------------------------------------------------------------ */

void proto_buf_init(struct proto_buf *b, size_t limit)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->limit = limit ? limit : (size_t)PROTO_MAX_BODY_HARD * 2;
}

void proto_buf_free(struct proto_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int proto_buf_reserve(struct proto_buf *b, size_t extra)
{
    if (extra > b->limit || b->len > b->limit - extra)
        return PROTO_ENOMEM;
    size_t need = b->len + extra;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    if (cap > b->limit)
        cap = b->limit;
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL)
        return PROTO_ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

void proto_buf_consume(struct proto_buf *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static int buf_write_cb(void *data, const char *p, size_t n)
{
    struct proto_buf *b = data;
    if (proto_buf_reserve(b, n) != 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

/*
 * Encoding state for one frame: remembers where it started so that a failure
 * part-way rolls the buffer back and a success patches the body length.
 */
struct enc {
    struct proto_buf *b;
    size_t start;
    msgpack_packer pk;
    int rc;
};

static void enc_begin(struct enc *e, struct proto_buf *b, int kind, uint64_t seq)
{
    e->b = b;
    e->start = b->len;
    e->rc = proto_buf_reserve(b, PROTO_HEADER_LEN);
    if (e->rc == 0) {
        struct proto_header h = {PROTO_VERSION, (uint8_t)kind, 0, seq};
        proto_header_encode(b->data + b->len, &h);
        b->len += PROTO_HEADER_LEN;
    }
    msgpack_packer_init(&e->pk, b, buf_write_cb);
}

static int enc_end(struct enc *e)
{
    size_t body = e->b->len - e->start - PROTO_HEADER_LEN;
    if (e->rc == 0 && body > PROTO_MAX_BODY_HARD)
        e->rc = PROTO_ETOOBIG;
    if (e->rc != 0) {
        e->b->len = e->start;
        return e->rc;
    }
    put_be32(e->b->data + e->start + 4, (uint32_t)body);
    return 0;
}

/* Each helper records the first failure; later calls become no-ops. */
static void enc_check(struct enc *e, int packer_rc)
{
    if (e->rc == 0 && packer_rc != 0)
        e->rc = PROTO_ENOMEM;
}

static void enc_array(struct enc *e, size_t n)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_array(&e->pk, n));
}

static void enc_str(struct enc *e, struct proto_str s)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_str_with_body(&e->pk, s.ptr ? s.ptr : "", s.len));
}

static void enc_uint(struct enc *e, uint64_t v)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_uint64(&e->pk, v));
}

static void enc_int(struct enc *e, int64_t v)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_int64(&e->pk, v));
}

static void enc_double(struct enc *e, double v)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_double(&e->pk, v));
}

static void enc_nil(struct enc *e)
{
    if (e->rc == 0)
        enc_check(e, msgpack_pack_nil(&e->pk));
}

static struct proto_str run_str(const char *run_id)
{
    return (struct proto_str){run_id, PROTO_RUN_ID_LEN};
}

static void enc_kvs(struct enc *e, const struct proto_kv *kvs, size_t n)
{
    enc_array(e, n * 2);
    for (size_t i = 0; i < n; i++) {
        enc_str(e, kvs[i].key);
        enc_str(e, kvs[i].value);
    }
}

int proto_encode_hello_ctx(struct proto_buf *b, uint64_t seq, uint32_t pid,
                           struct proto_str program, struct proto_str source_name,
                           struct proto_str source_type, struct proto_str client, bool context_tags,
                           uint64_t session)
{
    /* Optional fields are sent only when they differ from their defaults. */
    uint32_t n = session ? 8 : context_tags ? 6 : 7;
    struct enc e;
    enc_begin(&e, b, PROTO_HELLO, seq);
    enc_array(&e, n);
    enc_uint(&e, PROTO_VERSION);
    enc_uint(&e, pid);
    enc_str(&e, program);
    enc_str(&e, source_name);
    enc_str(&e, source_type);
    enc_str(&e, client);
    if (n >= 7 && e.rc == 0)
        enc_check(&e, context_tags ? msgpack_pack_true(&e.pk) : msgpack_pack_false(&e.pk));
    if (n >= 8)
        enc_uint(&e, session);
    return enc_end(&e);
}

int proto_encode_ack(struct proto_buf *b, uint64_t seq, uint64_t acked_seq)
{
    struct enc e;
    enc_begin(&e, b, PROTO_ACK, seq);
    enc_array(&e, 1);
    enc_uint(&e, acked_seq);
    return enc_end(&e);
}

int proto_encode_hello(struct proto_buf *b, uint64_t seq, uint32_t pid, struct proto_str program,
                       struct proto_str source_name, struct proto_str source_type,
                       struct proto_str client)
{
    return proto_encode_hello_ctx(b, seq, pid, program, source_name, source_type, client, true, 0);
}

int proto_encode_welcome_uri(struct proto_buf *b, uint64_t seq, struct proto_str agent_version,
                             uint32_t max_frame, uint64_t session, struct proto_str backend_uri)
{
    struct enc e;
    enc_begin(&e, b, PROTO_WELCOME, seq);
    enc_array(&e, backend_uri.len ? 5 : 4);
    enc_uint(&e, PROTO_VERSION);
    enc_str(&e, agent_version);
    enc_uint(&e, max_frame);
    enc_uint(&e, session);
    if (backend_uri.len)
        enc_str(&e, backend_uri);
    return enc_end(&e);
}

int proto_encode_welcome(struct proto_buf *b, uint64_t seq, struct proto_str agent_version,
                         uint32_t max_frame, uint64_t session)
{
    return proto_encode_welcome_uri(b, seq, agent_version, max_frame, session,
                                    (struct proto_str){"", 0});
}

int proto_encode_experiment_at(struct proto_buf *b, uint64_t seq, struct proto_str name,
                               const struct proto_str *artifact_location)
{
    struct enc e;
    enc_begin(&e, b, PROTO_EXPERIMENT, seq);
    enc_array(&e, artifact_location ? 2 : 1);
    enc_str(&e, name);
    if (artifact_location)
        enc_str(&e, *artifact_location);
    return enc_end(&e);
}

int proto_encode_experiment(struct proto_buf *b, uint64_t seq, struct proto_str name)
{
    return proto_encode_experiment_at(b, seq, name, NULL);
}

int proto_encode_delete_tag(struct proto_buf *b, uint64_t seq, const char *run_id,
                            struct proto_str key)
{
    struct enc e;
    enc_begin(&e, b, PROTO_DELETE_TAG, seq);
    enc_array(&e, 2);
    enc_str(&e, run_str(run_id));
    enc_str(&e, key);
    return enc_end(&e);
}

int proto_encode_artifact(struct proto_buf *b, uint64_t seq, const char *run_id,
                          struct proto_str path, const struct proto_file_seen *seen)
{
    struct enc e;
    enc_begin(&e, b, PROTO_ARTIFACT, seq);
    enc_array(&e, seen->mtime_ns ? 4 : 3);
    enc_str(&e, run_str(run_id));
    enc_str(&e, path);
    enc_uint(&e, seen->size);
    if (seen->mtime_ns)
        enc_uint(&e, seen->mtime_ns);
    return enc_end(&e);
}

int proto_encode_update_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                            const struct proto_str *status, const int64_t *end_time,
                            const struct proto_str *run_name)
{
    struct enc e;
    enc_begin(&e, b, PROTO_UPDATE_RUN, seq);
    enc_array(&e, 4);
    enc_str(&e, run_str(run_id));
    if (status)
        enc_str(&e, *status);
    else
        enc_nil(&e);
    if (end_time)
        enc_int(&e, *end_time);
    else
        enc_nil(&e);
    if (run_name)
        enc_str(&e, *run_name);
    else
        enc_nil(&e);
    return enc_end(&e);
}

int proto_encode_start_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                           struct proto_str experiment, const struct proto_str *run_name,
                           int64_t start_time, const struct proto_kv *tags, size_t ntags,
                           const uint64_t *experiment_id)
{
    struct enc e;
    enc_begin(&e, b, PROTO_START_RUN, seq);
    enc_array(&e, experiment_id ? 6 : 5);
    enc_str(&e, run_str(run_id));
    enc_str(&e, experiment);
    if (run_name)
        enc_str(&e, *run_name);
    else
        enc_nil(&e);
    enc_int(&e, start_time);
    enc_kvs(&e, tags, ntags);
    if (experiment_id)
        enc_uint(&e, *experiment_id);
    return enc_end(&e);
}

int proto_encode_metric(struct proto_buf *b, uint64_t seq, const char *run_id,
                        const struct proto_point *p)
{
    struct enc e;
    enc_begin(&e, b, PROTO_METRIC, seq);
    enc_array(&e, 5);
    enc_str(&e, run_str(run_id));
    enc_str(&e, p->key);
    enc_double(&e, p->value);
    enc_int(&e, p->timestamp);
    enc_int(&e, p->step);
    return enc_end(&e);
}

int proto_encode_kvs(struct proto_buf *b, uint64_t seq, int kind, const char *run_id,
                     const struct proto_kv *kvs, size_t n)
{
    if (kind != PROTO_PARAMS && kind != PROTO_TAGS)
        return PROTO_EKIND;
    struct enc e;
    enc_begin(&e, b, kind, seq);
    enc_array(&e, 2);
    enc_str(&e, run_str(run_id));
    enc_kvs(&e, kvs, n);
    return enc_end(&e);
}

int proto_encode_end_run(struct proto_buf *b, uint64_t seq, const char *run_id,
                         struct proto_str status, int64_t end_time)
{
    struct enc e;
    enc_begin(&e, b, PROTO_END_RUN, seq);
    enc_array(&e, 3);
    enc_str(&e, run_str(run_id));
    enc_str(&e, status);
    enc_int(&e, end_time);
    return enc_end(&e);
}

int proto_encode_empty(struct proto_buf *b, uint64_t seq, int kind)
{
    struct enc e;
    enc_begin(&e, b, kind, seq);
    enc_array(&e, 0);
    return enc_end(&e);
}

int proto_encode_flushed(struct proto_buf *b, uint64_t seq, uint64_t flush_seq, uint64_t errors)
{
    struct enc e;
    enc_begin(&e, b, PROTO_FLUSHED, seq);
    enc_array(&e, 2);
    enc_uint(&e, flush_seq);
    enc_uint(&e, errors);
    return enc_end(&e);
}

int proto_encode_error(struct proto_buf *b, uint64_t seq, uint64_t about_seq, uint32_t code,
                       struct proto_str message)
{
    struct enc e;
    enc_begin(&e, b, PROTO_ERROR, seq);
    enc_array(&e, 3);
    enc_uint(&e, about_seq);
    enc_uint(&e, code);
    enc_str(&e, message);
    return enc_end(&e);
}

int proto_encode_stats_reply(struct proto_buf *b, uint64_t seq, const char *const *names,
                             const uint64_t *values, size_t n)
{
    struct enc e;
    enc_begin(&e, b, PROTO_STATS_REPLY, seq);
    enc_array(&e, 1);
    enc_array(&e, n * 2);
    for (size_t i = 0; i < n; i++) {
        enc_str(&e, (struct proto_str){names[i], (uint32_t)strlen(names[i])});
        enc_uint(&e, values[i]);
    }
    return enc_end(&e);
}

/*
 * Layout of an open many-points frame at frame_off:
 *   header(16) | 0x92 | run_id str (2 + 32) | 0xdd count(4) | points...
 * The points array always uses the 32-bit header so it can be patched in place.
 */
#define METRICS_COUNT_OFF (PROTO_HEADER_LEN + 1 + 2 + PROTO_RUN_ID_LEN + 1)

int proto_metrics_begin(struct proto_buf *b, uint64_t seq, const char *run_id, size_t *frame_off)
{
    struct enc e;
    enc_begin(&e, b, PROTO_METRICS, seq);
    enc_array(&e, 2);
    enc_str(&e, run_str(run_id));
    if (e.rc == 0) {
        static const uint8_t empty32[5] = {0xdd, 0, 0, 0, 0};
        e.rc = buf_write_cb(b, (const char *)empty32, sizeof empty32) ? PROTO_ENOMEM : 0;
    }
    size_t off = e.start;
    int rc = enc_end(&e);
    if (rc == 0)
        *frame_off = off;
    return rc;
}

uint32_t proto_metrics_count(const struct proto_buf *b, size_t frame_off)
{
    return get_be32(b->data + frame_off + METRICS_COUNT_OFF) / 4;
}

/* Writes v big-endian in n bytes at p; returns p + n. */
static uint8_t *put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
    return p + n;
}

/* msgpack's smallest form of a signed integer, as msgpack_pack_int64 writes it. */
static uint8_t *put_int(uint8_t *p, int64_t v)
{
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 0x80)
            return *p = (uint8_t)u, p + 1;
        if (u <= UINT8_MAX)
            return *p = 0xcc, put_be(p + 1, u, 1);
        if (u <= UINT16_MAX)
            return *p = 0xcd, put_be(p + 1, u, 2);
        if (u <= UINT32_MAX)
            return *p = 0xce, put_be(p + 1, u, 4);
        return *p = 0xcf, put_be(p + 1, u, 8);
    }
    if (v >= -32)
        return *p = (uint8_t)v, p + 1;
    if (v >= INT8_MIN)
        return *p = 0xd0, put_be(p + 1, (uint64_t)v, 1);
    if (v >= INT16_MIN)
        return *p = 0xd1, put_be(p + 1, (uint64_t)v, 2);
    if (v >= INT32_MIN)
        return *p = 0xd2, put_be(p + 1, (uint64_t)v, 4);
    return *p = 0xd3, put_be(p + 1, (uint64_t)v, 8);
}

static size_t int_size(int64_t v)
{
    if (v >= -32 && v < 0x80)
        return 1;
    if (v >= 0)
        return v <= UINT8_MAX ? 2 : v <= UINT16_MAX ? 3 : v <= UINT32_MAX ? 5 : 9;
    return v >= INT8_MIN ? 2 : v >= INT16_MIN ? 3 : v >= INT32_MIN ? 5 : 9;
}

/*
 * The hot path of every logged point: one reservation, then the bytes written
 * in place, exactly as msgpack-c would pack them (the test vectors hold both
 * to the same bytes).
 */
int proto_metrics_add(struct proto_buf *b, size_t frame_off, const struct proto_point *p)
{
    uint32_t klen = p->key.len;
    size_t hdr = klen < 32 ? 1 : klen <= UINT8_MAX ? 2 : klen <= UINT16_MAX ? 3 : 5;
    if (proto_buf_reserve(b, hdr + klen + 9 + int_size(p->timestamp) + int_size(p->step)) != 0)
        return PROTO_ENOMEM;
    uint8_t *w = b->data + b->len;
    if (klen < 32)
        *w++ = (uint8_t)(0xa0 | klen);
    else if (klen <= UINT8_MAX)
        *w++ = 0xd9, w = put_be(w, klen, 1);
    else if (klen <= UINT16_MAX)
        *w++ = 0xda, w = put_be(w, klen, 2);
    else
        *w++ = 0xdb, w = put_be(w, klen, 4);
    if (klen)
        memcpy(w, p->key.ptr, klen);
    w += klen;
    uint64_t bits;
    memcpy(&bits, &p->value, sizeof bits);
    *w++ = 0xcb;
    w = put_be(w, bits, 8);
    w = put_int(w, p->timestamp);
    w = put_int(w, p->step);
    size_t len = (size_t)(w - b->data);
    size_t body = len - frame_off - PROTO_HEADER_LEN;
    if (body > PROTO_MAX_BODY_HARD)
        return PROTO_ETOOBIG;
    b->len = len;
    uint8_t *cnt = b->data + frame_off + METRICS_COUNT_OFF;
    put_be32(cnt, get_be32(cnt) + 4);
    put_be32(b->data + frame_off + 4, (uint32_t)body);
    return 0;
}

/* ---- decoding ---------------------------------------------------------- */

struct cur {
    const uint8_t *p;
    const uint8_t *end;
};

static size_t cur_left(const struct cur *c)
{
    return (size_t)(c->end - c->p);
}

static int need(const struct cur *c, size_t n)
{
    return cur_left(c) >= n ? 0 : PROTO_EMSGPACK;
}

static uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* Reads a container header; the count is checked against the bytes left. */
static int rd_array(struct cur *c, uint32_t *n)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    uint8_t t = *c->p;
    if ((t & 0xf0) == 0x90) {
        *n = t & 0x0f;
        c->p += 1;
    } else if (t == 0xdc) {
        if (need(c, 3))
            return PROTO_EMSGPACK;
        *n = get_be16(c->p + 1);
        c->p += 3;
    } else if (t == 0xdd) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        *n = get_be32(c->p + 1);
        c->p += 5;
    } else {
        return PROTO_ESHAPE;
    }
    return *n <= cur_left(c) ? 0 : PROTO_EMSGPACK;
}

static int rd_str(struct cur *c, struct proto_str *s)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    uint8_t t = *c->p;
    uint32_t n, hl;
    if ((t & 0xe0) == 0xa0) {
        n = t & 0x1f;
        hl = 1;
    } else if (t == 0xd9) {
        if (need(c, 2))
            return PROTO_EMSGPACK;
        n = c->p[1];
        hl = 2;
    } else if (t == 0xda) {
        if (need(c, 3))
            return PROTO_EMSGPACK;
        n = get_be16(c->p + 1);
        hl = 3;
    } else if (t == 0xdb) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        n = get_be32(c->p + 1);
        hl = 5;
    } else {
        return PROTO_ESHAPE;
    }
    if (need(c, (size_t)hl + n))
        return PROTO_EMSGPACK;
    s->ptr = (const char *)c->p + hl;
    s->len = n;
    c->p += hl + n;
    return 0;
}

static bool is_nil(const struct cur *c)
{
    return cur_left(c) >= 1 && *c->p == 0xc0;
}

/* Any msgpack integer as int64; uint64 above INT64_MAX is a shape error. */
static int rd_int(struct cur *c, int64_t *v)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    uint8_t t = *c->p;
    if (t <= 0x7f) {
        *v = t;
        c->p += 1;
        return 0;
    }
    if (t >= 0xe0) {
        *v = (int8_t)t;
        c->p += 1;
        return 0;
    }
    static const uint8_t width[] = {1, 2, 4, 8};
    bool is_signed;
    size_t w;
    if (t >= 0xcc && t <= 0xcf) {
        is_signed = false;
        w = width[t - 0xcc];
    } else if (t >= 0xd0 && t <= 0xd3) {
        is_signed = true;
        w = width[t - 0xd0];
    } else {
        return PROTO_ESHAPE;
    }
    if (need(c, 1 + w))
        return PROTO_EMSGPACK;
    const uint8_t *q = c->p + 1;
    uint64_t u = 0;
    for (size_t i = 0; i < w; i++)
        u = u << 8 | q[i];
    if (is_signed) {
        /* Sign-extend from the field width. */
        unsigned shift = (unsigned)(64 - 8 * w);
        *v = (int64_t)(u << shift) >> shift;
    } else {
        if (u > INT64_MAX)
            return PROTO_ESHAPE;
        *v = (int64_t)u;
    }
    c->p += 1 + w;
    return 0;
}

static int rd_uint(struct cur *c, uint64_t *v)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    if (*c->p == 0xcf) {
        if (need(c, 9))
            return PROTO_EMSGPACK;
        *v = get_be64(c->p + 1);
        c->p += 9;
        return 0;
    }
    int64_t s;
    int rc = rd_int(c, &s);
    if (rc != 0)
        return rc;
    if (s < 0)
        return PROTO_ESHAPE;
    *v = (uint64_t)s;
    return 0;
}

static int rd_u32(struct cur *c, uint32_t *v)
{
    uint64_t u;
    int rc = rd_uint(c, &u);
    if (rc != 0)
        return rc;
    if (u > UINT32_MAX)
        return PROTO_ESHAPE;
    *v = (uint32_t)u;
    return 0;
}

/* A metric value: float32, float64 or any integer. */
static int rd_double(struct cur *c, double *v)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    uint8_t t = *c->p;
    if (t == 0xcb) {
        if (need(c, 9))
            return PROTO_EMSGPACK;
        uint64_t u = get_be64(c->p + 1);
        memcpy(v, &u, sizeof *v);
        c->p += 9;
        return 0;
    }
    if (t == 0xca) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        uint32_t u = get_be32(c->p + 1);
        float f;
        memcpy(&f, &u, sizeof f);
        *v = f;
        c->p += 5;
        return 0;
    }
    if (t == 0xcf) {
        uint64_t u;
        int rc = rd_uint(c, &u);
        *v = (double)u;
        return rc;
    }
    int64_t i;
    int rc = rd_int(c, &i);
    if (rc == 0)
        *v = (double)i;
    return rc;
}

/* Skips one object of any type (trailing fields from newer clients). */
static int rd_skip(struct cur *c, int depth)
{
    if (depth > PROTO_MAX_DEPTH)
        return PROTO_EDEPTH;
    if (need(c, 1))
        return PROTO_EMSGPACK;
    uint8_t t = *c->p;
    size_t skip = 0;
    uint64_t items = 0;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
        skip = 1;
    } else if ((t & 0xe0) == 0xa0 || t == 0xd9 || t == 0xda || t == 0xdb) {
        struct proto_str s;
        return rd_str(c, &s);
    } else if ((t & 0xf0) == 0x90 || t == 0xdc || t == 0xdd) {
        uint32_t n;
        int rc = rd_array(c, &n);
        if (rc != 0)
            return rc;
        items = n;
    } else if ((t & 0xf0) == 0x80 || t == 0xde || t == 0xdf) {
        uint32_t n;
        size_t hl = (t & 0xf0) == 0x80 ? 1 : t == 0xde ? 3 : 5;
        if (need(c, hl))
            return PROTO_EMSGPACK;
        n = hl == 1 ? (t & 0x0f) : hl == 3 ? get_be16(c->p + 1) : get_be32(c->p + 1);
        c->p += hl;
        if ((uint64_t)n * 2 > cur_left(c))
            return PROTO_EMSGPACK;
        items = (uint64_t)n * 2;
    } else {
        switch (t) {
        case 0xcc:
        case 0xd0: skip = 2; break;
        case 0xcd:
        case 0xd1: skip = 3; break;
        case 0xce:
        case 0xd2:
        case 0xca: skip = 5; break;
        case 0xcf:
        case 0xd3:
        case 0xcb: skip = 9; break;
        case 0xd4: skip = 3; break; /* fixext 1..16: type byte + data */
        case 0xd5: skip = 4; break;
        case 0xd6: skip = 6; break;
        case 0xd7: skip = 10; break;
        case 0xd8: skip = 18; break;
        case 0xc4:
        case 0xc5:
        case 0xc6:
        case 0xc7:
        case 0xc8:
        case 0xc9: {
            static const uint8_t lw[] = {1, 2, 4, 1, 2, 4};
            size_t w = lw[t - 0xc4];
            bool ext = t >= 0xc7;
            if (need(c, 1 + w))
                return PROTO_EMSGPACK;
            uint32_t n = w == 1 ? c->p[1] : w == 2 ? get_be16(c->p + 1) : get_be32(c->p + 1);
            skip = 1 + w + (ext ? 1 : 0) + (size_t)n;
            break;
        }
        default: return PROTO_EMSGPACK; /* 0xc1 is never used */
        }
    }
    if (skip) {
        if (need(c, skip))
            return PROTO_EMSGPACK;
        c->p += skip;
        return 0;
    }
    for (uint64_t i = 0; i < items; i++) {
        int rc = rd_skip(c, depth + 1);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Opens the body's top-level array and requires at least min fields. */
static int rd_top(struct cur *c, uint32_t min, uint32_t *n)
{
    int rc = rd_array(c, n);
    if (rc != 0)
        return rc;
    return *n >= min ? 0 : PROTO_ESHAPE;
}

/* Skips fields a newer peer appended, then requires the body to end. */
static int rd_finish(struct cur *c, uint32_t n, uint32_t used)
{
    for (uint32_t i = used; i < n; i++) {
        int rc = rd_skip(c, 1);
        if (rc != 0)
            return rc;
    }
    return cur_left(c) == 0 ? 0 : PROTO_ETRAILING;
}

static int rd_bool(struct cur *c, bool *v)
{
    if (need(c, 1))
        return PROTO_EMSGPACK;
    if (*c->p != 0xc2 && *c->p != 0xc3)
        return PROTO_ESHAPE;
    *v = *c->p == 0xc3;
    c->p++;
    return 0;
}

/* A string or nil. */
static int rd_opt_str(struct cur *c, struct proto_str *s, bool *present)
{
    if (is_nil(c)) {
        c->p++;
        *present = false;
        return 0;
    }
    *present = true;
    return rd_str(c, s);
}

static int rd_run_id(struct cur *c, struct proto_str *s)
{
    return rd_str(c, s);
}

/* A flat list of n_per-tuples; validated here, iterated later. */
static int rd_kv_list(struct cur *c, struct proto_iter *it)
{
    uint32_t n;
    int rc = rd_array(c, &n);
    if (rc != 0)
        return rc;
    if (n % 2 != 0)
        return PROTO_ESHAPE;
    it->pos = c->p;
    it->left = n / 2;
    for (uint32_t i = 0; i < n; i++) {
        struct proto_str s;
        if ((rc = rd_str(c, &s)) != 0)
            return rc;
    }
    it->end = c->p;
    return 0;
}

static int rd_point(struct cur *c, struct proto_point *p)
{
    int rc = rd_str(c, &p->key);
    if (rc == 0)
        rc = rd_double(c, &p->value);
    if (rc == 0)
        rc = rd_int(c, &p->timestamp);
    if (rc == 0)
        rc = rd_int(c, &p->step);
    return rc;
}

static int rd_points(struct cur *c, struct proto_iter *it)
{
    uint32_t n;
    int rc = rd_array(c, &n);
    if (rc != 0)
        return rc;
    if (n % 4 != 0)
        return PROTO_ESHAPE;
    it->pos = c->p;
    it->left = n / 4;
    struct proto_point p;
    for (uint32_t i = 0; i < n / 4; i++)
        if ((rc = rd_point(c, &p)) != 0)
            return rc;
    it->end = c->p;
    return 0;
}

static int rd_stat_list(struct cur *c, struct proto_iter *it)
{
    uint32_t n;
    int rc = rd_array(c, &n);
    if (rc != 0)
        return rc;
    if (n % 2 != 0)
        return PROTO_ESHAPE;
    it->pos = c->p;
    it->left = n / 2;
    for (uint32_t i = 0; i < n / 2; i++) {
        struct proto_str s;
        uint64_t v;
        if ((rc = rd_str(c, &s)) != 0 || (rc = rd_uint(c, &v)) != 0)
            return rc;
    }
    it->end = c->p;
    return 0;
}

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        if ((rc = (expr)) != 0)                                                                    \
            return rc;                                                                             \
    } while (0)

int proto_msg_decode(const struct proto_header *h, const uint8_t *body, struct proto_msg *out)
{
    struct cur c = {body, body + h->body_len};
    uint32_t n;
    int rc;

    memset(out, 0, sizeof *out);
    out->kind = h->kind;
    out->seq = h->seq;
    switch (h->kind) {
    case PROTO_HELLO:
        TRY(rd_top(&c, 6, &n));
        TRY(rd_u32(&c, &out->u.hello.version));
        TRY(rd_u32(&c, &out->u.hello.pid));
        TRY(rd_str(&c, &out->u.hello.program));
        TRY(rd_str(&c, &out->u.hello.source_name));
        TRY(rd_str(&c, &out->u.hello.source_type));
        TRY(rd_str(&c, &out->u.hello.client));
        out->u.hello.context_tags = true;
        if (n < 7)
            return rd_finish(&c, n, 6);
        TRY(rd_bool(&c, &out->u.hello.context_tags));
        if (n < 8)
            return rd_finish(&c, n, 7);
        TRY(rd_uint(&c, &out->u.hello.session));
        return rd_finish(&c, n, 8);
    case PROTO_ACK:
        TRY(rd_top(&c, 1, &n));
        TRY(rd_uint(&c, &out->u.ack.acked_seq));
        return rd_finish(&c, n, 1);
    case PROTO_WELCOME:
        TRY(rd_top(&c, 4, &n));
        TRY(rd_u32(&c, &out->u.welcome.version));
        TRY(rd_str(&c, &out->u.welcome.agent_version));
        TRY(rd_u32(&c, &out->u.welcome.max_frame));
        TRY(rd_uint(&c, &out->u.welcome.session));
        if (n < 5)
            return rd_finish(&c, n, 4);
        TRY(rd_str(&c, &out->u.welcome.backend_uri));
        return rd_finish(&c, n, 5);
    case PROTO_EXPERIMENT:
        TRY(rd_top(&c, 1, &n));
        TRY(rd_str(&c, &out->u.experiment.name));
        if (n < 2)
            return rd_finish(&c, n, 1);
        TRY(rd_opt_str(&c, &out->u.experiment.artifact_location,
                       &out->u.experiment.has_artifact_location));
        return rd_finish(&c, n, 2);
    case PROTO_DELETE_TAG:
        TRY(rd_top(&c, 2, &n));
        TRY(rd_run_id(&c, &out->u.delete_tag.run_id));
        TRY(rd_str(&c, &out->u.delete_tag.key));
        return rd_finish(&c, n, 2);
    case PROTO_ARTIFACT:
        TRY(rd_top(&c, 3, &n));
        TRY(rd_run_id(&c, &out->u.artifact.run_id));
        TRY(rd_str(&c, &out->u.artifact.path));
        TRY(rd_uint(&c, &out->u.artifact.seen.size));
        if (n < 4)
            return rd_finish(&c, n, 3);
        TRY(rd_uint(&c, &out->u.artifact.seen.mtime_ns));
        return rd_finish(&c, n, 4);
    case PROTO_UPDATE_RUN:
        TRY(rd_top(&c, 4, &n));
        TRY(rd_run_id(&c, &out->u.update_run.run_id));
        TRY(rd_opt_str(&c, &out->u.update_run.status, &out->u.update_run.has_status));
        if (is_nil(&c)) {
            c.p++;
        } else {
            TRY(rd_int(&c, &out->u.update_run.end_time));
            out->u.update_run.has_end_time = true;
        }
        TRY(rd_opt_str(&c, &out->u.update_run.run_name, &out->u.update_run.has_run_name));
        return rd_finish(&c, n, 4);
    case PROTO_START_RUN:
        TRY(rd_top(&c, 5, &n));
        TRY(rd_run_id(&c, &out->u.start_run.run_id));
        TRY(rd_str(&c, &out->u.start_run.experiment));
        TRY(rd_opt_str(&c, &out->u.start_run.run_name, &out->u.start_run.has_run_name));
        TRY(rd_int(&c, &out->u.start_run.start_time));
        TRY(rd_kv_list(&c, &out->u.start_run.tags));
        if (n < 6)
            return rd_finish(&c, n, 5);
        TRY(rd_uint(&c, &out->u.start_run.experiment_id));
        out->u.start_run.has_experiment_id = true;
        return rd_finish(&c, n, 6);
    case PROTO_METRIC:
        TRY(rd_top(&c, 5, &n));
        TRY(rd_run_id(&c, &out->u.metric.run_id));
        TRY(rd_point(&c, &out->u.metric.point));
        return rd_finish(&c, n, 5);
    case PROTO_METRICS:
        TRY(rd_top(&c, 2, &n));
        TRY(rd_run_id(&c, &out->u.metrics.run_id));
        TRY(rd_points(&c, &out->u.metrics.points));
        return rd_finish(&c, n, 2);
    case PROTO_PARAMS:
    case PROTO_TAGS:
        TRY(rd_top(&c, 2, &n));
        TRY(rd_run_id(&c, &out->u.kvs.run_id));
        TRY(rd_kv_list(&c, &out->u.kvs.kvs));
        return rd_finish(&c, n, 2);
    case PROTO_END_RUN:
        TRY(rd_top(&c, 3, &n));
        TRY(rd_run_id(&c, &out->u.end_run.run_id));
        TRY(rd_str(&c, &out->u.end_run.status));
        TRY(rd_int(&c, &out->u.end_run.end_time));
        return rd_finish(&c, n, 3);
    case PROTO_FLUSH:
    case PROTO_STATS: TRY(rd_top(&c, 0, &n)); return rd_finish(&c, n, 0);
    case PROTO_FLUSHED:
        TRY(rd_top(&c, 2, &n));
        TRY(rd_uint(&c, &out->u.flushed.flush_seq));
        TRY(rd_uint(&c, &out->u.flushed.errors));
        return rd_finish(&c, n, 2);
    case PROTO_ERROR:
        TRY(rd_top(&c, 3, &n));
        TRY(rd_uint(&c, &out->u.error.about_seq));
        TRY(rd_u32(&c, &out->u.error.code));
        TRY(rd_str(&c, &out->u.error.message));
        return rd_finish(&c, n, 3);
    case PROTO_STATS_REPLY:
        TRY(rd_top(&c, 1, &n));
        TRY(rd_stat_list(&c, &out->u.stats.pairs));
        return rd_finish(&c, n, 1);
    default: return PROTO_EKIND;
    }
}

/* Iteration re-reads bytes proto_msg_decode already validated. */
bool proto_iter_next_kv(struct proto_iter *it, struct proto_kv *kv)
{
    if (it->left == 0)
        return false;
    struct cur c = {it->pos, it->end};
    if (rd_str(&c, &kv->key) != 0 || rd_str(&c, &kv->value) != 0)
        return false;
    it->pos = c.p;
    it->left--;
    return true;
}

bool proto_iter_next_point(struct proto_iter *it, struct proto_point *p)
{
    if (it->left == 0)
        return false;
    struct cur c = {it->pos, it->end};
    if (rd_point(&c, p) != 0)
        return false;
    it->pos = c.p;
    it->left--;
    return true;
}

bool proto_iter_next_stat(struct proto_iter *it, struct proto_str *name, uint64_t *value)
{
    if (it->left == 0)
        return false;
    struct cur c = {it->pos, it->end};
    if (rd_str(&c, name) != 0 || rd_uint(&c, value) != 0)
        return false;
    it->pos = c.p;
    it->left--;
    return true;
}

/* ---- reader ------------------------------------------------------------ */

void proto_reader_init(struct proto_reader *r, uint32_t max_body)
{
    memset(r, 0, sizeof *r);
    r->max_body = max_body < PROTO_MAX_BODY_HARD ? max_body : PROTO_MAX_BODY_HARD;
}

void proto_reader_free(struct proto_reader *r)
{
    free(r->data);
    r->data = NULL;
    r->start = r->len = r->cap = 0;
}

int proto_reader_space(struct proto_reader *r, size_t min, uint8_t **p, size_t *n)
{
    /* Slide unconsumed bytes to the front before growing. */
    if (r->start > 0 && r->cap - r->len < min) {
        memmove(r->data, r->data + r->start, r->len - r->start);
        r->len -= r->start;
        r->start = 0;
    }
    if (r->cap - r->len < min) {
        size_t limit = (size_t)PROTO_HEADER_LEN + r->max_body + min;
        size_t cap = r->cap ? r->cap : min;
        while (cap - r->len < min)
            cap *= 2;
        if (cap > limit)
            cap = limit;
        if (cap - r->len < min)
            return PROTO_ENOMEM;
        uint8_t *d = realloc(r->data, cap);
        if (d == NULL)
            return PROTO_ENOMEM;
        r->data = d;
        r->cap = cap;
    }
    *p = r->data + r->len;
    *n = r->cap - r->len;
    return 0;
}

void proto_reader_commit(struct proto_reader *r, size_t n)
{
    r->len += n;
}

int proto_reader_next(struct proto_reader *r, struct proto_header *h, const uint8_t **body)
{
    size_t avail = r->len - r->start;
    if (avail < PROTO_HEADER_LEN)
        return 0;
    int rc = proto_header_decode(r->data + r->start, r->max_body, h);
    if (rc != 0)
        return rc;
    if (avail < PROTO_HEADER_LEN + (size_t)h->body_len)
        return 0;
    *body = r->data + r->start + PROTO_HEADER_LEN;
    r->start += PROTO_HEADER_LEN + (size_t)h->body_len;
    if (r->start == r->len)
        r->start = r->len = 0;
    return 1;
}

size_t proto_reader_pending(const struct proto_reader *r)
{
    return r->len - r->start;
}
