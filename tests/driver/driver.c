/*
 * trackd-driver: replays a script of logging calls through libtrackd, so
 * integration tests and benchmarks drive the real shim with exact inputs.
 * One call per line, fields separated by tabs, \t \n \\ escapes in fields:
 *   experiment NAME
 *   run ALIAS EXPERIMENT NAME|"" START|now [KEY VALUE]...   (prints "run ALIAS ID")
 *   runid ALIAS ID EXPERIMENT NAME|"" START|now [KEY VALUE]...   (start_run with a given id)
 *   metric ALIAS KEY VALUE STEP TS|now      (VALUE may be nan, inf, -inf)
 *   param ALIAS KEY VALUE        tag ALIAS KEY VALUE
 *   end ALIAS STATUS TS|now
 *   experiment NAME LOCATION     (with an artifact location)
 *   deltag ALIAS KEY
 *   artifact ALIAS LOCAL_PATH ARTIFACT_DIR|""  (prints "artifact RC"; also for a directory)
 *   update ALIAS STATUS|- END|now|- NAME|-   ("-" keeps the stored value)
 *   backend_uri                  (prints "backend_uri RC URI")
 *   gen ALIAS NKEYS NSTEPS TS0   (NKEYS x NSTEPS points; prints the time taken)
 *   flush TIMEOUT_MS             (prints "flush RC")
 *   errors                       (prints "error SEQ CODE MESSAGE" per error)
 *   counters                     (prints "counters queued=.. sent=.. dropped=.. errors=..")
 * Usage: trackd-driver [--socket PATH] [--source-name NAME] [--buffer BYTES] [SCRIPT]
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trackd.h"

#define MAX_FIELDS 256
#define MAX_RUNS 256

static struct {
    char alias[64];
    char id[TRACKD_RUN_ID_SIZE];
} runs[MAX_RUNS];
static int nruns;

static void unescape(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r == '\\' && r[1]) {
            r++;
            *w++ = *r == 't' ? '\t' : *r == 'n' ? '\n' : *r;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

static const char *run_of(const char *alias)
{
    for (int i = 0; i < nruns; i++)
        if (strcmp(runs[i].alias, alias) == 0)
            return runs[i].id;
    /* Unknown aliases that look like run ids are used as they are (tests of unknown runs). */
    return alias;
}

