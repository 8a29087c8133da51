/*
 * Unit tests for client-shim/src/shim.c against a fake agent: a Unix socket in a
 * temporary directory served by a thread of this process that reassembles frames
 * with proto_reader, records them, answers HELLO with WELCOME and FLUSH with
 * FLUSHED, and can withhold FLUSHED, stop reading, drop the connection or inject
 * ERROR frames. Waits are deadline polls, never bare sleeps.
 */
/* For RTLD_NEXT: the test interposes connect() to count the shim's attempts. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "trackd.h"
#include "trackd_proto.h"

#define R1 "5f0c3e8a9b7d4e21a6c4b2f81d09e7c3"
#define R2 "0a1b2c3d4e5f40718293a4b5c6d7e8f9"
#define T0 INT64_C(1700000000000)
#define WAIT_MS 5000

static char argv0[256];

/* ---- time ---------------------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void pause_1ms(void)
{
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
}

/* Polls cond every millisecond until it holds; fails the test at the deadline. */
#define WAIT_FOR(cond, ms)                                                                         \
    do {                                                                                           \
        int64_t wf_deadline_ = mono_ms() + (ms);                                                   \
        while (!(cond)) {                                                                          \
            if (mono_ms() > wf_deadline_)                                                          \
                fail_msg("line %d: timed out after %d ms waiting for %s", __LINE__, (int)(ms),     \
                         #cond);                                                                   \
            pause_1ms();                                                                           \
        }                                                                                          \
    } while (0)

/* ---- fake agent ------------------------------------------------------------ */

struct frame {
    struct proto_header h;
    uint8_t *body; /* owned; freed by fake_stop */
    int conn;      /* 1 for the first connection accepted, 2 for the next, ... */
};

struct injected {
    uint64_t about;
    uint32_t code;
    char *msg;
};

struct fake {
    char dir[64];
    char path[108];
    bool started;
    int lfd;
    int wake[2];
    pthread_t th;
    pthread_mutex_t mu;
    /* Under mu. */
    int cfd;
    int conns;
    struct frame *frames;
    size_t nframes, capframes;
    bool answer_flush;
    bool ack; /* acknowledge every frame, as the agent does */
    bool reading;
    bool drop;
    bool stop;
    uint32_t max_frame;
    struct injected inject[512];
    size_t ninject;
};

static void fake_wake(struct fake *f)
{
    char x = 1;
    ssize_t r = write(f->wake[1], &x, 1);
    (void)r;
}

static void fake_send(int fd, const struct proto_buf *b)
{
    size_t off = 0;
    while (off < b->len) {
        ssize_t n = send(fd, b->data + off, b->len - off, MSG_NOSIGNAL);
        if (n <= 0)
            return; /* the client went away; nothing to report to */
        off += (size_t)n;
    }
}

/* Records one frame and answers it; called on the agent thread. */
static void fake_on_frame(struct fake *f, int fd, int conn, const struct proto_header *h,
                          const uint8_t *body)
{
    struct frame fr = {*h, malloc(h->body_len ? h->body_len : 1), conn};
    memcpy(fr.body, body, h->body_len);
    pthread_mutex_lock(&f->mu);
    if (f->nframes == f->capframes) {
        f->capframes = f->capframes ? 2 * f->capframes : 64;
        f->frames = realloc(f->frames, f->capframes * sizeof *f->frames);
    }
    f->frames[f->nframes++] = fr;
    bool answer = f->answer_flush, ack = f->ack;
    uint32_t max_frame = f->max_frame;
    pthread_mutex_unlock(&f->mu);

    struct proto_buf out;
    proto_buf_init(&out, 0);
    if (h->kind == PROTO_HELLO)
        proto_encode_welcome(&out, 0, (struct proto_str){"fake", 4}, max_frame, (uint64_t)conn);
    else if (h->kind == PROTO_FLUSH && answer)
        proto_encode_flushed(&out, 0, h->seq, 0);
    if (h->kind != PROTO_HELLO && ack)
        proto_encode_ack(&out, 0, h->seq);
    fake_send(fd, &out);
    proto_buf_free(&out);
}

static void *fake_main(void *arg)
{
    struct fake *f = arg;
    struct proto_reader rd;
    proto_reader_init(&rd, PROTO_MAX_BODY_HARD);
    for (;;) {
        pthread_mutex_lock(&f->mu);
        if (f->stop) {
            pthread_mutex_unlock(&f->mu);
            break;
        }
        if (f->drop && f->cfd >= 0) {
            close(f->cfd);
            f->cfd = -1;
            proto_reader_free(&rd);
            proto_reader_init(&rd, PROTO_MAX_BODY_HARD);
        }
        f->drop = false;
        if (f->cfd >= 0) {
            struct proto_buf out;
            proto_buf_init(&out, 0);
            for (size_t i = 0; i < f->ninject; i++) {
                struct injected *e = &f->inject[i];
                proto_encode_error(&out, 0, e->about, e->code,
                                   (struct proto_str){e->msg, (uint32_t)strlen(e->msg)});
                free(e->msg);
            }
            f->ninject = 0;
            fake_send(f->cfd, &out);
            proto_buf_free(&out);
        }
        int cfd = f->cfd, conn = f->conns;
        bool reading = f->reading;
        pthread_mutex_unlock(&f->mu);

        struct pollfd p[2] = {{f->wake[0], POLLIN, 0}, {-1, POLLIN, 0}};
        if (cfd < 0)
            p[1].fd = f->lfd;
        else if (reading)
            p[1].fd = cfd;
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[0].revents & POLLIN) {
            char buf[64];
            ssize_t r = read(f->wake[0], buf, sizeof buf);
            (void)r;
        }
        if (cfd < 0 && (p[1].revents & POLLIN)) {
            int fd = accept(f->lfd, NULL, NULL);
            if (fd >= 0) {
                pthread_mutex_lock(&f->mu);
                f->cfd = fd;
                f->conns++;
                pthread_mutex_unlock(&f->mu);
            }
        } else if (cfd >= 0 && p[1].fd == cfd && (p[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            uint8_t *dst;
            size_t room;
            ssize_t n = -1;
            if (proto_reader_space(&rd, 65536, &dst, &room) == 0)
                n = read(cfd, dst, room);
            if (n <= 0) {
                pthread_mutex_lock(&f->mu);
                close(f->cfd);
                f->cfd = -1;
                pthread_mutex_unlock(&f->mu);
                proto_reader_free(&rd);
                proto_reader_init(&rd, PROTO_MAX_BODY_HARD);
                continue;
            }
            proto_reader_commit(&rd, (size_t)n);
            struct proto_header h;
            const uint8_t *body;
            while (proto_reader_next(&rd, &h, &body) == 1)
                fake_on_frame(f, cfd, conn, &h, body);
        }
    }
    proto_reader_free(&rd);
    return NULL;
}

/* Creates the temporary directory and socket path; listens only when listen_now. */
static void fake_init(struct fake *f, bool listen_now);

static void fake_listen(struct fake *f)
{
    f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(f->lfd >= 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, f->path, strlen(f->path) + 1);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(f->lfd, 8), 0);
    assert_int_equal(pipe(f->wake), 0);
    fcntl(f->wake[0], F_SETFL, O_NONBLOCK);
    fcntl(f->wake[1], F_SETFL, O_NONBLOCK);
    assert_int_equal(pthread_create(&f->th, NULL, fake_main, f), 0);
    f->started = true;
}

static void fake_init(struct fake *f, bool listen_now)
{
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/trackd-shim-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/agent.sock", f->dir);
    pthread_mutex_init(&f->mu, NULL);
    f->lfd = -1;
    f->cfd = -1;
    f->answer_flush = true;
    f->ack = true;
    f->reading = true;
    f->max_frame = 1u << 20;
    if (listen_now)
        fake_listen(f);
}

static void fake_stop(struct fake *f)
{
    if (f->started) {
        pthread_mutex_lock(&f->mu);
        f->stop = true;
        pthread_mutex_unlock(&f->mu);
        fake_wake(f);
        pthread_join(f->th, NULL);
        close(f->lfd);
        close(f->wake[0]);
        close(f->wake[1]);
        if (f->cfd >= 0)
            close(f->cfd);
        f->started = false;
    }
    for (size_t i = 0; i < f->nframes; i++)
        free(f->frames[i].body);
    free(f->frames);
    for (size_t i = 0; i < f->ninject; i++)
        free(f->inject[i].msg);
    unlink(f->path);
    rmdir(f->dir);
    pthread_mutex_destroy(&f->mu);
}

static void fake_set(struct fake *f, bool *flag, bool value)
{
    pthread_mutex_lock(&f->mu);
    *flag = value;
    pthread_mutex_unlock(&f->mu);
    fake_wake(f);
}

static void fake_inject(struct fake *f, uint64_t about, uint32_t code, const char *msg)
{
    pthread_mutex_lock(&f->mu);
    assert_true(f->ninject < sizeof f->inject / sizeof f->inject[0]);
    f->inject[f->ninject++] = (struct injected){about, code, strdup(msg)};
    pthread_mutex_unlock(&f->mu);
    fake_wake(f);
}

/* Frames of kind (0: any) received on conn (0: any). */
static size_t fake_count(struct fake *f, int kind, int conn)
{
    size_t n = 0;
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nframes; i++)
        if ((kind == 0 || f->frames[i].h.kind == kind) && (conn == 0 || f->frames[i].conn == conn))
            n++;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* A copy of the frame list (bodies stay owned by f); free the result. */
static struct frame *fake_snapshot(struct fake *f, size_t *n)
{
    pthread_mutex_lock(&f->mu);
    *n = f->nframes;
    struct frame *out = calloc(*n + 1, sizeof *out);
    if (*n)
        memcpy(out, f->frames, *n * sizeof *out);
    pthread_mutex_unlock(&f->mu);
    return out;
}

/* Bytes the client wrote that the fake agent has not read. */
static int fake_unread(struct fake *f)
{
    int n = 0;
    pthread_mutex_lock(&f->mu);
    if (f->cfd >= 0 && ioctl(f->cfd, FIONREAD, &n) != 0)
        n = 0;
    pthread_mutex_unlock(&f->mu);
    return n;
}

static void decode(const struct frame *fr, struct proto_msg *m)
{
    int rc = proto_msg_decode(&fr->h, fr->body, m);
    if (rc != 0)
        fail_msg("frame %s seq %llu does not decode: %s", proto_kind_name(fr->h.kind),
                 (unsigned long long)fr->h.seq, proto_strerror(rc));
}

static void assert_str(struct proto_str s, const char *want)
{
    size_t n = strlen(want);
    if (s.len != n || (n && memcmp(s.ptr, want, n) != 0))
        fail_msg("string \"%.*s\" != \"%s\"", (int)s.len, s.ptr ? s.ptr : "", want);
}

/* ---- per-test state ------------------------------------------------------ */

struct ctx {
    struct fake f;
    trackd_client *c;
    trackd_client *c2;
};

static int setup(void **state)
{
    struct ctx *x = calloc(1, sizeof *x);
    assert_non_null(x);
    *state = x;
    return 0;
}

/* Releases whatever the test left behind, even after a failed assertion. */
static int teardown(void **state)
{
    struct ctx *x = *state;
    if (x->f.started) {
        pthread_mutex_lock(&x->f.mu);
        x->f.reading = true;
        x->f.answer_flush = true;
        pthread_mutex_unlock(&x->f.mu);
        fake_wake(&x->f);
    }
    if (x->c)
        trackd_close(x->c, -1);
    if (x->c2)
        trackd_close(x->c2, -1);
    if (x->f.dir[0])
        fake_stop(&x->f);
    free(x);
    return 0;
}

static trackd_client *open_at(const char *path, size_t buffer, int overflow)
{
    struct trackd_options o = {0};
    o.socket_path = path;
    o.buffer_bytes = buffer;
    o.overflow = overflow;
    o.source_name = "src.py";
    trackd_client *c = NULL;
    assert_int_equal(trackd_open(&c, &o), 0);
    assert_non_null(c);
    return c;
}

static struct trackd_counters counters(trackd_client *c)
{
    struct trackd_counters k;
    trackd_get_counters(c, &k);
    return k;
}

/* Opens a client to a running fake agent and waits for its HELLO. */
static trackd_client *open_connected(struct ctx *x)
{
    trackd_client *c = open_at(x->f.path, 0, TRACKD_DROP_NEWEST);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 0) >= 1, WAIT_MS);
    WAIT_FOR(counters(c).connected == 1, WAIT_MS);
    return c;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_hello_and_flush(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    assert_int_equal(n, 2);
    struct proto_msg m;
    assert_int_equal(fr[0].h.kind, PROTO_HELLO);
    assert_int_equal(fr[0].h.seq, 1);
    decode(&fr[0], &m);
    assert_int_equal(m.u.hello.version, PROTO_VERSION);
    assert_int_equal(m.u.hello.pid, (uint32_t)getpid());
    assert_str(m.u.hello.program, argv0);
    assert_str(m.u.hello.source_name, "src.py");
    assert_str(m.u.hello.source_type, "LOCAL");
    assert_str(m.u.hello.client, "libtrackd " TRACKD_VERSION);
    assert_int_equal(fr[1].h.kind, PROTO_FLUSH);
    assert_int_equal(fr[1].h.seq, 2);
    decode(&fr[1], &m);
    free(fr);

    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.connected, 1);
    assert_int_equal(k.reconnects, 0);
    assert_int_equal(k.queued + k.sent + k.dropped + k.errors + k.errors_lost, 0);

    /* Defaults: source_name is the program, source_type as given. The fake agent
     * serves one connection at a time, so the first client goes first. */
    trackd_close(x->c, -1);
    x->c = NULL;
    struct trackd_options o = {0};
    o.socket_path = x->f.path;
    o.source_type = "NOTEBOOK";
    assert_int_equal(trackd_open(&x->c2, &o), 0);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 2) == 1, WAIT_MS);
    fr = fake_snapshot(&x->f, &n);
    assert_int_equal(fr[n - 1].conn, 2);
    decode(&fr[n - 1], &m);
    assert_int_equal(fr[n - 1].h.seq, 1);
    assert_str(m.u.hello.source_name, argv0);
    assert_str(m.u.hello.source_type, "NOTEBOOK");
    free(fr);
}

