/*
 * Unit tests for agent/artifacts.c on a real libuv loop and real files: path rules, the
 * spool copy and its SHA-256, uploads to local paths and file:// URIs, recovery of a
 * spooled artifact after a "restart", and the messages for stores that cannot be used.
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

#include "artifacts.h"
#include "s3.h"

struct seen {
    int snapshots, uploads;
    int rc;
    char msg[512];
    struct artifact *last;
};

static void on_snapshot(void *ctx, struct artifact *a, int rc, const char *msg)
{
    struct seen *s = ctx;
    s->snapshots++;
    s->rc = rc;
    s->last = rc == 0 ? a : NULL;
    snprintf(s->msg, sizeof s->msg, "%s", msg);
}

static void on_upload(void *ctx, struct artifact *a, int rc, const char *msg)
{
    struct seen *s = ctx;
    s->uploads++;
    s->rc = rc;
    s->last = a;
    snprintf(s->msg, sizeof s->msg, "%s", msg);
}

static const struct artifacts_cbs cbs = {on_snapshot, on_upload};

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

static struct artifact *snapshot(struct artifacts *ar, uv_loop_t *loop, struct seen *s,
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
    assert_int_equal(artifacts_snapshot(ar, &o, RUN, p, &fs, fd, &a), 0);
    int before = s->snapshots;
    while (s->snapshots == before)
        uv_run(loop, UV_RUN_ONCE);
    assert_int_equal(s->rc, 0);
    assert_ptr_equal(s->last, a);
    return a;
}

/* A module on its own loop over a fresh directory, as the tests below use it. */
struct fx {
    char *dir;
    uv_loop_t loop;
    struct artifacts ar;
    struct seen s;
};

static void fx_init_module(struct fx *f, const char *server)
{
    char msg[256];
    assert_int_equal(
        artifacts_init(&f->ar, &f->loop, f->dir, server, NULL, &cbs, &f->s, msg, sizeof msg), 0);
}

static void fx_start(struct fx *f, const char *server)
{
    memset(f, 0, sizeof *f);
    f->dir = tmpdir();
    uv_loop_init(&f->loop);
    fx_init_module(f, server);
}

