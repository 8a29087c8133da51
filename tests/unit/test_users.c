/*
 * Unit tests for agent/users.c: user names of uids looked up on the threadpool, one lookup per
 * uid however many connections wait for it, answers cached, a cancelled waiter never called.
 * Real NSS: uid 0 is root on every machine these tests run on; uid 64999 has no entry.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <stdio.h>
#include <string.h>

#include "stats.h"
#include "users.h"

#define NOBODY_KNOWS 64999

struct waiter {
    struct users_wait w;
    char got[USERS_NAME_MAX];
    int calls;
};

static void answered(struct users_wait *w, const char *name)
{
    struct waiter *x = (struct waiter *)w;
    snprintf(x->got, sizeof x->got, "%s", name);
    x->calls++;
}

static void wait_for(struct waiter *x, uid_t uid)
{
    memset(x, 0, sizeof *x);
    x->w.uid = uid;
    x->w.cb = answered;
}

static void test_one_lookup_for_many_waiters(void **state)
{
    (void)state;
    uv_loop_t loop;
    struct users u;
    struct waiter a, b, c, gone;
    uv_loop_init(&loop);
    assert_int_equal(users_init(&u, &loop), 0);
    memset(&stats, 0, sizeof stats);

    assert_null(users_find(&u, 0));
    wait_for(&a, 0);
    wait_for(&b, NOBODY_KNOWS);
    wait_for(&c, 0);
    wait_for(&gone, NOBODY_KNOWS);
    users_resolve(&u, &a.w);
    users_resolve(&u, &b.w);
    users_resolve(&u, &c.w);
    users_resolve(&u, &gone.w);
    assert_int_equal(a.calls + b.calls + c.calls, 0); /* never from inside users_resolve */
    users_cancel(&u, &gone.w);
    uv_run(&loop, UV_RUN_DEFAULT);

    assert_int_equal(a.calls, 1);
    assert_int_equal(c.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(gone.calls, 0);
    assert_string_equal(a.got, "root");
    assert_string_equal(c.got, "root");
    assert_string_equal(b.got, "64999"); /* no passwd entry: the number */
    assert_int_equal(stats.user_lookups, 2);
    assert_int_equal(stats.user_lookup_waits, 4);

    /* Cached now: no lookup, and a waiter for a cached uid is answered at once. */
    assert_string_equal(users_find(&u, 0), "root");
    assert_string_equal(users_find(&u, NOBODY_KNOWS), "64999");
    wait_for(&a, 0);
    users_resolve(&u, &a.w);
    assert_int_equal(a.calls, 1);
    assert_int_equal(stats.user_lookups, 2);

    users_close(&u);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    users_free(&u);
}

/* The table never holds more than USERS_CACHE_MAX uids: the oldest answer goes. */
static void test_cache_is_bounded(void **state)
{
    (void)state;
    uv_loop_t loop;
    struct users u;
    uv_loop_init(&loop);
    assert_int_equal(users_init(&u, &loop), 0);
    memset(&stats, 0, sizeof stats);
    for (uid_t uid = 100000; uid < 100000 + USERS_CACHE_MAX + 1; uid++) {
        struct waiter x;
        wait_for(&x, uid);
        users_resolve(&u, &x.w);
        uv_run(&loop, UV_RUN_DEFAULT);
        assert_int_equal(x.calls, 1);
        uv_update_time(&loop);
    }
    assert_int_equal(stats.user_lookups, USERS_CACHE_MAX + 1);
    assert_non_null(users_find(&u, 100000 + USERS_CACHE_MAX));
    size_t held = 0;
    for (uid_t uid = 100000; uid < 100000 + USERS_CACHE_MAX + 1; uid++)
        held += users_find(&u, uid) != NULL;
    assert_int_equal(held, USERS_CACHE_MAX);
    users_close(&u);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    users_free(&u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_lookup_for_many_waiters),
        cmocka_unit_test(test_cache_is_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