static double metric_value(int i)
{
    switch (i) {
    case 500: return NAN;
    case 501: return INFINITY;
    case 502: return -0.0;
    case 503: return -INFINITY;
    default: return i * 0.001 - 0.25;
    }
}

static void test_metrics_arrive_in_order(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);
    enum { N = 1000 };
    for (int i = 0; i < N; i++)
        assert_int_equal(
            trackd_log_metric(x->c, R1, i % 3 ? "loss" : "val/acc", metric_value(i), i, T0 + i), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n, got = 0;
    struct frame *fr = fake_snapshot(&x->f, &n);
    uint64_t last_seq = 1;
    for (size_t i = 1; i < n; i++) {
        assert_true(fr[i].h.seq > last_seq);
        last_seq = fr[i].h.seq;
        if (fr[i].h.kind == PROTO_FLUSH) {
            assert_int_equal(i, n - 1);
            break;
        }
        assert_int_equal(fr[i].h.kind, PROTO_METRICS);
        /* The shim grows frames in place: the points header is array32. */
        assert_int_equal(fr[i].body[1 + 2 + PROTO_RUN_ID_LEN], 0xdd);
        struct proto_msg m;
        decode(&fr[i], &m);
        assert_str(m.u.metrics.run_id, R1);
        struct proto_point p;
        while (proto_iter_next_point(&m.u.metrics.points, &p)) {
            assert_true(got < N);
            double want = metric_value((int)got);
            assert_str(p.key, got % 3 ? "loss" : "val/acc");
            if (memcmp(&p.value, &want, sizeof want) != 0)
                fail_msg("point %zu: value %.17g, want %.17g", got, p.value, want);
            assert_int_equal(p.step, got);
            assert_int_equal(p.timestamp, T0 + (int64_t)got);
            got++;
        }
    }
    assert_int_equal(got, N);
    assert_int_equal(fr[n - 1].h.kind, PROTO_FLUSH);
    free(fr);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.queued, N);
    assert_int_equal(k.sent, N);
    assert_int_equal(k.dropped, 0);

    /* TRACKD_NOW: the call's wall-clock time; log_metrics shares one time. */
    int64_t before = wall_ms();
    assert_int_equal(trackd_log_metric(x->c, R2, "now", 1.0, 0, TRACKD_NOW), 0);
    struct trackd_metric ms[3] = {
        {"a", 1.0, 7, TRACKD_NOW}, {"b", 2.0, 8, TRACKD_NOW}, {"c", 3.0, 9, 42}};
    assert_int_equal(trackd_log_metrics(x->c, R2, ms, 3), 0);
    int64_t after = wall_ms();
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    fr = fake_snapshot(&x->f, &n);
    struct proto_point p[5];
    int np = 0;
    size_t first_flush = 0;
    while (fr[first_flush].h.kind != PROTO_FLUSH)
        first_flush++;
    for (size_t i = first_flush + 1; i + 1 < n; i++) {
        struct proto_msg m;
        assert_int_equal(fr[i].h.kind, PROTO_METRICS);
        decode(&fr[i], &m);
        assert_str(m.u.metrics.run_id, R2);
        while (np < 5 && proto_iter_next_point(&m.u.metrics.points, &p[np]))
            np++;
    }
    assert_int_equal(np, 4);
    assert_int_equal(fr[n - 1].h.kind, PROTO_FLUSH);
    for (int i = 0; i < 3; i++) {
        assert_true(p[i].timestamp >= before && p[i].timestamp <= after);
        assert_int_equal(p[i].step, i == 0 ? 0 : 6 + i);
    }
    assert_int_equal(p[1].timestamp, p[2].timestamp);
    assert_int_equal(p[3].timestamp, 42);
    assert_str(p[3].key, "c");
    free(fr);
}

