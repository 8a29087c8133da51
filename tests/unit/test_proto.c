/*
 * Unit tests for proto/: every vector in tests/vectors decodes to its fields and is
 * exactly what the encoder writes; a stream of all vectors reassembles identically
 * whatever the split; malformed bodies fail with the exact code; msgpack-c reads our
 * bodies and we read msgpack-c's; METRICS grows in place; encoders respect buffer
 * limits. Usage: test_proto path/to/tests/vectors
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trackd_proto.h"

static const char *vectors_dir = "../tests/vectors";

#define R1 "5f0c3e8a9b7d4e21a6c4b2f81d09e7c3"
#define R2 "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
#define T0 INT64_C(1700000000000)
#define S(lit) ((struct proto_str){(lit), (uint32_t)(sizeof(lit) - 1)})
#define HARD ((size_t)PROTO_MAX_BODY_HARD)

/* ---- helpers ------------------------------------------------------------ */

struct vec {
    uint8_t *data;
    size_t len;
};

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1; /* upper case is not allowed in the vector files */
}

/* Loads tests/vectors/<name>.hex: lower-case hex digits, whitespace ignored. */
static void vec_load(const char *name, struct vec *v)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.hex", vectors_dir, name);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        fail_msg("cannot open vector %s", path);
    v->data = malloc(65536);
    assert_non_null(v->data);
    v->len = 0;
    int ch, hi = -1;
    while ((ch = fgetc(f)) != EOF) {
        if (isspace(ch))
            continue;
        int x = hexval(ch);
        if (x < 0)
            fail_msg("%s: bad character 0x%02x", path, ch);
        if (hi < 0) {
            hi = x;
        } else {
            assert_true(v->len < 65536);
            v->data[v->len++] = (uint8_t)(hi << 4 | x);
            hi = -1;
        }
    }
    fclose(f);
    if (hi >= 0)
        fail_msg("%s: odd number of hex digits", path);
    assert_true(v->len >= PROTO_HEADER_LEN);
}

static void vec_free(struct vec *v)
{
    free(v->data);
    v->data = NULL;
}

static void dump_hex(const char *label, const uint8_t *p, size_t n)
{
    fprintf(stderr, "%s (%zu bytes):", label, n);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, "%s%02x", i % 32 ? "" : "\n  ", p[i]);
    fprintf(stderr, "\n");
}

static void assert_bytes(const uint8_t *got, size_t got_len, const uint8_t *want, size_t want_len)
{
    if (got_len != want_len || memcmp(got, want, want_len) != 0) {
        dump_hex("got", got, got_len);
        dump_hex("want", want, want_len);
        fail_msg("byte mismatch");
    }
}

static void assert_str(struct proto_str s, const char *want)
{
    size_t n = strlen(want);
    if (s.len != n || (n && memcmp(s.ptr, want, n) != 0))
        fail_msg("string \"%.*s\" (%u bytes) != \"%s\"", (int)s.len, s.ptr ? s.ptr : "", s.len,
                 want);
}

/* Decodes a vector: header checks plus proto_msg_decode, both must succeed. */
static void vec_decode(const struct vec *v, int kind, uint64_t seq, struct proto_msg *m)
{
    struct proto_header h;
    assert_int_equal(proto_header_decode(v->data, PROTO_MAX_BODY_HARD, &h), 0);
    assert_int_equal(h.version, 1);
    assert_int_equal(h.kind, kind);
    assert_int_equal(h.seq, seq);
    assert_int_equal(h.body_len, v->len - PROTO_HEADER_LEN);
    assert_int_equal(proto_msg_decode(&h, v->data + PROTO_HEADER_LEN, m), 0);
    assert_int_equal(m->kind, kind);
    assert_int_equal(m->seq, seq);
}

/*
 * Decodes a body held in an exact-size heap copy, so any over-read trips ASan.
 * m borrows from the copy, which lives until the next call.
 */
static int decode_raw(int kind, const void *body, size_t len, struct proto_msg *m)
{
    static uint8_t *held;
    struct proto_header h = {PROTO_VERSION, (uint8_t)kind, (uint32_t)len, 42};
    struct proto_msg tmp;
    free(held);
    held = malloc(len ? len : 1);
    assert_non_null(held);
    if (len)
        memcpy(held, body, len);
    return proto_msg_decode(&h, held, m ? m : &tmp);
}

static void next_kv(struct proto_iter *it, const char *k, const char *v)
{
    struct proto_kv kv;
    assert_true(proto_iter_next_kv(it, &kv));
    assert_str(kv.key, k);
    assert_str(kv.value, v);
}

static void next_point(struct proto_iter *it, const char *key, double value, int64_t ts,
                       int64_t step)
{
    struct proto_point p;
    assert_true(proto_iter_next_point(it, &p));
    assert_str(p.key, key);
    if (memcmp(&p.value, &value, sizeof value) != 0)
        fail_msg("point %s: value %.17g != %.17g", key, p.value, value);
    assert_int_equal(p.timestamp, ts);
    assert_int_equal(p.step, step);
}

static void next_stat(struct proto_iter *it, const char *name, uint64_t value)
{
    struct proto_str n;
    uint64_t v;
    assert_true(proto_iter_next_stat(it, &n, &v));
    assert_str(n, name);
    assert_int_equal(v, value);
}

/* ---- (a) vectors: decode and exact re-encode ---------------------------- */

