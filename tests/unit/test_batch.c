/*
 * Unit tests for agent/batch.c: batches built by hand, statement inputs for whole
 * batches and sub-ranges checked byte for byte: text array literals and their
 * escaping, de-duplication (experiments, last-wins tags and end_runs, immutable
 * params with rejections), skipping of rejected events, and the binary COPY
 * stream parsed back field by field.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <errno.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch.h"
#include "validate.h"

#define R1 "11111111111111111111111111111111"
#define R2 "22222222222222222222222222222222"
#define R3 "0123456789abcdef0123456789abcdef"
#define T0 INT64_C(1700000000000)

/* ---- helpers ------------------------------------------------------------ */

/* Appends an event with its strings (NULL: empty); returns its index. */
static size_t add(struct batch *b, int kind, const char *run, const char *a, const char *bstr,
                  const char *c)
{
    struct sref ra = {0, 0}, rb = {0, 0}, rc = {0, 0};
    /* Strings first: batch_push may move the events. */
    if (a)
        assert_int_equal(batch_str(b, a, strlen(a), &ra), 0);
    if (bstr)
        assert_int_equal(batch_str(b, bstr, strlen(bstr), &rb), 0);
    if (c)
        assert_int_equal(batch_str(b, c, strlen(c), &rc), 0);
    if (run)
        assert_int_equal(strlen(run), PROTO_RUN_ID_LEN);
    assert_int_equal(batch_frame(b, 1, b->n + 1, 0, 0, run), 0);
    struct ev *ev = batch_push(b, kind);
    assert_non_null(ev);
    assert_int_equal(ev->kind, kind);
    assert_int_equal(ev->flags, 0);
    assert_int_equal(ev->frame, b->nframes - 1);
    ev->str[0] = ra;
    ev->str[1] = rb;
    ev->str[2] = rc;
    ev->serial = b->n;
    return b->n - 1;
}

static size_t add_exp(struct batch *b, const char *name)
{
    return add(b, EV_EXPERIMENT, NULL, name, NULL, NULL);
}

static size_t add_run(struct batch *b, const char *run, const char *exp, const char *name,
                      const char *user, int64_t start)
{
    size_t i = add(b, EV_START_RUN, run, exp, name, user);
    b->evs[i].start.ms = start;
    return i;
}

static size_t add_metric(struct batch *b, const char *run, const char *key, double value,
                         int64_t ts, int64_t step, int is_nan)
{
    size_t i = add(b, EV_METRIC, run, key, NULL, NULL);
    b->evs[i].point.value = value;
    b->evs[i].point.ts = ts;
    b->evs[i].point.step = step;
    b->evs[i].is_nan = (uint8_t)is_nan;
    return i;
}

static size_t add_param(struct batch *b, const char *run, const char *key, const char *value)
{
    return add(b, EV_PARAM, run, key, value, NULL);
}

static size_t add_tag(struct batch *b, const char *run, const char *key, const char *value)
{
    return add(b, EV_TAG, run, key, value, NULL);
}

static size_t add_end(struct batch *b, const char *run, int status, int64_t ts)
{
    size_t i = add(b, EV_END_RUN, run, NULL, NULL, NULL);
    b->evs[i].status = (uint8_t)status;
    b->evs[i].end_ms = ts;
    return i;
}

/* A finished text array literal: NUL-terminated right after its last byte. */
static void assert_array(const struct proto_buf *arr, const char *want)
{
    assert_non_null(arr->data);
    assert_int_equal(arr->data[arr->len], '\0');
    if (arr->len != strlen(want) || memcmp(arr->data, want, arr->len) != 0)
        fail_msg("array literal\n  got  %.*s\n  want %s", (int)arr->len, (const char *)arr->data,
                 want);
}

static void build(struct batch *b, size_t lo, size_t hi, struct batch_sql *s)
{
    assert_int_equal(batch_sql_build(b, lo, hi, VALIDATE_TAG_VALUE_MAX, s), 0);
}

/* Every output of s empty. */
static void assert_nothing(const struct batch_sql *s)
{
    const struct proto_buf *arrays[] = {
        &s->exp_names,     &s->run_ids,       &s->run_names,    &s->run_users,  &s->run_starts,
        &s->run_exps,      &s->tag_keys,      &s->tag_values,   &s->tag_runs,   &s->rename_runs,
        &s->rename_values, &s->param_keys,    &s->param_values, &s->param_runs, &s->param_ords,
        &s->end_runs,      &s->end_statuses,  &s->end_times,    &s->state_runs, &s->state_exps,
        &s->latest_keys,   &s->latest_values, &s->latest_runs,
    };
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++)
        assert_array(arrays[i], "{}");
    assert_int_equal(s->n_exps + s->n_runs + s->n_tags + s->n_renames + s->n_params + s->n_ends +
                         s->n_metrics + s->n_rejected + s->n_state_runs + s->n_latest,
                     0);
    assert_int_equal(s->copy.len, 0);
}