static void test_run_frames(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);

    char ids[100][TRACKD_RUN_ID_SIZE];
    for (int i = 0; i < 100; i++) {
        assert_int_equal(trackd_new_run_id(ids[i]), 0);
        assert_int_equal(strlen(ids[i]), 32);
        for (int j = 0; j < 32; j++)
            assert_non_null(strchr("0123456789abcdef", ids[i][j]));
        assert_int_equal(ids[i][12], '4');
        assert_non_null(strchr("89ab", ids[i][16]));
        for (int k = 0; k < i; k++)
            assert_string_not_equal(ids[i], ids[k]);
    }
    const char *ra = ids[0], *rb = ids[1];

    struct trackd_kv tags[] = {{"team", "vision"}, {"note", "h\xc3\xa9"}};
    struct trackd_kv params[] = {{"lr", "0.1"}, {"bs", "64"}};
    int64_t before = wall_ms();
    assert_int_equal(trackd_start_run(x->c, ra, "exp", "name", T0, tags, 2), 0);
    assert_int_equal(trackd_start_run(x->c, rb, NULL, NULL, TRACKD_NOW, NULL, 0), 0);
    assert_int_equal(trackd_create_experiment(x->c, "other"), 0);
    assert_int_equal(trackd_log_param(x->c, ra, "p", "v"), 0);
    assert_int_equal(trackd_log_params(x->c, ra, params, 2), 0);
    assert_int_equal(trackd_set_tag(x->c, rb, "t", ""), 0);
    assert_int_equal(trackd_set_tags(x->c, rb, tags, 2), 0);
    assert_int_equal(trackd_end_run(x->c, ra, NULL, TRACKD_NOW), 0);
    assert_int_equal(trackd_end_run(x->c, rb, "FAILED", T0 + 5), 0);
    int64_t after = wall_ms();
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    static const int kinds[] = {PROTO_HELLO,   PROTO_START_RUN, PROTO_START_RUN, PROTO_EXPERIMENT,
                                PROTO_PARAMS,  PROTO_PARAMS,    PROTO_TAGS,      PROTO_TAGS,
                                PROTO_END_RUN, PROTO_END_RUN,   PROTO_FLUSH};
    assert_int_equal(n, sizeof kinds / sizeof kinds[0]);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(fr[i].h.kind, kinds[i]);
        assert_int_equal(fr[i].h.seq, i + 1);
    }
    struct proto_msg m;
    struct proto_kv kv;

    decode(&fr[1], &m);
    assert_str(m.u.start_run.run_id, ra);
    assert_str(m.u.start_run.experiment, "exp");
    assert_true(m.u.start_run.has_run_name);
    assert_str(m.u.start_run.run_name, "name");
    assert_int_equal(m.u.start_run.start_time, T0);
    assert_int_equal(m.u.start_run.tags.left, 2);
    assert_true(proto_iter_next_kv(&m.u.start_run.tags, &kv));
    assert_str(kv.key, "team");
    assert_str(kv.value, "vision");
    assert_true(proto_iter_next_kv(&m.u.start_run.tags, &kv));
    assert_str(kv.key, "note");
    assert_str(kv.value, "h\xc3\xa9");

    decode(&fr[2], &m);
    assert_str(m.u.start_run.run_id, rb);
    assert_str(m.u.start_run.experiment, "Default");
    assert_false(m.u.start_run.has_run_name);
    assert_true(m.u.start_run.start_time >= before && m.u.start_run.start_time <= after);
    assert_int_equal(m.u.start_run.tags.left, 0);

    decode(&fr[3], &m);
    assert_str(m.u.experiment.name, "other");

    decode(&fr[4], &m);
    assert_str(m.u.kvs.run_id, ra);
    assert_int_equal(m.u.kvs.kvs.left, 1);
    assert_true(proto_iter_next_kv(&m.u.kvs.kvs, &kv));
    assert_str(kv.key, "p");
    assert_str(kv.value, "v");

    decode(&fr[5], &m);
    assert_int_equal(m.u.kvs.kvs.left, 2);
    assert_true(proto_iter_next_kv(&m.u.kvs.kvs, &kv));
    assert_str(kv.key, "lr");
    assert_str(kv.value, "0.1");
    assert_true(proto_iter_next_kv(&m.u.kvs.kvs, &kv));
    assert_str(kv.key, "bs");
    assert_str(kv.value, "64");

    decode(&fr[6], &m);
    assert_str(m.u.kvs.run_id, rb);
    assert_true(proto_iter_next_kv(&m.u.kvs.kvs, &kv));
    assert_str(kv.key, "t");
    assert_str(kv.value, "");
    decode(&fr[7], &m);
    assert_int_equal(m.u.kvs.kvs.left, 2);

    decode(&fr[8], &m);
    assert_str(m.u.end_run.run_id, ra);
    assert_str(m.u.end_run.status, "FINISHED");
    assert_true(m.u.end_run.end_time >= before && m.u.end_run.end_time <= after);
    decode(&fr[9], &m);
    assert_str(m.u.end_run.run_id, rb);
    assert_str(m.u.end_run.status, "FAILED");
    assert_int_equal(m.u.end_run.end_time, T0 + 5);
    free(fr);

    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.queued, 11);
    assert_int_equal(k.sent, 11);
}