static void test_vec_hello(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("hello", &v);
    vec_decode(&v, PROTO_HELLO, 1, &m);
    assert_int_equal(m.u.hello.version, 1);
    assert_int_equal(m.u.hello.pid, 4242);
    assert_str(m.u.hello.program, "train.py");
    assert_str(m.u.hello.source_name, "/home/ana/projects/mnist/train.py");
    assert_str(m.u.hello.source_type, "LOCAL");
    assert_str(m.u.hello.client, "libtrackd 0.1.0");

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_hello(&b, 1, 4242, S("train.py"),
                                        S("/home/ana/projects/mnist/train.py"), S("LOCAL"),
                                        S("libtrackd 0.1.0")),
                     0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_welcome(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("welcome", &v);
    vec_decode(&v, PROTO_WELCOME, 0, &m);
    assert_int_equal(m.u.welcome.version, 1);
    assert_str(m.u.welcome.agent_version, "0.1.0");
    assert_int_equal(m.u.welcome.max_frame, 1048576);
    assert_int_equal(m.u.welcome.session, 7);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_welcome(&b, 0, S("0.1.0"), 1048576, 7), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_experiment(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("experiment", &v);
    vec_decode(&v, PROTO_EXPERIMENT, 2, &m);
    assert_str(m.u.experiment.name, "mnist");

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_experiment(&b, 2, S("mnist")), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_start_run(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("start_run", &v);
    vec_decode(&v, PROTO_START_RUN, 3, &m);
    assert_str(m.u.start_run.run_id, R1);
    assert_str(m.u.start_run.experiment, "mnist");
    assert_true(m.u.start_run.has_run_name);
    assert_str(m.u.start_run.run_name, "baseline");
    assert_int_equal(m.u.start_run.start_time, T0);
    assert_int_equal(m.u.start_run.tags.left, 2);
    struct proto_iter it = m.u.start_run.tags;
    next_kv(&it, "mlflow.user", "ana");
    next_kv(&it, "team", "vision");
    struct proto_kv kv;
    assert_false(proto_iter_next_kv(&it, &kv));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    struct proto_kv tags[] = {{S("mlflow.user"), S("ana")}, {S("team"), S("vision")}};
    struct proto_str name = S("baseline");
    assert_int_equal(proto_encode_start_run(&b, 3, R1, S("mnist"), &name, T0, tags, 2, NULL), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_start_run_nil_name(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("start_run_nil_name", &v);
    vec_decode(&v, PROTO_START_RUN, 4, &m);
    assert_str(m.u.start_run.run_id, R2);
    assert_str(m.u.start_run.experiment, "Default");
    assert_false(m.u.start_run.has_run_name);
    assert_int_equal(m.u.start_run.run_name.len, 0);
    assert_int_equal(m.u.start_run.start_time, T0 + 1);
    assert_int_equal(m.u.start_run.tags.left, 0);
    struct proto_kv kv;
    assert_false(proto_iter_next_kv(&m.u.start_run.tags, &kv));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_start_run(&b, 4, R2, S("Default"), NULL, T0 + 1, NULL, 0, NULL),
                     0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

/* An experiment id after the tags (a later field, as the protocol adds fields). */
static void test_vec_start_run_exp_id(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("start_run_exp_id", &v);
    vec_decode(&v, PROTO_START_RUN, 5, &m);
    assert_str(m.u.start_run.run_id, R2);
    assert_str(m.u.start_run.experiment, "Default");
    assert_true(m.u.start_run.has_experiment_id);
    assert_int_equal(m.u.start_run.experiment_id, 7);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    uint64_t id = 7;
    assert_int_equal(proto_encode_start_run(&b, 5, R2, S("Default"), NULL, T0 + 1, NULL, 0, &id),
                     0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);

    /* Without it, the field is absent. */
    vec_load("start_run_nil_name", &v);
    vec_decode(&v, PROTO_START_RUN, 4, &m);
    assert_false(m.u.start_run.has_experiment_id);
    vec_free(&v);
}

static void test_vec_metric(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("metric", &v);
    vec_decode(&v, PROTO_METRIC, 5, &m);
    assert_str(m.u.metric.run_id, R1);
    assert_str(m.u.metric.point.key, "loss");
    assert_true(m.u.metric.point.value == 0.5);
    assert_int_equal(m.u.metric.point.timestamp, T0 + 123);
    assert_int_equal(m.u.metric.point.step, 1);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    struct proto_point p = {S("loss"), 0.5, T0 + 123, 1};
    assert_int_equal(proto_encode_metric(&b, 5, R1, &p), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_metrics(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("metrics", &v);
    vec_decode(&v, PROTO_METRICS, 6, &m);
    assert_str(m.u.metrics.run_id, R1);
    assert_int_equal(m.u.metrics.points.left, 3);
    struct proto_iter it = m.u.metrics.points;
    next_point(&it, "loss", 0.25, T0 + 200, 0);
    next_point(&it, "acc", 0.875, T0 + 201, 1);
    next_point(&it, "grad/norm", -1.5, T0 + 202, 300);
    struct proto_point p;
    assert_false(proto_iter_next_point(&it, &p));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    size_t off = 99;
    assert_int_equal(proto_metrics_begin(&b, 6, R1, &off), 0);
    assert_int_equal(off, 0);
    assert_int_equal(proto_metrics_count(&b, off), 0);
    struct proto_point pts[] = {{S("loss"), 0.25, T0 + 200, 0},
                                {S("acc"), 0.875, T0 + 201, 1},
                                {S("grad/norm"), -1.5, T0 + 202, 300}};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(proto_metrics_add(&b, off, &pts[i]), 0);
        assert_int_equal(proto_metrics_count(&b, off), i + 1);
    }
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

/* Integer, float32 and float64 values and a short points header: decoders take all. */
static void test_vec_metrics_mixed(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("metrics_mixed", &v);
    vec_decode(&v, PROTO_METRICS, 7, &m);
    assert_str(m.u.metrics.run_id, R1);
    assert_int_equal(m.u.metrics.points.left, 3);
    struct proto_iter it = m.u.metrics.points;
    next_point(&it, "acc", 1.0, T0 + 300, 2);
    next_point(&it, "lr", 0.5, T0 + 301, 2);
    next_point(&it, "loss", -1.5, T0 + 302, -2);
    struct proto_point p;
    assert_false(proto_iter_next_point(&it, &p));
    /* The points header is a fixarray here, and the values are not all float64. */
    assert_int_equal(v.data[PROTO_HEADER_LEN + 1 + 2 + 32], 0x9c);
    vec_free(&v);
}

static void kvs_vector(const char *name, int kind, uint64_t seq, const struct proto_kv *kvs,
                       size_t n)
{
    struct vec v;
    struct proto_msg m;
    vec_load(name, &v);
    vec_decode(&v, kind, seq, &m);
    assert_str(m.u.kvs.run_id, R1);
    assert_int_equal(m.u.kvs.kvs.left, n);
    struct proto_iter it = m.u.kvs.kvs;
    for (size_t i = 0; i < n; i++) {
        char k[64], val[64];
        snprintf(k, sizeof k, "%.*s", (int)kvs[i].key.len, kvs[i].key.ptr);
        snprintf(val, sizeof val, "%.*s", (int)kvs[i].value.len, kvs[i].value.ptr);
        next_kv(&it, k, val);
    }
    struct proto_kv kv;
    assert_false(proto_iter_next_kv(&it, &kv));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_kvs(&b, seq, kind, R1, kvs, n), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_params(void **state)
{
    (void)state;
    struct proto_kv kvs[] = {{S("lr"), S("0.001")}, {S("batch_size"), S("64")}};
    kvs_vector("params", PROTO_PARAMS, 8, kvs, 2);
}

static void test_vec_tags(void **state)
{
    (void)state;
    struct proto_kv kvs[] = {{S("mlflow.runName"), S("baseline-2")},
                             {S("note"), S("h\xc3\xa9llo \xe2\x9c\x93")}};
    assert_int_equal(kvs[1].value.len, 10);
    kvs_vector("tags", PROTO_TAGS, 9, kvs, 2);
}

static void test_vec_end_run(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("end_run", &v);
    vec_decode(&v, PROTO_END_RUN, 10, &m);
    assert_str(m.u.end_run.run_id, R1);
    assert_str(m.u.end_run.status, "FINISHED");
    assert_int_equal(m.u.end_run.end_time, INT64_C(1700000360000));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_end_run(&b, 10, R1, S("FINISHED"), INT64_C(1700000360000)), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_artifact(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("artifact", &v);
    vec_decode(&v, PROTO_ARTIFACT, 12, &m);
    assert_str(m.u.artifact.run_id, R1);
    assert_str(m.u.artifact.path, "plots/loss.png");
    assert_int_equal(m.u.artifact.seen.size, 1024);
    assert_int_equal(m.u.artifact.seen.mtime_ns, 0);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    struct proto_file_seen seen = {1024, 0};
    assert_int_equal(proto_encode_artifact(&b, 12, R1, S("plots/loss.png"), &seen), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);

    /* With what the client saw of the file at the call. */
    vec_load("artifact_seen", &v);
    vec_decode(&v, PROTO_ARTIFACT, 13, &m);
    assert_str(m.u.artifact.path, "plots/loss.png");
    assert_int_equal(m.u.artifact.seen.size, 1024);
    assert_int_equal(m.u.artifact.seen.mtime_ns, UINT64_C(1700000000123456789));
    proto_buf_init(&b, 0);
    seen = (struct proto_file_seen){1024, UINT64_C(1700000000123456789)};
    assert_int_equal(proto_encode_artifact(&b, 13, R1, S("plots/loss.png"), &seen), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void empty_vector(const char *name, int kind, uint64_t seq)
{
    struct vec v;
    struct proto_msg m;
    vec_load(name, &v);
    vec_decode(&v, kind, seq, &m);
    assert_int_equal(v.len, PROTO_HEADER_LEN + 1);
    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_empty(&b, seq, kind), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_flush(void **state)
{
    (void)state;
    empty_vector("flush", PROTO_FLUSH, 11);
}

static void test_vec_stats(void **state)
{
    (void)state;
    empty_vector("stats", PROTO_STATS, UINT64_C(4294967297));
}

static void test_vec_flushed(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("flushed", &v);
    vec_decode(&v, PROTO_FLUSHED, 0, &m);
    assert_int_equal(m.u.flushed.flush_seq, 11);
    assert_int_equal(m.u.flushed.errors, 2);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_flushed(&b, 0, 11, 2), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_error(void **state)
{
    (void)state;
    static const char msg[] = "param 'lr' was already logged with value '0.001'";
    struct vec v;
    struct proto_msg m;
    vec_load("error", &v);
    vec_decode(&v, PROTO_ERROR, 0, &m);
    assert_int_equal(m.u.error.about_seq, 8);
    assert_int_equal(m.u.error.code, PROTO_ERR_PARAM_CHANGED);
    assert_str(m.u.error.message, msg);

    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_error(&b, 0, 8, PROTO_ERR_PARAM_CHANGED, S(msg)), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_vec_stats_reply(void **state)
{
    (void)state;
    struct vec v;
    struct proto_msg m;
    vec_load("stats_reply", &v);
    vec_decode(&v, PROTO_STATS_REPLY, UINT64_C(4294967297), &m);
    assert_int_equal(m.u.stats.pairs.left, 3);
    struct proto_iter it = m.u.stats.pairs;
    next_stat(&it, "frames_received", 12);
    next_stat(&it, "bytes_received", 300);
    next_stat(&it, "flushes", 70000);
    struct proto_str n;
    uint64_t x;
    assert_false(proto_iter_next_stat(&it, &n, &x));

    struct proto_buf b;
    proto_buf_init(&b, 0);
    const char *const names[] = {"frames_received", "bytes_received", "flushes"};
    const uint64_t values[] = {12, 300, 70000};
    assert_int_equal(proto_encode_stats_reply(&b, UINT64_C(4294967297), names, values, 3), 0);
    assert_bytes(b.data, b.len, v.data, v.len);
    proto_buf_free(&b);
    vec_free(&v);
}

static void test_header_bytes(void **state)
{
    (void)state;
    uint8_t out[PROTO_HEADER_LEN];
    struct proto_header h = {1, PROTO_METRICS, 0x0a0b0c0du, UINT64_C(0x0102030405060708)};
    proto_header_encode(out, &h);
    static const uint8_t want[] = {0x54, 0x4b, 0x01, 0x06, 0x0a, 0x0b, 0x0c, 0x0d,
                                   0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
    assert_bytes(out, sizeof out, want, sizeof want);
    struct proto_header d;
    assert_int_equal(proto_header_decode(out, UINT32_MAX, &d), PROTO_ETOOBIG);
    out[4] = 0;
    assert_int_equal(proto_header_decode(out, UINT32_MAX, &d), 0);
    assert_int_equal(d.body_len, 0x000b0c0d);
    assert_int_equal(d.seq, UINT64_C(0x0102030405060708));
    assert_int_equal(d.kind, PROTO_METRICS);
}

static void test_names(void **state)
{
    (void)state;
    static const char *const kinds[] = {
        "unknown",     "hello",      "welcome",    "experiment", "start_run", "metric", "metrics",
        "params",      "tags",       "end_run",    "flush",      "flushed",   "error",  "stats",
        "stats_reply", "delete_tag", "update_run", "ack",        "artifact",  "unknown"};
    for (int k = 0; k <= 19; k++)
        assert_string_equal(proto_kind_name(k), kinds[k]);
    assert_string_equal(proto_kind_name(-1), "unknown");
    assert_string_equal(proto_kind_name(255), "unknown");

    assert_string_equal(proto_strerror(0), "success");
    assert_string_equal(proto_strerror(PROTO_EBADMAGIC), "bad frame magic (not a trackd client?)");
    assert_string_equal(proto_strerror(PROTO_EVERSION), "unsupported protocol version");
    assert_string_equal(proto_strerror(PROTO_ETOOBIG), "frame body exceeds the size limit");
    assert_string_equal(proto_strerror(PROTO_EKIND), "unknown message kind");
    assert_string_equal(proto_strerror(PROTO_EMSGPACK), "malformed or truncated msgpack body");
    assert_string_equal(proto_strerror(PROTO_ESHAPE),
                        "message fields have the wrong count or type");
    assert_string_equal(proto_strerror(PROTO_EDEPTH), "msgpack nesting too deep");
    assert_string_equal(proto_strerror(PROTO_ENOMEM), "out of buffer space");
    assert_string_equal(proto_strerror(PROTO_ETRAILING), "bytes left after the message body");
    /* Negative errno values are named too: one strerror for every code the project returns. */
    assert_string_equal(proto_strerror(-ENOENT), strerror(ENOENT));
    assert_string_equal(proto_strerror(-1010), "unknown error");
    assert_string_equal(proto_strerror(7), "unknown error");
}

/* ---- (b) incremental reassembly ---------------------------------------- */

static const char *const stream_names[] = {
    "hello",       "welcome",  "experiment",    "start_run", "start_run_nil_name",
    "metric",      "metrics",  "metrics_mixed", "params",    "tags",
    "end_run",     "flush",    "flushed",       "error",     "stats",
    "stats_reply", "artifact",
};
#define N_STREAM (sizeof stream_names / sizeof stream_names[0])

struct stream {
    struct vec v[N_STREAM];
    uint8_t *all;
    size_t len;
};

static void stream_load(struct stream *s)
{
    s->len = 0;
    for (size_t i = 0; i < N_STREAM; i++) {
        vec_load(stream_names[i], &s->v[i]);
        s->len += s->v[i].len;
    }
    s->all = malloc(s->len);
    assert_non_null(s->all);
    size_t off = 0;
    for (size_t i = 0; i < N_STREAM; i++) {
        memcpy(s->all + off, s->v[i].data, s->v[i].len);
        off += s->v[i].len;
    }
}

static void stream_free(struct stream *s)
{
    for (size_t i = 0; i < N_STREAM; i++)
        vec_free(&s->v[i]);
    free(s->all);
}

/*
 * Feeds p[0..n) to r as a socket read would (into proto_reader_space, at most
 * what it offers), then checks every frame that completes against the next
 * expected vector: same header, same body bytes, and it decodes.
 */
static void feed(struct proto_reader *r, const uint8_t *p, size_t n, size_t min,
                 const struct stream *s, size_t *next)
{
    while (n > 0) {
        uint8_t *dst;
        size_t room;
        assert_int_equal(proto_reader_space(r, min, &dst, &room), 0);
        assert_true(room >= min);
        size_t k = n < room ? n : room;
        memcpy(dst, p, k);
        proto_reader_commit(r, k);
        p += k;
        n -= k;
        struct proto_header h;
        const uint8_t *body;
        int rc;
        while ((rc = proto_reader_next(r, &h, &body)) == 1) {
            assert_true(*next < N_STREAM);
            const struct vec *want = &s->v[*next];
            struct proto_header wh;
            assert_int_equal(proto_header_decode(want->data, PROTO_MAX_BODY_HARD, &wh), 0);
            assert_int_equal(h.kind, wh.kind);
            assert_int_equal(h.seq, wh.seq);
            assert_int_equal(h.body_len, wh.body_len);
            assert_bytes(body, h.body_len, want->data + PROTO_HEADER_LEN, wh.body_len);
            struct proto_msg m;
            assert_int_equal(proto_msg_decode(&h, body, &m), 0);
            (*next)++;
        }
        assert_int_equal(rc, 0);
    }
}

static void test_reassembly_two_chunks(void **state)
{
    (void)state;
    struct stream s;
    stream_load(&s);
    for (size_t cut = 0; cut <= s.len; cut++) {
        struct proto_reader r;
        proto_reader_init(&r, PROTO_MAX_BODY_HARD);
        size_t next = 0;
        feed(&r, s.all, cut, 4096, &s, &next);
        feed(&r, s.all + cut, s.len - cut, 4096, &s, &next);
        assert_int_equal(next, N_STREAM);
        assert_int_equal(proto_reader_pending(&r), 0);
        proto_reader_free(&r);
    }
    stream_free(&s);
}

static void test_reassembly_byte_by_byte(void **state)
{
    (void)state;
    struct stream s;
    stream_load(&s);
    /* A tight max_body also checks that memory stays within header + body + one read. */
    const uint32_t max_body = 128;
    struct proto_reader r;
    proto_reader_init(&r, max_body);
    size_t next = 0;
    for (size_t i = 0; i < s.len; i++) {
        feed(&r, s.all + i, 1, 1, &s, &next);
        assert_true(r.cap <= PROTO_HEADER_LEN + max_body + 1);
    }
    assert_int_equal(next, N_STREAM);
    assert_int_equal(proto_reader_pending(&r), 0);
    proto_reader_free(&r);

    /* Three-way splits at a coarser stride, reading with a small buffer. */
    for (size_t a = 0; a <= s.len; a += 7) {
        for (size_t b = a; b <= s.len; b += 13) {
            proto_reader_init(&r, PROTO_MAX_BODY_HARD);
            next = 0;
            feed(&r, s.all, a, 16, &s, &next);
            feed(&r, s.all + a, b - a, 16, &s, &next);
            feed(&r, s.all + b, s.len - b, 16, &s, &next);
            assert_int_equal(next, N_STREAM);
            assert_int_equal(proto_reader_pending(&r), 0);
            proto_reader_free(&r);
        }
    }
    stream_free(&s);
}

static void reader_put(struct proto_reader *r, const uint8_t *p, size_t n)
{
    uint8_t *dst;
    size_t room;
    assert_int_equal(proto_reader_space(r, n, &dst, &room), 0);
    memcpy(dst, p, n);
    proto_reader_commit(r, n);
}

static void test_reader_errors(void **state)
{
    (void)state;
    struct vec v;
    vec_load("hello", &v); /* body 71 bytes */
    struct proto_reader r;
    struct proto_header h;
    const uint8_t *body;

    /* A header over the limit fails as soon as the header is in, not after the body. */
    proto_reader_init(&r, 70);
    reader_put(&r, v.data, PROTO_HEADER_LEN);
    assert_int_equal(proto_reader_next(&r, &h, &body), PROTO_ETOOBIG);
    proto_reader_free(&r);

    proto_reader_init(&r, 71);
    reader_put(&r, v.data, PROTO_HEADER_LEN - 1);
    assert_int_equal(proto_reader_next(&r, &h, &body), 0);
    reader_put(&r, v.data + PROTO_HEADER_LEN - 1, v.len - PROTO_HEADER_LEN);
    assert_int_equal(proto_reader_next(&r, &h, &body), 0);
    assert_int_equal(proto_reader_pending(&r), v.len - 1);
    reader_put(&r, v.data + v.len - 1, 1);
    assert_int_equal(proto_reader_next(&r, &h, &body), 1);
    assert_int_equal(h.body_len, 71);
    assert_int_equal(proto_reader_pending(&r), 0);
    assert_int_equal(proto_reader_next(&r, &h, &body), 0);
    /* More than header + max_body + min is never allocated. */
    uint8_t *dst;
    size_t room;
    assert_int_equal(proto_reader_space(&r, 8, &dst, &room), 0);
    assert_true(r.cap <= PROTO_HEADER_LEN + 71 + 71);
    proto_reader_free(&r);

    /* Bad headers are sticky: the stream cannot be resynchronised. */
    uint8_t bad[PROTO_HEADER_LEN];
    memcpy(bad, v.data, sizeof bad);
    bad[1] = 'X';
    proto_reader_init(&r, PROTO_MAX_BODY_HARD);
    reader_put(&r, bad, sizeof bad);
    assert_int_equal(proto_reader_next(&r, &h, &body), PROTO_EBADMAGIC);
    assert_int_equal(proto_reader_next(&r, &h, &body), PROTO_EBADMAGIC);
    proto_reader_free(&r);

    /* max_body above the hard cap is clamped to it. */
    proto_reader_init(&r, UINT32_MAX);
    assert_int_equal(r.max_body, PROTO_MAX_BODY_HARD);
    proto_reader_free(&r);
    vec_free(&v);
}

/* ---- (c) malformed input ------------------------------------------------ */

static void test_header_malformed(void **state)
{
    (void)state;
    uint8_t hd[PROTO_HEADER_LEN];
    struct proto_header h = {1, PROTO_HELLO, 10, 5}, d;
    proto_header_encode(hd, &h);
    assert_int_equal(proto_header_decode(hd, 100, &d), 0);

    hd[0] = 'X';
    assert_int_equal(proto_header_decode(hd, 100, &d), PROTO_EBADMAGIC);
    hd[0] = 'K';
    hd[1] = 'T';
    assert_int_equal(proto_header_decode(hd, 100, &d), PROTO_EBADMAGIC);
    hd[0] = 'T';
    hd[1] = 'K';

    static const uint8_t versions[] = {0, 2, 255};
    for (size_t i = 0; i < sizeof versions; i++) {
        hd[2] = versions[i];
        assert_int_equal(proto_header_decode(hd, 100, &d), PROTO_EVERSION);
    }
    hd[2] = 1;

    for (int k = 0; k <= 255; k++) {
        hd[3] = (uint8_t)k;
        int want = k >= 1 && k <= PROTO_KIND_MAX ? 0 : PROTO_EKIND;
        assert_int_equal(proto_header_decode(hd, 100, &d), want);
    }
    hd[3] = PROTO_HELLO;

    h.body_len = 100;
    proto_header_encode(hd, &h);
    assert_int_equal(proto_header_decode(hd, 100, &d), 0);
    assert_int_equal(proto_header_decode(hd, 99, &d), PROTO_ETOOBIG);
    assert_int_equal(proto_header_decode(hd, 0, &d), PROTO_ETOOBIG);
    h.body_len = PROTO_MAX_BODY_HARD;
    proto_header_encode(hd, &h);
    assert_int_equal(proto_header_decode(hd, UINT32_MAX, &d), 0);
    h.body_len = PROTO_MAX_BODY_HARD + 1;
    proto_header_encode(hd, &h);
    assert_int_equal(proto_header_decode(hd, UINT32_MAX, &d), PROTO_ETOOBIG);
    h.body_len = UINT32_MAX;
    proto_header_encode(hd, &h);
    assert_int_equal(proto_header_decode(hd, UINT32_MAX, &d), PROTO_ETOOBIG);

    /* A kind the header allows but the body decoder does not know. */
    static const uint8_t body[] = {0x90};
    assert_int_equal(decode_raw(0, body, 1, NULL), PROTO_EKIND);
    assert_int_equal(decode_raw(PROTO_KIND_MAX + 1, body, 1, NULL), PROTO_EKIND);
}

static void load_kind(const char *name, struct vec *v, int *kind)
{
    vec_load(name, v);
    *kind = v->data[3];
}

static void test_truncated_bodies(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_STREAM; i++) {
        struct vec v;
        int kind;
        load_kind(stream_names[i], &v, &kind);
        size_t blen = v.len - PROTO_HEADER_LEN;
        assert_int_equal(decode_raw(kind, v.data + PROTO_HEADER_LEN, blen, NULL), 0);
        for (size_t n = 0; n < blen; n++) {
            int rc = decode_raw(kind, v.data + PROTO_HEADER_LEN, n, NULL);
            if (rc != PROTO_EMSGPACK)
                fail_msg("%s cut to %zu of %zu body bytes: %d", stream_names[i], n, blen, rc);
        }
        vec_free(&v);
    }
}

static void test_trailing_bytes(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_STREAM; i++) {
        struct vec v;
        int kind;
        load_kind(stream_names[i], &v, &kind);
        size_t blen = v.len - PROTO_HEADER_LEN;
        uint8_t *b = malloc(blen + 2);
        assert_non_null(b);
        memcpy(b, v.data + PROTO_HEADER_LEN, blen);
        b[blen] = 0xc0;
        b[blen + 1] = 0x00;
        assert_int_equal(decode_raw(kind, b, blen + 1, NULL), PROTO_ETRAILING);
        assert_int_equal(decode_raw(kind, b, blen + 2, NULL), PROTO_ETRAILING);
        free(b);
        vec_free(&v);
    }
}

#define RAW(kind, want, ...)                                                                       \
    do {                                                                                           \
        static const uint8_t raw_[] = {__VA_ARGS__};                                               \
        int rc_ = decode_raw((kind), raw_, sizeof raw_, NULL);                                     \
        if (rc_ != (want))                                                                         \
            fail_msg("line %d: rc %d (%s), want %d", __LINE__, rc_, proto_strerror(rc_), (want));  \
    } while (0)

/* The 32-byte run id as str8: d9 20 followed by R1's bytes. */
#define RUN_ID_BYTES                                                                               \
    0xd9, 0x20, '5', 'f', '0', 'c', '3', 'e', '8', 'a', '9', 'b', '7', 'd', '4', 'e', '2', '1',    \
        'a', '6', 'c', '4', 'b', '2', 'f', '8', '1', 'd', '0', '9', 'e', '7', 'c', '3'

static void test_truncated_strings(void **state)
{
    (void)state;
    RAW(PROTO_EXPERIMENT, 0, 0x91, 0xa2, 'a', 'b');
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xa5, 'a', 'b');
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xd9);
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xd9, 0x05, 'a', 'b');
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xda, 0x00);
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xda, 0x00, 0x03, 'a');
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xdb, 0x00, 0x00, 0x00);
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x91, 0xdb, 0xff, 0xff, 0xff, 0xff, 'x');
    RAW(PROTO_EXPERIMENT, 0, 0x91, 0xdb, 0x00, 0x00, 0x00, 0x01, 'x');
    /* A truncated string inside a kv list and inside a point. */
    RAW(PROTO_PARAMS, PROTO_EMSGPACK, 0x92, RUN_ID_BYTES, 0x92, 0xa1, 'k', 0xa3, 'v');
    RAW(PROTO_METRICS, PROTO_EMSGPACK, 0x92, RUN_ID_BYTES, 0x94, 0xa9, 'k', 0x01, 0x02, 0x03);
    /* A short run id is accepted by the decoder; the agent's validation refuses it. */
    RAW(PROTO_END_RUN, 0, 0x93, 0xa1, 'r', 0xa1, 'S', 0x00);
}

static void test_counts_beyond_body(void **state)
{
    (void)state;
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0xdd, 0xff, 0xff, 0xff, 0xff);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0xdd, 0x00, 0x00, 0x00, 0x01);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0xdc, 0xff, 0xff, 0x90);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0xdd, 0x00, 0x00);
    RAW(PROTO_PARAMS, PROTO_EMSGPACK, 0x92, RUN_ID_BYTES, 0xdd, 0xff, 0xff, 0xff, 0xff);
    RAW(PROTO_PARAMS, PROTO_EMSGPACK, 0x92, RUN_ID_BYTES, 0xdc, 0x00, 0x04, 0xa0, 0xa0);
    RAW(PROTO_START_RUN, PROTO_EMSGPACK, 0x95, RUN_ID_BYTES, 0xa1, 'e', 0xc0, 0x00, 0xdd, 0xff,
        0xff, 0xff, 0xfe);
    /* Two points (8 elements) claimed, one present: 8 <= 9 bytes left, then the body ends. */
    RAW(PROTO_METRICS, PROTO_EMSGPACK, 0x92, RUN_ID_BYTES, 0xdd, 0x00, 0x00, 0x00, 0x08, 0xa5, 'k',
        'k', 'k', 'k', 'k', 0x01, 0x02, 0x03);
    RAW(PROTO_STATS_REPLY, PROTO_EMSGPACK, 0x91, 0xdd, 0x7f, 0xff, 0xff, 0xfe);
    /* Trailing fields: containers and blobs whose length exceeds the body. */
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xdd, 0xff, 0xff, 0xff, 0xff);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xdf, 0xff, 0xff, 0xff, 0xff);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xde, 0x00, 0x02, 0x01, 0x02);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0x81, 0x01);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xc4, 0x05, 'a', 'b');
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xc7, 0x05, 0x01, 'a');
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xc9, 0x00, 0x00);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xd8, 0x01, 0x00, 0x00);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xcb, 0x00, 0x00);
    RAW(PROTO_FLUSH, PROTO_EMSGPACK, 0x91, 0xc1);
    RAW(PROTO_EXPERIMENT, PROTO_EMSGPACK, 0x92, 0xa1, 'x');
    /* Truncated numbers in known fields. */
    RAW(PROTO_FLUSHED, PROTO_EMSGPACK, 0x92, 0xcf, 0x00, 0x00, 0x00, 0x00, 0x01);
    RAW(PROTO_METRIC, PROTO_EMSGPACK, 0x95, RUN_ID_BYTES, 0xa1, 'k', 0xca, 0x00, 0x00);
    RAW(PROTO_METRIC, PROTO_EMSGPACK, 0x95, RUN_ID_BYTES, 0xa1, 'k', 0xcf, 0x00);
    RAW(PROTO_METRIC, PROTO_EMSGPACK, 0x95, RUN_ID_BYTES, 0xa1, 'k', 0x01, 0xd3, 0x00, 0x01);
}