/* ---- COPY stream reader ------------------------------------------------- */

struct rd {
    const uint8_t *p;
    const uint8_t *end;
};

static const uint8_t *take(struct rd *r, size_t n)
{
    if ((size_t)(r->end - r->p) < n)
        fail_msg("COPY stream ends %zu bytes early", n - (size_t)(r->end - r->p));
    const uint8_t *q = r->p;
    r->p += n;
    return q;
}

static uint32_t be32_at(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int16_t rd_i16(struct rd *r)
{
    const uint8_t *p = take(r, 2);
    return (int16_t)(uint16_t)(p[0] << 8 | p[1]);
}

static int32_t rd_i32(struct rd *r)
{
    return (int32_t)be32_at(take(r, 4));
}

static uint64_t rd_u64(struct rd *r)
{
    const uint8_t *p = take(r, 8);
    return (uint64_t)be32_at(p) << 32 | be32_at(p + 4);
}

static void copy_header(struct rd *r)
{
    static const uint8_t sig[11] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', 0xff, '\r', '\n', 0};
    assert_memory_equal(take(r, sizeof sig), sig, sizeof sig);
    assert_int_equal(rd_i32(r), 0); /* flags */
    assert_int_equal(rd_i32(r), 0); /* header extension length */
}

/* One BATCH_METRIC_COLUMNS row: key, value, timestamp, run_uuid, step, is_nan; row is its
 * position, for the message. */
static void copy_row(struct rd *r, const char *key, double value, int64_t ts, const char *run,
                     int64_t step, int is_nan, uint32_t row)
{
    assert_int_equal(rd_i16(r), 6);
    size_t klen = strlen(key);
    assert_int_equal(rd_i32(r), (int32_t)klen);
    assert_memory_equal(take(r, klen), key, klen ? klen : 1 - 1);
    assert_int_equal(rd_i32(r), 8);
    uint64_t bits = rd_u64(r), want;
    memcpy(&want, &value, sizeof want);
    if (bits != want)
        fail_msg("row %u value bits %016llx, want %016llx", row, (unsigned long long)bits,
                 (unsigned long long)want);
    assert_int_equal(rd_i32(r), 8);
    assert_int_equal((int64_t)rd_u64(r), ts);
    assert_int_equal(rd_i32(r), PROTO_RUN_ID_LEN);
    assert_memory_equal(take(r, PROTO_RUN_ID_LEN), run, PROTO_RUN_ID_LEN);
    assert_int_equal(rd_i32(r), 8);
    assert_int_equal((int64_t)rd_u64(r), step);
    assert_int_equal(rd_i32(r), 1);
    assert_int_equal(*take(r, 1), is_nan ? 1 : 0);
}

static void copy_trailer(struct rd *r)
{
    assert_int_equal(rd_i16(r), -1);
    assert_ptr_equal(r->p, r->end);
}

/* ---- tests -------------------------------------------------------------- */

static void test_run_status_name(void **state)
{
    (void)state;
    assert_string_equal(run_status_name(RUN_RUNNING), "RUNNING");
    assert_string_equal(run_status_name(RUN_SCHEDULED), "SCHEDULED");
    assert_string_equal(run_status_name(RUN_FINISHED), "FINISHED");
    assert_string_equal(run_status_name(RUN_FAILED), "FAILED");
    assert_string_equal(run_status_name(RUN_KILLED), "KILLED");
    assert_string_equal(run_status_name(-1), "RUNNING");
    assert_string_equal(run_status_name(5), "RUNNING");
    assert_string_equal(run_status_name(255), "RUNNING");
}

static void test_array_literal(void **state)
{
    (void)state;
    struct proto_buf arr;
    proto_buf_init(&arr, 0);
    assert_int_equal(batch_array_finish(&arr), 0);
    assert_array(&arr, "{}");
    proto_buf_free(&arr);

    static const char *const in[] = {
        "plain", "a\"b", "c\\d", "e,f",       "{}",  "", "h\xc3\xa9llo \xe2\x9c\x93",
        "NULL",  " x ",  "\\\"", "new\nline", "'q'",
    };
    proto_buf_init(&arr, 0);
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++)
        assert_int_equal(batch_array_append(&arr, in[i], strlen(in[i])), 0);
    assert_int_equal(batch_array_finish(&arr), 0);
    assert_array(&arr, "{\"plain\",\"a\\\"b\",\"c\\\\d\",\"e,f\",\"{}\",\"\","
                       "\"h\xc3\xa9llo \xe2\x9c\x93\",\"NULL\",\" x \",\"\\\\\\\"\","
                       "\"new\nline\",\"'q'\"}");
    proto_buf_free(&arr);

    /* Worst case: every byte escaped. */
    char q[1000];
    memset(q, '"', sizeof q);
    proto_buf_init(&arr, 0);
    assert_int_equal(batch_array_append(&arr, q, sizeof q), 0);
    assert_int_equal(batch_array_finish(&arr), 0);
    assert_int_equal(arr.len, 2 + 2 + 2 * sizeof q);
    for (size_t i = 0; i < sizeof q; i++) {
        assert_int_equal(arr.data[2 + 2 * i], '\\');
        assert_int_equal(arr.data[3 + 2 * i], '"');
    }
    proto_buf_free(&arr);

    /* A limited buffer refuses with -ENOMEM and keeps what it had. */
    proto_buf_init(&arr, 8);
    assert_int_equal(batch_array_append(&arr, "ab", 2), 0);
    assert_int_equal(arr.len, 5);
    assert_int_equal(batch_array_append(&arr, "c", 1), -ENOMEM);
    assert_int_equal(arr.len, 5);
    assert_memory_equal(arr.data, "{\"ab\"", 5);
    proto_buf_free(&arr);
}