static void test_flush_timeout(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    fake_set(&x->f, &x->f.answer_flush, false);
    x->c = open_connected(x);

    int64_t t = mono_ms();
    assert_int_equal(trackd_flush(x->c, 150), -ETIMEDOUT);
    int64_t took = mono_ms() - t;
    assert_true(took >= 140 && took < 3000);
    WAIT_FOR(fake_count(&x->f, PROTO_FLUSH, 1) == 1, WAIT_MS);

    fake_set(&x->f, &x->f.answer_flush, true);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    assert_int_equal(fake_count(&x->f, PROTO_FLUSH, 1), 2);

    /* No agent at all. */
    char path[160];
    snprintf(path, sizeof path, "%s/nobody.sock", x->f.dir);
    x->c2 = open_at(path, 0, TRACKD_DROP_NEWEST);
    t = mono_ms();
    assert_int_equal(trackd_flush(x->c2, 50), -ETIMEDOUT);
    assert_true(mono_ms() - t >= 45);
}

static void test_drop_newest_without_agent(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->c = open_at(x->f.path, 4096, TRACKD_DROP_NEWEST);
    enum { CALLS = 1000 };
    uint64_t ok = 0, nobufs = 0;
    for (int i = 0; i < CALLS; i++) {
        int rc = trackd_log_metric(x->c, R1, "loss", i, i, T0 + i);
        if (rc == 0)
            ok++;
        else if (rc == -ENOBUFS)
            nobufs++;
        else
            fail_msg("call %d: %d", i, rc);
    }
    assert_true(ok > 0);
    assert_true(nobufs > 0);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.queued, ok);
    assert_int_equal(k.dropped, nobufs);
    assert_int_equal(k.queued + k.dropped, CALLS);
    assert_int_equal(k.sent, 0);
    assert_int_equal(k.connected, 0);
    assert_true(k.buffered_bytes > 0 && k.buffered_bytes <= 4096);
    assert_string_equal(trackd_strerror(-ENOBUFS), "buffer full: event dropped");
}