/* Field types of each message, for the wrong-type sweep. */
enum ft { F_U32, F_U64, F_INT, F_STR, F_STR_NIL, F_NUM, F_KVS, F_POINTS, F_STATS };

struct schema {
    int kind;
    int nf;
    enum ft f[6];
};

static const struct schema schemas[] = {
    {PROTO_HELLO, 6, {F_U32, F_U32, F_STR, F_STR, F_STR, F_STR}},
    {PROTO_WELCOME, 4, {F_U32, F_STR, F_U32, F_U64}},
    {PROTO_EXPERIMENT, 1, {F_STR}},
    {PROTO_START_RUN, 5, {F_STR, F_STR, F_STR_NIL, F_INT, F_KVS}},
    {PROTO_METRIC, 5, {F_STR, F_STR, F_NUM, F_INT, F_INT}},
    {PROTO_METRICS, 2, {F_STR, F_POINTS}},
    {PROTO_PARAMS, 2, {F_STR, F_KVS}},
    {PROTO_TAGS, 2, {F_STR, F_KVS}},
    {PROTO_END_RUN, 3, {F_STR, F_STR, F_INT}},
    {PROTO_FLUSH, 0, {F_U32}},
    {PROTO_FLUSHED, 2, {F_U64, F_U64}},
    {PROTO_ERROR, 3, {F_U64, F_U32, F_STR}},
    {PROTO_STATS, 0, {F_U32}},
    {PROTO_STATS_REPLY, 1, {F_STATS}},
};