static void test_empty_range(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    build(&b, 0, 0, &s);
    assert_nothing(&s);
    add_exp(&b, "x");
    add_metric(&b, R1, "m", 1.0, T0, 0, 0);
    build(&b, 1, 1, &s);
    assert_nothing(&s);
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_experiments_and_runs(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_exp(&b, "a");
    add_run(&b, R1, "b", "run one", "ana", T0);
    add_exp(&b, "a");
    add_run(&b, R2, "a", "", "bo\"b", -5);
    add_exp(&b, "c,\\");
    add_exp(&b, "b");
    add_run(&b, R3, "c,\\", "tr\xc3\xa9s", "", 0);
    build(&b, 0, b.n, &s);

    assert_int_equal(s.n_exps, 3);
    assert_array(&s.exp_names, "{\"a\",\"b\",\"c,\\\\\"}");
    assert_int_equal(s.n_runs, 3);
    assert_array(&s.run_ids, "{\"" R1 "\",\"" R2 "\",\"" R3 "\"}");
    assert_array(&s.run_names, "{\"run one\",\"\",\"tr\xc3\xa9s\"}");
    assert_array(&s.run_users, "{\"ana\",\"bo\\\"b\",\"\"}");
    assert_array(&s.run_starts, "{\"1700000000000\",\"-5\",\"0\"}");
    assert_array(&s.run_exps, "{\"b\",\"a\",\"c,\\\\\"}");
    /* The runs whose state the transaction checks: each once, with the experiment it starts in. */
    assert_int_equal(s.n_state_runs, 3);
    assert_array(&s.state_runs, "{\"" R1 "\",\"" R2 "\",\"" R3 "\"}");
    assert_array(&s.state_exps, "{\"b\",\"a\",\"c,\\\\\"}");
    assert_array(&s.run_exp_ids, "{NULL,NULL,NULL}");
    assert_array(&s.state_exp_ids, "{NULL,NULL,NULL}");
    assert_int_equal(s.n_rejected, 0);
    assert_int_equal(s.copy.len, 0);
    assert_array(&s.tag_keys, "{}");

    /* A run started by experiment id (stored + 1) goes by that id and creates nothing. */
    struct batch b3;
    batch_init(&b3);
    size_t i = add_run(&b3, R1, "named", "", "ana", T0);
    b3.evs[i].start.experiment_id = 7 + 1;
    add_run(&b3, R2, "other", "", "ana", T0);
    build(&b3, 0, b3.n, &s);
    assert_array(&s.exp_names, "{\"other\"}");
    assert_array(&s.run_exp_ids, "{\"7\",NULL}");
    assert_array(&s.state_exp_ids, "{\"7\",NULL}");
    assert_array(&s.run_exps, "{\"named\",\"other\"}");
    batch_free(&b3);

    /* Names that differ only in length or case are different experiments. */
    struct batch b2;
    batch_init(&b2);
    add_exp(&b2, "ab");
    add_exp(&b2, "a");
    add_exp(&b2, "A");
    add_exp(&b2, "ab");
    add_exp(&b2, "");
    add_exp(&b2, "");
    build(&b2, 0, b2.n, &s);
    assert_array(&s.exp_names, "{\"ab\",\"a\",\"A\",\"\"}");
    assert_int_equal(s.n_exps, 4);
    batch_free(&b2);

    batch_sql_free(&s);
    batch_free(&b);
}

static void test_tags_last_wins(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_tag(&b, R1, "k", "1");
    add_tag(&b, R2, "k", "2");
    add_tag(&b, R1, "k", "3");
    add_tag(&b, R1, "j", "4");
    add_tag(&b, R1, "k2", "x");
    add_tag(&b, R2, "k", "5");
    add_tag(&b, R1, "mlflow.runName", "first");
    add_tag(&b, R2, "mlflow.runNameX", "not a rename");
    add_tag(&b, R1, "mlflow.runName", "se\"cond");
    add_tag(&b, R2, "mlflow.runName", "");
    build(&b, 0, b.n, &s);

    /* Winners appear at their own arrival positions. */
    assert_int_equal(s.n_tags, 7);
    assert_array(&s.tag_keys, "{\"k\",\"j\",\"k2\",\"k\",\"mlflow.runNameX\",\"mlflow.runName\","
                              "\"mlflow.runName\"}");
    assert_array(&s.tag_values, "{\"3\",\"4\",\"x\",\"5\",\"not a rename\",\"se\\\"cond\",\"\"}");
    assert_array(&s.tag_runs,
                 "{\"" R1 "\",\"" R1 "\",\"" R1 "\",\"" R2 "\",\"" R2 "\",\"" R1 "\",\"" R2 "\"}");
    assert_int_equal(s.n_renames, 2);
    assert_array(&s.rename_runs, "{\"" R1 "\",\"" R2 "\"}");
    assert_array(&s.rename_values, "{\"se\\\"cond\",\"\"}");
    assert_int_equal(s.n_rejected, 0);
    for (size_t i = 0; i < b.n; i++)
        assert_int_equal(b.evs[i].flags, 0); /* superseded tags are not errors */
    batch_sql_free(&s);
    batch_free(&b);
}

/* A tags.value shorter than MLflow 2.17's (varchar(5000) before it): values keep their first
 * code points, whole characters only, and a rename takes the same cut value. */
static void test_tags_cut_to_the_column(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_tag(&b, R1, "k", "a\303\251\342\202\254\360\237\230\200bc"); /* a é € 😀 b c */
    add_tag(&b, R1, "short", "abcd");
    add_tag(&b, R2, "mlflow.runName",
            "\342\202\254\342\202\254\342\202\254\342\202\254\342\202\254");
    assert_int_equal(batch_sql_build(&b, 0, b.n, 4, &s), 0);
    assert_int_equal(s.n_tags, 3);
    assert_array(&s.tag_values, "{\"a\303\251\342\202\254\360\237\230\200\",\"abcd\","
                                "\"\342\202\254\342\202\254\342\202\254\342\202\254\"}");
    assert_array(&s.rename_values, "{\"\342\202\254\342\202\254\342\202\254\342\202\254\"}");
    assert_int_equal(s.n_rejected, 0);
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_params_duplicates(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_param(&b, R1, "lr", "0.1");  /* 0 */
    add_param(&b, R1, "lr", "0.1");  /* 1: same value, dropped */
    add_param(&b, R1, "lr", "0.2");  /* 2: changed, rejected */
    add_param(&b, R2, "lr", "0.2");  /* 3: other run */
    add_param(&b, R1, "bs", "64");   /* 4 */
    add_param(&b, R1, "lr", "0.1");  /* 5: same as the first, dropped */
    add_param(&b, R1, "lr", "0.10"); /* 6: longer, rejected */
    add_param(&b, R1, "lr", "0.");   /* 7: prefix, rejected */
    add_param(&b, R2, "e", "");      /* 8 */
    add_param(&b, R2, "e", "");      /* 9: same empty value, dropped */
    build(&b, 0, b.n, &s);

    assert_int_equal(s.n_params, 4);
    assert_array(&s.param_keys, "{\"lr\",\"lr\",\"bs\",\"e\"}");
    assert_array(&s.param_values, "{\"0.1\",\"0.2\",\"64\",\"\"}");
    assert_array(&s.param_runs, "{\"" R1 "\",\"" R2 "\",\"" R1 "\",\"" R2 "\"}");
    assert_array(&s.param_ords, "{\"0\",\"3\",\"4\",\"8\"}");
    assert_int_equal(s.n_rejected, 3);
    assert_int_equal(s.rejected[0], 2);
    assert_int_equal(s.rejected[1], 6);
    assert_int_equal(s.rejected[2], 7);
    static const uint8_t want_flags[] = {0, 0,           EV_REJECTED, 0, 0,
                                         0, EV_REJECTED, EV_REJECTED, 0, 0};
    for (size_t i = 0; i < b.n; i++)
        assert_int_equal(b.evs[i].flags, want_flags[i]);

    /* A retry of the same range skips what was rejected and finds nothing new. */
    build(&b, 0, b.n, &s);
    assert_int_equal(s.n_params, 4);
    assert_array(&s.param_ords, "{\"0\",\"3\",\"4\",\"8\"}");
    assert_int_equal(s.n_rejected, 0);
    assert_null(s.rejected);
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_end_run_last_wins(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_end(&b, R1, RUN_FAILED, 5);
    add_end(&b, R2, RUN_FINISHED, 6);
    add_end(&b, R1, RUN_KILLED, T0);
    add_end(&b, R3, 9, 8); /* out of range: written as RUNNING */
    add_end(&b, R3, RUN_SCHEDULED, 9);
    add_end(&b, R3, RUN_RUNNING, -1);
    build(&b, 0, b.n, &s);
    assert_int_equal(s.n_ends, 3);
    assert_array(&s.end_runs, "{\"" R2 "\",\"" R1 "\",\"" R3 "\"}");
    assert_array(&s.end_statuses, "{\"FINISHED\",\"KILLED\",\"RUNNING\"}");
    assert_array(&s.end_times, "{\"6\",\"1700000000000\",\"-1\"}");

    build(&b, 3, 4, &s);
    assert_array(&s.end_statuses, "{\"RUNNING\"}");
    assert_array(&s.end_times, "{\"8\"}");
    build(&b, 3, 5, &s);
    assert_array(&s.end_statuses, "{\"SCHEDULED\"}");
    assert_int_equal(s.n_rejected, 0);
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_rejected_skipped(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    size_t rej[8], n = 0;
    rej[n++] = add_exp(&b, "x");
    rej[n++] = add_run(&b, R1, "y", "n", "u", 1);
    rej[n++] = add_metric(&b, R1, "m", 1.0, 1, 1, 0);
    add_tag(&b, R1, "k", "1");
    rej[n++] = add_tag(&b, R1, "k", "2");
    add_end(&b, R1, RUN_FAILED, 2);
    rej[n++] = add_end(&b, R1, RUN_KILLED, 3);
    rej[n++] = add_param(&b, R1, "p", "1");
    add_param(&b, R1, "p", "2");
    rej[n++] = add_tag(&b, R2, "mlflow.runName", "r");
    for (size_t i = 0; i < n; i++)
        b.evs[rej[i]].flags |= EV_REJECTED;
    build(&b, 0, b.n, &s);

    assert_array(&s.exp_names, "{}");
    assert_int_equal(s.n_exps, 0);
    assert_array(&s.run_ids, "{}");
    assert_int_equal(s.n_runs, 0);
    assert_int_equal(s.n_metrics, 0);
    assert_int_equal(s.copy.len, 0);
    assert_array(&s.tag_keys, "{\"k\"}");
    assert_array(&s.tag_values, "{\"1\"}");
    assert_array(&s.rename_runs, "{}");
    assert_array(&s.end_statuses, "{\"FAILED\"}");
    assert_array(&s.end_times, "{\"2\"}");
    assert_array(&s.param_values, "{\"2\"}");
    assert_array(&s.param_ords, "{\"8\"}");
    assert_int_equal(s.n_rejected, 0);
    batch_sql_free(&s);
    batch_free(&b);
}

static void fill_mixed(struct batch *b)
{
    add_exp(b, "e1");                       /* 0 */
    add_run(b, R1, "e1", "n1", "u", 10);    /* 1 */
    add_metric(b, R1, "m", 1.0, 100, 0, 0); /* 2 */
    add_param(b, R1, "p", "1");             /* 3 */
    add_tag(b, R1, "t", "a");               /* 4 */
    add_metric(b, R1, "m", 2.0, 101, 1, 0); /* 5 */
    add_param(b, R1, "p", "2");             /* 6: conflicts with 3 */
    add_tag(b, R1, "t", "b");               /* 7 */
    add_end(b, R1, RUN_FINISHED, 200);      /* 8 */
    add_exp(b, "e2");                       /* 9 */
}

static void test_sub_ranges(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    struct rd r;
    batch_init(&b);
    batch_sql_init(&s);
    fill_mixed(&b);

    build(&b, 4, 8, &s);
    assert_array(&s.exp_names, "{}");
    assert_array(&s.run_ids, "{}");
    /* A run the range only writes to is checked too, with no experiment to name. */
    assert_int_equal(s.n_state_runs, 1);
    assert_array(&s.state_runs, "{\"" R1 "\"}");
    assert_array(&s.state_exps, "{NULL}");
    assert_array(&s.tag_values, "{\"b\"}");
    assert_array(&s.param_values, "{\"2\"}"); /* the first value is outside the range */
    assert_array(&s.param_ords, "{\"6\"}");
    assert_int_equal(s.n_rejected, 0);
    assert_int_equal(s.n_metrics, 1);
    r = (struct rd){s.copy.data, s.copy.data + s.copy.len};
    copy_header(&r);
    copy_row(&r, "m", 2.0, 101, R1, 1, 0, 0);
    copy_trailer(&r);
    assert_array(&s.end_runs, "{}");

    build(&b, 0, 4, &s);
    assert_array(&s.exp_names, "{\"e1\"}");
    assert_array(&s.run_ids, "{\"" R1 "\"}");
    assert_array(&s.param_ords, "{\"3\"}");
    assert_array(&s.tag_keys, "{}");
    assert_int_equal(s.n_metrics, 1);
    r = (struct rd){s.copy.data, s.copy.data + s.copy.len};
    copy_header(&r);
    copy_row(&r, "m", 1.0, 100, R1, 0, 0, 0);
    copy_trailer(&r);

    build(&b, 8, 10, &s);
    assert_array(&s.exp_names, "{\"e2\"}");
    assert_array(&s.end_runs, "{\"" R1 "\"}");
    assert_int_equal(s.n_metrics + s.n_params + s.n_tags + s.n_runs, 0);
    assert_int_equal(s.copy.len, 0);

    build(&b, 0, 10, &s);
    assert_array(&s.exp_names, "{\"e1\",\"e2\"}");
    assert_array(&s.param_values, "{\"1\"}");
    assert_int_equal(s.n_rejected, 1);
    assert_int_equal(s.rejected[0], 6);
    assert_true(b.evs[6].flags & EV_REJECTED);
    assert_array(&s.tag_values, "{\"b\"}");
    assert_int_equal(s.n_metrics, 2);
    r = (struct rd){s.copy.data, s.copy.data + s.copy.len};
    copy_header(&r);
    copy_row(&r, "m", 1.0, 100, R1, 0, 0, 0);
    copy_row(&r, "m", 2.0, 101, R1, 1, 0, 1);
    copy_trailer(&r);

    /* Once flagged, the param is skipped in the sub-range too. */
    build(&b, 4, 8, &s);
    assert_array(&s.param_keys, "{}");
    assert_int_equal(s.n_params, 0);
    assert_int_equal(s.n_rejected, 0);
    batch_sql_free(&s);
    batch_free(&b);
}

/* latest_metrics gets one winner per (run, key): the largest (step, timestamp, value), the
 * first among equals, as SqlAlchemyStore._update_latest_metrics_if_necessary. */
static void test_latest_winners(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    add_metric(&b, R1, "loss", 9.0, T0 + 9, 1, 0); /* a later timestamp, a smaller step */
    add_metric(&b, R1, "loss", 0.0, T0, 3, 1);     /* NaN, stored as 0 */
    add_metric(&b, R1, "acc", 0.25, T0, 0, 0);
    add_metric(&b, R1, "loss", 2.5, T0, 3, 0);       /* the same step and time, a larger value */
    add_metric(&b, R2, "loss", -1.0, T0, 3, 0);      /* another run */
    add_metric(&b, R1, "loss", 2.5, T0, 3, 0);       /* equal to the winner: left out */
    add_metric(&b, R1, "acc", 1e308 * 10, T0, 0, 0); /* +Inf, sanitised as the caller does */
    b.evs[6].point.value = 1.7976931348623157e308;
    size_t rejected = add_metric(&b, R1, "acc", 5.0, T0 + 1, 9, 0);
    b.evs[rejected].flags |= EV_REJECTED;
    build(&b, 0, b.n, &s);
    assert_int_equal(s.n_metrics, 6);
    assert_int_equal(s.n_latest, 3);
    assert_array(&s.latest_keys, "{\"loss\",\"acc\",\"loss\"}"); /* by first point */
    assert_array(&s.latest_values, "{\"2.5\",\"1.7976931348623157e+308\",\"-1\"}");
    assert_array(&s.latest_steps, "{\"3\",\"0\",\"3\"}");
    assert_array(&s.latest_nans, "{\"f\",\"f\",\"f\"}");
    assert_array(&s.latest_runs, "{\"" R1 "\",\"" R1 "\",\"" R2 "\"}");
    /* Only the range counts: the first two points alone make the NaN the winner. */
    build(&b, 0, 2, &s);
    assert_array(&s.latest_values, "{\"0\"}");
    assert_array(&s.latest_nans, "{\"t\"}");
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_copy_stream(void **state)
{
    (void)state;
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    double negzero = -0.0;
    add_metric(&b, R1, "loss", 0.5, T0, 0, 0);
    add_metric(&b, R2, "h\xc3\xa9llo/\xe2\x9c\x93", -1.25, 0, -7, 0);
    add_tag(&b, R1, "t", "v");
    add_metric(&b, R1, "nan", 0.0, T0 + 1, INT64_MAX, 1);
    add_metric(&b, R3, "k", negzero, INT64_MIN, INT64_MIN, 0);
    add_metric(&b, R1, "big", DBL_MAX, 1, 1, 0);
    add_metric(&b, R1, "tiny", -DBL_MIN, 2, 2, 0);
    /* The same point again is left out (the stream may go straight into metrics, whose
     * primary key is the whole point); -0 equals 0 there, and a NaN is stored as 0. */
    add_metric(&b, R1, "loss", 0.5, T0, 0, 0);
    add_metric(&b, R3, "k", 0.0, INT64_MIN, INT64_MIN, 0);
    add_metric(&b, R1, "nan", 0.0, T0 + 1, INT64_MAX, 1);
    /* Points that differ in one column of the key stay. */
    add_metric(&b, R1, "loss", 0.5, T0, 1, 0);
    add_metric(&b, R1, "loss", 0.5, T0 + 1, 0, 0);
    add_metric(&b, R1, "loss", 0.25, T0, 0, 0);
    add_metric(&b, R1, "nan", 0.0, T0 + 1, INT64_MAX, 0);
    add_metric(&b, R2, "loss", 0.5, T0, 0, 0);
    assert_int_equal(b.n_metrics, 14);
    build(&b, 0, b.n, &s);
    assert_int_equal(s.n_metrics, 11);
    assert_int_equal(s.n_tags, 1);

    struct rd r = {s.copy.data, s.copy.data + s.copy.len};
    copy_header(&r);
    copy_row(&r, "loss", 0.5, T0, R1, 0, 0, 0);
    copy_row(&r, "h\xc3\xa9llo/\xe2\x9c\x93", -1.25, 0, R2, -7, 0, 1);
    copy_row(&r, "nan", 0.0, T0 + 1, R1, INT64_MAX, 1, 2);
    copy_row(&r, "k", negzero, INT64_MIN, R3, INT64_MIN, 0, 3);
    copy_row(&r, "big", DBL_MAX, 1, R1, 1, 0, 4);
    copy_row(&r, "tiny", -DBL_MIN, 2, R1, 2, 0, 5);
    copy_row(&r, "loss", 0.5, T0, R1, 1, 0, 6);
    copy_row(&r, "loss", 0.5, T0 + 1, R1, 0, 0, 7);
    copy_row(&r, "loss", 0.25, T0, R1, 0, 0, 8);
    copy_row(&r, "nan", 0.0, T0 + 1, R1, INT64_MAX, 0, 9);
    copy_row(&r, "loss", 0.5, T0, R2, 0, 0, 10);
    copy_trailer(&r);

    /* Exact bytes of one row, independent of the reader above. */
    build(&b, 0, 1, &s);
    static const uint8_t want[] = {
        'P',  'G',  'C', 'O', 'P',  'Y',  '\n', 0xff, '\r', '\n', 0,    0,
        0,    0,    0,   0,   0,    0,    0,    0,    6,                      /* fields */
        0,    0,    0,   4,   'l',  'o',  's',  's',                          /* key */
        0,    0,    0,   8,   0x3f, 0xe0, 0,    0,    0,    0,    0,    0,    /* value 0.5 */
        0,    0,    0,   8,   0,    0,    0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00, /* timestamp */
        0,    0,    0,   32,  '1',  '1',  '1',  '1',  '1',  '1',  '1',  '1',
        '1',  '1',  '1', '1', '1',  '1',  '1',  '1',  '1',  '1',  '1',  '1',
        '1',  '1',  '1', '1', '1',  '1',  '1',  '1',  '1',  '1',  '1',  '1',
        0,    0,    0,   8,   0,    0,    0,    0,    0,    0,    0,    0, /* step */
        0,    0,    0,   1,   0,                                           /* is_nan */
        0xff, 0xff,                                                        /* trailer */
    };
    assert_int_equal(s.copy.len, sizeof want);
    assert_memory_equal(s.copy.data, want, sizeof want);
    batch_sql_free(&s);
    batch_free(&b);
}

/* Many events: the event array and arena grow, hash tables see many identities. */
static void test_many_events(void **state)
{
    (void)state;
    enum { RUNS = 30, KEYS = 50, METRICS = 1000 };
    struct batch b;
    struct batch_sql s;
    batch_init(&b);
    batch_sql_init(&s);
    char runs[RUNS][PROTO_RUN_ID_LEN + 1];
    for (int r = 0; r < RUNS; r++)
        snprintf(runs[r], sizeof runs[r], "%032x", r * 7919 + 1);
    for (int pass = 0; pass < 2; pass++)
        for (int r = 0; r < RUNS; r++)
            for (int k = 0; k < KEYS; k++) {
                char key[16], val[32];
                snprintf(key, sizeof key, "key%d", k);
                snprintf(val, sizeof val, "%s-%d-%d", pass ? "second" : "first", r, k);
                add_tag(&b, runs[r], key, val);
                add_param(&b, runs[r], key, "same");
            }
    for (int i = 0; i < METRICS; i++)
        add_metric(&b, runs[i % RUNS], "m", i, i, i, 0);
    assert_int_equal(b.n, 2 * 2 * RUNS * KEYS + METRICS);
    assert_int_equal(b.n_metrics, METRICS);
    assert_true(batch_bytes(&b) >= b.n * sizeof(struct ev));
    build(&b, 0, b.n, &s);

    assert_int_equal(s.n_tags, RUNS * KEYS);
    assert_int_equal(s.n_params, RUNS * KEYS);
    assert_int_equal(s.n_rejected, 0);
    /* Every winning tag is the second pass, in arrival order. */
    const char *p = (const char *)s.tag_values.data;
    assert_int_equal(*p, '{');
    for (int r = 0; r < RUNS; r++)
        for (int k = 0; k < KEYS; k++) {
            char want[40];
            int n = snprintf(want, sizeof want, "%s\"second-%d-%d\"", r || k ? "," : "", r, k);
            assert_memory_equal(p + 1, want, (size_t)n);
            p += n;
        }
    assert_string_equal(p + 1, "}");

    struct rd rr = {s.copy.data, s.copy.data + s.copy.len};
    copy_header(&rr);
    for (int i = 0; i < METRICS; i++)
        copy_row(&rr, "m", i, i, runs[i % RUNS], i, 0, (uint32_t)i);
    copy_trailer(&rr);
    batch_sql_free(&s);
    batch_free(&b);
}

static void test_batch_storage(void **state)
{
    (void)state;
    struct batch b;
    batch_init(&b);
    assert_int_equal(b.n, 0);
    struct sref r1, r2, r3;
    assert_int_equal(batch_str(&b, "hello", 5, &r1), 0);
    assert_int_equal(batch_str(&b, "", 0, &r2), 0);
    assert_int_equal(batch_str(&b, "world", 5, &r3), 0);
    assert_int_equal(r1.off, 0);
    assert_int_equal(r1.len, 5);
    assert_int_equal(r2.off, 5);
    assert_int_equal(r2.len, 0);
    assert_int_equal(r3.off, 5);
    assert_memory_equal(batch_sptr(&b, r1), "hello", 5);
    assert_memory_equal(batch_sptr(&b, r3), "world", 5);

    /* Growth keeps earlier strings in place by offset. */
    char big[40000];
    memset(big, 'z', sizeof big);
    struct sref rb;
    assert_int_equal(batch_str(&b, big, sizeof big, &rb), 0);
    assert_int_equal(rb.off, 10);
    assert_memory_equal(batch_sptr(&b, r1), "hello", 5);
    assert_memory_equal(batch_sptr(&b, rb), big, sizeof big);

    for (int i = 0; i < 600; i++) {
        struct ev *ev = batch_push(&b, i % 2 ? EV_METRIC : EV_TAG);
        assert_non_null(ev);
        assert_int_equal(ev->kind, i % 2 ? EV_METRIC : EV_TAG);
        assert_int_equal(ev->point.value, 0);
    }
    assert_int_equal(b.n, 600);
    assert_int_equal(b.n_metrics, 300);
    assert_true(b.cap >= 600);
    /* Pushed without batch_frame: one empty frame holds them all. */
    assert_int_equal(b.nframes, 1);
    assert_int_equal(b.evs[599].frame, 0);
    assert_int_equal(batch_bytes(&b), b.cap * sizeof(struct ev) +
                                          b.capframes * sizeof(struct ev_frame) + b.acap +
                                          sizeof b);
    batch_free(&b);
    assert_int_equal(b.n, 0);
    assert_null(b.evs);
    assert_null(b.frames);
    assert_null(b.arena);

    /* A batch cut at max_rows never holds room for more: 256, 512, then 700, not 1024. */
    b.max_rows = 700;
    for (int i = 0; i < 700; i++)
        assert_non_null(batch_push(&b, EV_METRIC));
    assert_int_equal(b.cap, 700);
    assert_non_null(batch_push(&b, EV_METRIC)); /* a frame may take it past: then it doubles */
    assert_int_equal(b.cap, 1400);
    batch_free(&b);
}

/* An empty string before anything else: the arena does not exist yet. */
static void test_empty_string_first(void **state)
{
    (void)state;
    struct batch b;
    struct sref r = {7, 7};
    batch_init(&b);
    assert_int_equal(batch_str(&b, "", 0, &r), 0);
    assert_int_equal(r.len, 0);
    assert_int_equal(r.off, 0);
    assert_int_equal(batch_str(&b, "ab", 2, &r), 0);
    assert_memory_equal(batch_sptr(&b, r), "ab", 2);
    batch_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_string_first),
        cmocka_unit_test(test_run_status_name),
        cmocka_unit_test(test_array_literal),
        cmocka_unit_test(test_empty_range),
        cmocka_unit_test(test_experiments_and_runs),
        cmocka_unit_test(test_tags_last_wins),
        cmocka_unit_test(test_tags_cut_to_the_column),
        cmocka_unit_test(test_params_duplicates),
        cmocka_unit_test(test_end_run_last_wins),
        cmocka_unit_test(test_rejected_skipped),
        cmocka_unit_test(test_sub_ranges),
        cmocka_unit_test(test_latest_winners),
        cmocka_unit_test(test_copy_stream),
        cmocka_unit_test(test_many_events),
        cmocka_unit_test(test_batch_storage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
