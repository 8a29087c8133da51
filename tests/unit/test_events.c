/*
 * Unit tests for agent/events.c: MLflow's rules for one client message, on their own. Frames
 * are encoded with the shim's own encoders, decoded, and expanded into a batch; the events and
 * the errors are what is checked. No loop, no writer, no database.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "events.h"
#include "stats.h"

#define RUN "0123456789abcdef0123456789abcdef"
#define S(lit) ((struct proto_str){(lit), (uint32_t)(sizeof(lit) - 1)})

struct errors {
    int n;
    uint32_t code[8];
    uint64_t seq[8];
    char msg[8][512];
};

static void on_error(void *ctx, uint32_t conn, uint64_t seq, uint32_t code, const char *msg)
{
    struct errors *e = ctx;
    assert_int_equal(conn, 3);
    if (e->n < 8) {
        e->code[e->n] = code;
        e->seq[e->n] = seq;
        snprintf(e->msg[e->n], sizeof e->msg[e->n], "%s", msg);
    }
    e->n++;
}

struct fx {
    struct trackd_config cfg;
    struct batch b;
    uint64_t serial;
    struct errors errs;
    struct events_sink sink;
    struct events_origin origin;
};

static void fx_init(struct fx *f, const char *toml)
{
    struct config_error err;
    memset(f, 0, sizeof *f);
    memset(&stats, 0, sizeof stats);
    assert_int_equal(config_init(&f->cfg), 0);
    assert_int_equal(config_load_string(&f->cfg, toml, strlen(toml), "t.toml", &err), 0);
    batch_init(&f->b);
    f->serial = 100;
    f->sink = (struct events_sink){&f->cfg, &f->b, 0, &f->serial, on_error, &f->errs};
    f->origin = (struct events_origin){3, "ana", "train.py", "LOCAL", true, 0, NULL};
}

static void fx_free(struct fx *f)
{
    batch_free(&f->b);
    config_free(&f->cfg);
}

/* Decodes the one frame in pb and expands it; returns what events_from_message returned. */
static int expand(struct fx *f, struct proto_buf *pb)
{
    struct proto_header h;
    assert_int_equal(proto_header_decode(pb->data, PROTO_MAX_BODY_HARD, &h), 0);
    struct proto_msg m;
    assert_int_equal(proto_msg_decode(&h, pb->data + PROTO_HEADER_LEN, &m), 0);
    int rc = events_from_message(&f->sink, &f->origin, &m);
    proto_buf_free(pb);
    return rc;
}

static void assert_str(const struct batch *b, struct sref r, const char *want)
{
    if (r.len != strlen(want) || memcmp(batch_sptr(b, r), want, r.len) != 0)
        fail_msg("got '%.*s', want '%s'", (int)r.len, batch_sptr(b, r), want);
}

/* The tag event for key, or NULL. */
static const struct ev *tag(const struct batch *b, const char *key)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->evs[i].kind == EV_TAG && b->evs[i].kv.key.len == strlen(key) &&
            memcmp(batch_sptr(b, b->evs[i].kv.key), key, b->evs[i].kv.key.len) == 0)
            return &b->evs[i];
    return NULL;
}

/* start_run is the run row and the tags MLflow adds: its name, its user (the socket's), its
 * source; a serial per event, in order. */