/* Candidate values put in a field. */
enum wv {
    W_NIL,
    W_TRUE,
    W_NEG,
    W_POS,
    W_U32_OVER,
    W_U63_OVER,
    W_F64,
    W_F32,
    W_STR,
    W_BIN,
    W_ARRAY,
    W_MAP,
    W_EXT,
    W_COUNT
};

static void pack_valid(msgpack_packer *pk, enum ft t)
{
    switch (t) {
    case F_U32: msgpack_pack_uint32(pk, 7); break;
    case F_U64: msgpack_pack_uint64(pk, UINT64_C(1) << 40); break;
    case F_INT: msgpack_pack_int64(pk, -5); break;
    case F_STR: msgpack_pack_str_with_body(pk, "abc", 3); break;
    case F_STR_NIL: msgpack_pack_str_with_body(pk, "n", 1); break;
    case F_NUM: msgpack_pack_double(pk, 1.5); break;
    case F_KVS:
        msgpack_pack_array(pk, 2);
        msgpack_pack_str_with_body(pk, "k", 1);
        msgpack_pack_str_with_body(pk, "v", 1);
        break;
    case F_POINTS:
        msgpack_pack_array(pk, 4);
        msgpack_pack_str_with_body(pk, "k", 1);
        msgpack_pack_double(pk, 1.0);
        msgpack_pack_int64(pk, 5);
        msgpack_pack_int64(pk, 6);
        break;
    case F_STATS:
        msgpack_pack_array(pk, 2);
        msgpack_pack_str_with_body(pk, "n", 1);
        msgpack_pack_uint64(pk, 1);
        break;
    }
}

static void pack_wrong(msgpack_packer *pk, enum wv w)
{
    switch (w) {
    case W_NIL: msgpack_pack_nil(pk); break;
    case W_TRUE: msgpack_pack_true(pk); break;
    case W_NEG: msgpack_pack_int64(pk, -1); break;
    case W_POS: msgpack_pack_uint64(pk, 3); break;
    case W_U32_OVER: msgpack_pack_uint64(pk, UINT64_C(1) << 32); break;
    case W_U63_OVER: msgpack_pack_uint64(pk, UINT64_C(1) << 63); break;
    case W_F64: msgpack_pack_double(pk, 2.5); break;
    case W_F32: msgpack_pack_float(pk, 2.5f); break;
    case W_STR: msgpack_pack_str_with_body(pk, "s", 1); break;
    case W_BIN:
        msgpack_pack_bin(pk, 1);
        msgpack_pack_bin_body(pk, "b", 1);
        break;
    case W_ARRAY: msgpack_pack_array(pk, 0); break;
    case W_MAP: msgpack_pack_map(pk, 0); break;
    case W_EXT:
        msgpack_pack_ext(pk, 1, 5);
        msgpack_pack_ext_body(pk, "e", 1);
        break;
    case W_COUNT: break;
    }
}

static bool accepts(enum ft t, enum wv w)
{
    switch (t) {
    case F_U32: return w == W_POS;
    case F_U64: return w == W_POS || w == W_U32_OVER || w == W_U63_OVER;
    case F_INT: return w == W_NEG || w == W_POS || w == W_U32_OVER;
    case F_STR: return w == W_STR;
    case F_STR_NIL: return w == W_STR || w == W_NIL;
    case F_NUM:
        return w == W_NEG || w == W_POS || w == W_U32_OVER || w == W_U63_OVER || w == W_F64 ||
               w == W_F32;
    case F_KVS:
    case F_POINTS:
    case F_STATS: return w == W_ARRAY; /* an empty list is a valid list */
    }
    return false;
}

static int decode_sbuf(int kind, const msgpack_sbuffer *sb, struct proto_msg *m)
{
    return decode_raw(kind, sb->data, sb->size, m);
}

static void test_wrong_types(void **state)
{
    (void)state;
    int checked = 0;
    for (size_t s = 0; s < sizeof schemas / sizeof schemas[0]; s++) {
        const struct schema *sc = &schemas[s];
        msgpack_sbuffer sb;
        msgpack_packer pk;

        /* All fields valid. */
        msgpack_sbuffer_init(&sb);
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        msgpack_pack_array(&pk, (size_t)sc->nf);
        for (int i = 0; i < sc->nf; i++)
            pack_valid(&pk, sc->f[i]);
        assert_int_equal(decode_sbuf(sc->kind, &sb, NULL), 0);
        msgpack_sbuffer_destroy(&sb);

        /* One field missing. */
        if (sc->nf > 0) {
            msgpack_sbuffer_init(&sb);
            msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
            msgpack_pack_array(&pk, (size_t)sc->nf - 1);
            for (int i = 0; i + 1 < sc->nf; i++)
                pack_valid(&pk, sc->f[i]);
            assert_int_equal(decode_sbuf(sc->kind, &sb, NULL), PROTO_ESHAPE);
            msgpack_sbuffer_destroy(&sb);
        }

        /* The body is not an array. */
        for (int w = W_NIL; w < W_COUNT; w++) {
            if (w == W_ARRAY)
                continue;
            msgpack_sbuffer_init(&sb);
            msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
            pack_wrong(&pk, (enum wv)w);
            int rc = decode_sbuf(sc->kind, &sb, NULL);
            if (rc != PROTO_ESHAPE)
                fail_msg("%s body of value kind %d: rc %d", proto_kind_name(sc->kind), w, rc);
            msgpack_sbuffer_destroy(&sb);
        }

        /* Each field in turn replaced by each candidate value. */
        for (int i = 0; i < sc->nf; i++) {
            for (int w = W_NIL; w < W_COUNT; w++) {
                msgpack_sbuffer_init(&sb);
                msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
                msgpack_pack_array(&pk, (size_t)sc->nf);
                for (int j = 0; j < sc->nf; j++) {
                    if (j == i)
                        pack_wrong(&pk, (enum wv)w);
                    else
                        pack_valid(&pk, sc->f[j]);
                }
                int want = accepts(sc->f[i], (enum wv)w) ? 0 : PROTO_ESHAPE;
                int rc = decode_sbuf(sc->kind, &sb, NULL);
                if (rc != want)
                    fail_msg("%s field %d value kind %d: rc %d, want %d", proto_kind_name(sc->kind),
                             i, w, rc, want);
                msgpack_sbuffer_destroy(&sb);
                checked++;
            }
        }
    }
    assert_int_equal(checked, 36 * W_COUNT);
}

/* Lists: elements of the wrong type, wrong parity, and points not in fours. */
static void test_wrong_list_elements(void **state)
{
    (void)state;
    /* kv lists */
    RAW(PROTO_PARAMS, 0, 0x92, RUN_ID_BYTES, 0x92, 0xa1, 'k', 0xa1, 'v');
    RAW(PROTO_PARAMS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x92, 0x01, 0xa1, 'v');
    RAW(PROTO_PARAMS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x92, 0xa1, 'k', 0x01);
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x92, 0xa1, 'k', 0xc0);
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x92, 0x91, 0xa1, 'k', 0xa1, 'v');
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x92, 0xc4, 0x01, 'k', 0xa1, 'v');
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x91, 0xa1, 'k');
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x93, 0xa1, 'k', 0xa1, 'v', 0xa1, 'k');
    RAW(PROTO_TAGS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x81, 0xa1, 'k', 0xa1, 'v');
    RAW(PROTO_START_RUN, PROTO_ESHAPE, 0x95, RUN_ID_BYTES, 0xa1, 'e', 0xc0, 0x00, 0x91, 0xa1, 'k');
    RAW(PROTO_START_RUN, PROTO_ESHAPE, 0x95, RUN_ID_BYTES, 0xa1, 'e', 0xc2, 0x00, 0x90);
    /* points */
    RAW(PROTO_METRICS, 0, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0x01, 0x02, 0x03);
    RAW(PROTO_METRICS, 0, 0x92, RUN_ID_BYTES, 0x90);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0x01, 0x01, 0x02, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0xa1, 'v', 0x02, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0xc0, 0x02, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0xc3, 0x02, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0x01, 0xcb, 0, 0, 0, 0, 0,
        0, 0, 0, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0x01, 0x02, 0xa1, 's');
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0x01, 0xcf, 0x80, 0, 0, 0,
        0, 0, 0, 0, 0x03);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x94, 0xa1, 'k', 0x01, 0x02, 0xcf, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff);
    /* counts not a multiple of 4 */
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x93, 0xa1, 'k', 0x01, 0x02);
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x95, 0xa1, 'k', 0x01, 0x02, 0x03, 0xa1,
        'k');
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0xdd, 0x00, 0x00, 0x00, 0x05, 0xa1, 'k',
        0x01, 0x02, 0x03, 0xa1, 'k');
    RAW(PROTO_METRICS, PROTO_ESHAPE, 0x92, RUN_ID_BYTES, 0x91, 0xa1, 'k');
    /* stats */
    RAW(PROTO_STATS_REPLY, 0, 0x91, 0x92, 0xa1, 'n', 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff);
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x92, 0x01, 0x01);
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x92, 0xa1, 'n', 0xff);
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x92, 0xa1, 'n', 0xa1, 'v');
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x92, 0xa1, 'n', 0xca, 0, 0, 0, 0);
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x91, 0xa1, 'n');
    RAW(PROTO_STATS_REPLY, PROTO_ESHAPE, 0x91, 0x81, 0xa1, 'n', 0x01);
    /* Range limits of typed integers. */
    RAW(PROTO_HELLO, PROTO_ESHAPE, 0x96, 0x01, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0xa0, 0xa0, 0xa0,
        0xa0);
    RAW(PROTO_HELLO, 0, 0x96, 0x01, 0xce, 0xff, 0xff, 0xff, 0xff, 0xa0, 0xa0, 0xa0, 0xa0);
    RAW(PROTO_HELLO, 0, 0x96, 0xd3, 0, 0, 0, 0, 0, 0, 0, 1, 0xd0, 0x05, 0xa0, 0xa0, 0xa0, 0xa0);
    RAW(PROTO_HELLO, PROTO_ESHAPE, 0x96, 0x01, 0xd0, 0xff, 0xa0, 0xa0, 0xa0, 0xa0);
    RAW(PROTO_END_RUN, 0, 0x93, RUN_ID_BYTES, 0xa1, 'S', 0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0);
    RAW(PROTO_END_RUN, 0, 0x93, RUN_ID_BYTES, 0xa1, 'S', 0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff);
    RAW(PROTO_END_RUN, PROTO_ESHAPE, 0x93, RUN_ID_BYTES, 0xa1, 'S', 0xcf, 0x80, 0, 0, 0, 0, 0, 0,
        0);
    /* Empty body. */
    assert_int_equal(decode_raw(PROTO_FLUSH, "", 0, NULL), PROTO_EMSGPACK);
}