/* A call carrying several events that is refused drops all of them. */
static void test_drop_counts_events(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->c = open_at(x->f.path, 2048, TRACKD_DROP_NEWEST);
    struct trackd_kv kv[3] = {{"a", "1"}, {"b", "2"}, {"c", "3"}};
    struct trackd_metric ms[4] = {{"m", 1, 1, 1}, {"m", 2, 2, 2}, {"m", 3, 3, 3}, {"m", 4, 4, 4}};
    uint64_t events = 0;
    int refused = 0;
    for (int i = 0; i < 200; i++) {
        int rc = i % 2 ? trackd_log_params(x->c, R1, kv, 3) : trackd_log_metrics(x->c, R1, ms, 4);
        assert_true(rc == 0 || rc == -ENOBUFS);
        refused += rc != 0;
        events += i % 2 ? 3 : 4;
    }
    assert_true(refused > 0);
    struct trackd_counters k = counters(x->c);
    if (k.queued + k.dropped != events)
        fail_msg("%d calls refused: queued %llu + dropped %llu != %llu events logged", refused,
                 (unsigned long long)k.queued, (unsigned long long)k.dropped,
                 (unsigned long long)events);
}

static void test_drop_newest_agent_not_reading(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    fake_set(&x->f, &x->f.reading, false);
    x->c = open_at(x->f.path, 4096, TRACKD_DROP_NEWEST);
    WAIT_FOR(counters(x->c).connected == 1, WAIT_MS);

    uint64_t calls = 0, ok = 0, nobufs = 0;
    while (nobufs < 1000 && calls < 5000000) {
        int rc = trackd_log_metric(x->c, R1, "m", (double)calls, (int64_t)calls, T0);
        calls++;
        if (rc == 0)
            ok++;
        else if (rc == -ENOBUFS)
            nobufs++;
        else
            fail_msg("call %llu: %d", (unsigned long long)calls, rc);
    }
    assert_true(nobufs > 0);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.dropped, nobufs);
    assert_int_equal(k.queued, ok);
    assert_int_equal(k.queued + k.dropped, calls);

    /* Once the agent reads again, every accepted event arrives, in order. */
    fake_set(&x->f, &x->f.reading, true);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    uint64_t points = 0;
    double last = -1;
    for (size_t i = 0; i < n; i++) {
        if (fr[i].h.kind != PROTO_METRICS)
            continue;
        struct proto_msg m;
        decode(&fr[i], &m);
        struct proto_point p;
        while (proto_iter_next_point(&m.u.metrics.points, &p)) {
            assert_true(p.value > last);
            assert_int_equal(p.step, (int64_t)p.value);
            last = p.value;
            points++;
        }
    }
    free(fr);
    assert_int_equal(points, ok);
    k = counters(x->c);
    assert_int_equal(k.sent, ok);
    assert_int_equal(k.dropped, nobufs);
}

struct closer {
    trackd_client *c;
    volatile int done;
};

static void *close_thread(void *arg)
{
    struct closer *cl = arg;
    trackd_close(cl->c, -1);
    __atomic_store_n(&cl->done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* trackd_close must return in bounded time even when the agent stopped reading. */
static void test_close_with_stalled_agent(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);
    fake_set(&x->f, &x->f.reading, false);
    /* About 5 MB: far more than a Unix socket buffers, so the sender is stuck writing. */
    for (int i = 0; i < 200000; i++)
        assert_int_equal(trackd_log_metric(x->c, R1, "loss", i, i, T0 + i), 0);
    /* The sender has started writing into the socket the agent does not drain. */
    WAIT_FOR(fake_unread(&x->f) >= 100000, WAIT_MS);

    struct closer cl = {x->c, 0};
    x->c = NULL;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, close_thread, &cl), 0);
    int64_t deadline = mono_ms() + 2000 /* CLOSE_SEND_MS */ + 1500;
    while (!__atomic_load_n(&cl.done, __ATOMIC_SEQ_CST) && mono_ms() < deadline)
        pause_1ms();
    bool returned = __atomic_load_n(&cl.done, __ATOMIC_SEQ_CST);
    if (!returned)
        fake_set(&x->f, &x->f.reading, true); /* unblock it so the test can clean up */
    pthread_join(th, NULL);
    if (!returned)
        fail_msg("trackd_close(c, -1) still blocked 3.5 s after being called while the agent "
                 "was not reading; it returned only once the agent read again");
}

static void test_errors_from_agent(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);
    char longmsg[2001];
    memset(longmsg, 'x', 2000);
    longmsg[2000] = '\0';
    fake_inject(&x->f, 5, PROTO_ERR_PARAM_CHANGED, "param lr changed");
    fake_inject(&x->f, 7, PROTO_ERR_DATABASE, "no such run");
    fake_inject(&x->f, UINT64_MAX, PROTO_ERR_PROTOCOL, longmsg);
    WAIT_FOR(counters(x->c).errors == 3, WAIT_MS);

    struct trackd_error e;
    assert_int_equal(trackd_next_error(x->c, &e), 1);
    assert_int_equal(e.seq, 5);
    assert_int_equal(e.code, PROTO_ERR_PARAM_CHANGED);
    assert_string_equal(e.message, "param lr changed");
    assert_int_equal(trackd_next_error(x->c, &e), 1);
    assert_int_equal(e.seq, 7);
    assert_int_equal(e.code, PROTO_ERR_DATABASE);
    assert_string_equal(e.message, "no such run");
    assert_int_equal(trackd_next_error(x->c, &e), 1);
    assert_int_equal(e.seq, UINT64_MAX);
    assert_int_equal(e.code, PROTO_ERR_PROTOCOL);
    assert_int_equal(strlen(e.message), sizeof e.message - 1);
    assert_memory_equal(e.message, longmsg, sizeof e.message - 1);
    assert_int_equal(trackd_next_error(x->c, &e), 0);

    /* The queue keeps the oldest 256 and counts what it could not keep. */
    for (int i = 0; i < 300; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "e%d", i);
        fake_inject(&x->f, 1000 + (uint64_t)i, PROTO_ERR_BAD_KEY, msg);
    }
    WAIT_FOR(counters(x->c).errors == 303, WAIT_MS);
    assert_int_equal(counters(x->c).errors_lost, 44);
    for (int i = 0; i < 256; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "e%d", i);
        assert_int_equal(trackd_next_error(x->c, &e), 1);
        assert_int_equal(e.seq, 1000 + (uint64_t)i);
        assert_int_equal(e.code, PROTO_ERR_BAD_KEY);
        assert_string_equal(e.message, msg);
    }
    assert_int_equal(trackd_next_error(x->c, &e), 0);
}

