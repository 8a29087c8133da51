/*
 * trackd-loadgen: one training process of a bench workload, logging through
 * libtrackd, timing every logging call. Prints one JSON object on stdout.
 *
 *   trackd-loadgen w1 [--keys 50] [--steps 20000] [--rate POINTS_PER_S] [options]
 *       one run, KEYS x STEPS metric points (key m<k>, step s)
 *   trackd-loadgen w2 [--runs 2000] [--params 20] [--tags 10] [--keys 5] [--steps 100] [options]
 *       RUNS runs, each with its params (one call), tags (one call) and metric points
 *   trackd-loadgen artifact PATH
 *       one run, one trackd_log_artifact of PATH
 * Options: --socket PATH, --experiment NAME, --name RUN_NAME, --block (wait for buffer space
 * instead of dropping), --buffer BYTES.
 *
 * With --rate, steps are paced so the process logs RATE points per second and the time each
 * step's first point was logged is printed ("probe": [[step, monotonic seconds], ...]), so the
 * caller can measure how long a point takes to become visible in PostgreSQL.
 *
 * Latencies go into a log-linear histogram: exact below 128 ns, then 64 buckets per power of
 * two (1.6% resolution). Buckets are printed sparse, as [index, count] pairs; bench/run.py
 * merges them across processes. "timer_ns" is the median cost of the clock pair itself,
 * which every recorded latency includes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trackd.h"

#define NBUCKETS (128 + 64 * 57)

static uint64_t hist[NBUCKETS];
static uint64_t hist_first[NBUCKETS]; /* paced: the first call after each sleep */
static uint64_t *cur = hist;

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void record(uint64_t ns)
{
    size_t i;
    if (ns < 128) {
        i = (size_t)ns;
    } else {
        int e = 63 - __builtin_clzll(ns); /* >= 7 */
        i = 128 + (size_t)(e - 7) * 64 + (size_t)((ns >> (e - 6)) & 63);
    }
    cur[i < NBUCKETS ? i : NBUCKETS - 1]++;
}

/* Times one logging call; counts a non-zero return as dropped. */
#define TIMED(dropped, call)                                                                       \
    do {                                                                                           \
        uint64_t a_ = now_ns();                                                                    \
        int rc_ = (call);                                                                          \
        record(now_ns() - a_);                                                                     \
        if (rc_ != 0)                                                                              \
            (dropped)++;                                                                           \
    } while (0)

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t timer_cost(void)
{
    enum { N = 10001 };
    static uint64_t d[N];
    for (int i = 0; i < N; i++) {
        uint64_t a = now_ns();
        d[i] = now_ns() - a;
    }
    qsort(d, N, sizeof d[0], cmp_u64);
    return d[N / 2];
}

