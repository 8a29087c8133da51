/*
 * Unit tests for agent/owners.c: the run-owner rule (uid, shared groups, user_id for runs
 * trackd did not start), and the plan / learn / check steps the writer runs on a range,
 * with batches built by hand and the database's answers given as rows.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "owners.h"

#define R1 "11111111111111111111111111111111"
#define R2 "22222222222222222222222222222222"
#define R3 "33333333333333333333333333333333"
#define R4 "44444444444444444444444444444444"

static const struct peer ALICE = {1001, 1, {500}};
static const struct peer BOB = {1002, 1, {500}}; /* shares group 500 with alice */
static const struct peer EVE = {1003, 1, {600}};
static const struct peer CAROL = {1004, 0, {0}};

static size_t add(struct batch *b, int kind, const char *run, const struct peer *p,
                  const char *user)
{
    uint16_t who = p ? batch_peer(b, p, user) : 0;
    if (p)
        assert_int_not_equal(who, 0);
    assert_int_equal(batch_frame(b, 1, b->n + 1, 0, who, run), 0);
    struct ev *ev = batch_push(b, kind);
    assert_non_null(ev);
    return b->n - 1;
}

struct refusals {
    size_t idx[64];
    char msg[64][512];
    size_t n;
};

static void on_refused(void *ctx, size_t i, const char *msg)
{
    struct refusals *r = ctx;
    assert_true(r->n < 64);
    r->idx[r->n] = i;
    snprintf(r->msg[r->n], sizeof r->msg[r->n], "%s", msg);
    r->n++;
}

static struct run_owner recorded(const char *run, const struct peer *p)
{
    struct run_owner o = {.kind = OWNER_RECORDED, .id = *p};
    memcpy(o.run_id, run, PROTO_RUN_ID_LEN);
    return o;
}

/* The rule alone: the uid, a shared group, or the user named by user_id. */
static void test_rule(void **state)
{
    (void)state;
    char msg[512];
    struct run_owner o = recorded(R1, &ALICE);
    assert_true(owners_may_write(&o, &ALICE, "alice", 5, false, msg, sizeof msg));
    assert_true(owners_may_write(&o, &BOB, "bob", 3, false, msg, sizeof msg));
    assert_false(owners_may_write(&o, &EVE, "eve", 3, false, msg, sizeof msg));
    assert_string_equal(msg, "Permission denied: run " R1 " was started by uid 1001; uid 1003 "
                             "(eve) may not write to it. A run is written only by the uid that "
                             "started it, and by members of a group in the agent's [agent] "
                             "shared_gids that both belong to");
    struct run_owner lone = recorded(R1, &CAROL);
    assert_false(owners_may_write(&lone, &BOB, "bob", 3, false, msg, sizeof msg));

    struct run_owner u = {.kind = OWNER_USER_ID, .run_id = R2, .user_id = "alice"};
    memcpy(u.run_id, R2, PROTO_RUN_ID_LEN);
    assert_true(owners_may_write(&u, &EVE, "alice", 5, false, msg, sizeof msg));
    assert_false(owners_may_write(&u, &ALICE, "alic", 4, false, msg, sizeof msg));
    assert_string_equal(msg, "Permission denied: run " R2 " was not started through trackd; it "
                             "belongs to the local user named by its user_id ('alice'), and uid "
                             "1001 (alic) may not write to it ([agent] open_unowned_runs lets "
                             "anyone)");
    assert_true(owners_may_write(&u, &ALICE, "alic", 4, true, msg, sizeof msg));
    struct run_owner rec = recorded(R1, &ALICE); /* open_unowned is about runs without a row */
    assert_false(owners_may_write(&rec, &EVE, "eve", 3, true, msg, sizeof msg));
    struct run_owner nobody = u;
    nobody.user_id[0] = '\0'; /* an empty or too long user_id matches no one */
    assert_false(owners_may_write(&nobody, &ALICE, "", 0, false, msg, sizeof msg));
}

/*
 * One range: R1 is alice's (a row), R2 is started in the range by bob, R3 exists nowhere,
 * R4 was made by MLflow for "carol". Events without a peer and experiments are not checked.
 */