/* Trailing fields of every msgpack type are skipped; nesting beyond 4 is refused. */
static void test_depth_and_skip(void **state)
{
    (void)state;
    RAW(PROTO_FLUSH, 0, 0x91, 0x91, 0x91, 0x91, 0x01);
    RAW(PROTO_FLUSH, 0, 0x91, 0x91, 0x91, 0x91, 0x90);
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x91, 0x91, 0x91, 0x91, 0x91, 0x01);
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x91, 0x91, 0x91, 0x91, 0x91, 0x90);
    RAW(PROTO_FLUSH, 0, 0x91, 0x81, 0x01, 0x91, 0x91, 0x01);
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x91, 0x81, 0x01, 0x91, 0x91, 0x91, 0x01);
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x91, 0x81, 0x91, 0x91, 0x91, 0x01, 0x01);
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x91, 0xdc, 0x00, 0x01, 0xde, 0x00, 0x01, 0x01, 0xdd, 0x00, 0x00,
        0x00, 0x01, 0x91, 0x90);
    /* A second trailing field after a deep first one is not reached. */
    RAW(PROTO_FLUSH, PROTO_EDEPTH, 0x92, 0x91, 0x91, 0x91, 0x91, 0x01, 0x01);

    /* A very deep nest fails fast without exhausting the stack. */
    size_t n = 1000000;
    uint8_t *deep = malloc(n + 2);
    assert_non_null(deep);
    deep[0] = 0x91;
    memset(deep + 1, 0x91, n);
    deep[n + 1] = 0x01;
    assert_int_equal(decode_raw(PROTO_FLUSH, deep, n + 2, NULL), PROTO_EDEPTH);
    free(deep);

    /* One trailing field of every type, after each message's fields. */
    RAW(PROTO_FLUSH, 0, 0x9d, 0xc0, 0xc2, 0xc3, 0x7f, 0xe0, 0xcc, 0x01, 0xcd, 0, 1, 0xce, 0, 0, 0,
        1, 0xcf, 0, 0, 0, 0, 0, 0, 0, 1, 0xd0, 0xff, 0xd1, 0, 1, 0xd2, 0, 0, 0, 1, 0xd3, 0, 0, 0, 0,
        0, 0, 0, 1);
    RAW(PROTO_FLUSH, 0, 0xdc, 0x00, 0x0f, 0xca, 0, 0, 0, 0, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xa1, 's',
        0xd9, 0x01, 's', 0xda, 0, 1, 's', 0xdb, 0, 0, 0, 1, 's', 0xc4, 0x01, 'b', 0xc5, 0, 1, 'b',
        0xc6, 0, 0, 0, 1, 'b', 0xd4, 1, 'e', 0xd5, 1, 'e', 'e', 0xd6, 1, 'e', 'e', 'e', 'e', 0xc7,
        0x01, 1, 'e', 0xc8, 0, 1, 1, 'e', 0xc9, 0, 0, 0, 1, 1, 'e');
    RAW(PROTO_FLUSH, 0, 0x93, 0xd7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xd8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0x82, 0xa1, 'k', 0x92, 0x01, 0x80, 0x02, 0xc0);
    RAW(PROTO_FLUSH, 0, 0x92, 0x80, 0x90);
    RAW(PROTO_FLUSHED, 0, 0x93, 0x01, 0x02, 0x81, 0xa1, 'k', 0xa1, 'v');
}

/* Random byte mutations of every vector never over-read and only return known codes. */
static void test_mutations(void **state)
{
    (void)state;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < N_STREAM; i++) {
        struct vec v;
        int kind;
        load_kind(stream_names[i], &v, &kind);
        size_t blen = v.len - PROTO_HEADER_LEN;
        uint8_t *b = malloc(blen);
        assert_non_null(b);
        for (int round = 0; round < 4000; round++) {
            memcpy(b, v.data + PROTO_HEADER_LEN, blen);
            int flips = 1 + round % 4;
            for (int f = 0; f < flips; f++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b[x % blen] = (uint8_t)(x >> 32);
            }
            struct proto_msg m;
            int rc = decode_raw(kind, b, blen, &m);
            assert_true(rc == 0 || (rc <= PROTO_EKIND && rc >= PROTO_ETRAILING));
            if (rc == 0 && (kind == PROTO_METRICS || kind == PROTO_PARAMS || kind == PROTO_TAGS)) {
                /* Iterators over a validated body reach their count exactly. */
                size_t got = 0;
                if (kind == PROTO_METRICS) {
                    struct proto_point p;
                    uint32_t left = m.u.metrics.points.left;
                    while (proto_iter_next_point(&m.u.metrics.points, &p))
                        got++;
                    assert_int_equal(got, left);
                } else {
                    struct proto_kv kv;
                    uint32_t left = m.u.kvs.kvs.left;
                    while (proto_iter_next_kv(&m.u.kvs.kvs, &kv))
                        got++;
                    assert_int_equal(got, left);
                }
            }
        }
        free(b);
        vec_free(&v);
    }
}

/* ---- (d) msgpack-c interoperability ------------------------------------ */