static void test_invalid_args(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    trackd_client *c = NULL;
    assert_int_equal(trackd_open(NULL, NULL), -EINVAL);
    char longpath[200];
    memset(longpath, 'p', sizeof longpath - 1);
    longpath[sizeof longpath - 1] = '\0';
    struct trackd_options o = {0};
    o.socket_path = longpath;
    assert_int_equal(trackd_open(&c, &o), -ENAMETOOLONG);
    assert_null(c);

    x->c = open_at(x->f.path, 0, TRACKD_DROP_NEWEST);
    c = x->c;
    const char *shorter = "5f0c3e8a9b7d4e21a6c4b2f81d09e7c"; /* 31 */
    const char *longer = R1 "0";                             /* 33 */
    const char *bad_ids[] = {NULL, "", shorter, longer};
    struct trackd_kv kv = {"k", "v"}, nokey = {NULL, "v"}, noval = {"k", NULL};
    struct trackd_metric mt = {"m", 1, 1, 1}, nomkey = {NULL, 1, 1, 1};

    for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++) {
        const char *id = bad_ids[i];
        assert_int_equal(trackd_start_run(c, id, "e", "n", 1, NULL, 0), -EINVAL);
        assert_int_equal(trackd_log_metric(c, id, "m", 1, 1, 1), -EINVAL);
        assert_int_equal(trackd_log_metrics(c, id, &mt, 1), -EINVAL);
        assert_int_equal(trackd_log_param(c, id, "k", "v"), -EINVAL);
        assert_int_equal(trackd_log_params(c, id, &kv, 1), -EINVAL);
        assert_int_equal(trackd_set_tag(c, id, "k", "v"), -EINVAL);
        assert_int_equal(trackd_set_tags(c, id, &kv, 1), -EINVAL);
        assert_int_equal(trackd_end_run(c, id, NULL, 1), -EINVAL);
    }
    assert_int_equal(trackd_create_experiment(NULL, "e"), -EINVAL);
    assert_int_equal(trackd_create_experiment(c, NULL), -EINVAL);
    assert_int_equal(trackd_start_run(NULL, R1, "e", "n", 1, NULL, 0), -EINVAL);
    assert_int_equal(trackd_start_run(c, R1, "e", "n", 1, NULL, 2), -EINVAL);
    assert_int_equal(trackd_start_run(c, R1, "e", "n", 1, &nokey, 1), -EINVAL);
    assert_int_equal(trackd_start_run(c, R1, "e", "n", 1, &noval, 1), -EINVAL);
    assert_int_equal(trackd_log_metric(NULL, R1, "m", 1, 1, 1), -EINVAL);
    assert_int_equal(trackd_log_metric(c, R1, NULL, 1, 1, 1), -EINVAL);
    assert_int_equal(trackd_log_metrics(NULL, R1, &mt, 1), -EINVAL);
    assert_int_equal(trackd_log_metrics(c, R1, NULL, 1), -EINVAL);
    assert_int_equal(trackd_log_metrics(c, R1, &nomkey, 1), -EINVAL);
    assert_int_equal(trackd_log_param(NULL, R1, "k", "v"), -EINVAL);
    assert_int_equal(trackd_log_param(c, R1, NULL, "v"), -EINVAL);
    assert_int_equal(trackd_log_param(c, R1, "k", NULL), -EINVAL);
    assert_int_equal(trackd_log_params(c, R1, NULL, 1), -EINVAL);
    assert_int_equal(trackd_log_params(c, R1, &noval, 1), -EINVAL);
    assert_int_equal(trackd_set_tag(NULL, R1, "k", "v"), -EINVAL);
    assert_int_equal(trackd_set_tag(c, R1, NULL, "v"), -EINVAL);
    assert_int_equal(trackd_set_tags(c, R1, NULL, 1), -EINVAL);
    assert_int_equal(trackd_set_tags(c, R1, &nokey, 1), -EINVAL);
    assert_int_equal(trackd_end_run(NULL, R1, NULL, 1), -EINVAL);
    assert_int_equal(trackd_flush(NULL, 0), -EINVAL);

    struct trackd_counters k = counters(c);
    assert_int_equal(k.queued + k.dropped + k.sent, 0);
    assert_int_equal(k.buffered_bytes, 0);

    assert_string_equal(trackd_strerror(0), "success");
    assert_string_equal(trackd_strerror(-EINVAL), "invalid argument");
    assert_string_equal(trackd_strerror(-ETIMEDOUT), "timed out waiting for the agent");
    assert_string_equal(trackd_strerror(-ENOMEM), "out of memory");
    assert_string_equal(trackd_strerror(-ENAMETOOLONG), strerror(ENAMETOOLONG));
    assert_string_equal(trackd_strerror(1), "unknown");
    trackd_close(NULL, 0);
}

/* trackd.h: -EINVAL for "a run id that is not 32 hex characters" (lower-case, per
 * TRACKD_RUN_ID_SIZE). */
static void test_run_id_must_be_hex(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->c = open_at(x->f.path, 0, TRACKD_DROP_NEWEST);
    const char *not_hex = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";
    const char *upper = "5F0C3E8A9B7D4E21A6C4B2F81D09E7C3";
    assert_int_equal(strlen(not_hex), 32);
    int rc1 = trackd_log_metric(x->c, not_hex, "m", 1, 1, 1);
    int rc2 = trackd_end_run(x->c, not_hex, NULL, 1);
    int rc3 = trackd_log_param(x->c, upper, "k", "v");
    if (rc1 != -EINVAL || rc2 != -EINVAL || rc3 != -EINVAL)
        fail_msg("32-character run ids that are not lower-case hex were accepted: "
                 "log_metric(\"%s\") = %d, end_run = %d, log_param(\"%s\") = %d (want %d)",
                 not_hex, rc1, rc2, upper, rc3, -EINVAL);
}

