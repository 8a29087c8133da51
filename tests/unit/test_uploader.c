/*
 * Unit tests for agent/uploader.c (with spool.c and transports.c) on a real libuv loop and real
 * files: path rules, the spool copy and its SHA-256, an artifact's states from snapshot to
 * forget, uploads to local paths and file:// URIs, destinations the operator does not allow,
 * recovery of a spooled artifact after a "restart", and the messages for stores that cannot be
 * used. The rest of the agent (ingest, the client, the dead-letter file) is the callbacks.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>

#include "config.h"
#include "s3.h"
#include "spool.h"
#include "stats.h"
#include "uploader.h"

/* What the uploader asked of the agent. */
struct seen {
    int snapshots, ledgers, records, failures, holds, unholds;
    int rc;
    char msg[512];
    char status[16];
    char failed[700];
    bool told;
    const struct artifact *last;
    uint64_t next_serial;
};

static uint64_t on_ledger(void *ctx, const struct artifact *a)
{
    struct seen *s = ctx;
    (void)a;
    s->ledgers++;
    return ++s->next_serial;
}

static int on_record(void *ctx, const struct artifact *a, const char *status, const char *error)
{
    struct seen *s = ctx;
    s->records++;
    s->last = a;
    snprintf(s->status, sizeof s->status, "%s", status);
    snprintf(s->msg, sizeof s->msg, "%s", error ? error : "");
    return 0;
}

static void on_hold(void *ctx, uint32_t conn_id, uint64_t serial, bool hold)
{
    struct seen *s = ctx;
    (void)conn_id;
    assert_true(serial > 0);
    if (hold)
        s->holds++;
    else
        s->unholds++;
}

static void on_taken(void *ctx, const struct artifact *a, int rc, const char *msg)
{
    struct seen *s = ctx;
    s->snapshots++;
    s->rc = rc;
    s->last = rc == 0 ? a : NULL;
    snprintf(s->msg, sizeof s->msg, "%s", msg);
}

static void on_failed(void *ctx, const struct artifact *a, const char *msg, bool tell)
{
    struct seen *s = ctx;
    (void)a;
    s->failures++;
    s->told = tell;
    snprintf(s->failed, sizeof s->failed, "%s", msg);
}

static const struct uploader_cbs cbs = {on_ledger, on_record, on_hold, on_taken, on_failed};

static char *tmpdir(void)
{
    char *d = strdup("/tmp/trackd-art-test-XXXXXX");
    assert_non_null(mkdtemp(d));
    return d;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void read_file(const char *path, char *out, size_t n)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t got = fread(out, 1, n - 1, f);
    out[got] = '\0';
    fclose(f);
}

static int count_files(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls -A %s | wc -l", dir);
    FILE *p = popen(cmd, "r");
    int n = -1;
    assert_int_equal(fscanf(p, "%d", &n), 1);
    pclose(p);
    return n;
}