/* Unpacks the body of the single frame in b with msgpack-c; the frame must be whole. */
static void unpack_frame(const struct proto_buf *b, int kind, msgpack_unpacked *u,
                         const msgpack_object **top, uint32_t nfields)
{
    struct proto_header h;
    assert_int_equal(proto_header_decode(b->data, PROTO_MAX_BODY_HARD, &h), 0);
    assert_int_equal(h.kind, kind);
    assert_int_equal(h.body_len, b->len - PROTO_HEADER_LEN);
    msgpack_unpacked_init(u);
    size_t off = 0;
    msgpack_unpack_return r =
        msgpack_unpack_next(u, (const char *)b->data + PROTO_HEADER_LEN, h.body_len, &off);
    assert_int_equal(r, MSGPACK_UNPACK_SUCCESS);
    assert_int_equal(off, h.body_len);
    assert_int_equal(u->data.type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(u->data.via.array.size, nfields);
    *top = u->data.via.array.ptr;
}

static void obj_str(const msgpack_object *o, const char *want, size_t n)
{
    assert_int_equal(o->type, MSGPACK_OBJECT_STR);
    assert_int_equal(o->via.str.size, n);
    if (n)
        assert_memory_equal(o->via.str.ptr, want, n);
}

static void obj_uint(const msgpack_object *o, uint64_t want)
{
    assert_int_equal(o->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
    assert_int_equal(o->via.u64, want);
}

static void obj_int(const msgpack_object *o, int64_t want)
{
    if (want >= 0) {
        obj_uint(o, (uint64_t)want);
        return;
    }
    assert_int_equal(o->type, MSGPACK_OBJECT_NEGATIVE_INTEGER);
    assert_int_equal(o->via.i64, want);
}

static void obj_f64(const msgpack_object *o, double want)
{
    assert_int_equal(o->type, MSGPACK_OBJECT_FLOAT64);
    assert_memory_equal(&o->via.f64, &want, sizeof want);
}

#define OBJ_STR(o, lit) obj_str((o), (lit), sizeof(lit) - 1)

static void test_msgpack_c_reads_ours(void **state)
{
    (void)state;
    struct proto_buf b;
    msgpack_unpacked u;
    const msgpack_object *f;

    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_hello(&b, 1, UINT32_MAX, S("p"), S(""), S("LOCAL"), S("c")), 0);
    unpack_frame(&b, PROTO_HELLO, &u, &f, 6);
    obj_uint(&f[0], 1);
    obj_uint(&f[1], UINT32_MAX);
    OBJ_STR(&f[2], "p");
    OBJ_STR(&f[3], "");
    OBJ_STR(&f[4], "LOCAL");
    OBJ_STR(&f[5], "c");
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_welcome(&b, 0, S("9.9"), 4096, UINT64_MAX), 0);
    unpack_frame(&b, PROTO_WELCOME, &u, &f, 4);
    obj_uint(&f[0], 1);
    OBJ_STR(&f[1], "9.9");
    obj_uint(&f[2], 4096);
    obj_uint(&f[3], UINT64_MAX);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    /* Names of every string width: fixstr, str8, str16, str32. */
    static const uint32_t lens[] = {0, 31, 32, 255, 256, 65535, 65536, 70000};
    char *big = malloc(70000);
    assert_non_null(big);
    for (size_t i = 0; i < 70000; i++)
        big[i] = (char)('a' + i % 26);
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        proto_buf_init(&b, 0);
        assert_int_equal(proto_encode_experiment(&b, 2, (struct proto_str){big, lens[i]}), 0);
        unpack_frame(&b, PROTO_EXPERIMENT, &u, &f, 1);
        obj_str(&f[0], big, lens[i]);
        msgpack_unpacked_destroy(&u);
        proto_buf_free(&b);
    }

    /* START_RUN with 20 tags (array16 of 40) and with a nil name. */
    struct proto_kv tags[20];
    char keys[20][8];
    for (int i = 0; i < 20; i++) {
        snprintf(keys[i], sizeof keys[i], "k%02d", i);
        tags[i].key = (struct proto_str){keys[i], 3};
        tags[i].value = (struct proto_str){big, (uint32_t)i};
    }
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_start_run(&b, 3, R1, S("e"), NULL, INT64_MIN, tags, 20, NULL), 0);
    unpack_frame(&b, PROTO_START_RUN, &u, &f, 5);
    OBJ_STR(&f[0], R1);
    OBJ_STR(&f[1], "e");
    assert_int_equal(f[2].type, MSGPACK_OBJECT_NIL);
    obj_int(&f[3], INT64_MIN);
    assert_int_equal(f[4].type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(f[4].via.array.size, 40);
    for (int i = 0; i < 20; i++) {
        obj_str(&f[4].via.array.ptr[2 * i], keys[i], 3);
        obj_str(&f[4].via.array.ptr[2 * i + 1], big, (size_t)i);
    }
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    /* METRIC: integer widths of both signs and special doubles. */
    static const int64_t ints[] = {
        0,         1,  127, 128, 255,  256,  65535,  65536,  UINT32_MAX, T0,
        INT64_MAX, -1, -32, -33, -128, -129, -32768, -32769, INT32_MIN,  (int64_t)INT32_MIN - 1,
        INT64_MIN};
    static const double vals[] = {0.0, -0.0, 1e-310, 1e308, -2.5};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        double val = vals[i % 5];
        struct proto_point p = {S("k"), val, ints[i], ints[i] / -2};
        proto_buf_init(&b, 0);
        assert_int_equal(proto_encode_metric(&b, 5, R1, &p), 0);
        unpack_frame(&b, PROTO_METRIC, &u, &f, 5);
        OBJ_STR(&f[0], R1);
        OBJ_STR(&f[1], "k");
        obj_f64(&f[2], val);
        obj_int(&f[3], ints[i]);
        obj_int(&f[4], ints[i] / -2);
        msgpack_unpacked_destroy(&u);
        proto_buf_free(&b);
    }
    struct proto_point pnan = {S("k"), NAN, 0, 0}, pinf = {S("k"), -INFINITY, 0, 0};
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_metric(&b, 5, R1, &pnan), 0);
    unpack_frame(&b, PROTO_METRIC, &u, &f, 5);
    assert_int_equal(f[2].type, MSGPACK_OBJECT_FLOAT64);
    assert_true(isnan(f[2].via.f64));
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_metric(&b, 5, R1, &pinf), 0);
    unpack_frame(&b, PROTO_METRIC, &u, &f, 5);
    obj_f64(&f[2], -INFINITY);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    /* METRICS with its array32 points header. */
    proto_buf_init(&b, 0);
    size_t off;
    assert_int_equal(proto_metrics_begin(&b, 6, R2, &off), 0);
    for (int i = 0; i < 5; i++) {
        struct proto_point p = {S("m"), i * 0.5, T0 + i, -i};
        assert_int_equal(proto_metrics_add(&b, off, &p), 0);
    }
    unpack_frame(&b, PROTO_METRICS, &u, &f, 2);
    OBJ_STR(&f[0], R2);
    assert_int_equal(f[1].type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(f[1].via.array.size, 20);
    for (int i = 0; i < 5; i++) {
        const msgpack_object *q = f[1].via.array.ptr + 4 * i;
        OBJ_STR(&q[0], "m");
        obj_f64(&q[1], i * 0.5);
        obj_int(&q[2], T0 + i);
        obj_int(&q[3], -i);
    }
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    /* PARAMS, TAGS, END_RUN, FLUSH, FLUSHED, ERROR, STATS_REPLY. */
    struct proto_kv kv[] = {{S("a\"b"), S("")}, {S("\xc3\xa9"), S("v")}};
    for (int kind = PROTO_PARAMS; kind <= PROTO_TAGS; kind++) {
        proto_buf_init(&b, 0);
        assert_int_equal(proto_encode_kvs(&b, 7, kind, R1, kv, 2), 0);
        unpack_frame(&b, kind, &u, &f, 2);
        OBJ_STR(&f[0], R1);
        assert_int_equal(f[1].type, MSGPACK_OBJECT_ARRAY);
        assert_int_equal(f[1].via.array.size, 4);
        OBJ_STR(&f[1].via.array.ptr[0], "a\"b");
        OBJ_STR(&f[1].via.array.ptr[1], "");
        OBJ_STR(&f[1].via.array.ptr[2], "\xc3\xa9");
        OBJ_STR(&f[1].via.array.ptr[3], "v");
        msgpack_unpacked_destroy(&u);
        proto_buf_free(&b);
    }
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_end_run(&b, 9, R1, S("KILLED"), -1), 0);
    unpack_frame(&b, PROTO_END_RUN, &u, &f, 3);
    OBJ_STR(&f[0], R1);
    OBJ_STR(&f[1], "KILLED");
    obj_int(&f[2], -1);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_empty(&b, 10, PROTO_FLUSH), 0);
    unpack_frame(&b, PROTO_FLUSH, &u, &f, 0);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_flushed(&b, 0, UINT64_MAX, 0), 0);
    unpack_frame(&b, PROTO_FLUSHED, &u, &f, 2);
    obj_uint(&f[0], UINT64_MAX);
    obj_uint(&f[1], 0);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    proto_buf_init(&b, 0);
    assert_int_equal(
        proto_encode_error(&b, 0, 77, PROTO_ERR_SHUTDOWN, (struct proto_str){big, 300}), 0);
    unpack_frame(&b, PROTO_ERROR, &u, &f, 3);
    obj_uint(&f[0], 77);
    obj_uint(&f[1], PROTO_ERR_SHUTDOWN);
    obj_str(&f[2], big, 300);
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);

    const char *names[40];
    uint64_t values[40];
    char nbuf[40][12];
    for (int i = 0; i < 40; i++) {
        snprintf(nbuf[i], sizeof nbuf[i], "counter_%d", i);
        names[i] = nbuf[i];
        values[i] = (uint64_t)i << (i % 64);
    }
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_stats_reply(&b, 13, names, values, 40), 0);
    unpack_frame(&b, PROTO_STATS_REPLY, &u, &f, 1);
    assert_int_equal(f[0].type, MSGPACK_OBJECT_ARRAY);
    assert_int_equal(f[0].via.array.size, 80);
    for (int i = 0; i < 40; i++) {
        obj_str(&f[0].via.array.ptr[2 * i], nbuf[i], strlen(nbuf[i]));
        obj_uint(&f[0].via.array.ptr[2 * i + 1], values[i]);
    }
    msgpack_unpacked_destroy(&u);
    proto_buf_free(&b);
    free(big);
}

/* Appends trailing fields a newer peer might send: a map, bin, ext, float32, nil. */
static void pack_future_fields(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 2);
    msgpack_pack_str_with_body(pk, "features", 8);
    msgpack_pack_array(pk, 2);
    msgpack_pack_str_with_body(pk, "a", 1);
    msgpack_pack_map(pk, 1);
    msgpack_pack_int(pk, -3);
    msgpack_pack_double(pk, 0.5);
    msgpack_pack_uint64(pk, UINT64_MAX);
    msgpack_pack_bin(pk, 300);
    for (int i = 0; i < 300; i++)
        msgpack_pack_bin_body(pk, "z", 1);
    msgpack_pack_ext(pk, 4, -7);
    msgpack_pack_ext_body(pk, "abcd", 4);
    msgpack_pack_float(pk, 1.25f);
    msgpack_pack_nil(pk);
    msgpack_pack_str_with_body(pk, "future", 6);
}
#define N_FUTURE 5

static void test_ours_reads_msgpack_c(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    struct proto_msg m;

    /* HELLO with non-minimal integer forms and a trailing map. */
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 8 + N_FUTURE);
    msgpack_pack_fix_uint64(&pk, 1);
    msgpack_pack_fix_int32(&pk, 4242);
    msgpack_pack_str_with_body(&pk, "prog", 4);
    msgpack_pack_v4raw(&pk, 40);
    msgpack_pack_v4raw_body(&pk, "0123456789012345678901234567890123456789", 40);
    msgpack_pack_str_with_body(&pk, "LOCAL", 5);
    msgpack_pack_str_with_body(&pk, "py/2", 4);
    msgpack_pack_false(&pk);      /* context_tags, the 7th field */
    msgpack_pack_uint64(&pk, 77); /* session, the 8th */
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_HELLO, &sb, &m), 0);
    assert_false(m.u.hello.context_tags);
    assert_int_equal(m.u.hello.session, 77);
    assert_int_equal(m.u.hello.version, 1);
    assert_int_equal(m.u.hello.pid, 4242);
    assert_str(m.u.hello.program, "prog");
    assert_str(m.u.hello.source_name, "0123456789012345678901234567890123456789");
    assert_str(m.u.hello.source_type, "LOCAL");
    assert_str(m.u.hello.client, "py/2");
    msgpack_sbuffer_destroy(&sb);

    /* START_RUN with 10 tags (array16 of 20 from msgpack-c), nil name and experiment id 9. */
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 6 + N_FUTURE);
    msgpack_pack_str_with_body(&pk, R1, 32);
    msgpack_pack_str_with_body(&pk, "exp", 3);
    msgpack_pack_nil(&pk);
    msgpack_pack_int64(&pk, T0);
    msgpack_pack_array(&pk, 20);
    for (int i = 0; i < 10; i++) {
        char k[8], v[8];
        snprintf(k, sizeof k, "t%d", i);
        snprintf(v, sizeof v, "v%d", i);
        msgpack_pack_str_with_body(&pk, k, strlen(k));
        msgpack_pack_str_with_body(&pk, v, strlen(v));
    }
    msgpack_pack_uint64(&pk, 9);
    pack_future_fields(&pk);
    assert_int_equal(((const uint8_t *)sb.data)[1 + 34 + 4 + 1 + 9], 0xdc);
    assert_int_equal(decode_sbuf(PROTO_START_RUN, &sb, &m), 0);
    assert_true(m.u.start_run.has_experiment_id);
    assert_int_equal(m.u.start_run.experiment_id, 9);
    assert_str(m.u.start_run.run_id, R1);
    assert_str(m.u.start_run.experiment, "exp");
    assert_false(m.u.start_run.has_run_name);
    assert_int_equal(m.u.start_run.start_time, T0);
    assert_int_equal(m.u.start_run.tags.left, 10);
    for (int i = 0; i < 10; i++) {
        char k[8], v[8];
        snprintf(k, sizeof k, "t%d", i);
        snprintf(v, sizeof v, "v%d", i);
        next_kv(&m.u.start_run.tags, k, v);
    }
    msgpack_sbuffer_destroy(&sb);

    /* METRICS: msgpack-c's minimal points header and values of every numeric form. */
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 2 + N_FUTURE);
    msgpack_pack_str_with_body(&pk, R2, 32);
    msgpack_pack_array(&pk, 4 * 7);
    msgpack_pack_str_with_body(&pk, "f32", 3);
    msgpack_pack_float(&pk, -0.75f);
    msgpack_pack_int64(&pk, T0);
    msgpack_pack_int64(&pk, 0);
    msgpack_pack_str_with_body(&pk, "f64", 3);
    msgpack_pack_double(&pk, 1e-300);
    msgpack_pack_int64(&pk, 0);
    msgpack_pack_int8(&pk, -1);
    msgpack_pack_str_with_body(&pk, "i8", 2);
    msgpack_pack_int8(&pk, -100);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_int16(&pk, -300);
    msgpack_pack_str_with_body(&pk, "u64", 3);
    msgpack_pack_uint64(&pk, UINT64_MAX);
    msgpack_pack_fix_uint8(&pk, 2);
    msgpack_pack_int32(&pk, -70000);
    msgpack_pack_str_with_body(&pk, "i64", 3);
    msgpack_pack_int64(&pk, INT64_MIN);
    msgpack_pack_fix_int64(&pk, 3);
    msgpack_pack_int64(&pk, INT64_MIN);
    msgpack_pack_str_with_body(&pk, "u16", 3);
    msgpack_pack_fix_uint16(&pk, 7);
    msgpack_pack_fix_int16(&pk, 4);
    msgpack_pack_int64(&pk, INT64_MAX);
    msgpack_pack_str_with_body(&pk, "fix", 3);
    msgpack_pack_int(&pk, 5);
    msgpack_pack_fix_uint64(&pk, 5);
    msgpack_pack_fix_int8(&pk, -5);
    pack_future_fields(&pk);
    assert_int_equal(((const uint8_t *)sb.data)[1 + 34], 0xdc); /* array16, not array32 */
    assert_int_equal(decode_sbuf(PROTO_METRICS, &sb, &m), 0);
    assert_str(m.u.metrics.run_id, R2);
    assert_int_equal(m.u.metrics.points.left, 7);
    next_point(&m.u.metrics.points, "f32", -0.75, T0, 0);
    next_point(&m.u.metrics.points, "f64", 1e-300, 0, -1);
    next_point(&m.u.metrics.points, "i8", -100.0, 1, -300);
    next_point(&m.u.metrics.points, "u64", (double)UINT64_MAX, 2, -70000);
    next_point(&m.u.metrics.points, "i64", (double)INT64_MIN, 3, INT64_MIN);
    next_point(&m.u.metrics.points, "u16", 7.0, 4, INT64_MAX);
    next_point(&m.u.metrics.points, "fix", 5.0, 5, -5);
    msgpack_sbuffer_destroy(&sb);

    /* METRIC, PARAMS, END_RUN, FLUSHED, ERROR, STATS_REPLY, FLUSH with trailing fields. */
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 5 + N_FUTURE);
    msgpack_pack_str_with_body(&pk, R1, 32);
    msgpack_pack_str_with_body(&pk, "k", 1);
    msgpack_pack_float(&pk, 3.5f);
    msgpack_pack_uint16(&pk, 1000);
    msgpack_pack_int(&pk, -7);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_METRIC, &sb, &m), 0);
    assert_str(m.u.metric.point.key, "k");
    assert_true(m.u.metric.point.value == 3.5);
    assert_int_equal(m.u.metric.point.timestamp, 1000);
    assert_int_equal(m.u.metric.point.step, -7);
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 2 + N_FUTURE);
    msgpack_pack_str_with_body(&pk, R1, 32);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_str_with_body(&pk, "lr", 2);
    msgpack_pack_v4raw(&pk, 3);
    msgpack_pack_v4raw_body(&pk, "0.1", 3);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_PARAMS, &sb, &m), 0);
    next_kv(&m.u.kvs.kvs, "lr", "0.1");
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3 + N_FUTURE);
    msgpack_pack_str_with_body(&pk, R1, 32);
    msgpack_pack_str_with_body(&pk, "FAILED", 6);
    msgpack_pack_uint64(&pk, (uint64_t)T0);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_END_RUN, &sb, &m), 0);
    assert_str(m.u.end_run.status, "FAILED");
    assert_int_equal(m.u.end_run.end_time, T0);
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 2 + N_FUTURE);
    msgpack_pack_uint64(&pk, UINT64_MAX);
    msgpack_pack_fix_int16(&pk, 9);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_FLUSHED, &sb, &m), 0);
    assert_int_equal(m.u.flushed.flush_seq, UINT64_MAX);
    assert_int_equal(m.u.flushed.errors, 9);
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3 + N_FUTURE);
    msgpack_pack_uint8(&pk, 200);
    msgpack_pack_fix_uint32(&pk, PROTO_ERR_DATABASE);
    msgpack_pack_str_with_body(&pk, "no such run", 11);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_ERROR, &sb, &m), 0);
    assert_int_equal(m.u.error.about_seq, 200);
    assert_int_equal(m.u.error.code, PROTO_ERR_DATABASE);
    assert_str(m.u.error.message, "no such run");
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 1 + N_FUTURE);
    msgpack_pack_array(&pk, 4);
    msgpack_pack_str_with_body(&pk, "a", 1);
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_str_with_body(&pk, "b", 1);
    msgpack_pack_uint64(&pk, UINT64_MAX);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_STATS_REPLY, &sb, &m), 0);
    next_stat(&m.u.stats.pairs, "a", 0);
    next_stat(&m.u.stats.pairs, "b", UINT64_MAX);
    msgpack_sbuffer_destroy(&sb);

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, N_FUTURE);
    pack_future_fields(&pk);
    assert_int_equal(decode_sbuf(PROTO_FLUSH, &sb, &m), 0);
    assert_int_equal(decode_sbuf(PROTO_STATS, &sb, &m), 0);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- (e) METRICS built in place ----------------------------------------- */