static void sleep_until(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void usage(FILE *f)
{
    fputs("usage: trackd-loadgen w1|w2|artifact [PATH] [--keys N] [--steps N] [--runs N]\n"
          "         [--params N] [--tags N] [--rate POINTS_PER_S] [--socket PATH]\n"
          "         [--experiment NAME] [--name RUN_NAME] [--run-id ID] [--block]\n"
          "         [--buffer BYTES]\n"
          "  --run-id ID: the run's id (w1 and artifact log one run), instead of a new one\n",
          f);
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *mode = argv[1], *socket = NULL, *experiment = "bench", *name = "loadgen";
    const char *path = NULL, *given_id = NULL;
    long keys = -1, steps = -1, runs = 2000, nparams = 20, ntags = 10;
    double rate = 0;
    struct trackd_options o = {0};
    int i = 2;
    if (strcmp(mode, "artifact") == 0 && argc > 2)
        path = argv[i++];
    for (; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--block") == 0) {
            o.overflow = TRACKD_BLOCK;
            o.block_timeout_ms = 3600 * 1000;
            continue;
        }
        if (v == NULL) {
            usage(stderr);
            return 2;
        }
        i++;
        if (strcmp(a, "--keys") == 0)
            keys = atol(v);
        else if (strcmp(a, "--steps") == 0)
            steps = atol(v);
        else if (strcmp(a, "--runs") == 0)
            runs = atol(v);
        else if (strcmp(a, "--params") == 0)
            nparams = atol(v);
        else if (strcmp(a, "--tags") == 0)
            ntags = atol(v);
        else if (strcmp(a, "--rate") == 0)
            rate = atof(v);
        else if (strcmp(a, "--socket") == 0)
            socket = v;
        else if (strcmp(a, "--experiment") == 0)
            experiment = v;
        else if (strcmp(a, "--name") == 0)
            name = v;
        else if (strcmp(a, "--run-id") == 0)
            given_id = v;
        else if (strcmp(a, "--buffer") == 0)
            o.buffer_bytes = (size_t)atoll(v);
        else {
            usage(stderr);
            return 2;
        }
    }
    bool w1 = strcmp(mode, "w1") == 0, w2 = strcmp(mode, "w2") == 0;
    if (!w1 && !w2 && !(strcmp(mode, "artifact") == 0 && path)) {
        usage(stderr);
        return 2;
    }
    if (keys < 0)
        keys = w1 ? 50 : 5;
    if (steps < 0)
        steps = w1 ? 20000 : 100;
    if (!w2)
        runs = 1;
    if (given_id && (w2 || strlen(given_id) >= TRACKD_RUN_ID_SIZE)) {
        fputs("trackd-loadgen: --run-id takes an id of at most 32 characters, not in w2\n", stderr);
        return 2;
    }
    if (keys < 1 || keys > 1000 || steps < 1 || runs < 1 || nparams < 0 || ntags < 0 ||
        nparams > 1000 || ntags > 1000) {
        fputs("trackd-loadgen: counts out of range\n", stderr);
        return 2;
    }

    o.socket_path = socket;
    trackd_client *c;
    int rc = trackd_open(&c, &o);
    if (rc != 0) {
        fprintf(stderr, "trackd-loadgen: trackd_open: %s\n", trackd_strerror(rc));
        return 1;
    }
    char(*kname)[24] = calloc((size_t)keys, sizeof *kname);
    char(*pk)[24] = calloc((size_t)nparams + 1, sizeof *pk);
    char(*pv)[24] = calloc((size_t)nparams + 1, sizeof *pv);
    char(*tk)[24] = calloc((size_t)ntags + 1, sizeof *tk);
    struct trackd_kv *params = calloc((size_t)nparams + 1, sizeof *params);
    struct trackd_kv *tags = calloc((size_t)ntags + 1, sizeof *tags);
    double *probe = rate > 0 ? calloc((size_t)steps, sizeof *probe) : NULL;
    if (!kname || !pk || !pv || !tk || !params || !tags || (rate > 0 && !probe)) {
        fputs("trackd-loadgen: out of memory\n", stderr);
        return 1;
    }
    for (long k = 0; k < keys; k++)
        snprintf(kname[k], sizeof kname[k], "m%ld", k);
    for (long k = 0; k < nparams; k++) {
        snprintf(pk[k], sizeof pk[k], "p%ld", k);
        params[k] = (struct trackd_kv){pk[k], pv[k]};
    }
    for (long k = 0; k < ntags; k++) {
        snprintf(tk[k], sizeof tk[k], "t%ld", k);
        tags[k] = (struct trackd_kv){tk[k], "value"};
    }

    uint64_t timer = timer_cost();
    uint64_t dropped = 0, events = 0, points = 0;
    char run_id[TRACKD_RUN_ID_SIZE] = "";
    uint64_t t0 = now_ns();
    const int64_t ts0 = 1700000000000;
    for (long r = 0; r < runs; r++) {
        char rname[96];
        snprintf(rname, sizeof rname, runs > 1 ? "%s-%ld" : "%s", name, r);
        if (given_id)
            snprintf(run_id, sizeof run_id, "%s", given_id);
        else
            trackd_new_run_id(run_id);
        TIMED(dropped, trackd_start_run(c, run_id, experiment, rname, TRACKD_NOW, NULL, 0));
        events++;
        if (path) {
            TIMED(dropped, trackd_log_artifact(c, run_id, path, ""));
            events++;
            continue;
        }
        if (nparams > 0 && w2) {
            for (long k = 0; k < nparams; k++)
                snprintf(pv[k], sizeof pv[k], "%ld", r * 1000 + k);
            TIMED(dropped, trackd_log_params(c, run_id, params, (size_t)nparams));
            events += (uint64_t)nparams;
        }
        if (ntags > 0 && w2) {
            TIMED(dropped, trackd_set_tags(c, run_id, tags, (size_t)ntags));
            events += (uint64_t)ntags;
        }
        uint64_t step_ns = rate > 0 ? (uint64_t)(1e9 * (double)keys / rate) : 0;
        for (long s = 0; s < steps; s++) {
            if (rate > 0) {
                sleep_until(t0 + (uint64_t)s * step_ns);
                probe[s] = (double)now_ns() / 1e9;
            }
            for (long k = 0; k < keys; k++) {
                cur = rate > 0 && k == 0 ? hist_first : hist;
                TIMED(dropped, trackd_log_metric(c, run_id, kname[k], (double)(s * keys + k) * 0.5,
                                                 s, ts0 + s));
            }
            cur = hist;
        }
        points += (uint64_t)(keys * steps);
        events += (uint64_t)(keys * steps);
        if (w2) {
            TIMED(dropped, trackd_end_run(c, run_id, "FINISHED", TRACKD_NOW));
            events++;
        }
    }
    uint64_t t_logged = now_ns();
    int frc = trackd_flush(c, 3600 * 1000);
    uint64_t t_durable = now_ns();
    struct trackd_counters k;
    trackd_get_counters(c, &k);

    printf("{\"mode\": \"%s\", \"run_id\": \"%s\", \"points\": %" PRIu64 ", \"events\": %" PRIu64
           ", \"dropped\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"flush\": %d"
           ", \"t0\": %.6f, \"t_logged\": %.6f, \"t_durable\": %.6f, \"timer_ns\": %" PRIu64
           ", \"hist\": [",
           mode, run_id, points, events, dropped, k.errors, frc, (double)t0 / 1e9,
           (double)t_logged / 1e9, (double)t_durable / 1e9, timer);
    const char *sep = "";
    for (size_t b = 0; b < NBUCKETS; b++)
        if (hist[b]) {
            printf("%s[%zu, %" PRIu64 "]", sep, b, hist[b]);
            sep = ", ";
        }
    printf("], \"hist_first\": [");
    sep = "";
    for (size_t b = 0; b < NBUCKETS; b++)
        if (hist_first[b]) {
            printf("%s[%zu, %" PRIu64 "]", sep, b, hist_first[b]);
            sep = ", ";
        }
    printf("], \"probe\": [");
    for (long s = 0; probe && s < steps; s++)
        printf("%s[%ld, %.6f]", s ? ", " : "", s, probe[s]);
    printf("]}\n");
    trackd_close(c, 1000);
    free(kname);
    free(pk);
    free(pv);
    free(tk);
    free(params);
    free(tags);
    free(probe);
    return frc == 0 && dropped == 0 ? 0 : 1;
}