static void test_start_run_expands_as_mlflow(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "");
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    struct proto_kv tags[] = {{S("team"), S("vision")}};
    struct proto_str name = S("baseline");
    assert_int_equal(
        proto_encode_start_run(&pb, 7, RUN, S("mnist"), &name, 1700000000000, tags, 1, NULL), 0);
    assert_int_equal(expand(&f, &pb), 0);
    assert_int_equal(f.errs.n, 0);
    assert_int_equal(f.b.n, 6);
    const struct ev *run = &f.b.evs[0];
    assert_int_equal(run->kind, EV_START_RUN);
    assert_memory_equal(ev_run(&f.b, run), RUN, 32);
    /* One frame for the message's six events. */
    assert_int_equal(f.b.nframes, 1);
    assert_int_equal(f.b.evs[5].frame, 0);
    assert_str(&f.b, run->run.experiment, "mnist");
    assert_str(&f.b, run->run.name, "baseline");
    assert_str(&f.b, run->run.user, "ana");
    assert_int_equal(run->start.ms, 1700000000000);
    assert_int_equal(run->start.experiment_id, 0); /* by name */
    assert_int_equal(ev_frame(&f.b, run)->seq, 7);
    assert_int_equal(run->serial, 100);
    assert_str(&f.b, tag(&f.b, "team")->kv.value, "vision");
    assert_str(&f.b, tag(&f.b, "mlflow.runName")->kv.value, "baseline");
    assert_str(&f.b, tag(&f.b, "mlflow.user")->kv.value, "ana");
    assert_str(&f.b, tag(&f.b, "mlflow.source.name")->kv.value, "train.py");
    assert_str(&f.b, tag(&f.b, "mlflow.source.type")->kv.value, "LOCAL");
    assert_int_equal(f.serial, 106);
    assert_int_equal(stats.events_received, 6);
    fx_free(&f);
}

/* A user the client claims is not the one the socket proves: overridden and counted, unless
 * [agent] trust_client_user. */
static void test_claimed_user_is_overridden(void **state)
{
    (void)state;
    const char *configs[] = {"", "[agent]\ntrust_client_user = true\n"};
    const char *want[] = {"ana", "mallory"};
    for (int i = 0; i < 2; i++) {
        struct fx f;
        fx_init(&f, configs[i]);
        struct proto_buf pb;
        proto_buf_init(&pb, 0);
        struct proto_kv tags[] = {{S("mlflow.user"), S("mallory")}};
        assert_int_equal(proto_encode_start_run(&pb, 2, RUN, S("e"), NULL, 1, tags, 1, NULL), 0);
        assert_int_equal(expand(&f, &pb), 0);
        assert_str(&f.b, f.b.evs[0].run.user, want[i]);
        assert_str(&f.b, tag(&f.b, "mlflow.user")->kv.value, want[i]);
        assert_int_equal(stats.identity_overridden, i == 0 ? 1 : 0);
        /* No name given: MLflow's adjective-noun-number. */
        const struct ev *n = tag(&f.b, "mlflow.runName");
        assert_non_null(n);
        assert_non_null(memchr(batch_sptr(&f.b, n->kv.value), '-', n->kv.value.len));
        fx_free(&f);
    }
}

/* One bad key costs its own event: MLflow's message, the rule's counter, the rest kept. */
static void test_bad_key_rejects_only_its_point(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "");
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    struct proto_point good = {S("loss"), 0.5, 1700000000000, 3};
    struct proto_point bad = {S("../up"), 1.0, 1700000000000, 3};
    struct proto_point nan_point = {S("acc"), NAN, 1700000000000, 4};
    assert_int_equal(proto_encode_metric(&pb, 9, RUN, &bad), 0);
    assert_int_equal(expand(&f, &pb), 0);
    proto_buf_init(&pb, 0);
    assert_int_equal(proto_encode_metric(&pb, 10, RUN, &good), 0);
    assert_int_equal(expand(&f, &pb), 0);
    proto_buf_init(&pb, 0);
    assert_int_equal(proto_encode_metric(&pb, 11, RUN, &nan_point), 0);
    assert_int_equal(expand(&f, &pb), 0);

    assert_int_equal(f.errs.n, 1);
    assert_int_equal(f.errs.code[0], PROTO_ERR_BAD_KEY);
    assert_int_equal(f.errs.seq[0], 9);
    assert_non_null(strstr(f.errs.msg[0], "Invalid value \"../up\" for parameter 'name' supplied"));
    assert_int_equal(stats.rejected_bad_key, 1);
    assert_int_equal(f.b.n, 2);
    assert_str(&f.b, f.b.evs[0].kv.key, "loss");
    assert_int_equal(f.b.evs[0].point.step, 3);
    assert_true(f.b.evs[1].is_nan);
    fx_free(&f);
}