static void point_key(int i, char *buf, size_t n, struct proto_str *key)
{
    /* Mostly short keys, every 97th a 40-byte one (str8). */
    int len = i % 97 == 0 ? snprintf(buf, n, "a/fairly/long/metric/key/for/str8/%06d", i)
                          : snprintf(buf, n, "k%d", i % 10);
    *key = (struct proto_str){buf, (uint32_t)len};
}

/*
 * proto_metrics_add writes the points by hand: every integer width, sign and
 * string-header size must come out byte for byte as msgpack-c packs them.
 */
static void test_metrics_add_matches_msgpack_c(void **state)
{
    (void)state;
    static const int64_t ints[] = {
        0,        1,     31,         127,        128,       255,       256,
        65535,    65536, 4294967295, 4294967296, INT64_MAX, -1,        -32,
        -33,      -128,  -129,       -32768,     -32769,    INT32_MIN, INT32_MIN - (int64_t)1,
        INT64_MIN};
    static const uint32_t klens[] = {0, 1, 31, 32, 255, 256, 65535, 65536};
    char *key = malloc(65536);
    assert_non_null(key);
    memset(key, 'k', 65536);
    size_t nints = sizeof ints / sizeof ints[0];
    for (size_t ki = 0; ki < sizeof klens / sizeof klens[0]; ki++)
        for (size_t i = 0; i < nints; i++) {
            struct proto_point p = {
                {key, klens[ki]}, -1.5 * (double)i, ints[i], ints[nints - 1 - i]};
            struct proto_buf b;
            proto_buf_init(&b, 0);
            size_t off;
            assert_int_equal(proto_metrics_begin(&b, 1, R1, &off), 0);
            size_t before = b.len;
            assert_int_equal(proto_metrics_add(&b, off, &p), 0);

            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            msgpack_packer pk;
            msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
            msgpack_pack_str_with_body(&pk, key, klens[ki]);
            msgpack_pack_double(&pk, p.value);
            msgpack_pack_int64(&pk, p.timestamp);
            msgpack_pack_int64(&pk, p.step);
            assert_int_equal(b.len - before, sb.size);
            assert_memory_equal(b.data + before, sb.data, sb.size);
            msgpack_sbuffer_destroy(&sb);
            proto_buf_free(&b);
        }
    free(key);
}

static void test_metrics_patching(void **state)
{
    (void)state;
    enum { N = 10000 };
    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_experiment(&b, 1, S("before")), 0);
    size_t off;
    assert_int_equal(proto_metrics_begin(&b, 2, R1, &off), 0);
    assert_int_equal(off, 24);
    char kb[64];
    for (int i = 0; i < N; i++) {
        struct proto_point p;
        point_key(i, kb, sizeof kb, &p.key);
        p.value = i * 0.25 - 100.0;
        p.timestamp = T0 + 7 * i;
        p.step = i - N / 2;
        assert_int_equal(proto_metrics_add(&b, off, &p), 0);
        assert_int_equal(proto_metrics_count(&b, off), (uint32_t)i + 1);
    }
    assert_int_equal(proto_encode_end_run(&b, 3, R1, S("FINISHED"), T0), 0);

    /* The points header stays array32 and holds the element count. */
    static const uint8_t cnt[] = {0xdd, 0x00, 0x00, 0x9c, 0x40};
    assert_memory_equal(b.data + off + PROTO_HEADER_LEN + 1 + 34, cnt, sizeof cnt);

    struct proto_reader r;
    proto_reader_init(&r, PROTO_MAX_BODY_HARD);
    reader_put(&r, b.data, b.len);
    struct proto_header h;
    const uint8_t *body;
    struct proto_msg m;
    assert_int_equal(proto_reader_next(&r, &h, &body), 1);
    assert_int_equal(proto_msg_decode(&h, body, &m), 0);
    assert_str(m.u.experiment.name, "before");
    assert_int_equal(proto_reader_next(&r, &h, &body), 1);
    assert_int_equal(h.kind, PROTO_METRICS);
    assert_int_equal(h.seq, 2);
    assert_int_equal(proto_msg_decode(&h, body, &m), 0);
    assert_str(m.u.metrics.run_id, R1);
    assert_int_equal(m.u.metrics.points.left, N);
    for (int i = 0; i < N; i++) {
        struct proto_str key;
        point_key(i, kb, sizeof kb, &key);
        next_point(&m.u.metrics.points, kb, i * 0.25 - 100.0, T0 + 7 * i, i - N / 2);
    }
    struct proto_point p;
    assert_false(proto_iter_next_point(&m.u.metrics.points, &p));
    assert_int_equal(proto_reader_next(&r, &h, &body), 1);
    assert_int_equal(h.kind, PROTO_END_RUN);
    assert_int_equal(proto_reader_next(&r, &h, &body), 0);
    assert_int_equal(proto_reader_pending(&r), 0);
    proto_reader_free(&r);
    proto_buf_free(&b);
}

/* ---- (f) buffer limits -------------------------------------------------- */

enum {
    ENC_HELLO,
    ENC_WELCOME,
    ENC_EXPERIMENT,
    ENC_START_RUN,
    ENC_START_RUN_NIL,
    ENC_METRIC,
    ENC_PARAMS,
    ENC_TAGS,
    ENC_END_RUN,
    ENC_FLUSH,
    ENC_FLUSHED,
    ENC_ERROR,
    ENC_STATS_REPLY,
    ENC_METRICS_ADD,
    ENC_COUNT
};

/* Runs encoder e once on b; for METRICS_ADD, b must already hold an open frame at 17. */
static int run_encoder(int e, struct proto_buf *b)
{
    static const struct proto_kv kv[] = {{{"key", 3}, {"value", 5}}, {{"k2", 2}, {"", 0}}};
    static const char *const names[] = {"a", "bb"};
    static const uint64_t values[] = {1, 300};
    struct proto_str name = S("run name");
    struct proto_point p = {S("metric/key"), 0.125, T0, 42};
    switch (e) {
    case ENC_HELLO: return proto_encode_hello(b, 1, 99, S("prog"), S("src"), S("LOCAL"), S("c"));
    case ENC_WELCOME: return proto_encode_welcome(b, 0, S("0.1.0"), 1 << 20, 3);
    case ENC_EXPERIMENT: return proto_encode_experiment(b, 2, S("experiment"));
    case ENC_START_RUN: return proto_encode_start_run(b, 3, R1, S("exp"), &name, T0, kv, 2, NULL);
    case ENC_START_RUN_NIL:
        return proto_encode_start_run(b, 3, R1, S("exp"), NULL, T0, NULL, 0, NULL);
    case ENC_METRIC: return proto_encode_metric(b, 4, R1, &p);
    case ENC_PARAMS: return proto_encode_kvs(b, 5, PROTO_PARAMS, R1, kv, 2);
    case ENC_TAGS: return proto_encode_kvs(b, 6, PROTO_TAGS, R1, kv, 2);
    case ENC_END_RUN: return proto_encode_end_run(b, 7, R1, S("FINISHED"), T0);
    case ENC_FLUSH: return proto_encode_empty(b, 8, PROTO_FLUSH);
    case ENC_FLUSHED: return proto_encode_flushed(b, 0, 8, 1);
    case ENC_ERROR: return proto_encode_error(b, 0, 4, PROTO_ERR_BAD_KEY, S("bad key"));
    case ENC_STATS_REPLY: return proto_encode_stats_reply(b, 9, names, values, 2);
    case ENC_METRICS_ADD: return proto_metrics_add(b, 17, &p);
    default: fail_msg("no encoder %d", e);
    }
    return -1;
}

/* Fills b with the 17-byte prefix (a FLUSH frame), plus an open METRICS frame for add. */
static size_t prefix(int e, struct proto_buf *b)
{
    assert_int_equal(proto_encode_empty(b, 100, PROTO_FLUSH), 0);
    if (e == ENC_METRICS_ADD) {
        size_t off;
        assert_int_equal(proto_metrics_begin(b, 101, R2, &off), 0);
        assert_int_equal(off, 17);
    }
    return b->len;
}