static void fx_stop_module(struct fx *f)
{
    artifacts_close(&f->ar, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static void fx_end(struct fx *f)
{
    fx_stop_module(f);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    rm_rf(f->dir);
    free(f->dir);
}

static void test_path_rules(void **state)
{
    (void)state;
    const char *ok[] = {"a", "plots/loss.png", "a b/c.d", "deep/er/still/x", ".hidden", "a..b"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        assert_null(artifacts_path_problem(ok[i], strlen(ok[i])));
    const char *bad[] = {"", "/abs", "a//b", "a/", "./a", "a/../b", "..", "a/.", "a\nb", "t\tab"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_non_null(artifacts_path_problem(bad[i], strlen(bad[i])));
    char longp[1100];
    memset(longp, 'x', sizeof longp);
    assert_string_equal(artifacts_path_problem(longp, 1025),
                        "the artifact path is longer than 1024 bytes");
    assert_null(artifacts_path_problem(longp, 1024));
}

static void test_snapshot_upload_forget(void **state)
{
    (void)state;
    char src[300], spool[300], dest[400], got[64];
    struct fx f;
    fx_start(&f, "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "abc");
    struct artifact *a = snapshot(&f.ar, &f.loop, &f.s, src, "x/y.txt", 5);
    unlink(src); /* the spool copy is what counts now */
    assert_string_equal(a->sha256,
                        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(a->size, 3);
    assert_string_equal(a->id, "0000000000000abc-0000000000000005");
    snprintf(spool, sizeof spool, "%s/artifacts", f.dir);
    assert_int_equal(count_files(spool), 2); /* .data and .meta */

    /* The same frame again (a resend) is recognised. */
    int fd = open("/dev/null", O_RDONLY);
    struct artifact *dup = NULL;
    struct proto_file_seen none = {0, 0};
    struct artifact_origin o5 = {7, 0xabc, 5, &PEER, "ml"}, o6 = {7, 0xabc, 6, &PEER, "ml"};
    assert_int_equal(
        artifacts_snapshot(&f.ar, &o5, RUN, (struct proto_str){"x/y.txt", 7}, &none, fd, &dup),
        -EEXIST);

    /* What needs the disk is the worker's: a descriptor that is not a regular file is refused
     * through the callback, off the loop. */
    struct artifact_origin o7 = {7, 0xabc, 7, &PEER, "ml"};
    fd = open("/dev/null", O_RDONLY);
    assert_int_equal(
        artifacts_snapshot(&f.ar, &o7, RUN, (struct proto_str){"n.txt", 5}, &none, fd, &dup), 0);
    int waiting = f.s.snapshots;
    while (f.s.snapshots == waiting)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -EBADF);
    assert_true(artifacts_refused(f.s.rc));
    assert_string_equal(f.s.msg, "the descriptor is not a regular file");
    assert_null(artifacts_find(&f.ar, "0000000000000abc-0000000000000007"));

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
        artifacts_snapshot(&f.ar, &o6, RUN, (struct proto_str){"l.txt", 5}, &old, fd, &stale), 0);
    int before = f.s.snapshots;
    while (f.s.snapshots == before)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -ESTALE);
    assert_non_null(strstr(f.s.msg, "the file changed after log_artifact (at the call: 3 bytes"));
    assert_non_null(strstr(f.s.msg, "when copied: 4 bytes"));
    assert_null(artifacts_find(&f.ar, "0000000000000abc-0000000000000006"));
    assert_int_equal(count_files(spool), 2); /* only y.txt's .data and .meta */

    snprintf(dest, sizeof dest, "file://%s/store/run/artifacts/x/y.txt", f.dir);
    char root[300];
    snprintf(root, sizeof root, "%s/store", f.dir);
    assert_int_equal(mkdir(root, 0755), 0);
    artifacts_upload(&f.ar, a, dest, root, dest + 7 + strlen(root) + 1);
    while (f.s.uploads == 0)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, 0);
    read_file(dest + 7, got, sizeof got);
    assert_string_equal(got, "abc");
    char tmpdir_path[400];
    snprintf(tmpdir_path, sizeof tmpdir_path, "%s/store/run/artifacts/x", f.dir);
    assert_int_equal(count_files(tmpdir_path), 1); /* no temporary file left */
    artifacts_forget(&f.ar, a); /* gone at once; the files go on a worker thread */
    assert_null(artifacts_find(&f.ar, "0000000000000abc-0000000000000005"));
    uv_run(&f.loop, UV_RUN_DEFAULT);
    assert_int_equal(count_files(spool), 0);

    fx_end(&f);
}

static int recovered;
static char recovered_sha[65];

static void on_recover(void *ctx, struct artifact *a)
{
    (void)ctx;
    recovered++;
    snprintf(recovered_sha, sizeof recovered_sha, "%s", a->sha256);
}

static void test_recover_after_restart(void **state)
{
    (void)state;
    char src[300], part[400];
    struct fx f;
    fx_start(&f, "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "");
    struct artifact *a = snapshot(&f.ar, &f.loop, &f.s, src, "empty", 9);
    assert_int_equal(a->size, 0);
    char sha[65];
    snprintf(sha, sizeof sha, "%s", a->sha256);
    fx_stop_module(&f); /* a "crash": the spool stays */
    /* A snapshot cut short leaves a .part, which recovery deletes. */
    snprintf(part, sizeof part, "%s/artifacts/0000000000000abc-000000000000000a.part", f.dir);
    write_file(part, "partial");

    fx_init_module(&f, "");
    recovered = 0;
    assert_int_equal(artifacts_recover(&f.ar, on_recover, NULL), 1);
    assert_int_equal(recovered, 1);
    assert_string_equal(recovered_sha, sha);
    assert_int_equal(access(part, F_OK), -1);
    struct artifact *back = artifacts_find(&f.ar, "0000000000000abc-0000000000000009");
    assert_non_null(back);
    assert_string_equal(back->path, "empty");
    assert_memory_equal(back->run_id, RUN, 32);
    /* The client's identity comes back with it (the ':' of its name made safe). */
    assert_true(back->has_peer);
    assert_int_equal(back->peer.uid, PEER.uid);
    assert_int_equal(back->peer.nshared, 2);
    assert_int_equal(back->peer.shared[1], PEER.shared[1]);
    assert_string_equal(back->user, "ml?user");

    /* Its frame resent after the restart: not in memory yet (recovery did not run), but in
     * the spool: the worker says so, and nothing is copied again. */
    fx_stop_module(&f);
    fx_init_module(&f, "");
    int fd = open(src, O_RDONLY);
    struct artifact *dup = NULL;
    struct proto_file_seen none = {0, 0};
    struct artifact_origin o9 = {7, 0xabc, 9, &PEER, "ml"};
    assert_int_equal(
        artifacts_snapshot(&f.ar, &o9, RUN, (struct proto_str){"empty", 5}, &none, fd, &dup), 0);
    int waiting = f.s.snapshots;
    while (f.s.snapshots == waiting)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, -EEXIST);
    assert_true(artifacts_refused(f.s.rc));
    fx_end(&f);
}

/* One uid holds at most ARTIFACTS_MAX_LIVE_PER_UID artifacts; another uid is not affected. */
static void test_pending_artifacts_are_bounded_per_uid(void **state)
{
    (void)state;
    char src[300];
    struct fx f;
    fx_start(&f, "");
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "x");
    const struct peer other = {4343, 0, {0}};
    struct artifact *a = NULL;
    struct proto_file_seen seen = {0, 0};
    for (uint64_t seq = 1; seq <= ARTIFACTS_MAX_LIVE_PER_UID + 1; seq++) {
        struct stat st;
        int fd = open(src, O_RDONLY);
        assert_int_equal(fstat(fd, &st), 0);
        seen = (struct proto_file_seen){(uint64_t)st.st_size,
                                        (uint64_t)st.st_mtim.tv_sec * 1000000000u +
                                            (uint64_t)st.st_mtim.tv_nsec};
        struct artifact_origin o = {7, 0xabc, seq, &PEER, "ml"};
        int rc = artifacts_snapshot(&f.ar, &o, RUN, (struct proto_str){"f", 1}, &seen, fd, &a);
        assert_int_equal(rc, seq <= ARTIFACTS_MAX_LIVE_PER_UID ? 0 : -EDQUOT);
    }
    int fd = open(src, O_RDONLY);
    struct artifact_origin o = {8, 0xdef, 1, &other, "other"};
    assert_int_equal(artifacts_snapshot(&f.ar, &o, RUN, (struct proto_str){"f", 1}, &seen, fd, &a),
                     0);
    while (f.s.snapshots < ARTIFACTS_MAX_LIVE_PER_UID + 1)
        uv_run(&f.loop, UV_RUN_ONCE);
    fx_end(&f);
}

static void upload_fails_with(const char *uri, const char *server, int want_rc, const char *want)
{
    char src[300];
    struct fx f;
    fx_start(&f, server);
    snprintf(src, sizeof src, "%s/in.txt", f.dir);
    write_file(src, "data");
    struct artifact *a = snapshot(&f.ar, &f.loop, &f.s, src, "f", 1);
    artifacts_upload(&f.ar, a, uri, NULL, NULL);
    while (f.s.uploads == 0)
        uv_run(&f.loop, UV_RUN_ONCE);
    assert_int_equal(f.s.rc, want_rc);
    if (strstr(f.s.msg, want) == NULL)
        fail_msg("message '%s' lacks '%s'", f.s.msg, want);
    artifacts_forget(&f.ar, a);
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
    upload_fails_with("file://host/x/f", "", -EPERM, "below no allowed artifact root");
}

/* AWS's published example: "GET Object" in the S3 Signature Version 4 documentation. */
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
        cmocka_unit_test(test_recover_after_restart),
        cmocka_unit_test(test_pending_artifacts_are_bounded_per_uid),
        cmocka_unit_test(test_stores_that_cannot_be_used),
        cmocka_unit_test(test_sigv4_matches_aws_example),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