/* A bad run id rejects the whole frame; params keep MLflow's limit by truncation. */
static void test_run_id_and_long_values(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "");
    static char longv[7000];
    memset(longv, 'v', sizeof longv);
    struct proto_kv params[] = {{S("lr"), S("0.1")},
                                {S("notes"), (struct proto_str){longv, sizeof longv}}};
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    assert_int_equal(
        proto_encode_kvs(&pb, 4, PROTO_PARAMS, "NOT-A-RUN-ID-NOT-A-RUN-ID-123456", params, 2), 0);
    assert_int_equal(expand(&f, &pb), 0);
    assert_int_equal(f.errs.n, 1);
    assert_int_equal(f.errs.code[0], PROTO_ERR_BAD_RUN_ID);
    assert_int_equal(f.b.n, 0);

    proto_buf_init(&pb, 0);
    assert_int_equal(proto_encode_kvs(&pb, 5, PROTO_PARAMS, RUN, params, 2), 0);
    assert_int_equal(expand(&f, &pb), 0);
    assert_int_equal(f.errs.n, 1);
    assert_int_equal(f.b.n, 2);
    assert_int_equal(f.b.evs[1].kind, EV_PARAM);
    assert_int_equal(f.b.evs[1].kv.value.len, 6000); /* MLflow's MAX_PARAM_VAL_LENGTH, cut */
    fx_free(&f);
}

/* end_run takes MLflow's statuses only; an artifact's ledger rows carry what the spool saw. */
static void test_end_run_and_artifact_rows(void **state)
{
    (void)state;
    struct fx f;
    fx_init(&f, "");
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    assert_int_equal(proto_encode_end_run(&pb, 6, RUN, S("DONE"), 5), 0);
    assert_int_equal(expand(&f, &pb), 0);
    assert_int_equal(f.errs.n, 1);
    assert_int_equal(f.errs.code[0], PROTO_ERR_BAD_STATUS);
    proto_buf_init(&pb, 0);
    assert_int_equal(proto_encode_end_run(&pb, 7, RUN, S("KILLED"), 5), 0);
    assert_int_equal(expand(&f, &pb), 0);
    assert_int_equal(f.b.n, 1);
    assert_int_equal(f.b.evs[0].status, RUN_KILLED);

    uint64_t serial =
        events_artifact(&f.sink, &f.origin, 8, RUN, "plots/a.png", "id-1", 42, "ab12");
    assert_int_equal(serial, f.b.evs[1].serial);
    assert_int_equal(f.b.evs[1].kind, EV_ARTIFACT);
    assert_int_equal(f.b.evs[1].size, 42);
    assert_str(&f.b, f.b.evs[1].artifact.path, "plots/a.png");
    assert_str(&f.b, f.b.evs[1].artifact.upload_id, "id-1");
    assert_str(&f.b, f.b.evs[1].artifact.sha256, "ab12");
    assert_int_equal(events_artifact_done(&f.sink, "id-1", "failed", "store down"), 0);
    assert_int_equal(f.b.evs[2].kind, EV_ARTIFACT_DONE);
    assert_str(&f.b, f.b.evs[2].done.status, "failed");
    assert_str(&f.b, f.b.evs[2].done.upload_id, "id-1");
    assert_str(&f.b, f.b.evs[2].done.error, "store down");
    assert_string_equal(ev_kind_name(EV_ARTIFACT_DONE), "artifact_done");
    assert_string_equal(ev_kind_name(EV_KIND_COUNT), "unknown");
    fx_free(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_start_run_expands_as_mlflow),
        cmocka_unit_test(test_claimed_user_is_overridden),
        cmocka_unit_test(test_bad_key_rejects_only_its_point),
        cmocka_unit_test(test_run_id_and_long_values),
        cmocka_unit_test(test_end_run_and_artifact_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