static void test_socket_from_env(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    assert_int_equal(setenv("TRACKD_SOCKET", x->f.path, 1), 0);
    int rc = trackd_open(&x->c, NULL);
    unsetenv("TRACKD_SOCKET");
    assert_int_equal(rc, 0);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 1) == 1, WAIT_MS);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    trackd_close(x->c, -1); /* the fake agent serves one connection at a time */
    x->c = NULL;

    /* Options without a socket_path fall back to the variable too. */
    assert_int_equal(setenv("TRACKD_SOCKET", x->f.path, 1), 0);
    struct trackd_options o = {0};
    o.source_name = "env";
    rc = trackd_open(&x->c2, &o);
    unsetenv("TRACKD_SOCKET");
    assert_int_equal(rc, 0);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 2) == 1, WAIT_MS);
    assert_int_equal(trackd_log_param(x->c2, R1, "k", "v"), 0);
    assert_int_equal(trackd_flush(x->c2, WAIT_MS), 0);
    assert_int_equal(fake_count(&x->f, PROTO_PARAMS, 2), 1);
    assert_int_equal(fake_count(&x->f, PROTO_FLUSH, 0), 2);
}

static void test_reconnect(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    x->c = open_connected(x);
    assert_int_equal(trackd_log_metric(x->c, R1, "a", 1.0, 0, T0), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    assert_int_equal(fake_count(&x->f, 0, 1), 3);

    fake_set(&x->f, &x->f.drop, true);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 2) == 1, WAIT_MS);
    WAIT_FOR(counters(x->c).reconnects == 1 && counters(x->c).connected == 1, WAIT_MS);

    assert_int_equal(trackd_log_metric(x->c, R1, "b", 2.0, 1, T0 + 1), 0);
    assert_int_equal(trackd_set_tag(x->c, R1, "k", "v"), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    assert_int_equal(n, 7);
    static const int kinds[] = {PROTO_HELLO,   PROTO_METRICS, PROTO_FLUSH, PROTO_HELLO,
                                PROTO_METRICS, PROTO_TAGS,    PROTO_FLUSH};
    static const int conns[] = {1, 1, 1, 2, 2, 2, 2};
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(fr[i].h.kind, kinds[i]);
        assert_int_equal(fr[i].conn, conns[i]);
    }
    assert_true(fr[3].h.seq > fr[2].h.seq);
    assert_true(fr[4].h.seq > fr[3].h.seq);
    struct proto_msg m;
    decode(&fr[3], &m);
    assert_int_equal(m.u.hello.pid, (uint32_t)getpid());
    decode(&fr[4], &m);
    struct proto_point p;
    assert_true(proto_iter_next_point(&m.u.metrics.points, &p));
    assert_str(p.key, "b");
    assert_true(p.value == 2.0);
    assert_int_equal(p.timestamp, T0 + 1);
    assert_int_equal(p.step, 1);
    assert_false(proto_iter_next_point(&m.u.metrics.points, &p));
    free(fr);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.sent, 3);
    assert_int_equal(k.dropped, 0);
}

/* Events logged before the agent is up are buffered and sent after HELLO. */
static void test_buffered_until_agent_starts(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->c = open_at(x->f.path, 0, TRACKD_DROP_NEWEST);
    enum { N = 20000 };
    for (int i = 0; i < N; i++)
        assert_int_equal(trackd_log_metric(x->c, R1, "k", i, i, T0 + i), 0);
    assert_int_equal(counters(x->c).connected, 0);
    fake_listen(&x->f);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    assert_true(n >= 2);
    assert_int_equal(fr[0].h.kind, PROTO_HELLO);
    int got = 0;
    size_t frames = 0;
    for (size_t i = 1; i + 1 < n; i++) {
        assert_int_equal(fr[i].h.kind, PROTO_METRICS);
        assert_true(fr[i].h.seq < fr[0].h.seq); /* numbered when logged */
        struct proto_msg m;
        decode(&fr[i], &m);
        assert_true(m.u.metrics.points.left <= 8192);
        struct proto_point p;
        while (proto_iter_next_point(&m.u.metrics.points, &p)) {
            assert_int_equal(p.step, got);
            assert_int_equal(p.timestamp, T0 + got);
            got++;
        }
        frames++;
    }
    assert_int_equal(got, N);
    assert_int_equal(frames, 3); /* 8192 + 8192 + 3616 */
    assert_int_equal(fr[n - 1].h.kind, PROTO_FLUSH);
    free(fr);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.sent, N);
    assert_int_equal(k.reconnects, 0);
}

static void test_block_overflow(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    struct trackd_options o = {0};
    o.socket_path = x->f.path;
    o.buffer_bytes = 2048;
    o.overflow = TRACKD_BLOCK;
    o.block_timeout_ms = 100;
    assert_int_equal(trackd_open(&x->c, &o), 0);
    int ok = 0, rc = 0;
    int64_t t = 0;
    while (ok < 10000) {
        t = mono_ms();
        rc = trackd_log_metric(x->c, R1, "m", 1, 1, 1);
        if (rc != 0)
            break;
        ok++;
    }
    assert_int_equal(rc, -ENOBUFS);
    assert_true(mono_ms() - t >= 95);
    struct trackd_counters k = counters(x->c);
    assert_int_equal(k.queued, ok);
    assert_int_equal(k.dropped, 1);
}

/* WELCOME's max_frame is the largest body the agent accepts; the shim must stay under it. */
static void test_respects_welcome_max_frame(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->f.max_frame = 4096; /* the agent's smallest allowed max_frame_bytes */
    fake_listen(&x->f);
    x->c = open_connected(x);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0); /* WELCOME has been read by now */
    char key[101];
    memset(key, 'k', 100);
    key[100] = '\0';
    for (int i = 0; i < 2000; i++)
        assert_int_equal(trackd_log_metric(x->c, R1, key, i, i, T0), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    uint32_t biggest = 0;
    for (size_t i = 0; i < n; i++)
        if (fr[i].h.body_len > biggest)
            biggest = fr[i].h.body_len;
    free(fr);
    if (biggest > 4096)
        fail_msg("the shim sent a %u-byte body after the agent's WELCOME said max_frame 4096 "
                 "(a real agent closes the connection with a protocol error)",
                 biggest);
}

