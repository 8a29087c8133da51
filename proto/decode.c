/*
 * The decoder and the frame reader. The decoder is a cursor over the body bytes rather than
 * msgpack-c's unpacker: every count a header claims is checked against the bytes that remain
 * before anything trusts it, and nothing is allocated, so a hostile frame costs at most one
 * pass over bytes the agent already holds.
 */
#include "trackd_proto.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

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
        *n = util_get_be16(c->p + 1);
        c->p += 3;
    } else if (t == 0xdd) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        *n = util_get_be32(c->p + 1);
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
        n = util_get_be16(c->p + 1);
        hl = 3;
    } else if (t == 0xdb) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        n = util_get_be32(c->p + 1);
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
        *v = util_get_be64(c->p + 1);
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
        uint64_t u = util_get_be64(c->p + 1);
        memcpy(v, &u, sizeof *v);
        c->p += 9;
        return 0;
    }
    if (t == 0xca) {
        if (need(c, 5))
            return PROTO_EMSGPACK;
        uint32_t u = util_get_be32(c->p + 1);
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
        n = hl == 1 ? (t & 0x0f) : hl == 3 ? util_get_be16(c->p + 1) : util_get_be32(c->p + 1);
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
            uint32_t n = w == 1   ? c->p[1]
                         : w == 2 ? util_get_be16(c->p + 1)
                                  : util_get_be32(c->p + 1);
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