static int64_t ts_of(const char *s)
{
    return strcmp(s, "now") == 0 ? TRACKD_NOW : strtoll(s, NULL, 10);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int check(int rc, int lineno, const char *what)
{
    if (rc != 0)
        printf("fail\t%d\t%s\t%s\n", lineno, what, trackd_strerror(rc));
    return rc;
}

int main(int argc, char **argv)
{
    struct trackd_options opts = {0};
    const char *script = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc)
            opts.socket_path = argv[++i];
        else if (strcmp(argv[i], "--source-name") == 0 && i + 1 < argc)
            opts.source_name = argv[++i];
        else if (strcmp(argv[i], "--buffer") == 0 && i + 1 < argc)
            opts.buffer_bytes = strtoull(argv[++i], NULL, 10);
        else
            script = argv[i];
    }
    FILE *in = script ? fopen(script, "r") : stdin;
    if (in == NULL) {
        fprintf(stderr, "cannot open %s: %s\n", script, strerror(errno));
        return 2;
    }
    trackd_client *c;
    if (trackd_open(&c, &opts) != 0)
        return 2;
    char *line = NULL;
    size_t cap = 0;
    int lineno = 0, failures = 0;
    while (getline(&line, &cap, in) > 0) {
        lineno++;
        line[strcspn(line, "\n")] = '\0';
        char *f[MAX_FIELDS];
        int n = 0;
        for (char *p = line, *tab; n < MAX_FIELDS; p = tab + 1) {
            f[n++] = p;
            if ((tab = strchr(p, '\t')) == NULL)
                break;
            *tab = '\0';
        }
        for (int i = 0; i < n; i++)
            unescape(f[i]);
        const char *cmd = f[0];
        if (cmd[0] == '\0' || cmd[0] == '#')
            continue;
        if (strcmp(cmd, "experiment") == 0 && n >= 3) {
            failures += check(trackd_create_experiment_at(c, f[1], f[2]), lineno, cmd) != 0;
        } else if (strcmp(cmd, "experiment") == 0 && n >= 2) {
            failures += check(trackd_create_experiment(c, f[1]), lineno, cmd) != 0;
        } else if (strcmp(cmd, "deltag") == 0 && n >= 3) {
            failures += check(trackd_delete_tag(c, run_of(f[1]), f[2]), lineno, cmd) != 0;
        } else if (strcmp(cmd, "artifact") == 0 && n >= 4) {
            int rc = trackd_log_artifact(c, run_of(f[1]), f[2], f[3]);
            if (rc == -EISDIR)
                rc = trackd_log_artifacts(c, run_of(f[1]), f[2], f[3]);
            printf("artifact\t%d\n", rc);
            fflush(stdout);
        } else if (strcmp(cmd, "update") == 0 && n >= 5) {
            bool keep_status = strcmp(f[2], "-") == 0, keep_end = strcmp(f[3], "-") == 0;
            bool keep_name = strcmp(f[4], "-") == 0;
            failures += check(trackd_update_run(c, run_of(f[1]), keep_status ? NULL : f[2],
                                                keep_end ? TRACKD_KEEP : ts_of(f[3]),
                                                keep_name ? NULL : f[4]),
                              lineno, cmd) != 0;
        } else if (strcmp(cmd, "backend_uri") == 0) {
            char uri[1024] = "";
            int rc = trackd_backend_uri(c, uri, sizeof uri, 10000);
            printf("backend_uri\t%d\t%s\n", rc, uri);
        } else if ((strcmp(cmd, "run") == 0 && n >= 5 && nruns < MAX_RUNS) ||
                   (strcmp(cmd, "runid") == 0 && n >= 6 && nruns < MAX_RUNS)) {
            /* runid: a client that names a run someone else started (tests of owners). */
            int given = strcmp(cmd, "runid") == 0;
            char **g = f + given; /* g[2..4]: experiment, name, start; tags from g[5] */
            snprintf(runs[nruns].alias, sizeof runs[nruns].alias, "%s", f[1]);
            if (given)
                snprintf(runs[nruns].id, sizeof runs[nruns].id, "%s", f[2]);
            else
                trackd_new_run_id(runs[nruns].id);
            struct trackd_kv tags[MAX_FIELDS / 2];
            size_t nt = 0;
            for (int i = 5; i + given + 1 < n; i += 2)
                tags[nt++] = (struct trackd_kv){g[i], g[i + 1]};
            failures += check(trackd_start_run(c, runs[nruns].id, g[2], g[3][0] ? g[3] : NULL,
                                               ts_of(g[4]), tags, nt),
                              lineno, cmd) != 0;
            printf("run\t%s\t%s\n", f[1], runs[nruns].id);
            nruns++;
        } else if (strcmp(cmd, "metric") == 0 && n >= 6) {
            failures += check(trackd_log_metric(c, run_of(f[1]), f[2], strtod(f[3], NULL),
                                                strtoll(f[4], NULL, 10), ts_of(f[5])),
                              lineno, cmd) != 0;
        } else if (strcmp(cmd, "param") == 0 && n >= 4) {
            failures += check(trackd_log_param(c, run_of(f[1]), f[2], f[3]), lineno, cmd) != 0;
        } else if (strcmp(cmd, "tag") == 0 && n >= 4) {
            failures += check(trackd_set_tag(c, run_of(f[1]), f[2], f[3]), lineno, cmd) != 0;
        } else if (strcmp(cmd, "end") == 0 && n >= 4) {
            failures += check(trackd_end_run(c, run_of(f[1]), f[2], ts_of(f[3])), lineno, cmd) != 0;
        } else if (strcmp(cmd, "gen") == 0 && n >= 5) {
            const char *run = run_of(f[1]);
            long nkeys = strtol(f[2], NULL, 10), nsteps = strtol(f[3], NULL, 10);
            int64_t ts0 = strtoll(f[4], NULL, 10);
            char(*keys)[24] = calloc((size_t)nkeys, sizeof *keys);
            for (long k = 0; k < nkeys; k++)
                snprintf(keys[k], sizeof keys[k], "m%ld", k);
            uint64_t dropped = 0;
            double t0 = now_s();
            for (long s = 0; s < nsteps; s++)
                for (long k = 0; k < nkeys; k++)
                    if (trackd_log_metric(c, run, keys[k], (double)(s * nkeys + k) * 0.5, s,
                                          ts0 + s) != 0)
                        dropped++;
            double t1 = now_s();
            int rc = trackd_flush(c, 600000);
            double t2 = now_s();
            printf("gen\t%ld\tlog_s=%.6f\tdurable_s=%.6f\tdropped=%llu\tflush=%d\n", nkeys * nsteps,
                   t1 - t0, t2 - t0, (unsigned long long)dropped, rc);
            free(keys);
        } else if (strcmp(cmd, "flush") == 0 && n >= 2) {
            printf("flush\t%d\n", trackd_flush(c, atoi(f[1])));
        } else if (strcmp(cmd, "errors") == 0) {
            struct trackd_error e;
            while (trackd_next_error(c, &e))
                printf("error\t%llu\t%u\t%s\n", (unsigned long long)e.seq, e.code, e.message);
        } else if (strcmp(cmd, "counters") == 0) {
            struct trackd_counters k;
            trackd_get_counters(c, &k);
            printf("counters\tqueued=%llu\tsent=%llu\tdropped=%llu\tlost=%llu\terrors=%llu\n",
                   (unsigned long long)k.queued, (unsigned long long)k.sent,
                   (unsigned long long)k.dropped, (unsigned long long)k.lost,
                   (unsigned long long)k.errors);
        } else {
            printf("fail\t%d\tunknown or short command\t%s\n", lineno, cmd);
            failures++;
        }
        fflush(stdout);
    }
    free(line);
    if (in != stdin)
        fclose(in);
    trackd_close(c, 10000);
    return failures ? 1 : 0;
}