static void rm_rf(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static const char RUN[] = "0123456789abcdef0123456789abcdef";
static const struct peer PEER = {4242, 2, {77, 900}};

static struct artifact *snapshot(struct uploader *up, uv_loop_t *loop, struct seen *s,
                                 const char *file, const char *path, uint64_t seq)
{
    int fd = open(file, O_RDONLY);
    assert_true(fd >= 0);
    struct artifact *a = NULL;
    struct proto_str p = {path, (uint32_t)strlen(path)};
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    struct proto_file_seen fs = {(uint64_t)st.st_size,
                                 (uint64_t)st.st_mtim.tv_sec * 1000000000u + st.st_mtim.tv_nsec};
    struct artifact_origin o = {7, 0xabc, seq, &PEER, "ml:user"};
    int ledgers = s->ledgers, holds = s->holds;
    assert_int_equal(uploader_snapshot(up, &o, RUN, p, &fs, fd, &a), 0);
    assert_int_equal(a->state, ARTIFACT_SNAPSHOT);
    int before = s->snapshots;
    while (s->snapshots == before)
        uv_run(loop, UV_RUN_ONCE);
    assert_int_equal(s->rc, 0);
    assert_ptr_equal(s->last, a);
    /* Spooled: its "pending" row is queued and flush barriers wait for it. */
    assert_int_equal(a->state, ARTIFACT_LEDGER);
    assert_int_equal(s->ledgers, ledgers + 1);
    assert_int_equal(s->holds, holds + 1);
    assert_int_equal(a->serial, s->next_serial);
    return a;
}

/* A module on its own loop over a fresh directory, as the tests below use it: local
 * destinations below <dir>/store and the stores named in allowed_roots are allowed. */
struct fx {
    char *dir;
    uv_loop_t loop;
    struct trackd_config cfg;
    struct uploader up;
    struct seen s;
};

static void set_str(char **field, const char *value)
{
    free(*field);
    *field = strdup(value);
    assert_non_null(*field);
}

static void fx_init_module(struct fx *f)
{
    char msg[256];
    assert_int_equal(uploader_init(&f->up, &f->loop, &f->cfg, NULL, &cbs, &f->s, msg, sizeof msg),
                     0);
}

static void fx_start(struct fx *f, const char *server, const char *allowed)
{
    memset(f, 0, sizeof *f);
    f->dir = tmpdir();
    uv_loop_init(&f->loop);
    assert_int_equal(config_init(&f->cfg), 0);
    char store[300];
    snprintf(store, sizeof store, "%s/store", f->dir);
    set_str(&f->cfg.journal_dir, f->dir);
    set_str(&f->cfg.artifact_root, store);
    set_str(&f->cfg.mlflow_server_url, server);
    set_str(&f->cfg.allowed_roots, allowed);
    fx_init_module(f);
}

static void fx_stop_module(struct fx *f)
{
    uploader_close(&f->up, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static void fx_end(struct fx *f)
{
    fx_stop_module(f);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    rm_rf(f->dir);
    free(f->dir);
    config_free(&f->cfg);
}

static void test_path_rules(void **state)
{
    (void)state;
    const char *ok[] = {"a", "plots/loss.png", "a b/c.d", "deep/er/still/x", ".hidden", "a..b"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        assert_null(uploader_path_problem(ok[i], strlen(ok[i])));
    const char *bad[] = {"", "/abs", "a//b", "a/", "./a", "a/../b", "..", "a/.", "a\nb", "t\tab"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_non_null(uploader_path_problem(bad[i], strlen(bad[i])));
    char longp[1100];
    memset(longp, 'x', sizeof longp);
    assert_string_equal(uploader_path_problem(longp, 1025),
                        "the artifact path is longer than 1024 bytes");
    assert_null(uploader_path_problem(longp, 1024));
}

static void test_snapshot_upload_forget(void **state)
{
    (void)state;
    char src[300], spool[300], dest[400], got[64];
    struct fx f;
    fx_start(&f, "", "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "abc");
    struct artifact *a = snapshot(&f.up, &f.loop, &f.s, src, "x/y.txt", 5);
    unlink(src); /* the spool copy is what counts now */
    assert_string_equal(a->e.sha256,
                        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(a->e.size, 3);
    assert_string_equal(a->e.id, "0000000000000abc-0000000000000005");
    snprintf(spool, sizeof spool, "%s/artifacts", f.dir);
    assert_int_equal(count_files(spool), 2); /* .data and .meta */

    /* The same frame again (a resend) is recognised. */
    int fd = open("/dev/null", O_RDONLY);
    struct artifact *dup = NULL;
    struct proto_file_seen none = {0, 0};
    struct artifact_origin o5 = {7, 0xabc, 5, &PEER, "ml"}, o6 = {7, 0xabc, 6, &PEER, "ml"};
    assert_int_equal(
        uploader_snapshot(&f.up, &o5, RUN, (struct proto_str){"x/y.txt", 7}, &none, fd, &dup),
        -EEXIST);

    /* What needs the disk is the worker's: a descriptor that is not a regular file is refused
     * through the callback, off the loop. */
    struct artifact_origin o7 = {7, 0xabc, 7, &PEER, "ml"};
    fd = open("/dev/null", O_RDONLY);
    assert_int_equal(
        uploader_snapshot(&f.up, &o7, RUN, (struct proto_str){"n.txt", 5}, &none, fd, &dup), 0);
    int waiting = f.s.snapshots;
    while (f.s.snapshots == waiting)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -EBADF);
    assert_true(uploader_refused(f.s.rc));
    assert_string_equal(f.s.msg,
                        "artifact 'n.txt' not taken: the descriptor is not a regular file");
    assert_null(uploader_find(&f.up, "0000000000000abc-0000000000000007"));

    /* A file that is not what the client saw at the call (rewritten since) is not taken. */
    char later[300];
    snprintf(later, sizeof later, "%s/later.txt", f.dir);
    write_file(later, "abcd");
    fd = open(later, O_RDONLY);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    struct proto_file_seen old = {3, (uint64_t)st.st_mtim.tv_sec * 1000000000u - 1};
    struct artifact *stale = NULL;
    assert_int_equal(
        uploader_snapshot(&f.up, &o6, RUN, (struct proto_str){"l.txt", 5}, &old, fd, &stale), 0);
    int before = f.s.snapshots;
    while (f.s.snapshots == before)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -ESTALE);
    assert_non_null(strstr(f.s.msg, "the file changed after log_artifact (at the call: 3 bytes"));
    assert_non_null(strstr(f.s.msg, "when copied: 4 bytes"));
    /* Accepted work that failed: dead-lettered; the client heard it in the answer. */
    assert_int_equal(f.s.failures, 1);
    assert_false(f.s.told);
    assert_null(uploader_find(&f.up, "0000000000000abc-0000000000000006"));
    assert_int_equal(count_files(spool), 2); /* only y.txt's .data and .meta */

    snprintf(dest, sizeof dest, "file://%s/store/run/artifacts/x/y.txt", f.dir);
    uint64_t uploaded = stats.artifacts_uploaded;
    uploader_committed(&f.up, a->e.id, dest, "pending"); /* its row is in the database */
    assert_int_equal(a->state, ARTIFACT_UPLOAD);
    while (f.s.records == 0)
        uv_run(&f.loop, UV_RUN_ONCE);
    /* Uploaded: the barrier is released and the final row queued; the spool copy stays until
     * that row is committed. */
    assert_int_equal(a->state, ARTIFACT_RECORD);
    assert_string_equal(f.s.status, "done");
    assert_int_equal(f.s.unholds, 1);
    assert_int_equal(f.s.failures, 1);
    assert_int_equal(stats.artifacts_uploaded, uploaded + 1);
    read_file(dest + 7, got, sizeof got);
    assert_string_equal(got, "abc");
    char tmpdir_path[400];
    snprintf(tmpdir_path, sizeof tmpdir_path, "%s/store/run/artifacts/x", f.dir);
    assert_int_equal(count_files(tmpdir_path), 1); /* no temporary file left */
    assert_int_equal(count_files(spool), 2);
    /* The same row committed again (a replay) starts nothing. */
    uploader_committed(&f.up, a->e.id, dest, "pending");
    assert_int_equal(a->state, ARTIFACT_RECORD);
    uploader_recorded(&f.up, "0000000000000abc-0000000000000005"); /* the final row is in */
    /* Gone at once; the files go on a worker thread. */
    assert_null(uploader_find(&f.up, "0000000000000abc-0000000000000005"));
    uv_run(&f.loop, UV_RUN_DEFAULT);
    assert_int_equal(count_files(spool), 0);

    fx_end(&f);
}

/* A destination the operator does not allow fails the artifact, tells its client and records
 * "failed"; nothing is written anywhere. */
static void test_destination_not_allowed(void **state)
{
    (void)state;
    char src[300], dest[400];
    struct fx f;
    fx_start(&f, "", "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "abc");
    struct artifact *a = snapshot(&f.up, &f.loop, &f.s, src, "f.txt", 3);
    snprintf(dest, sizeof dest, "%s/elsewhere/f.txt", f.dir);
    uint64_t failed = stats.artifacts_failed;
    uploader_committed(&f.up, a->e.id, dest, "pending");
    assert_int_equal(a->state, ARTIFACT_RECORD);
    assert_string_equal(f.s.status, "failed");
    assert_non_null(strstr(f.s.msg, "is not below an artifact root this agent may write to"));
    assert_int_equal(f.s.failures, 1);
    assert_true(f.s.told);
    assert_non_null(strstr(f.s.failed, "artifact 'f.txt' of run 0123456789abcdef"));
    assert_int_equal(f.s.unholds, 1);
    assert_int_equal(stats.artifacts_failed, failed + 1);
    char elsewhere[400];
    snprintf(elsewhere, sizeof elsewhere, "%s/elsewhere", f.dir);
    assert_int_equal(access(elsewhere, F_OK), -1);

    /* A rejected ledger row (its error went to the client): released and forgotten. */
    write_file(src, "abcd");
    struct artifact *b = snapshot(&f.up, &f.loop, &f.s, src, "g.txt", 4);
    uploader_rejected(&f.up, b->e.id);
    assert_int_equal(f.s.unholds, 2);
    assert_null(uploader_find(&f.up, "0000000000000abc-0000000000000004"));
    fx_end(&f);
}

static void test_recover_after_restart(void **state)
{
    (void)state;
    char src[300], part[400];
    struct fx f;
    fx_start(&f, "", "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "");
    struct artifact *a = snapshot(&f.up, &f.loop, &f.s, src, "empty", 9);
    assert_int_equal(a->e.size, 0);
    char sha[65];
    snprintf(sha, sizeof sha, "%s", a->e.sha256);
    fx_stop_module(&f); /* a "crash": the spool stays */
    /* A snapshot cut short leaves a .part, which recovery deletes. */
    snprintf(part, sizeof part, "%s/artifacts/0000000000000abc-000000000000000a.part", f.dir);
    write_file(part, "partial");

    fx_init_module(&f);
    int ledgers = f.s.ledgers;
    assert_int_equal(uploader_recover(&f.up), 1);
    assert_int_equal(f.s.ledgers, ledgers + 1);
    assert_int_equal(access(part, F_OK), -1);
    struct artifact *back = uploader_find(&f.up, "0000000000000abc-0000000000000009");
    assert_non_null(back);
    assert_int_equal(back->state, ARTIFACT_LEDGER);
    assert_int_equal(back->conn_id, 0);
    assert_string_equal(back->e.sha256, sha);
    assert_string_equal(back->e.path, "empty");
    assert_memory_equal(back->e.run_id, RUN, 32);
    /* The client's identity comes back with it (the ':' of its name made safe). */
    assert_true(back->e.has_peer);
    assert_int_equal(back->e.peer.uid, PEER.uid);
    assert_int_equal(back->e.peer.nshared, 2);
    assert_int_equal(back->e.peer.shared[1], PEER.shared[1]);
    assert_string_equal(back->e.user, "ml?user");
    /* Uploaded before the restart: its row says so, and only the spool copy is left. */
    uploader_committed(&f.up, back->e.id, "ignored", "done");
    assert_null(uploader_find(&f.up, "0000000000000abc-0000000000000009"));
    uv_run(&f.loop, UV_RUN_DEFAULT);
    char spool[300];
    snprintf(spool, sizeof spool, "%s/artifacts", f.dir);
    assert_int_equal(count_files(spool), 0);
    write_file(src, "");

    /* Its frame resent after the restart: not in memory yet (recovery did not run), but in
     * the spool: the worker says so, and nothing is copied again. */
    a = snapshot(&f.up, &f.loop, &f.s, src, "empty", 9);
    fx_stop_module(&f);
    fx_init_module(&f);
    int fd = open(src, O_RDONLY);
    struct artifact *dup = NULL;
    struct proto_file_seen none = {0, 0};
    struct artifact_origin o9 = {7, 0xabc, 9, &PEER, "ml"};
    assert_int_equal(
        uploader_snapshot(&f.up, &o9, RUN, (struct proto_str){"empty", 5}, &none, fd, &dup), 0);
    int waiting = f.s.snapshots;
    while (f.s.snapshots == waiting)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -EEXIST);
    assert_true(uploader_refused(f.s.rc));
    fx_end(&f);
}

/* One uid holds at most UPLOADER_MAX_LIVE_PER_UID artifacts; another uid is not affected. */
static void test_pending_artifacts_are_bounded_per_uid(void **state)
{
    (void)state;
    char src[300];
    struct fx f;
    fx_start(&f, "", "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "x");
    const struct peer other = {4343, 0, {0}};
    struct artifact *a = NULL;
    struct proto_file_seen seen = {0, 0};
    for (uint64_t seq = 1; seq <= UPLOADER_MAX_LIVE_PER_UID + 1; seq++) {
        struct stat st;
        int fd = open(src, O_RDONLY);
        assert_int_equal(fstat(fd, &st), 0);
        seen = (struct proto_file_seen){(uint64_t)st.st_size,
                                        (uint64_t)st.st_mtim.tv_sec * 1000000000u +
                                            (uint64_t)st.st_mtim.tv_nsec};
        struct artifact_origin o = {7, 0xabc, seq, &PEER, "ml"};
        int rc = uploader_snapshot(&f.up, &o, RUN, (struct proto_str){"f", 1}, &seen, fd, &a);
        assert_int_equal(rc, seq <= UPLOADER_MAX_LIVE_PER_UID ? 0 : -EDQUOT);
    }
    int fd = open(src, O_RDONLY);
    struct artifact_origin o = {8, 0xdef, 1, &other, "other"};
    assert_int_equal(uploader_snapshot(&f.up, &o, RUN, (struct proto_str){"f", 1}, &seen, fd, &a),
                     0);
    while (f.s.snapshots < UPLOADER_MAX_LIVE_PER_UID + 1)
        uv_run(&f.loop, UV_RUN_ONCE);
    fx_end(&f);
}

static void upload_fails_with(const char *uri, const char *server, int want_rc, const char *want)
{
    char src[300];
    struct fx f;
    fx_start(&f, server, "gs://bucket,s3://bucket,mlflow-artifacts:/");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "data");
    struct artifact *a = snapshot(&f.up, &f.loop, &f.s, src, "f", 1);
    uploader_committed(&f.up, a->e.id, uri, "pending");
    while (f.s.records == 0)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(a->rc, want_rc);
    assert_string_equal(f.s.status, "failed");
    if (strstr(f.s.msg, want) == NULL)
        fail_msg("message '%s' lacks '%s'", f.s.msg, want);
    assert_true(f.s.told);
    uploader_recorded(&f.up, a->e.id);
    fx_end(&f);
}

static void test_stores_that_cannot_be_used(void **state)
{
    (void)state;
    upload_fails_with("gs://bucket/run/artifacts/f", "", -EPROTONOSUPPORT,
                      "is not supported by this agent");
    upload_fails_with("s3://bucket/run/artifacts/f", "", -EACCES, "no S3 credentials");
    upload_fails_with("mlflow-artifacts:/1/run/artifacts/f", "", -EDESTADDRREQ,
                      "set [artifacts] mlflow_server_url");
    upload_fails_with("file://host/x/f", "", -EPERM, "is not below an artifact root");
}

/* AWS's published example: "GET Object" in the S3 Signature Version 4 documentation. */
/* The pacing rule, without a clock: bytes / (rate per microsecond), less the time spent. */
static void test_pace_wait(void **state)
{
    (void)state;
    const uint64_t mib = 1u << 20, fast = SPOOL_PACE_STREAMING, slow = SPOOL_PACE_BACKLOG;
    /* 16 MiB at once at 16 MiB/s: a second (16 bytes per microsecond). */
    assert_int_equal(spool_pace_wait_us(16 * mib, 0, fast), 16 * mib / 16);
    assert_int_equal(spool_pace_wait_us(16 * mib, 100000, fast), 16 * mib / 16 - 100000);
    /* At 8 MiB/s (8 bytes per microsecond), two seconds. */
    assert_int_equal(spool_pace_wait_us(16 * mib, 0, slow), 16 * mib / 8);
    /* Behind the rate (the disk was slower): no wait. */
    assert_int_equal(spool_pace_wait_us(16 * mib, 1200000, fast), 0);
    assert_int_equal(spool_pace_wait_us(0, 0, fast), 0);
    /* 512 MiB (the bench's W3) take about 33 s while events stream, 67 s while they back up. */
    assert_int_equal(spool_pace_wait_us(512 * mib, 0, fast) / 1000000, 33);
    assert_int_equal(spool_pace_wait_us(512 * mib, 0, slow) / 1000000, 67);
    /* A rate below a byte per microsecond still paces (at one). */
    assert_int_equal(spool_pace_wait_us(1000, 0, 1000), 1000);
}

/* Which pace the event stream asks for. */
static void test_pace_rate(void **state)
{
    (void)state;
    const uint64_t bound = 20u << 20;
    assert_int_equal(spool_pace_rate(0, 0, 0, bound), 0); /* nothing to write: full speed */
    assert_int_equal(spool_pace_rate(5000, 0, 0, bound), SPOOL_PACE_STREAMING);
    assert_int_equal(spool_pace_rate(0, 10, 640, bound), SPOOL_PACE_STREAMING);
    assert_int_equal(spool_pace_rate(5000, 1000, bound / 4 - 1, bound), SPOOL_PACE_STREAMING);
    assert_int_equal(spool_pace_rate(5000, 1000, bound / 4, bound), SPOOL_PACE_BACKLOG);
    assert_int_equal(spool_pace_rate(0, 1000, bound, bound), SPOOL_PACE_BACKLOG);
    /* Events before the first tick: no longer full speed; a slower pace set is kept. */
    static struct spool sp;
    atomic_store(&sp.pace_bytes_per_s, 0);
    spool_pace_events(&sp);
    assert_int_equal(atomic_load(&sp.pace_bytes_per_s), SPOOL_PACE_STREAMING);
    atomic_store(&sp.pace_bytes_per_s, SPOOL_PACE_BACKLOG);
    spool_pace_events(&sp);
    assert_int_equal(atomic_load(&sp.pace_bytes_per_s), SPOOL_PACE_BACKLOG);
}

static void test_sigv4_matches_aws_example(void **state)
{
    (void)state;
    struct s3_config cfg = {0};
    snprintf(cfg.region, sizeof cfg.region, "us-east-1");
    snprintf(cfg.access_key, sizeof cfg.access_key, "AKIAIOSFODNN7EXAMPLE");
    snprintf(cfg.secret_key, sizeof cfg.secret_key, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
    const char *empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    struct s3_header hs[] = {{"host", "examplebucket.s3.amazonaws.com"},
                             {"range", "bytes=0-9"},
                             {"x-amz-content-sha256", empty},
                             {"x-amz-date", "20130524T000000Z"}};
    char auth[512];
    assert_int_equal(s3_authorization(&cfg, "GET", "/test.txt", "", hs, 4, empty,
                                      "20130524T000000Z", auth, sizeof auth),
                     0);
    assert_string_equal(auth, "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/"
                              "us-east-1/s3/aws4_request,SignedHeaders=host;range;"
                              "x-amz-content-sha256;x-amz-date,Signature="
                              "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
    char enc[64];
    assert_int_equal(s3_encode_key("a b/\xc3\xbc+x~.y", enc, sizeof enc), 0);
    assert_string_equal(enc, "a%20b/%C3%BC%2Bx~.y");
    assert_int_equal(s3_encode_key("0123456789", enc, 8), -ENAMETOOLONG);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path_rules),
        cmocka_unit_test(test_snapshot_upload_forget),
        cmocka_unit_test(test_destination_not_allowed),
        cmocka_unit_test(test_recover_after_restart),
        cmocka_unit_test(test_pending_artifacts_are_bounded_per_uid),
        cmocka_unit_test(test_stores_that_cannot_be_used),
        cmocka_unit_test(test_sigv4_matches_aws_example),
        cmocka_unit_test(test_pace_wait),
        cmocka_unit_test(test_pace_rate),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
