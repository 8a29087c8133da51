/*
 * Frame header, error and kind names, proto_buf and the msgpack encoders (msgpack-c's packer
 * writing into proto_buf). The decoder and the frame reader are in decode.c.
 */
#include "trackd_proto.h"

#include <errno.h>
#include <limits.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Negative errno values stop above this; PROTO_E* codes start below it. */
#define PROTO_ERRNO_MIN (-1000)
_Static_assert(PROTO_EBADMAGIC < PROTO_ERRNO_MIN && PROTO_ETRAILING < PROTO_ERRNO_MIN,
               "PROTO_E* codes must not collide with negative errno values");

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
    default: return code < 0 && code > PROTO_ERRNO_MIN ? strerror(-code) : "unknown error";
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

void proto_header_encode(uint8_t out[PROTO_HEADER_LEN], const struct proto_header *h)
{
    out[0] = PROTO_MAGIC0;
    out[1] = PROTO_MAGIC1;
    out[2] = h->version;
    out[3] = h->kind;
    util_put_be32(out + 4, h->body_len);
    util_put_be64(out + 8, h->seq);
}

int proto_header_decode(const uint8_t in[PROTO_HEADER_LEN], uint32_t max_body,
                        struct proto_header *h)
{
    if (in[0] != PROTO_MAGIC0 || in[1] != PROTO_MAGIC1)
        return PROTO_EBADMAGIC;
    h->version = in[2];
    h->kind = in[3];
    h->body_len = util_get_be32(in + 4);
    h->seq = util_get_be64(in + 8);
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
    util_put_be32(e->b->data + e->start + 4, (uint32_t)body);
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
    return util_get_be32(b->data + frame_off + METRICS_COUNT_OFF) / 4;
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
    util_put_be32(cnt, util_get_be32(cnt) + 4);
    util_put_be32(b->data + frame_off + 4, (uint32_t)body);
    return 0;
}