static void test_plan_learn_check(void **state)
{
    (void)state;
    struct owners o;
    assert_int_equal(owners_init(&o, false), 0);
    struct batch b;
    batch_init(&b);
    add(&b, EV_METRIC, R1, &ALICE, "alice");             /* 0 ok */
    size_t e1 = add(&b, EV_TAG, R1, &EVE, "eve");        /* 1 refused */
    add(&b, EV_METRIC, R1, &BOB, "bob");                 /* 2 ok: group 500 */
    size_t e3 = add(&b, EV_METRIC, R2, &ALICE, "alice"); /* 3 ok: shares 500 with the starter */
    add(&b, EV_START_RUN, R2, &BOB, "bob");              /* 4 the first start decides */
    size_t e5 = add(&b, EV_START_RUN, R2, &EVE, "eve");  /* 5 refused */
    add(&b, EV_METRIC, R3, &EVE, "eve");                 /* 6 unknown run: left alone */
    add(&b, EV_PARAM, R4, &CAROL, "carol");              /* 7 ok: user_id */
    size_t e8 = add(&b, EV_PARAM, R4, &ALICE, "alice");  /* 8 refused */
    add(&b, EV_ARTIFACT_DONE, R1, NULL, NULL);           /* 9 the agent's own */
    add(&b, EV_EXPERIMENT, R1, &EVE, "eve");             /* 10 not owned */
    size_t e11 = add(&b, EV_ARTIFACT, R1, &EVE, "eve");  /* 11 refused */
    (void)e3;

    struct proto_buf ids;
    proto_buf_init(&ids, SIZE_MAX / 4);
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 4);
    assert_string_equal((const char *)ids.data, "{\"" R1 "\",\"" R2 "\",\"" R3 "\",\"" R4 "\"}");
    /* What the lookup returns: R2 and R3 do not exist. */
    assert_int_equal(owners_learn(&o, R1, 1001, "{500}", "alice", true), 0);
    assert_int_equal(owners_learn(&o, R4, -1, NULL, "carol", true), 0);
    struct refusals r = {0};
    assert_int_equal(owners_check(&o, &b, 0, b.n, on_refused, &r), 4);
    assert_int_equal(r.n, 4);
    assert_int_equal(r.idx[0], e1);
    assert_int_equal(r.idx[1], e5);
    assert_int_equal(r.idx[2], e8);
    assert_int_equal(r.idx[3], e11);
    assert_non_null(strstr(r.msg[1], "was started by uid 1002; uid 1003 (eve)"));

    /* Known owners come from the cache: only the runs not found are asked again. */
    ids.len = 0;
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 2);
    assert_string_equal((const char *)ids.data, "{\"" R2 "\",\"" R3 "\"}");
    /* A sub-range sees only its own runs. */
    ids.len = 0;
    assert_int_equal(owners_plan(&o, &b, 0, 3, &ids), 0);
    assert_string_equal((const char *)ids.data, "{}");
    r.n = 0;
    assert_int_equal(owners_check(&o, &b, 0, 3, on_refused, &r), 1);

    /* Rejected events are not looked at again. */
    b.evs[e1].flags |= EV_REJECTED;
    r.n = 0;
    assert_int_equal(owners_check(&o, &b, 0, 3, on_refused, &r), 0);
    /* Learned without keeping (no owners table): the next plan asks again. */
    ids.len = 0;
    assert_int_equal(owners_learn(&o, R3, -1, NULL, "eve", false), 0);
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 2);
    /* A new connection forgets everything. */
    owners_clear(&o);
    ids.len = 0;
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 4);

    proto_buf_free(&ids);
    batch_free(&b);
    owners_free(&o);
}