/* trackd.h: -EMSGSIZE when an event is larger than the agent accepts in one frame. */
static void test_event_larger_than_max_frame(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->f.max_frame = 4096;
    fake_listen(&x->f);
    x->c = open_connected(x);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0); /* WELCOME has been read by now */
    char big[5001];
    memset(big, 'v', 5000);
    big[5000] = '\0';
    int rc_param = trackd_log_param(x->c, R1, "k", big);
    int rc_tag = trackd_set_tag(x->c, R1, "k", big);
    int rc_exp = trackd_create_experiment(x->c, big);
    assert_int_equal(trackd_log_param(x->c, R1, "small", "v"), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    uint32_t biggest = 0;
    for (size_t i = 0; i < n; i++)
        if (fr[i].h.body_len > biggest)
            biggest = fr[i].h.body_len;
    free(fr);
    if (rc_param != -EMSGSIZE || rc_tag != -EMSGSIZE || rc_exp != -EMSGSIZE || biggest > 4096)
        fail_msg("5000-byte values with max_frame 4096: log_param %d, set_tag %d, "
                 "create_experiment %d (want %d); largest body sent %u bytes",
                 rc_param, rc_tag, rc_exp, -EMSGSIZE, biggest);
}

static int connect_calls;

/*
 * Counts the shim's connection attempts; the test executable's definition takes
 * precedence over libc's for the statically linked shim.
 */
int connect(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    static int (*real)(int, __CONST_SOCKADDR_ARG, socklen_t);
    if (real == NULL)
        *(void **)&real = dlsym(RTLD_NEXT, "connect");
    __atomic_add_fetch(&connect_calls, 1, __ATOMIC_SEQ_CST);
    return real(fd, addr, len);
}

/* While the agent is down, a busy producer must not defeat the reconnect backoff. */
static void test_backoff_while_agent_down(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    x->c = open_at(x->f.path, 0, TRACKD_DROP_NEWEST);
    /* Well past the 256 KiB send threshold. */
    for (int i = 0; i < 20000; i++)
        assert_int_equal(trackd_log_metric(x->c, R1, "k", i, i, T0 + i), 0);
    int before = __atomic_load_n(&connect_calls, __ATOMIC_SEQ_CST);
    int64_t t = mono_ms();
    for (int i = 0; i < 20000; i++)
        assert_int_equal(trackd_log_metric(x->c, R1, "k", i, i, T0 + i), 0);
    int64_t took = mono_ms() - t;
    int attempts = __atomic_load_n(&connect_calls, __ATOMIC_SEQ_CST) - before;
    /* Retries are at least 50 ms apart (RECONNECT_MIN_MS), doubling to 2 s. */
    int allowed = 3 + (int)(took / 50);
    if (attempts > allowed)
        fail_msg("%d connect() attempts in %lld ms of logging while the agent was down "
                 "(at most %d expected with the 50 ms minimum backoff)",
                 attempts, (long long)took, allowed);
}

/* A forked child cannot use the parent's client (-ECHILD) and can close it without hanging;
 * the parent keeps logging on its own connection. */
static void test_fork_child_gets_echild(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, false);
    fake_listen(&x->f);
    x->c = open_connected(x);
    assert_int_equal(trackd_log_metric(x->c, R1, "before", 1, 0, T0), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int ok = trackd_log_metric(x->c, R1, "child", 1, 0, T0) == -ECHILD &&
                 trackd_flush(x->c, 10) == -ECHILD && trackd_end_run(x->c, R1, NULL, T0) == -ECHILD;
        trackd_close(x->c, 1000);
        _exit(ok ? 0 : 3);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(trackd_log_metric(x->c, R1, "after", 2, 1, T0), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    assert_int_equal(counters(x->c).lost, 0);
}

/* Frames the agent did not acknowledge are resent on the next connection, same seqs, right
 * after the new hello and before anything newer. */
static void test_unacked_frames_are_resent(void **state)
{
    struct ctx *x = *state;
    fake_init(&x->f, true);
    fake_set(&x->f, &x->f.ack, false);
    x->c = open_connected(x);
    assert_int_equal(trackd_log_metric(x->c, R1, "a", 1.0, 0, T0), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    fake_set(&x->f, &x->f.ack, true);
    fake_set(&x->f, &x->f.drop, true);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 2) == 1, WAIT_MS);
    assert_int_equal(trackd_set_tag(x->c, R1, "k", "v"), 0);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);

    size_t n;
    struct frame *fr = fake_snapshot(&x->f, &n);
    static const int kinds[] = {PROTO_HELLO,   PROTO_METRICS, PROTO_FLUSH, PROTO_HELLO,
                                PROTO_METRICS, PROTO_FLUSH,   PROTO_TAGS,  PROTO_FLUSH};
    assert_int_equal(n, sizeof kinds / sizeof kinds[0]);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(fr[i].h.kind, kinds[i]);
    assert_int_equal(fr[4].h.seq, fr[1].h.seq); /* the same frames again */
    assert_int_equal(fr[5].h.seq, fr[2].h.seq);
    assert_memory_equal(fr[4].body, fr[1].body, fr[1].h.body_len);
    struct proto_msg m;
    decode(&fr[3], &m);
    uint64_t session = m.u.hello.session;
    decode(&fr[0], &m);
    assert_true(session != 0 && m.u.hello.session == session);
    free(fr);
    /* Acknowledged now: nothing is resent on a further reconnect. */
    fake_set(&x->f, &x->f.drop, true);
    WAIT_FOR(fake_count(&x->f, PROTO_HELLO, 3) == 1, WAIT_MS);
    assert_int_equal(trackd_flush(x->c, WAIT_MS), 0);
    fr = fake_snapshot(&x->f, &n);
    assert_int_equal(fr[n - 2].h.kind, PROTO_HELLO);
    assert_int_equal(fr[n - 1].h.kind, PROTO_FLUSH);
    free(fr);
    assert_int_equal(counters(x->c).lost, 0);
}

int main(int argc, char **argv)
{
    (void)argc;
    /* The shim reports argv[0] as read from /proc/self/cmdline. */
    snprintf(argv0, sizeof argv0, "%s", argv[0]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hello_and_flush, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metrics_arrive_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_run_frames, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flush_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_newest_without_agent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_counts_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_newest_agent_not_reading, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_with_stalled_agent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors_from_agent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fork_child_gets_echild, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_args, setup, teardown),
        cmocka_unit_test_setup_teardown(test_run_id_must_be_hex, setup, teardown),
        cmocka_unit_test_setup_teardown(test_socket_from_env, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unacked_frames_are_resent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reconnect, setup, teardown),
        cmocka_unit_test_setup_teardown(test_buffered_until_agent_starts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_block_overflow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_respects_welcome_max_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_event_larger_than_max_frame, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backoff_while_agent_down, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
