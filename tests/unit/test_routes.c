/*
 * Unit tests for agent/routes.c: runs fall evenly over the writer connections whatever their
 * ids, keep their connection while in use, and are dropped only when finished and idle.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <stdio.h>
#include <string.h>

#include "routes.h"

/* A run id of PROTO_RUN_ID_LEN hex digits made from n. */
static const char *run(unsigned n)
{
    static char id[PROTO_RUN_ID_LEN + 1];
    snprintf(id, sizeof id, "%032x", n);
    return id;
}

/* Routes run n (as if its message got serials up to next - 1) and returns its part. */
static unsigned take(struct routes *r, unsigned n, const size_t *pending, uint64_t next)
{
    struct route *e = routes_get(r, run(n), pending);
    assert_non_null(e);
    e->mark = next;
    return e->part;
}

/* Eight runs over two parts fall 4/4 whatever their ids (a hash of these fell 6/2). */
static void test_runs_fall_evenly(void **state)
{
    (void)state;
    struct routes r;
    assert_int_equal(routes_init(&r, 2), 0);
    unsigned per[2] = {0, 0};
    for (unsigned n = 0; n < 8; n++)
        per[take(&r, n * 7919, NULL, n + 2)]++;
    assert_int_equal(per[0], 4);
    assert_int_equal(per[1], 4);
    assert_int_equal(r.runs[0], 4);
    assert_int_equal(routes_busiest(&r), 4);
    routes_free(&r);

    assert_int_equal(routes_init(&r, 3), 0);
    unsigned per3[3] = {0, 0, 0};
    for (unsigned n = 0; n < 8; n++)
        per3[take(&r, n, NULL, n + 2)]++;
    assert_int_equal(per3[0], 3);
    assert_int_equal(per3[1], 3);
    assert_int_equal(per3[2], 2);
    routes_free(&r);
}

/* Ties go to the part with fewer pending events; a routed run keeps its part. */
static void test_ties_and_sticky(void **state)
{
    (void)state;
    struct routes r;
    assert_int_equal(routes_init(&r, 2), 0);
    size_t pending[2] = {500, 10};
    assert_int_equal(take(&r, 1, pending, 2), 1);
    pending[0] = 0;
    pending[1] = 0;
    assert_int_equal(take(&r, 2, pending, 3), 0);
    /* Run 1 stays on part 1 even though part 0 is now emptier. */
    pending[1] = 1000;
    for (unsigned i = 0; i < 5; i++)
        assert_int_equal(take(&r, 1, pending, 10 + i), 1);
    assert_int_equal(r.used, 2);
    assert_int_equal(r.runs[0], 1);
    assert_int_equal(r.runs[1], 1);
    routes_free(&r);
}

/* A route goes only when every event of its run is finished on its part and the run sent
 * nothing since the sweep before; then the run may come back on the other part. */
static void test_sweep_drops_only_finished_idle_runs(void **state)
{
    (void)state;
    struct routes r;
    assert_int_equal(routes_init(&r, 2), 0);
    assert_int_equal(take(&r, 1, NULL, 11), 0); /* serials 1..10 */
    assert_int_equal(take(&r, 2, NULL, 21), 1); /* serials 11..20 */
    uint64_t first[2] = {21, 21};               /* everything finished */
    /* Both sent something since the last sweep (at serial 0): kept. */
    assert_int_equal(routes_sweep(&r, first, 21), 0);
    assert_int_equal(r.used, 2);
    /* Run 2 sends more (serial 21), still pending on part 1; run 1 is idle and finished. */
    assert_int_equal(take(&r, 2, NULL, 22), 1);
    first[1] = 21;
    first[0] = 22;
    assert_int_equal(routes_sweep(&r, first, 22), 1);
    assert_int_equal(r.used, 1);
    assert_int_equal(r.runs[0], 0);
    assert_int_equal(r.runs[1], 1);
    /* Run 2 is finished now and sent nothing since that sweep: dropped. */
    first[1] = 22;
    assert_int_equal(routes_sweep(&r, first, 22), 1);
    assert_int_equal(r.used, 0);
    /* Run 3 (serial 22) is kept while it sent something since the last sweep... */
    assert_int_equal(take(&r, 3, NULL, 23), 0);
    first[0] = 22;
    assert_int_equal(routes_sweep(&r, first, 23), 0);
    /* ... and while its event is pending on its part, however idle. */
    assert_int_equal(routes_sweep(&r, first, 23), 0);
    first[0] = 23;
    assert_int_equal(routes_sweep(&r, first, 23), 1);
    assert_int_equal(r.used, 0);
    assert_int_equal(r.runs[0] + r.runs[1], 0);
    /* Run 1 comes back: a new route, on the emptier part. */
    assert_int_equal(take(&r, 4, NULL, 24), 0);
    assert_int_equal(take(&r, 1, NULL, 25), 1);
    routes_free(&r);
}

/* Many runs: the table grows, every run is found again on its part, and a sweep shrinks it. */
static void test_grows_and_shrinks(void **state)
{
    (void)state;
    struct routes r;
    assert_int_equal(routes_init(&r, 4), 0);
    unsigned part[20000];
    for (unsigned n = 0; n < 20000; n++)
        part[n] = take(&r, n, NULL, n + 2);
    assert_int_equal(r.used, 20000);
    assert_true(r.cap >= 40000);
    for (unsigned p = 0; p < 4; p++)
        assert_int_equal(r.runs[p], 5000);
    for (unsigned n = 0; n < 20000; n++)
        assert_int_equal(take(&r, n, NULL, 20002), part[n]);
    assert_int_equal(r.used, 20000);
    uint64_t first[4] = {20002, 20002, 20002, 20002};
    assert_int_equal(routes_sweep(&r, first, 20002), 0);
    assert_int_equal(routes_sweep(&r, first, 20002), 20000);
    assert_int_equal(r.used, 0);
    assert_int_equal(r.cap, 64);
    routes_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_runs_fall_evenly),
        cmocka_unit_test(test_ties_and_sticky),
        cmocka_unit_test(test_sweep_drops_only_finished_idle_runs),
        cmocka_unit_test(test_grows_and_shrinks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