/* A row that cannot be read lets nobody in; the cache survives filling up. */
static void test_bad_rows_and_a_full_cache(void **state)
{
    (void)state;
    struct owners o;
    assert_int_equal(owners_init(&o, false), 0);
    struct batch b;
    batch_init(&b);
    add(&b, EV_METRIC, R1, &ALICE, "alice");
    struct proto_buf ids;
    proto_buf_init(&ids, SIZE_MAX / 4);
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 1);
    assert_int_equal(owners_learn(&o, R1, 1001, "{500,x}", "alice", true), -EINVAL);
    struct refusals r = {0};
    assert_int_equal(owners_check(&o, &b, 0, b.n, on_refused, &r), 1);
    ids.len = 0;
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 1); /* not cached */

    /* Far more runs than the cache holds: it starts over, and answers stay right. */
    for (int i = 0; i < 3 * OWNERS_CACHE_MAX; i++) {
        char run[PROTO_RUN_ID_LEN + 1];
        snprintf(run, sizeof run, "%032x", i);
        assert_int_equal(owners_learn(&o, run, i, "{}", "", true), 0);
    }
    assert_true(o.used <= OWNERS_CACHE_MAX);
    assert_int_equal(owners_learn(&o, R1, 1002, "{}", "", true), 0);
    ids.len = 0;
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 0);
    r.n = 0;
    assert_int_equal(owners_check(&o, &b, 0, b.n, on_refused, &r), 1); /* alice is not 1002 */
    proto_buf_free(&ids);
    batch_free(&b);
    owners_free(&o);
}

/* A range with nothing to check (the agent's own ledger updates) asks nothing and refuses
 * nothing, before the set ever held a run. */
static void test_nothing_to_check(void **state)
{
    (void)state;
    struct owners o;
    assert_int_equal(owners_init(&o, false), 0);
    struct batch b;
    batch_init(&b);
    add(&b, EV_ARTIFACT_DONE, R1, NULL, NULL);
    struct proto_buf ids;
    proto_buf_init(&ids, SIZE_MAX / 4);
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 0);
    assert_string_equal((const char *)ids.data, "{}");
    struct refusals r = {0};
    assert_int_equal(owners_check(&o, &b, 0, b.n, on_refused, &r), 0);
    proto_buf_free(&ids);
    batch_free(&b);
    owners_free(&o);
}

/* A start replayed from a journal that kept no peers makes a new run its user's: a peer
 * with that user name may write it, another may not. */
static void test_start_without_a_peer(void **state)
{
    (void)state;
    struct owners o;
    assert_int_equal(owners_init(&o, false), 0);
    struct batch b;
    batch_init(&b);
    struct sref user;
    assert_int_equal(batch_str(&b, "alice", 5, &user), 0);
    size_t start = add(&b, EV_START_RUN, R1, NULL, NULL);
    b.evs[start].run.user = user;
    add(&b, EV_METRIC, R1, &ALICE, "alice");
    size_t eve = add(&b, EV_METRIC, R1, &EVE, "eve");
    struct proto_buf ids;
    proto_buf_init(&ids, SIZE_MAX / 4);
    assert_int_equal(owners_plan(&o, &b, 0, b.n, &ids), 1); /* not in the database yet */
    struct refusals r = {0};
    assert_int_equal(owners_check(&o, &b, 0, b.n, on_refused, &r), 1);
    assert_int_equal(r.idx[0], eve);
    proto_buf_free(&ids);
    batch_free(&b);
    owners_free(&o);
}

/* Peers are interned per batch: the same identity and name once, a new name is a new entry. */
static void test_batch_peers(void **state)
{
    (void)state;
    struct batch b;
    batch_init(&b);
    assert_int_equal(batch_peer(&b, &ALICE, "alice"), 1);
    assert_int_equal(batch_peer(&b, &BOB, "bob"), 2);
    assert_int_equal(batch_peer(&b, &ALICE, "alice"), 1);
    assert_int_equal(batch_peer(&b, &ALICE, "alice2"), 3);
    struct peer alice_more = ALICE;
    alice_more.shared[alice_more.nshared++] = 900;
    assert_int_equal(batch_peer(&b, &alice_more, "alice"), 4);
    assert_int_equal(b.npeers, 4);
    batch_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule),
        cmocka_unit_test(test_nothing_to_check),
        cmocka_unit_test(test_plan_learn_check),
        cmocka_unit_test(test_bad_rows_and_a_full_cache),
        cmocka_unit_test(test_start_without_a_peer),
        cmocka_unit_test(test_batch_peers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