static void test_limit_encoders(void **state)
{
    (void)state;
    for (int e = 0; e < ENC_COUNT; e++) {
        /* Reference: the prefix and the frame with no limit. */
        struct proto_buf ref;
        proto_buf_init(&ref, 0);
        size_t pre = prefix(e, &ref);
        assert_int_equal(run_encoder(e, &ref), 0);
        size_t full = ref.len;
        assert_true(full > pre);

        for (size_t limit = pre; limit <= full; limit++) {
            struct proto_buf b;
            proto_buf_init(&b, limit);
            assert_int_equal(prefix(e, &b), pre);
            uint8_t *saved = malloc(pre);
            assert_non_null(saved);
            memcpy(saved, b.data, pre);
            int rc = run_encoder(e, &b);
            if (limit < full) {
                if (rc != PROTO_ENOMEM)
                    fail_msg("encoder %d, limit %zu of %zu: rc %d", e, limit, full, rc);
                assert_int_equal(b.len, pre);
                assert_memory_equal(b.data, saved, pre);
            } else {
                assert_int_equal(rc, 0);
                assert_bytes(b.data, b.len, ref.data, ref.len);
            }
            assert_true(b.cap <= limit);
            free(saved);
            proto_buf_free(&b);
        }
        proto_buf_free(&ref);
    }

    /* A kind the kvs encoder does not make leaves the buffer alone. */
    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_kvs(&b, 1, PROTO_METRIC, R1, NULL, 0), PROTO_EKIND);
    assert_int_equal(b.len, 0);
    proto_buf_free(&b);
}

/* proto_metrics_begin must report PROTO_ENOMEM like every other encoder. */
static void test_limit_metrics_begin(void **state)
{
    (void)state;
    struct proto_buf ref;
    proto_buf_init(&ref, 0);
    assert_int_equal(proto_encode_empty(&ref, 100, PROTO_FLUSH), 0);
    size_t off;
    assert_int_equal(proto_metrics_begin(&ref, 101, R2, &off), 0);
    size_t full = ref.len;
    proto_buf_free(&ref);
    assert_int_equal(full, 17 + 16 + 1 + 34 + 5);
    size_t bad_limit = 0, bad_len = 0;
    int bad_rc = 0;
    for (size_t limit = 17; limit < full; limit++) {
        struct proto_buf b;
        proto_buf_init(&b, limit);
        assert_int_equal(proto_encode_empty(&b, 100, PROTO_FLUSH), 0);
        off = 12345;
        int rc = proto_metrics_begin(&b, 101, R2, &off);
        if ((rc != PROTO_ENOMEM || b.len != 17 || off != 12345) && bad_rc == 0) {
            bad_limit = limit;
            bad_rc = rc ? rc : 1;
            bad_len = b.len;
        }
        proto_buf_free(&b);
    }
    if (bad_rc != 0)
        fail_msg("limit %zu of %zu: proto_metrics_begin returned %d (%s), not PROTO_ENOMEM "
                 "(buffer length after: %zu, before: 17)",
                 bad_limit, full, bad_rc, proto_strerror(bad_rc), bad_len);
}

static void test_buf_reserve_consume(void **state)
{
    (void)state;
    struct proto_buf b;
    proto_buf_init(&b, 100);
    assert_int_equal(b.limit, 100);
    assert_int_equal(proto_buf_reserve(&b, 101), PROTO_ENOMEM);
    assert_int_equal(proto_buf_reserve(&b, SIZE_MAX), PROTO_ENOMEM);
    assert_int_equal(proto_buf_reserve(&b, 100), 0);
    assert_true(b.cap >= 100 && b.cap <= 100);
    for (int i = 0; i < 99; i++)
        b.data[b.len++] = (uint8_t)i;
    assert_int_equal(proto_buf_reserve(&b, 2), PROTO_ENOMEM);
    assert_int_equal(proto_buf_reserve(&b, 1), 0);
    proto_buf_consume(&b, 10);
    assert_int_equal(b.len, 89);
    assert_int_equal(b.data[0], 10);
    assert_int_equal(b.data[88], 98);
    proto_buf_consume(&b, 89);
    assert_int_equal(b.len, 0);
    proto_buf_consume(&b, 5);
    assert_int_equal(b.len, 0);
    proto_buf_free(&b);
    assert_null(b.data);

    proto_buf_init(&b, 0);
    assert_int_equal(b.limit, 2 * HARD);
    proto_buf_free(&b);
}

/* The 64 MiB hard cap: a body of exactly the cap encodes, one byte more does not. */
static void test_hard_cap(void **state)
{
    (void)state;
    size_t n = HARD - 6; /* 0x91 + str32 header (5) + n == HARD */
    char *name = malloc(n + 1);
    assert_non_null(name);
    memset(name, 'x', n + 1);
    struct proto_buf b;
    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_experiment(&b, 1, S("a")), 0);
    size_t pre = b.len;
    assert_int_equal(proto_encode_experiment(&b, 2, (struct proto_str){name, (uint32_t)n + 1}),
                     PROTO_ETOOBIG);
    assert_int_equal(b.len, pre);
    assert_int_equal(proto_encode_experiment(&b, 2, (struct proto_str){name, (uint32_t)n}), 0);
    assert_int_equal(b.len, pre + PROTO_HEADER_LEN + HARD);
    struct proto_header h;
    assert_int_equal(proto_header_decode(b.data + pre, UINT32_MAX, &h), 0);
    assert_int_equal(h.body_len, PROTO_MAX_BODY_HARD);
    proto_buf_free(&b);

    /* proto_metrics_add refuses the point that would cross the cap and keeps the count. */
    proto_buf_init(&b, 0);
    size_t off;
    assert_int_equal(proto_metrics_begin(&b, 1, R1, &off), 0);
    const uint32_t klen = 1u << 20;
    struct proto_point p = {{name, klen}, 1.0, 0, 0};
    uint32_t added = 0;
    int rc;
    while ((rc = proto_metrics_add(&b, off, &p)) == 0)
        added++;
    assert_int_equal(rc, PROTO_ETOOBIG);
    size_t per_point = 5 + klen + 9 + 1 + 1;
    assert_int_equal(added, (HARD - 40) / per_point);
    assert_int_equal(proto_metrics_count(&b, off), added);
    assert_int_equal(b.len, PROTO_HEADER_LEN + 40 + added * per_point);
    assert_int_equal(proto_header_decode(b.data, UINT32_MAX, &h), 0);
    assert_int_equal(h.body_len, 40 + added * per_point);
    proto_buf_free(&b);
    free(name);
}

/* The optional-field messages: present and absent forms round-trip. */
static void test_optional_fields(void **state)
{
    (void)state;
    static const char run[] = "0123456789abcdef0123456789abcdef";
    struct proto_buf b;
    struct proto_header h;
    struct proto_msg m;
    struct proto_str name = {"exp", 3}, loc = {"s3://b/p", 8}, st = {"FAILED", 6};
    struct proto_str rn = {"renamed", 7}, uri = {"postgresql://r@db/mlflow", 24};
    int64_t end = 1700000000123;

    proto_buf_init(&b, 0);
    assert_int_equal(proto_encode_experiment_at(&b, 1, name, &loc), 0);
    assert_int_equal(proto_encode_experiment_at(&b, 2, name, NULL), 0);
    assert_int_equal(proto_encode_delete_tag(&b, 3, run, (struct proto_str){"k", 1}), 0);
    assert_int_equal(proto_encode_update_run(&b, 4, run, &st, &end, &rn), 0);
    assert_int_equal(proto_encode_update_run(&b, 5, run, NULL, NULL, NULL), 0);
    assert_int_equal(proto_encode_welcome_uri(&b, 6, name, 1 << 20, 9, uri), 0);
    assert_int_equal(proto_encode_welcome_uri(&b, 7, name, 1 << 20, 9, (struct proto_str){"", 0}),
                     0);

    const uint8_t *p = b.data;
    struct proto_msg got[7];
    for (int i = 0; i < 7; i++) {
        assert_int_equal(proto_header_decode(p, 1 << 20, &h), 0);
        assert_int_equal(proto_msg_decode(&h, p + PROTO_HEADER_LEN, &got[i]), 0);
        p += PROTO_HEADER_LEN + h.body_len;
    }
    assert_int_equal((size_t)(p - b.data), b.len);
    m = got[0];
    assert_true(m.u.experiment.has_artifact_location);
    assert_memory_equal(m.u.experiment.artifact_location.ptr, "s3://b/p", 8);
    assert_false(got[1].u.experiment.has_artifact_location);
    assert_int_equal(got[2].kind, PROTO_DELETE_TAG);
    assert_memory_equal(got[2].u.delete_tag.run_id.ptr, run, 32);
    assert_int_equal(got[2].u.delete_tag.key.len, 1);
    m = got[3];
    assert_true(m.u.update_run.has_status && m.u.update_run.has_end_time &&
                m.u.update_run.has_run_name);
    assert_memory_equal(m.u.update_run.status.ptr, "FAILED", 6);
    assert_int_equal(m.u.update_run.end_time, end);
    assert_memory_equal(m.u.update_run.run_name.ptr, "renamed", 7);
    m = got[4];
    assert_false(m.u.update_run.has_status || m.u.update_run.has_end_time ||
                 m.u.update_run.has_run_name);
    assert_int_equal(got[5].u.welcome.backend_uri.len, 24);
    assert_memory_equal(got[5].u.welcome.backend_uri.ptr, "postgresql://r@db/mlflow", 24);
    assert_int_equal(got[6].u.welcome.backend_uri.len, 0);
    proto_buf_free(&b);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        vectors_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vec_hello),
        cmocka_unit_test(test_vec_welcome),
        cmocka_unit_test(test_vec_experiment),
        cmocka_unit_test(test_vec_start_run),
        cmocka_unit_test(test_vec_start_run_nil_name),
        cmocka_unit_test(test_vec_start_run_exp_id),
        cmocka_unit_test(test_vec_metric),
        cmocka_unit_test(test_vec_metrics),
        cmocka_unit_test(test_vec_metrics_mixed),
        cmocka_unit_test(test_vec_params),
        cmocka_unit_test(test_vec_tags),
        cmocka_unit_test(test_vec_end_run),
        cmocka_unit_test(test_vec_artifact),
        cmocka_unit_test(test_vec_flush),
        cmocka_unit_test(test_vec_flushed),
        cmocka_unit_test(test_vec_error),
        cmocka_unit_test(test_vec_stats),
        cmocka_unit_test(test_vec_stats_reply),
        cmocka_unit_test(test_header_bytes),
        cmocka_unit_test(test_optional_fields),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_reassembly_two_chunks),
        cmocka_unit_test(test_reassembly_byte_by_byte),
        cmocka_unit_test(test_reader_errors),
        cmocka_unit_test(test_header_malformed),
        cmocka_unit_test(test_truncated_bodies),
        cmocka_unit_test(test_trailing_bytes),
        cmocka_unit_test(test_truncated_strings),
        cmocka_unit_test(test_counts_beyond_body),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_wrong_list_elements),
        cmocka_unit_test(test_depth_and_skip),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_msgpack_c_reads_ours),
        cmocka_unit_test(test_ours_reads_msgpack_c),
        cmocka_unit_test(test_metrics_add_matches_msgpack_c),
        cmocka_unit_test(test_metrics_patching),
        cmocka_unit_test(test_limit_encoders),
        cmocka_unit_test(test_limit_metrics_begin),
        cmocka_unit_test(test_buf_reserve_consume),
        cmocka_unit_test(test_hard_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
